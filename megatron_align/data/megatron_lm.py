"""Megatron-LM data-argument files for a resolved condition, so Megatron-LM can train on it directly.

Per segment (one blend for run samples ``[start, end)``):

* ``segNN_<phase>.data-args.txt``: ``WEIGHT PREFIX`` pairs for ``--data-args-path`` (or inline:
  ``--data-path $(cat segNN_<phase>.data-args.txt)``), used with ``--split``, which carves
  validation documents from each prefix as this toolkit does;
* ``segNN_<phase>.per-split.json``: ``{"train": [...], "valid": null, "test": null}`` for
  ``--per-split-data-args-path`` (fill ``valid`` with held-out prefixes if you have them: a
  per-split blend uses whole prefixes, so reusing the training prefixes would validate on
  training documents);
* ``schedule.json``: each segment's sample range, sequence length and files, and the flags to use.

Weights are the exact per-prefix token shares of the segment. Megatron-LM's builder turns them
into sample counts with its own rounding (``ceil(size * weight)`` plus a surplus) and starts every
prefix from its first sample in each run, so with several segments (a final-10% insertion) run
Megatron-LM once per segment, resuming from the previous checkpoint with the next segment's file
and ``--train-samples`` equal to the segment's ``end_sample``; the realized mixture then matches
the targets to Megatron-LM's rounding, not sample-exactly as ``malign train`` does.
"""

from __future__ import annotations

import json
import os

from megatron_align.config import atomic_write_text


def _pairs(segment) -> list[tuple[float, str]]:
    n = segment.num_samples
    return [(d.samples / n, d.prefix) for d in segment.draws if d.samples > 0]


def data_args_text(segment) -> str:
    return "".join(f"{w:.12g} {p}\n" for w, p in _pairs(segment))


def per_split_json(segment) -> dict:
    flat: list[str] = []
    for w, p in _pairs(segment):
        flat += [f"{w:.12g}", p]
    return {"train": flat, "valid": None, "test": None}


def write_megatron_lm_files(schedule, out_dir: str) -> dict:
    """Write the files of every segment of ``schedule`` into ``out_dir``; returns schedule.json's dict."""
    os.makedirs(out_dir, exist_ok=True)
    segs = []
    for seg in schedule.segments:
        stem = f"seg{seg.index:02d}_{seg.phase}"
        args_path = os.path.join(out_dir, stem + ".data-args.txt")
        split_path = os.path.join(out_dir, stem + ".per-split.json")
        atomic_write_text(args_path, data_args_text(seg))
        atomic_write_text(split_path, json.dumps(per_split_json(seg), indent=1))
        segs.append({
            "index": seg.index, "phase": seg.phase, "start_sample": seg.start_sample, "end_sample": seg.end_sample,
            "seq_length": seg.seq_length, "data_args_path": os.path.abspath(args_path),
            "per_split_data_args_path": os.path.abspath(split_path),
            "megatron_lm_flags": (f"--data-args-path {os.path.abspath(args_path)} --split {seg.data.split} "
                                  f"--seq-length {seg.seq_length} --seed {seg.seed} --train-samples {seg.end_sample}"),
            "targets": seg.targets,
        })
    doc = {"condition": schedule.condition, "seed": schedule.seed, "total_samples": schedule.total_samples,
           "segments": segs}
    atomic_write_text(os.path.join(out_dir, "schedule.json"), json.dumps(doc, indent=1))
    return doc
