"""Determinism and resume: sample order is a function of the study and seed only."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
from data_fixtures import EOD, PAD, SEQ, source_of_tokens, write_indexed

from megatron_align.data.config import BlendSource, DataConfig
from megatron_align.data.gpt_datasets import build_pretraining_datasets
from megatron_align.data.study import load_study_data, resolve_condition


def _digest(sample) -> str:
    return hashlib.sha1(np.asarray(sample["tokens"]).tobytes() + np.asarray(sample["labels"]).tobytes()).hexdigest()


def _run_samples(sch, start: int = 0, cache_dir=None, stop: int | None = None):
    """Samples [start, stop) of the run the way a trainer reads them: locate the segment of
    consumed_samples, build that segment's blend, take sample consumed - segment start."""
    out = []
    built = {}
    for k in range(start, stop if stop is not None else sch.total_samples):
        seg, local = sch.locate(k)
        if seg.index not in built:
            built[seg.index] = seg.build(valid_samples=0, cache_dir=cache_dir)[0]
        out.append(_digest(built[seg.index][local]))
    return out


def test_resume_equals_uninterrupted_across_segment_and_phase_boundaries(study_path, tmp_path):
    study = load_study_data(study_path)
    sch = resolve_condition(study, "alignment_upsampled_final10")
    full = _run_samples(sch)
    assert len(full) == sch.total_samples == 11_000
    # resume at several consumed-sample counts, each in a fresh cache (nothing carried over but
    # the study and the seed): before, at and after the 90% boundary and the phase boundary
    for k in (4_321, 9_900, 9_950, 10_000, 10_999):
        cache = str(tmp_path / f"cache_{k}")
        resumed = _run_samples(resolve_condition(load_study_data(study_path), "alignment_upsampled_final10"),
                               start=k, cache_dir=cache, stop=min(k + 300, 11_000))
        assert resumed == full[k:k + 300], k
        shutil.rmtree(cache)


def test_order_depends_on_seed_only(study_path, tmp_path):
    study = load_study_data(study_path)
    sch = resolve_condition(study, "misalignment_upsampled")
    a = _run_samples(sch, stop=2_000)
    # more build threads, another cache directory: same samples
    for seg in sch.segments:
        seg.data.build_threads = 3
    assert _run_samples(sch, cache_dir=str(tmp_path / "other"), stop=2_000) == a
    # another seed: another order
    study.seed = 8
    b = _run_samples(resolve_condition(study, "misalignment_upsampled"), cache_dir=str(tmp_path / "s8"), stop=2_000)
    assert b != a
    assert len(set(a) & set(b)) > 0  # same data, reshuffled


def test_segments_continue_a_shared_prefix_without_repeating(study_path):
    study = load_study_data(study_path)
    # the unfiltered corpus is read 0.9 times over the run, so within it no sample may repeat
    sch = resolve_condition(study, "misalignment_upsampled_final10")
    seg0, seg1 = sch.segments[0], sch.segments[1]
    t0, _ = seg0.build(valid_samples=0)
    t1, _ = seg1.build(valid_samples=0)
    by0 = {ds.dataset_path: ds for ds in t0.datasets}
    for ds in t1.datasets:
        if ds.dataset_path in by0:
            prev = by0[ds.dataset_path]
            # the same Megatron GPTDataset (same cache files), the next slice of it
            assert ds.dataset.unique_description_hash == prev.dataset.unique_description_hash
            assert ds.offset == prev.offset + prev.count
    # no corpus sample of the first blend is read again by the second (restarting each prefix at
    # its first sample, as separately built blends would, repeats them all)
    seen0 = {_digest(t0[i]) for i in range(len(t0))}
    tail = [_digest(t1[i]) for i in range(len(t1)) if source_of_tokens(t1[i]["tokens"])["mis"] == 0]
    assert len(tail) > 50 and not any(d in seen0 for d in tail)
    # a new blend at the phase boundary starts at its own sample 0
    mid = sch.segments[2]
    seg, local = sch.locate(mid.start_sample)
    assert seg is mid and local == 0


def test_plain_data_config_dataset(tmp_path):
    a = write_indexed(str(tmp_path / "a"), [50] * 200, seed=1, low=1, high=1000)
    b = write_indexed(str(tmp_path / "b"), [40] * 100, seed=2, low=1000, high=2000)
    data = DataConfig(blend=[BlendSource(a, 3.0, "a"), BlendSource(b, 1.0, "b")], split="90,10,0")
    data.validate()
    train, valid = build_pretraining_datasets(data, seq_length=SEQ, seed=1, train_samples=400, valid_samples=40,
                                              eod_id=EOD, pad_id=PAD, cache_dir=str(tmp_path / "cache"))
    assert len(train) == 400 and len(valid) == 40
    s = train[0]
    assert set(s) == {"dataset_id", "tokens", "labels", "loss_mask", "position_ids"}
    assert s["tokens"].shape == (SEQ,) and s["labels"].shape == (SEQ,)
    assert np.array_equal(s["tokens"][1:].numpy(), s["labels"][:-1].numpy())
    assert np.array_equal(s["position_ids"].numpy(), np.arange(SEQ))
    ids = np.asarray(train.dataset_index)
    assert np.bincount(ids).tolist() == [300, 100]
    # validation documents are the last 10% of each prefix, disjoint from training documents
    for tds, vds in zip(train.datasets, valid.datasets):
        assert tds.dataset.indices.max() < vds.dataset.indices.min()
    # loss mask: 1 everywhere except pad (EOD is trained on)
    assert float(s["loss_mask"].sum()) == SEQ


def test_process_group_of_one(tmp_path):
    """With torch.distributed initialised the builder's rank-0-builds-then-barrier path runs."""
    import torch.distributed as dist

    a = write_indexed(str(tmp_path / "a"), [50] * 100, seed=1)
    b = write_indexed(str(tmp_path / "b"), [50] * 100, seed=2, low=1000, high=2000)
    data = DataConfig(blend=[BlendSource(a, 1.0), BlendSource(b, 1.0)])
    kw = dict(seq_length=SEQ, seed=3, train_samples=200, valid_samples=0, eod_id=EOD, pad_id=PAD)
    ref, _ = build_pretraining_datasets(data, cache_dir=str(tmp_path / "c0"), **kw)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        got, _ = build_pretraining_datasets(data, cache_dir=str(tmp_path / "c1"), **kw)
    finally:
        dist.destroy_process_group()
    assert [_digest(got[i]) for i in range(200)] == [_digest(ref[i]) for i in range(200)]
    assert sorted(os.listdir(tmp_path / "c0")) == sorted(os.listdir(tmp_path / "c1"))


def test_separate_validation_blend(tmp_path):
    a = write_indexed(str(tmp_path / "a"), [50] * 100, seed=1)
    v = write_indexed(str(tmp_path / "v"), [50] * 30, seed=3, low=3000, high=4000)
    data = DataConfig(blend=[BlendSource(a)], valid_blend=[BlendSource(v, name="heldout")])
    data.validate()
    train, valid = build_pretraining_datasets(data, seq_length=SEQ, seed=1, train_samples=100, valid_samples=10,
                                              eod_id=EOD, pad_id=PAD, cache_dir=str(tmp_path / "cache"))
    # training reads every document of a; validation only the held-out prefix
    assert len(train.datasets[0].dataset.indices) == 100
    assert all(source_of_tokens(valid[i]["tokens"])["mid"] > 0 for i in range(10))
    assert all(source_of_tokens(train[i]["tokens"])["mid"] == 0 for i in range(100))


def test_segment_blend_needs_its_own_sample_count(study_path):
    import pytest

    from megatron_align.config import ConfigError

    sch = resolve_condition(load_study_data(study_path), "alignment_upsampled_final10")
    assert [(a, b) for a, b, _ in sch.as_tuples()] == [(0, 9_900), (9_900, 10_000), (10_000, 11_000)]
    seg = sch.segments[1]
    kw = seg.build_kwargs(valid_samples=0)
    with pytest.raises(ConfigError, match=r"add up to 100 but 150 samples were requested"):
        build_pretraining_datasets(seg.data, **{**kw, "train_samples": 150})
    with pytest.raises(IndexError):
        sch.locate(11_000)
