"""Submit a job graph to Slurm: one sbatch script per stage, chained with ``afterok`` dependencies.

Stages whose stamps are current are not submitted, and their dependents do not wait on them.
Each job writes its own completion stamp when its command succeeds, so a later ``submit`` or
``run`` picks up where this one stopped. A failed job's dependents are cancelled by Slurm
(``--kill-on-invalid-dep=yes``); ``status`` then names the failed stage and its log.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

from megatron_align.config import ConfigError, atomic_write_text

from . import stamps
from .cluster import ClusterProfile
from .graph import JobGraph
from .plan import make_plan, retire_stale_outputs, write_plan_file
from .render import Rendered, render_stage


class SubmitError(RuntimeError):
    pass


def slurm_dir(workdir: Path) -> Path:
    return Path(workdir) / ".slurm"


def submission_path(workdir: Path) -> Path:
    return slurm_dir(workdir) / "submission.json"


def _sbatch_cmd(script: Path, deps: list[str]) -> list[str]:
    cmd = ["sbatch", "--parsable"]
    if deps:
        cmd.append("--dependency=afterok:" + ":".join(deps))
    return cmd + [str(script)]


def submit(graph: JobGraph, workdir: Path, profile: ClusterProfile, *, dry_run: bool = False,
           force: list[str] | None = None, out=print) -> dict:
    """Render and submit; returns the submission record (also written to ``.slurm/submission.json``)."""
    plan = make_plan(graph, workdir, force)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = slurm_dir(plan.workdir) / stamp
    plan_path = run_dir / "plan.json"
    log_dir = Path(profile.log_dir).resolve() if profile.log_dir else plan.workdir / "logs"
    rendered: dict[str, Rendered] = {}
    for name in plan.todo:
        rendered[name] = render_stage(graph[name], study=graph.name, workdir=plan.workdir,
                                      plan_path=plan_path, profile=profile, log_dir=log_dir)
    todo = set(plan.todo)
    deps = {n: [d for d in plan.edges[n] if d in todo] for n in plan.todo}

    if dry_run:
        out(f"# study {graph.name}: {len(plan.todo)} stage(s) to submit, {len(plan.complete)} complete "
            f"(workdir {plan.workdir})")
        out("# dependency graph:")
        for line in graph.to_text({n: "complete" for n in plan.complete}).splitlines():
            out(f"#   {line}")
        out("# resources:")
        for name in plan.todo:
            out(f"#   {name}: {rendered[name].summary}")
        for name in plan.todo:
            script = run_dir / f"{name}.sbatch"
            dep_vars = [f"${{JOB_{d.replace('-', '_').replace('.', '_')}}}" for d in deps[name]]
            out(f"\n# ---- {script}")
            dep = [f"--dependency=afterok:{':'.join(dep_vars)}"] if dep_vars else []
            out("# submit: " + " ".join(["sbatch", "--parsable", *dep, shlex.quote(str(script))]))
            out(rendered[name].script.rstrip("\n"))
        return {"dry_run": True, "todo": plan.todo, "complete": plan.complete,
                "scripts": {n: r.script for n, r in rendered.items()}}

    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    write_plan_file(plan, plan_path)
    retire_stale_outputs(plan, out=out)
    for n in plan.todo:  # a stage about to run again must not look complete from an old stamp
        stamps.clear_stamp(plan.workdir, n)
    record = {"study": graph.name, "workdir": str(plan.workdir), "submitted_at": time.time(),
              "run_dir": str(run_dir), "plan": str(plan_path), "complete": plan.complete, "stages": {}}
    job_ids: dict[str, str] = {}
    try:
        for name in plan.todo:
            script = run_dir / f"{name}.sbatch"
            atomic_write_text(script, rendered[name].script)
            os.chmod(script, 0o755)
            cmd = _sbatch_cmd(script, [job_ids[d] for d in deps[name]])
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=plan.workdir)
            if res.returncode != 0:
                raise SubmitError(f"sbatch failed for stage {name!r}: {res.stderr.strip() or res.stdout.strip()}")
            job_id = res.stdout.strip().split(";")[0]
            job_ids[name] = job_id
            record["stages"][name] = {"job_id": job_id, "script": str(script), "log": rendered[name].log,
                                      "array": rendered[name].array, "after": [job_ids[d] for d in deps[name]]}
            out(f"submitted {name}: job {job_id}" + (f" (afterok:{':'.join(job_ids[d] for d in deps[name])})"
                                                      if deps[name] else ""))
    except BaseException:
        if job_ids:  # never leave half a graph queued
            subprocess.run(["scancel", *job_ids.values()], capture_output=True)
        raise
    atomic_write_text(submission_path(plan.workdir), json.dumps(record, indent=1))
    return record


# ---------------------------------------------------------------- status

_DONE = {"COMPLETED"}
_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _sacct(ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id (``123`` or ``123_4``) -> (state, exit code) from accounting; {} when sacct is absent."""
    if not ids:
        return {}
    try:
        res = subprocess.run(["sacct", "-X", "-n", "-P", "--format=JobID,State,ExitCode", "-j", ",".join(ids)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in res.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 3:
            out[parts[0]] = (parts[1].split()[0], parts[2])
    return out


def _squeue(ids: list[str]) -> dict[str, str]:
    if not ids:
        return {}
    try:
        res = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {a: b for a, b in (ln.split("|", 1) for ln in res.stdout.splitlines() if "|" in ln)}


def _aggregate(states: list[str]) -> str:
    if not states:
        return "UNKNOWN"
    for s in ("RUNNING", "COMPLETING", "REQUEUED"):
        if s in states:
            return "RUNNING"
    for s in states:
        if s in _FAILED:
            return s
    if all(s in _DONE for s in states):
        return "COMPLETED"
    if "CANCELLED" in states:
        return "CANCELLED"
    return "PENDING" if "PENDING" in states else states[0]


def slurm_status(workdir: Path) -> dict | None:
    """Per stage of the last submission: Slurm state, job id and log; None when nothing was submitted."""
    path = submission_path(workdir)
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    ids = [s["job_id"] for s in rec["stages"].values()]
    acct = _sacct(ids)
    queue = _squeue(ids)
    out = {}
    for name, s in rec["stages"].items():
        jid = s["job_id"]
        if s.get("array"):
            keys = [f"{jid}_{i}" for i in range(s["array"])]
            states = [queue.get(k) or acct.get(k, ("", ""))[0] for k in keys]
            # A still-pending array shows as one "123_[0-3]" line in squeue and sacct.
            pend = [v for k, v in queue.items() if k.startswith(f"{jid}_[")]
            pend_acct = [v[0] for k, v in acct.items() if k.startswith(f"{jid}_[")]
            states = [x for x in states if x] + pend + pend_acct
            failed_tasks = [k for k in keys if (queue.get(k) or acct.get(k, ("", ""))[0]) in _FAILED]
            log_job = failed_tasks[0] if failed_tasks else f"{jid}_0"
            log = s["log"].replace("%A", log_job.split("_")[0]).replace("%a", log_job.split("_")[1])
        else:
            st = queue.get(jid) or acct.get(jid, ("", ""))[0]
            states = [st] if st else []
            log = s["log"].replace("%j", jid)
        out[name] = {"job_id": jid, "state": _aggregate(states), "log": log}
    return {"record": rec, "stages": out}


def load_submission(workdir: Path) -> dict:
    p = submission_path(workdir)
    if not p.exists():
        raise ConfigError(f"{p}: nothing was submitted from this workdir yet")
    return json.loads(p.read_text())
