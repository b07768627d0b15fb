"""Per-step metrics to the console (people), JSONL (machines) and Weights & Biases (when enabled)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from megatron_align.config import to_dict

# Dense BF16 peak TFLOP/s per device, for the MFU estimate.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def device_peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return _PEAK_TFLOPS[key]
    return None


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    # Peak RSS of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Rank 0 only writes; other ranks hold a disabled logger."""

    def __init__(self, cfg, *, total_steps: int, enabled: bool, jsonl_path: str | os.PathLike | None,
                 name: str = "train"):
        self.cfg = cfg
        self.total_steps = total_steps
        self.enabled = enabled
        self.name = name
        self._jsonl = None
        self._wandb = None
        self._t0 = time.time()
        self._first_step: int | None = None
        if not enabled:
            return
        if jsonl_path is not None and cfg.logging.jsonl:
            Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(jsonl_path, "a", buffering=1)
        w = cfg.logging.wandb
        if w.enabled and w.mode != "disabled":
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("logging.wandb.enabled needs the wandb package: pip install 'megatron-align[wandb]'") from e
            os.environ.setdefault("WANDB_MODE", w.mode)
            self._wandb = wandb.init(project=w.project, entity=w.entity, name=w.name or cfg.name, group=w.group,
                                     config=to_dict(cfg), dir=cfg.run_dir, mode=w.mode)

    def log(self, step: int, metrics: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._t0 = step - 1, time.time()
        # Full float repr: resumed-vs-uninterrupted comparisons are exact.
        record = {"kind": kind, "step": step, **metrics}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if self.cfg.logging.progress:
            print(self._console_line(step, metrics, kind), file=sys.stdout, flush=True)

    def _console_line(self, step: int, m: dict, kind: str) -> str:
        if kind != "train":
            parts = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()]
            return f"[{self.name}] step {step:>6}/{self.total_steps} {kind}: " + " | ".join(parts)
        done = step - (self._first_step or 0)
        elapsed = time.time() - self._t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"[{self.name}] step {step:>6}/{self.total_steps}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}",
                 f"gnorm {m['grad_norm']:.3f}", f"{m['tokens_per_s']:,.0f} tok/s", f"{m['step_time_s']*1000:.0f} ms/step"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        parts.append(f"mem {m['mem_gb']:.2f} GB")
        parts.append(f"ETA {_fmt_eta(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
