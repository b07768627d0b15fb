"""The CPU redirection is active only while the runtime holds a process group, and undone after."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO

_SCRIPT = """
import torch
from megatron_align.runtime import cpu_compat, distributed as rt
from megatron_align.training.config import ParallelConfig
before = (torch.cuda.current_device, torch.tensor([1.0]).type())
rt.init_process_group(); rt.init_parallel_state(ParallelConfig(), 1)
assert cpu_compat.is_active()
assert torch.zeros(2, device="cuda").device.type == "cpu"          # Megatron's hard-coded CUDA tensors
assert torch.tensor([1.0]).type() == "torch.cuda.FloatTensor"      # Megatron's grad-clipping assertion
rt.destroy()
assert not cpu_compat.is_active()
assert (torch.cuda.current_device, torch.tensor([1.0]).type()) == before
try:
    torch.zeros(2, device="cuda")
except (RuntimeError, AssertionError):
    print("restored")
"""


def test_activation_is_scoped_to_the_process_group():
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().endswith("restored")
