"""Row building: packing keeps every trained token once, isolates samples, and matches padding mode."""

from __future__ import annotations

import numpy as np
import torch

from megatron_align.posttrain.packing import (build_row, document_causal_mask, epoch_order, pack_rows,
                                              packed_seq_params)
from megatron_align.posttrain.tasks import SFTRows


class _Data:
    def __init__(self, exs):
        self.exs = exs

    def lengths(self, stream):
        return np.asarray([len(e[0]) for e in self.exs])

    def __len__(self):
        return len(self.exs)

    def get(self, stream, i):
        return self.exs[i]


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(3, 20))
        ids = rng.integers(1, 50, size=L).astype(np.int32)
        mask = (rng.random(L) < 0.5).astype(np.uint8)
        out.append((ids, mask))
    return out


def _trained(rows):
    got = []
    for r in rows:
        keep = r["loss_mask"] > 0
        got += list(zip(r["tokens"][keep].tolist(), r["labels"][keep].tolist(), r["position_ids"][keep].tolist()))
    return sorted(got)


def test_pack_and_pad_train_the_same_tokens():
    exs = _examples(40)
    data = _Data(exs)
    order = epoch_order(len(exs), 2, seed=3)
    packed = SFTRows(data, order, 24, 0, pack=True)
    padded = SFTRows(data, order, 24, 0, pack=False)
    assert len(padded) == 80 and len(packed) < 60
    p_rows = [packed[i] for i in range(len(packed))]
    assert _trained(p_rows) == _trained([padded[i] for i in range(len(padded))])
    for r in p_rows:
        assert r["used"] <= 24
    # Each epoch visits every example once, in its own order.
    assert sorted(order[:40].tolist()) == list(range(40)) and order[:40].tolist() != order[40:].tolist()


def test_pack_rows_keeps_order_and_capacity():
    positions = np.array([10, 10, 5, 20, 4])
    rows = pack_rows(np.arange(5), positions, 24, pack=True)
    assert [r.tolist() for r in rows] == [[0, 1], [2], [3, 4]]


def test_document_causal_mask_and_cu_seqlens():
    row = build_row([(np.arange(1, 5), np.ones(4, np.uint8)), (np.arange(1, 4), np.ones(3, np.uint8))], 8, 0)
    seg = torch.from_numpy(row["segment_ids"])[None]
    assert seg[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    m = document_causal_mask(seg)[0, 0]
    allowed = [(i, j) for i in range(8) for j in range(8) if not m[i, j]]
    expect = [(i, j) for i in range(3) for j in range(i + 1)] + [(i, j) for i in range(3, 8) for j in range(3, i + 1)]
    assert allowed == expect
    p = packed_seq_params(seg, torch.tensor(row["used"]))
    assert p.qkv_format == "thd" and p.cu_seqlens_q.tolist() == [0, 3, 5, 8] and p.max_seqlen_q == 3
