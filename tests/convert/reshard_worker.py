"""torchrun worker: load checkpoints at other layouts and save them again at that layout.

Args: repeated ``SRC DST TP PP VPP`` (VPP 0 = none). Proves an imported checkpoint loads through
``load_checkpoint`` at TP/PP > 1, and gives the exporter checkpoints saved at those layouts.
"""

from __future__ import annotations

import dataclasses
import sys

from megatron_align.convert.megatron_side import checkpoint_run_config, resolve_step
from megatron_align.runtime import distributed as rt
from megatron_align.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_align.training.config import ParallelConfig, PrecisionConfig
from megatron_align.training.trainer import build_model_chunks


def main(args: list[str]) -> None:
    rt.init_process_group()
    for k in range(0, len(args), 5):
        src, dst, tp, pp, vpp = args[k], args[k + 1], int(args[k + 2]), int(args[k + 3]), int(args[k + 4])
        src = resolve_step(src)
        parallel = ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp or None)
        rt.init_parallel_state(parallel, 1234)
        cfg = checkpoint_run_config(src)
        cfg = dataclasses.replace(cfg, parallel=parallel,
                                  precision=PrecisionConfig(dtype="fp32", transformer_engine="off"))
        chunks = build_model_chunks(cfg, wrap_ddp=False)
        load_checkpoint(src, model_chunks=chunks, load_rng=False)
        save_checkpoint(dst, 0, model_chunks=chunks, optimizer=None, scheduler=None,
                        train_state={"step": 0, "consumed_samples": 0}, config=cfg)
    rt.destroy()


if __name__ == "__main__":
    main(sys.argv[1:])
