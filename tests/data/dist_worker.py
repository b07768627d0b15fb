"""Two-rank gloo run of build_pretraining_datasets (started by test_data_distributed.py)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys


def rank_main(rank: int, world: int, root: str, built_on_rank1: bool, out) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    from megatron_align.data.config import BlendSource, DataConfig
    from megatron_align.data.gpt_datasets import build_pretraining_datasets

    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(root, "store"), world), rank=rank,
                            world_size=world)
    data = DataConfig(blend=[BlendSource(os.path.join(root, "a"), 2.0), BlendSource(os.path.join(root, "b"), 1.0)])
    train, valid = build_pretraining_datasets(
        data, seq_length=32, seed=9, train_samples=300, valid_samples=12, eod_id=0, pad_id=1,
        cache_dir=os.path.join(root, "cache"), is_built_on_rank=lambda: rank == 0 or built_on_rank1)
    digest = None
    if train is not None:
        h = hashlib.sha1()
        for i in range(len(train)):
            h.update(train[i]["tokens"].numpy().tobytes())
        for i in range(len(valid)):
            h.update(valid[i]["tokens"].numpy().tobytes())
        digest = h.hexdigest()
    dist.barrier()
    dist.destroy_process_group()
    out.put((rank, digest))


def run_pair(root: str, built_on_rank1: bool) -> dict:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, 2, root, built_on_rank1, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = dict(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    return {"digests": [res[0], res[1]], "exitcodes": [p.exitcode for p in procs]}


if __name__ == "__main__":
    # import once here: the forked ranks inherit the modules instead of importing them twice
    import torch.distributed  # noqa: F401

    import megatron.core.datasets.gpt_dataset  # noqa: F401
    import megatron_align.data.gpt_datasets  # noqa: F401

    out = {}
    for arg in sys.argv[1:]:  # ROOT:1 (rank 1 builds/loads too) or ROOT:0 (rank 1 is no data rank)
        root, flag = arg.rsplit(":", 1)
        out[arg] = run_pair(root, flag == "1")
    print(json.dumps(out))
