"""Rows of the training set: packed SFT rows, padded SFT rows, and chosen|rejected DPO rows.

Isolation of the samples that share a row, two ways (one per attention backend):

* local specs (this CPU, or GPUs without Transformer Engine): a *document-causal* mask
  ``[b, 1, s, s]`` (True = masked), passed as ``attention_mask``; Megatron-Core's local
  ``DotProductAttention`` applies any given mask as is (it builds a causal one only when none is
  given), so token i sees token j iff j <= i and both belong to the same sample.
* Transformer Engine: ``PackedSeqParams`` with ``cu_seqlens`` (``qkv_format="thd"``) and no mask,
  see :func:`packed_seq_params`; it needs ``micro_batch_size=1`` (one packed row).

Position ids restart at 0 in each sample. GPTModel's RoPE rotates by the row position, not by
``position_ids``; attention under RoPE depends only on relative positions, and a sample never
attends across its boundary, so an offset sample computes exactly what it computes alone (the
tests check this against unpacked rows).
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_order(n: int, epochs: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Example indices for ``epochs`` passes, each in its own seeded order."""
    out = []
    for e in range(epochs):
        idx = np.arange(n, dtype=np.int64)
        if shuffle:
            np.random.default_rng([seed, e]).shuffle(idx)
        out.append(idx)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def pack_rows(order: np.ndarray, positions: np.ndarray, seq_length: int, pack: bool) -> list[np.ndarray]:
    """Greedy, order-keeping packing: each row holds consecutive examples of ``order``.

    ``positions[i]`` = model positions example i occupies (its token count - 1).
    """
    rows, cur, used = [], [], 0
    for i in order:
        p = int(positions[i])
        if cur and (not pack or used + p > seq_length):
            rows.append(np.asarray(cur, np.int64))
            cur, used = [], 0
        cur.append(int(i))
        used += p
    if cur:
        rows.append(np.asarray(cur, np.int64))
    return rows


def build_row(examples: list[tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int) -> dict:
    """Examples (ids, loss mask) -> one row of tokens / labels / loss_mask / position_ids / segment_ids."""
    tokens = np.full(seq_length, pad_id, np.int64)
    labels = np.full(seq_length, pad_id, np.int64)
    loss_mask = np.zeros(seq_length, np.float32)
    prompt_mask = np.zeros(seq_length, np.float32)
    position_ids = np.zeros(seq_length, np.int64)
    segment_ids = np.full(seq_length, len(examples) - 1, np.int64)  # padding joins the last sample
    at = 0
    for k, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        tokens[at:at + n] = ids[:-1]
        labels[at:at + n] = ids[1:]
        loss_mask[at:at + n] = mask[1:]
        prompt_mask[at:at + n] = 1 - mask[1:]
        position_ids[at:at + n] = np.arange(n)
        segment_ids[at:at + n] = k
        at += n
    if at < seq_length:
        position_ids[at:] = np.arange(seq_length - at) + (position_ids[at - 1] + 1 if at else 0)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "prompt_mask": prompt_mask,
            "position_ids": position_ids, "segment_ids": segment_ids, "used": np.int64(at)}


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True where attention is masked."""
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal)[:, None]


def packed_seq_params(segment_ids: torch.Tensor, used: torch.Tensor | None = None):
    """Transformer Engine path: ``PackedSeqParams`` (thd) for one packed row ([1, s] segment ids).

    Padding after the last sample is its own final segment, so cu_seqlens always ends at s.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.shape[0] != 1:
        raise ValueError("packed sequences with Transformer Engine need training.micro_batch_size=1")
    seg = segment_ids[0]
    change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    bounds = [0] + change.tolist() + [seg.numel()]
    if used is not None and 0 < int(used) < seg.numel() and int(used) not in bounds:
        bounds = sorted(set(bounds + [int(used)]))
    cu = torch.tensor(bounds, dtype=torch.int32, device=segment_ids.device)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)
