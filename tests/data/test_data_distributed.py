"""Two ranks with a gloo process group: rank 0 builds, the other rank loads the same samples."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

from data_fixtures import write_indexed

from megatron_align.data.config import BlendSource, DataConfig
from megatron_align.data.gpt_datasets import build_pretraining_datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_ranks_build_once_and_agree(tmp_path):
    roots = [str(tmp_path / "both"), str(tmp_path / "rank0only")]
    for root in roots:
        write_indexed(os.path.join(root, "a"), [45] * 200, seed=1)
        write_indexed(os.path.join(root, "b"), [70] * 80, seed=2, low=1000, high=2000)
    args = [f"{roots[0]}:1", f"{roots[1]}:0"]
    p = subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), *args], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    both, rank0only = res[args[0]], res[args[1]]
    assert both["exitcodes"] == [0, 0] and rank0only["exitcodes"] == [0, 0]
    d0, d1 = both["digests"]
    assert d0 is not None and d0 == d1
    # a rank that is not a data rank (e.g. tensor-parallel rank 1) gets None and keeps step with the barriers
    assert rank0only["digests"][0] == d0 and rank0only["digests"][1] is None
    # the same samples as a build without any process group
    root = roots[0]
    data = DataConfig(blend=[BlendSource(os.path.join(root, "a"), 2.0), BlendSource(os.path.join(root, "b"), 1.0)])
    train, valid = build_pretraining_datasets(data, seq_length=32, seed=9, train_samples=300, valid_samples=12,
                                              eod_id=0, pad_id=1, cache_dir=os.path.join(root, "nopg"))
    h = hashlib.sha1()
    for ds in (train, valid):
        for i in range(len(ds)):
            h.update(ds[i]["tokens"].numpy().tobytes())
    assert h.hexdigest() == d0
