"""Training throughput of a preset under a parallel layout: tokens/s, achieved TFLOP/s and MFU.

Runs ``malign train`` (through torchrun) on random tokens for a few steps and reads its JSONL log.
MFU = model FLOPs per token x tokens/s / (devices x peak); the peak comes from the GPU table in
``megatron_align.training.logger`` or ``--peak-tflops`` (needed on CPU).

    python benchmarks/train_step.py --preset tiny
    python benchmarks/train_step.py --preset pythia-14m --tp 2
    python benchmarks/train_step.py --preset pythia-410m --precision bf16 --seq 2048 --mbs 8 --gbs 64   # one H100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def write_random_dataset(prefix: Path, vocab: int, tokens: int) -> str:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    dtype = np.uint16 if vocab < 65500 else np.int32
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    left = tokens
    while left > 0:
        n = int(min(left, rng.integers(200, 2000)))
        b.add_document(torch.from_numpy(rng.integers(0, vocab - 1, n).astype(np.int64)), [n])
        left -= n
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the figures")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--fp8", default=None, choices=[None, "hybrid"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (required on CPU)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    from megatron_align.models.config import preset

    m = preset(args.preset)
    vocab = m.vocab_size or 50304
    world = args.tp * args.pp * args.dp
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokens = args.gbs * (args.seq + 1) * (args.steps + 2) + 10_000
        prefix = write_random_dataset(tmp / "data", vocab, tokens)
        cfg = {
            "name": f"bench-{args.preset}", "run_dir": str(tmp / "run"),
            "model": {"preset": args.preset, "vocab_size": vocab,
                      "max_position_embeddings": max(m.max_position_embeddings, args.seq)},
            "parallel": {"tensor": args.tp, "pipeline": args.pp},
            "precision": {"dtype": args.precision, "fp8": args.fp8},
            "training": {"train_steps": args.steps, "seq_length": args.seq, "micro_batch_size": args.mbs,
                         "global_batch_size": args.gbs},
            "data": {"blend": [{"prefix": prefix}], "split": "100,0,0"},
            "checkpoint": {"save_at_end": False, "save_on_signal": False},
            "logging": {"progress": False, "peak_tflops": args.peak_tflops},
        }
        (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
                            f"--master-port={port}", "-m", "megatron_align.training.cli", str(tmp / "run.yaml")],
                           cwd=REPO, capture_output=True, text=True)
        wall = time.time() - t0
        if p.returncode != 0:
            print(p.stderr[-4000:], file=sys.stderr)
            return p.returncode
        recs = [json.loads(line) for line in (tmp / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["kind"] == "train"][args.warmup:]
    tps = statistics.median(r["tokens_per_s"] for r in recs)
    step = statistics.median(r["step_time_s"] for r in recs)
    flops = m.flops_per_token(args.seq) if m.vocab_size else preset(args.preset, vocab_size=vocab).flops_per_token(args.seq)
    achieved = flops * tps / 1e12
    mfus = [r["mfu"] for r in recs if r.get("mfu") is not None]
    result = {
        "preset": args.preset, "layout": {"tp": args.tp, "pp": args.pp, "dp": args.dp},
        "precision": args.precision, "fp8": args.fp8, "seq_length": args.seq, "micro_batch_size": args.mbs,
        "global_batch_size": args.gbs, "steps_measured": len(recs),
        "tokens_per_s": round(tps, 1), "step_time_s": round(step, 4),
        "achieved_tflops_total": round(achieved, 4), "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "wall_s_including_startup": round(wall, 1),
        "machine": {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version()},
    }
    try:
        import torch

        if torch.cuda.is_available():
            result["machine"]["gpu"] = torch.cuda.get_device_name()
        import importlib.util

        result["transformer_engine"] = importlib.util.find_spec("transformer_engine") is not None
    except Exception:
        pass
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train_step-{args.preset}-tp{args.tp}pp{args.pp}dp{args.dp}-{args.precision}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
