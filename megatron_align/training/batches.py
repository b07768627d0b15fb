"""Microbatches in Megatron's pretraining order, so a run's data order depends only on the dataset.

Global batch ``g`` holds dataset samples ``[g*GBS, (g+1)*GBS)``; within it, microbatch ``k`` of
data-parallel rank ``r`` holds ``mbs`` consecutive samples starting at
``g*GBS + k*mbs*DP + r*mbs`` (Megatron-LM's ``MegatronPretrainingSampler``). Resuming at consumed
samples ``c`` therefore yields exactly what an uninterrupted run sees next, under any layout.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        vals = [s[key] for s in samples]
        vals = [v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v)) for v in vals]
        out[key] = torch.stack(vals)
    out["tokens"] = out["tokens"].long()
    out["labels"] = out["labels"].long()
    out["position_ids"] = out["position_ids"].long()
    out["loss_mask"] = out["loss_mask"].float()
    return out


def microbatches(dataset, *, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 device: torch.device | None = None, collate_fn=collate) -> Iterator[dict[str, torch.Tensor]]:
    """Microbatches of this DP rank from ``start_sample`` on, until the dataset ends."""
    step = micro_batch_size * dp_size
    idx = start_sample
    n = len(dataset)
    while True:
        first = idx + dp_rank * micro_batch_size
        if first + micro_batch_size > n:
            raise IndexError(f"the dataset has {n} samples but the run asked for sample {first + micro_batch_size - 1}: "
                             "it was built for fewer steps than the run takes")
        batch = collate_fn([dataset[first + j] for j in range(micro_batch_size)])
        if device is not None and device.type != "cpu":
            batch = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                     for k, v in batch.items()}
        yield batch
        idx += step
