"""Render a stage into an sbatch script from the templates in ``slurm/templates/``.

Quoting is the renderer's job, not the template author's: every ``{{ value }}`` goes through
``shlex.quote`` (jinja2's ``finalize``), and only text marked :class:`Raw` — shell the renderer
built itself from quoted pieces, or the profile's own setup lines — is written as is. A run name
like ``x"; rm -rf / #`` therefore arrives in the script as one inert word.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jinja2

from megatron_align.config import ConfigError

from .cluster import ClusterProfile
from .graph import EXIT_REQUEUE, TASK_ID, Stage, torchrun_args

TEMPLATE_DIR = Path(__file__).parent / "templates"


class Raw(str):
    """Text that is already valid shell and must not be quoted again."""


def _finalize(value):
    if value is None:
        return ""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    s = str(value)
    if "\n" in s or "\r" in s or "\0" in s:
        raise ConfigError(f"value {s!r} contains a line break or NUL; it cannot go into a job script")
    return shlex.quote(s)


@functools.lru_cache(maxsize=8)
def _env(template_dir: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(template_dir), str(TEMPLATE_DIR)]),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, finalize=_finalize, autoescape=False)
    env.filters["raw"] = lambda v: Raw(v)
    return env


def shell_word(token: str | Raw) -> str:
    """One argv token as shell; ``{task_id}`` becomes the array index, everything else is literal."""
    if isinstance(token, Raw):
        return str(token)
    if "\n" in token or "\0" in token:
        raise ConfigError(f"command argument {token!r} contains a line break or NUL")
    if TASK_ID not in token:
        return shlex.quote(token)
    parts = token.split(TASK_ID)
    return '"${MALIGN_TASK_ID}"'.join(shlex.quote(p) if p else "" for p in parts) or '"${MALIGN_TASK_ID}"'


def shell_join(tokens) -> str:
    return " ".join(shell_word(t) for t in tokens)


def job_name(study: str, stage: str) -> str:
    # Job names show in squeue and land on an #SBATCH line: keep them to plainly safe characters.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{study}.{stage}")[:120]


@dataclass
class Rendered:
    stage: str
    script: str
    log: str          # the --output pattern (%j / %A_%a filled in by Slurm)
    nodes: int
    array: int
    summary: str = ""


def stage_command(stage: Stage, profile: ClusterProfile, nodes: int, nproc: int) -> list:
    argv = stage.argv(python=profile.python)
    if nproc > 1 or nodes > 1:
        if nodes > 1:
            return torchrun_args(argv, profile.python, nproc, nnodes=nodes,
                                 rdzv_endpoint=Raw('"${MASTER_ADDR}:${MASTER_PORT}"'),
                                 rdzv_id=Raw('"${SLURM_JOB_ID}"'))
        return torchrun_args(argv, profile.python, nproc)
    return argv


def render_stage(stage: Stage, *, study: str, workdir: Path, plan_path: Path, profile: ClusterProfile,
                 log_dir: Path) -> Rendered:
    rc = profile.resource(stage.resources)
    nodes = stage.nodes or rc.nodes
    nproc = stage.nproc or max(1, rc.gpus_per_node)
    cmd = stage_command(stage, profile, nodes, nproc)
    srun_extra = []
    if profile.container is not None:
        c = profile.container
        srun_extra.append(f"--container-image={shlex.quote(c.image)}")
        if c.mounts:
            srun_extra.append(f"--container-mounts={shlex.quote(','.join(c.mounts))}")
        srun_extra.append(f"--container-workdir={shlex.quote(c.workdir or str(workdir))}")
        names = list(profile.env_passthrough) + list(profile.env) + list(stage.env) + [
            "MALIGN_STAGE", "MALIGN_WORKDIR"] + (["MALIGN_TASK_ID", "MALIGN_NUM_TASKS"] if stage.array else []) + (
            ["MASTER_ADDR", "MASTER_PORT"] if nodes > 1 else [])
        srun_extra.append(f"--container-env={','.join(dict.fromkeys(names))}")
    pattern = "%A_%a" if stage.array else "%j"
    log = str(log_dir / f"{stage.name}.{pattern}.log")
    env = list(profile.env.items()) + list(stage.env.items())
    ctx = dict(
        stage=stage.name, study=study, job_name=job_name(study, stage.name),
        account=profile.account, partition=rc.partition or profile.partition, qos=rc.qos or profile.qos,
        time=stage.time or rc.time, nodes=nodes, cpus_per_task=rc.cpus_per_task,
        gpus_per_node=rc.gpus_per_node, mem=rc.mem, exclusive=rc.exclusive, array=stage.array,
        log=log, requeue=stage.requeue, signal_seconds=profile.signal_seconds,
        sbatch_extra=[Raw(o) for o in rc.sbatch], setup=profile.setup, env=env,
        workdir=str(workdir), distributed=nodes > 1, master_port=profile.master_port,
        srun_extra=Raw("".join(" " + x for x in srun_extra)), command=Raw(shell_join(cmd)),
        exit_requeue=EXIT_REQUEUE, max_requeues=profile.max_requeues, python=profile.python,
        plan=str(plan_path),
    )
    tdir = Path(profile.template_dir) if profile.template_dir else TEMPLATE_DIR
    try:
        script = _env(tdir).get_template("stage.sbatch").render(**ctx)
    except jinja2.TemplateError as e:
        raise ConfigError(f"template {tdir / 'stage.sbatch'}: {e}") from e
    summary = (f"{nodes} node(s) x {rc.gpus_per_node} GPU(s), "
               + (f"torchrun {nproc} per node" if nproc > 1 or nodes > 1 else "1 process")
               + (f", array of {stage.array}" if stage.array else "") + f", {ctx['time']}")
    return Rendered(stage=stage.name, script=script, log=log, nodes=nodes, array=stage.array, summary=summary)
