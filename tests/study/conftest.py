"""Reuse the local-Slurm-cluster fixtures of tests/slurm (loaded by path: test dirs are not packages)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_slurm_fixtures", Path(__file__).parents[1] / "slurm" / "conftest.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
slurm_cluster = _mod.slurm_cluster
wait_for_jobs = _mod.wait_for_jobs
submission = _mod.submission
