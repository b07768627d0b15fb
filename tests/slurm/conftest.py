"""The local Slurm cluster for the tests marked ``slurm`` (started by scripts/slurm_local.sh)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _unreachable() -> str | None:
    if not shutil.which("sbatch"):
        return "no Slurm client (sbatch) on this machine"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm does not answer: {e}"
    if "UP" not in ping:
        return f"slurmctld is not up: {ping.strip() or 'no answer'}"
    if not any(s and not any(b in s for b in ("down", "drain", "fail", "unk")) for s in nodes.split()):
        return f"no usable Slurm node (states: {nodes.split()})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Cluster profile data for the local cluster; starts it when this machine can, else skips."""
    reason = _unreachable()
    if reason and os.geteuid() == 0 and os.environ.get("MALIGN_SLURM_AUTOSTART", "1") == "1":
        res = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_local.sh"), "start"], capture_output=True,
                             text=True, timeout=900, stdin=subprocess.DEVNULL)
        reason = _unreachable()
        if reason:
            reason += f" (scripts/slurm_local.sh start said: {res.stderr.strip().splitlines()[-1:]})"
    if reason:
        pytest.skip(f"no local Slurm cluster can be reached: {reason}")
    part = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.split()
    default = next((p.rstrip("*") for p in part if p.endswith("*")), part[0].rstrip("*"))
    return {
        "partition": default,
        "python": sys.executable,
        "resources": {
            "cpu": {"cpus_per_task": 1, "mem": "300M", "time": "00:05:00"},
            "gpu-train": {"gpus_per_node": 0, "cpus_per_task": 2, "mem": "2G", "time": "00:05:00",
                          "exclusive": False},
        },
    }


def _wait_for_jobs(job_ids, timeout=180.0):
    """Block until none of ``job_ids`` is queued and accounting has a final state for each."""
    ids = ",".join(str(j) for j in job_ids)
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-r", "-j", ids, "-o", "%i %T"], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"jobs {ids} still queued after {timeout}s:\n{q.stdout}")
    while time.time() < deadline:  # sacct records land a moment after a job ends
        a = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ids, "--format=JobID,State"], capture_output=True,
                           text=True).stdout
        states = [ln.split("|")[1] for ln in a.splitlines() if "|" in ln]
        if states and not any(s in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") for s in states):
            roots = {ln.split("|")[0].split("_")[0] for ln in a.splitlines()}
            if roots >= {str(j) for j in job_ids}:
                return
        time.sleep(0.5)
    raise AssertionError(f"no final accounting records for {ids} after {timeout}s")


@pytest.fixture
def wait_for_jobs():
    return _wait_for_jobs


@pytest.fixture
def submission():
    return lambda workdir: json.loads((Path(workdir) / ".slurm" / "submission.json").read_text())
