"""``malign data filter``: remove AI-discourse documents with the blocklist (PAPER.md, "The filtered condition").

Pipeline: read JSONL / JSONL.gz / JSONL.zst / Parquet -> blocklist (instant terms; entity AND
negative terms, optionally within N words) -> optional Hugging Face classifier on the flagged
documents -> ``retained`` and ``removed`` corpora in the input's format (removed documents carry
the terms that fired under ``--hits-key``) -> optional budget-preserving resampling of the
retained set -> ``filter_report.json`` + ``filter_report.md``.

JSONL is processed in blocks of whole lines by a pool of worker processes; retained JSONL lines are
written back byte for byte.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_tools.filter_terms import DEFAULT_BLOCKLIST_DIR, Matcher, load_blocklist  # noqa: F401
from data_tools.readers import (InputError, expand_inputs, input_format, iter_chunks, iter_parquet_batches,
                                parse_lines, parse_parquet_batch)
from data_tools.writers import CorpusWriter, with_format_suffix
from megatron_align.config import ConfigError, atomic_write_text, from_dict, to_dict

CHUNK_BYTES = 4 << 20


@dataclass
class FilterConfig:
    blocklist: str | None = None  # directory of category YAMLs; None = the shipped lists
    window: int | None = None  # two-stage terms must be within this many words; None = anywhere
    text_key: str = "text"
    on_error: str = "raise"  # or "skip"
    workers: int = 1
    tokenizer: str | None = None  # count "tokens" with this tokenizer; None = whitespace words
    resample: str | None = None  # None, "docs" or "tokens": refill the retained set to the input's count
    seed: int = 1234
    classifier: str | None = None  # HF sequence-classification model dir; None = blocklist only
    classifier_threshold: float = 0.5
    classifier_label: str | None = None  # label meaning "AI discourse"; default: index 1 of 2
    classifier_batch_size: int = 16
    classifier_max_length: int = 512
    format: str | None = None  # output format; None = the first input's
    hits_key: str = "blocklist_hits"
    progress: bool = True

    def validate(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error: {self.on_error!r} is not 'raise' or 'skip'")
        if self.resample not in (None, "docs", "tokens"):
            raise ConfigError(f"resample: {self.resample!r} is not one of docs, tokens (or leave it unset)")
        if self.window is not None and self.window < 0:
            raise ConfigError(f"window: must be >= 0 words, got {self.window}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if self.format not in (None, "jsonl", "jsonl.gz", "jsonl.zst", "parquet"):
            raise ConfigError(f"format: {self.format!r} is not one of jsonl, jsonl.gz, jsonl.zst, parquet")
        if not 0.0 <= self.classifier_threshold <= 1.0:
            raise ConfigError(f"classifier_threshold: must be in [0, 1], got {self.classifier_threshold}")


# --------------------------------------------------------------------------------------------
# Worker side

_W: dict[str, Any] = {}


def _init_worker(blocklist: Any, window: int | None, tokenizer: Any, text_key: str, on_error: str) -> None:
    _W["matcher"] = Matcher(blocklist, window=window)
    if tokenizer is not None:
        from data_tools.tokenizers import load_tokenizer

        _W["tok"] = load_tokenizer(tokenizer)
    else:
        _W["tok"] = None
    _W["text_key"] = text_key
    _W["on_error"] = on_error


# Words = runs of non-whitespace bytes (ASCII whitespace, as bytes.split()), counted as the
# whitespace -> non-whitespace transitions: numpy does it 2-3x faster than len(text.split()).
_WS = bytes(1 if c in b" \t\n\r\x0b\x0c" else 0 for c in range(256))


def count_words(text: str, encoded: bytes | None = None) -> int:
    if encoded is None:
        encoded = text.encode("utf-8", "replace")
    if not encoded:
        return 0
    a = np.frombuffer(encoded.translate(_WS), np.uint8)
    return int(np.count_nonzero(a[1:] < a[:-1])) + int(a[0] == 0)


def _judge(items: Iterator[tuple[int, str]]) -> list[tuple[int, dict | None, int]]:
    m: Matcher = _W["matcher"]
    tok = _W["tok"]
    out = []
    for line, text in items:
        enc = text.encode("utf-8", "replace")  # shared by the prefilter and the word count
        out.append((line, m.decide(text, enc), count_words(text, enc) if tok is None else len(tok.encode(text))))
    return out


def _work_jsonl(task: tuple[str, int, bytes, int, bool]) -> tuple[list, dict, int, Any]:
    """A block of lines -> [(line, decision, n_tokens)], reader stats, block bytes, and (if asked)
    the retained lines joined into one blob plus the removed lines by line number, so the parent
    only writes (per-line work stays in the workers, which is what lets workers scale)."""
    path, first_line, data, offset, split_here = task
    from data_tools.readers import Chunk

    stats: dict = {}
    recs = parse_lines(Chunk(path, first_line, data, offset), text_key=_W["text_key"], on_error=_W["on_error"],
                       stats=stats)
    results = _judge((r.line, r.text) for r in recs)
    extra = None
    if split_here:
        lines = data.split(b"\n")
        kept = [lines[ln - first_line] for ln, d, _n in results if d is None]
        removed = {ln: lines[ln - first_line] for ln, d, _n in results if d is not None}
        extra = (b"\n".join(kept) + b"\n" if kept else b"", len(kept), removed)
    return results, stats, len(data), extra


def _work_texts(task: tuple[list[tuple[int, str]], int]) -> tuple[list, dict, int]:
    items, nbytes = task
    return _judge(items), {}, nbytes


# --------------------------------------------------------------------------------------------
# Driver


def _merge_skips(total: dict, stats: dict) -> None:
    for k, v in stats.get("skipped", {}).items():
        total[k] = total.get(k, 0) + v


class _Pool:
    """imap over worker processes, or in-process when workers == 1 (simpler to debug and profile)."""

    def __init__(self, workers: int, initargs: tuple):
        self.workers = workers
        self.pool = None
        if workers > 1:
            self.pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, initializer=_init_worker, initargs=initargs)
        else:
            _init_worker(*initargs)

    def imap(self, fn, tasks):
        """Ordered results; at most 2 tasks per worker in flight, so memory stays bounded
        (Pool.imap would drain the whole input into its queue)."""
        if self.pool is None:
            yield from map(fn, tasks)
            return
        from collections import deque

        inflight: deque = deque()
        for task in tasks:
            inflight.append(self.pool.apply_async(fn, (task,)))
            if len(inflight) >= 2 * self.workers:
                yield inflight.popleft().get()
        while inflight:
            yield inflight.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()

    def terminate(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _resolve_format(paths: list[Path], fmt: str | None) -> str:
    if fmt:
        return fmt
    fmts = {input_format(p) for p in paths}
    if len(fmts) > 1:
        raise ConfigError(f"inputs mix formats ({', '.join(sorted(fmts))}); pass --format to choose the output format")
    return fmts.pop()


def filter_corpus(inputs: list[str] | str, out_dir: str | os.PathLike, cfg: FilterConfig | dict | None = None,
                  **overrides: Any) -> dict:
    """Filter ``inputs`` into ``out_dir``; returns the report (also written as JSON and Markdown).

    ``cfg`` is a :class:`FilterConfig` or a mapping of its fields; keyword arguments override it.
    """
    if cfg is None:
        cfg = FilterConfig()
    elif isinstance(cfg, dict):
        cfg = from_dict(FilterConfig, cfg)
    if overrides:
        cfg = from_dict(FilterConfig, {**to_dict(cfg), **overrides})
    cfg.validate()
    paths = expand_inputs(inputs)
    fmt = _resolve_format(paths, cfg.format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocklist = load_blocklist(cfg.blocklist)  # load once here so list errors surface before workers start
    classifier = None
    if cfg.classifier:
        from data_tools.filter_classifier import SequenceClassifier

        classifier = SequenceClassifier(cfg.classifier, threshold=cfg.classifier_threshold, label=cfg.classifier_label,
                                        batch_size=cfg.classifier_batch_size, max_length=cfg.classifier_max_length)
    tok_spec = None
    if cfg.tokenizer:
        from data_tools.tokenizers import load_tokenizer

        tok_spec = load_tokenizer(cfg.tokenizer).spec()

    retained_path = with_format_suffix(out_dir / "retained", fmt)
    removed_path = with_format_suffix(out_dir / "removed", fmt)
    first_pass_path = with_format_suffix(out_dir / ".retained_before_resample", fmt) if cfg.resample else retained_path

    t0 = time.perf_counter()
    counts = Counter()
    skipped: dict[str, int] = {}
    rules = Counter()
    cat_docs = Counter()
    cat_tokens = Counter()
    term_docs = Counter()
    term_cats: dict[str, list[str]] = {}
    retained_tokens: list[int] = []  # per retained document, for token-budget resampling
    clf_stats = Counter()
    in_bytes = 0

    pending_clf: list[tuple[Any, dict, int, str]] = []  # (writer payload, decision, ntok, text)

    def finish_removed(decision: dict, ntok: int) -> None:
        counts["removed_docs"] += 1
        counts["removed_tokens"] += ntok
        rules[decision["rule"]] += 1
        for c in decision["categories"]:
            cat_docs[c] += 1
            cat_tokens[c] += ntok
        for t in decision["terms"]:
            term_docs[t] += 1
            term_cats.setdefault(t, blocklist.term_categories.get(t, []))

    initargs = (blocklist, cfg.window, tok_spec, cfg.text_key, cfg.on_error)
    pool = _Pool(cfg.workers, initargs)
    total_size = sum(p.stat().st_size for p in paths)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_size, unit="B", unit_scale=True, desc="filter", file=sys.stderr,
                   dynamic_ncols=True)
    retained_w = CorpusWriter(first_pass_path, fmt)
    removed_w = CorpusWriter(removed_path, fmt)
    try:
        kept_lines: list[bytes] = []  # retained JSONL lines of the current block, written in one go

        def write_kept(payload: Any, ntok: int) -> None:
            if isinstance(payload, bytes):
                kept_lines.append(payload)
            else:
                retained_w.write(payload)
            counts["retained_docs"] += 1
            counts["retained_tokens"] += ntok
            retained_tokens.append(ntok)

        def write_removed(payload: Any, decision: dict, ntok: int) -> None:
            obj = json.loads(payload) if isinstance(payload, bytes) else dict(payload)
            obj[cfg.hits_key] = decision
            removed_w.write(obj)
            finish_removed(decision, ntok)

        def flush_classifier() -> None:
            if not pending_clf:
                return
            scores = classifier.scores([p[3] for p in pending_clf])
            for (payload, decision, ntok, _text), s in zip(pending_clf, scores):
                clf_stats["scored"] += 1
                if s >= classifier.threshold:
                    clf_stats["removed"] += 1
                    write_removed(payload, {**decision, "classifier_score": float(s)}, ntok)
                else:
                    clf_stats["kept"] += 1
                    write_kept(payload, ntok)
            pending_clf.clear()
            retained_w.write_raw_lines(kept_lines)
            kept_lines.clear()

        def handle(payload: Any, decision: dict | None, ntok: int, text_of) -> None:
            counts["input_docs"] += 1
            counts["input_tokens"] += ntok
            if decision is None:
                write_kept(payload, ntok)
            elif classifier is not None:
                pending_clf.append((payload, decision, ntok, text_of()))
                if len(pending_clf) >= 256:
                    flush_classifier()
            else:
                write_removed(payload, decision, ntok)

        for path in paths:
            path_s = str(path)
            size = path.stat().st_size
            done_bytes = 0
            if input_format(path) == "parquet":
                rows_by_line: dict[int, tuple[dict, str]] = {}

                def parquet_tasks():
                    for first_row, batch in iter_parquet_batches(path_s):
                        recs = list(parse_parquet_batch(path_s, first_row, batch, text_key=cfg.text_key,
                                                        on_error=cfg.on_error, stats=pq_stats))
                        for r in recs:
                            rows_by_line[r.line] = (r.obj, r.text)
                        yield [(r.line, r.text) for r in recs], sum(r.raw_bytes for r in recs)

                pq_stats: dict = {}
                for results, _st, nbytes in pool.imap(_work_texts, parquet_tasks()):
                    in_bytes += nbytes
                    for line, decision, ntok in results:
                        obj, text = rows_by_line.pop(line)
                        handle(obj, decision, ntok, lambda t=text: t)
                _merge_skips(skipped, pq_stats)
            else:
                chunks: dict[int, Any] = {}
                # Without a classifier every decision is final in the worker, which then also
                # assembles the retained lines; with one, the parent needs every line.
                split_in_worker = classifier is None and fmt != "parquet"

                def jsonl_tasks():
                    for ch in iter_chunks(path_s, CHUNK_BYTES):
                        chunks[ch.first_line] = ch if not split_in_worker else (ch.offset, len(ch.data))
                        yield (ch.path, ch.first_line, ch.data, ch.offset, split_in_worker)

                for results, st, nbytes, extra in pool.imap(_work_jsonl, jsonl_tasks()):
                    _merge_skips(skipped, st)
                    in_bytes += nbytes
                    ch = chunks.pop(min(chunks))  # results come back in task order
                    if extra is not None:
                        blob, n_kept, removed_raw = extra
                        retained_w.write_blob(blob, n_kept)
                        for line, decision, ntok in results:
                            counts["input_docs"] += 1
                            counts["input_tokens"] += ntok
                            if decision is None:
                                counts["retained_docs"] += 1
                                counts["retained_tokens"] += ntok
                                retained_tokens.append(ntok)
                            else:
                                write_removed(removed_raw[line], decision, ntok)
                        end = ch[0] + ch[1]
                    else:
                        lines = ch.data.split(b"\n")
                        for line, decision, ntok in results:
                            raw = lines[line - ch.first_line]
                            handle(raw, decision, ntok, lambda r=raw: json.loads(r)[cfg.text_key])
                        retained_w.write_raw_lines(kept_lines)
                        kept_lines.clear()
                        end = ch.offset + len(ch.data)
                    if bar is not None:
                        # Byte progress is exact for plain JSONL; compressed files advance per file.
                        if input_format(path) == "jsonl":
                            done = min(size, end)
                            bar.update(max(0, done - done_bytes))
                            done_bytes = done
                        bar.set_postfix(docs=counts["input_docs"], removed=counts["removed_docs"], refresh=False)
            if bar is not None and done_bytes < size:
                bar.update(size - done_bytes)
                bar.set_postfix(docs=counts["input_docs"], removed=counts["removed_docs"], refresh=False)
            if classifier is not None:
                flush_classifier()
        pool.close()
        retained_w.close()
        removed_w.close()
    except BaseException:
        pool.terminate()
        retained_w.abort()
        removed_w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    resample_info = None
    if cfg.resample:
        resample_info = _resample(first_pass_path, retained_path, fmt, np.asarray(retained_tokens, dtype=np.int64),
                                  mode=cfg.resample, target_docs=counts["input_docs"],
                                  target_tokens=counts["input_tokens"], seed=cfg.seed)

    report = _build_report(cfg, blocklist, paths, fmt, counts, skipped, rules, cat_docs, cat_tokens, term_docs,
                           term_cats, clf_stats, classifier, resample_info, in_bytes, seconds,
                           {"retained": str(retained_path), "removed": str(removed_path)})
    atomic_write_text(out_dir / "filter_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "filter_report.md", render_markdown(report))
    return report


def _resample(src: Path, dst: Path, fmt: str, tokens: np.ndarray, *, mode: str, target_docs: int,
              target_tokens: int, seed: int) -> dict:
    """Copy ``src`` to ``dst`` adding seeded duplicates until the document or token count is restored.

    Duplicates are drawn without replacement from a seeded permutation of the retained documents
    (a fresh permutation per pass if more than one pass is needed) and written right after their
    original; Megatron's dataset shuffles documents, so their place in the file does not matter.
    """
    n = len(tokens)
    mult = np.zeros(n, dtype=np.int64)
    have_docs, have_tokens = n, int(tokens.sum())
    rng = np.random.default_rng(seed)
    added_docs = added_tokens = 0
    if n > 0:
        def short() -> bool:
            return (have_docs + added_docs < target_docs) if mode == "docs" else (have_tokens + added_tokens < target_tokens)

        while short():
            for i in rng.permutation(n):
                if not short():
                    break
                mult[i] += 1
                added_docs += 1
                added_tokens += int(tokens[i])
    try:
        with CorpusWriter(dst, fmt) as w:
            idx = 0
            if fmt == "parquet":
                for _row, batch in iter_parquet_batches(src):
                    for obj in batch.to_pylist():
                        for _ in range(1 + int(mult[idx])):
                            w.write(obj)
                        idx += 1
            else:
                for ch in iter_chunks(src, CHUNK_BYTES):
                    for raw in ch.data.split(b"\n"):
                        if not raw.strip():
                            continue
                        for _ in range(1 + int(mult[idx])):
                            w.write_raw(raw)
                        idx += 1
        if idx != n:
            raise RuntimeError(f"{src}: read back {idx} retained documents, expected {n}")
    finally:
        if src.exists():
            src.unlink()
    return {"mode": mode, "seed": seed, "target_documents": target_docs, "target_tokens": target_tokens,
            "added_documents": added_docs, "added_tokens": added_tokens,
            "documents_after": have_docs + added_docs, "tokens_after": have_tokens + added_tokens,
            "note": None if n else "no document was retained, nothing to resample from"}


def _share(a: int, b: int) -> float:
    return round(a / b, 6) if b else 0.0


def _build_report(cfg, blocklist, paths, fmt, counts, skipped, rules, cat_docs, cat_tokens, term_docs, term_cats,
                  clf_stats, classifier, resample_info, in_bytes, seconds, outputs) -> dict:
    n_in, n_rm = counts["input_docs"], counts["removed_docs"]
    t_in, t_rm = counts["input_tokens"], counts["removed_tokens"]
    categories = {}
    for c in blocklist.categories:
        categories[c.name] = {
            "kind": c.kind,
            "documents": cat_docs[c.name],
            "share_of_removed": _share(cat_docs[c.name], n_rm),
            "share_of_input": _share(cat_docs[c.name], n_in),
            "tokens": cat_tokens[c.name],
        }
    top = [{"term": t, "documents": n, "categories": term_cats.get(t, [])} for t, n in term_docs.most_common(50)]
    return {
        "tool": "malign data filter",
        "inputs": [str(p) for p in paths],
        "format": fmt,
        "outputs": outputs,
        "blocklist": {"path": str(cfg.blocklist or DEFAULT_BLOCKLIST_DIR), "terms": blocklist.n_terms,
                      "categories": blocklist.summary(), "window_words": cfg.window},
        "token_unit": f"tokenizer {cfg.tokenizer}" if cfg.tokenizer else "words (runs of non-whitespace, ASCII whitespace)",
        "documents": {"input": n_in, "retained": counts["retained_docs"], "removed": n_rm,
                      "removed_share": _share(n_rm, n_in), "skipped": skipped,
                      "skipped_total": sum(skipped.values())},
        "tokens": {"input": t_in, "retained": counts["retained_tokens"], "removed": t_rm,
                   "removed_share": _share(t_rm, t_in)},
        "rules": {"instant": rules["instant"], "two_stage": rules["two_stage"]},
        "categories": categories,
        "top_terms": top,
        "classifier": None if classifier is None else {
            "model": classifier.path, "threshold": classifier.threshold, "label": classifier.label,
            "scored": clf_stats["scored"], "removed": clf_stats["removed"], "kept": clf_stats["kept"]},
        "resample": resample_info,
        "throughput": {"seconds": round(seconds, 3), "input_bytes": in_bytes,
                       "mb_per_s": round(in_bytes / 1e6 / seconds, 3) if seconds else None,
                       "docs_per_s": round(n_in / seconds, 1) if seconds else None, "workers": cfg.workers},
    }


def render_markdown(r: dict) -> str:
    d, t = r["documents"], r["tokens"]
    lines = [
        "# AI-discourse filter report",
        "",
        f"Inputs: {', '.join(r['inputs'])} ({r['format']})",
        f"Blocklist: {r['blocklist']['path']} ({r['blocklist']['terms']} terms; two-stage window: "
        f"{r['blocklist']['window_words'] if r['blocklist']['window_words'] is not None else 'whole document'})",
        f"Tokens counted as: {r['token_unit']}",
        "",
        "| | input | retained | removed | removed share |",
        "|---|---:|---:|---:|---:|",
        f"| documents | {d['input']:,} | {d['retained']:,} | {d['removed']:,} | {100 * d['removed_share']:.2f}% |",
        f"| tokens | {t['input']:,} | {t['retained']:,} | {t['removed']:,} | {100 * t['removed_share']:.2f}% |",
        "",
        f"Rules: {r['rules']['instant']:,} removed by an instant term, {r['rules']['two_stage']:,} by a two-stage pair.",
    ]
    if d["skipped_total"]:
        lines.append(f"Skipped input lines: {d['skipped_total']:,} ({', '.join(f'{k}: {v}' for k, v in d['skipped'].items())}).")
    lines += ["", "## Categories (a document counts under every category that fired)", "",
              "| category | kind | documents | share of removed | share of input | tokens |",
              "|---|---|---:|---:|---:|---:|"]
    for name, c in r["categories"].items():
        lines.append(f"| {name} | {c['kind']} | {c['documents']:,} | {100 * c['share_of_removed']:.2f}% | "
                     f"{100 * c['share_of_input']:.2f}% | {c['tokens']:,} |")
    lines += ["", "## Top terms", "", "| term | documents | categories |", "|---|---:|---|"]
    for e in r["top_terms"][:25]:
        lines.append(f"| {e['term']} | {e['documents']:,} | {', '.join(e['categories'])} |")
    if r["classifier"]:
        c = r["classifier"]
        lines += ["", f"Classifier {c['model']} (label {c['label']}, threshold {c['threshold']}): scored {c['scored']:,} "
                  f"flagged documents, removed {c['removed']:,}, kept {c['kept']:,}."]
    if r["resample"]:
        s = r["resample"]
        lines += ["", f"Resampled ({s['mode']}, seed {s['seed']}): added {s['added_documents']:,} duplicate documents "
                  f"({s['added_tokens']:,} tokens); retained set now {s['documents_after']:,} documents, "
                  f"{s['tokens_after']:,} tokens (input: {s['target_documents']:,} / {s['target_tokens']:,})."]
    tp = r["throughput"]
    lines += ["", f"Throughput: {tp['mb_per_s']} MB/s, {tp['docs_per_s']} documents/s with {tp['workers']} worker(s).", ""]
    return "\n".join(lines)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="JSONL / JSONL.gz / JSONL.zst / Parquet files, directories or globs")
    p.add_argument("--out-dir", "-o", required=True, help="directory for retained.*, removed.* and the reports")
    p.add_argument("--config", help="YAML with FilterConfig fields (flags below override it)")
    p.add_argument("--blocklist", help=f"directory of category YAMLs (default: {DEFAULT_BLOCKLIST_DIR})")
    p.add_argument("--window", type=int, help="two-stage terms must be within N words (default: anywhere)")
    p.add_argument("--text-key", help="JSON field / Parquet column with the document (default: text)")
    p.add_argument("--on-error", choices=["raise", "skip"], help="malformed lines: stop with file:line, or count and skip")
    p.add_argument("--workers", "-j", type=int, help="worker processes (default: 1)")
    p.add_argument("--tokenizer", help="count tokens with this tokenizer (default: whitespace words)")
    p.add_argument("--resample", choices=["docs", "tokens"], help="refill the retained set to the input's count")
    p.add_argument("--seed", type=int, help="seed for --resample (default: 1234)")
    p.add_argument("--classifier", help="HF sequence-classification model directory for flagged documents")
    p.add_argument("--classifier-threshold", type=float, help="remove when P(label) >= this (default: 0.5)")
    p.add_argument("--classifier-label", help="classifier label meaning AI discourse (default: the second of two)")
    p.add_argument("--format", choices=["jsonl", "jsonl.gz", "jsonl.zst", "parquet"], help="output format")
    p.add_argument("--hits-key", help="field added to removed documents (default: blocklist_hits)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    return p


def main(argv: list[str] | None = None, prog: str = "malign data filter") -> int:
    from megatron_align.config import load_config

    args = build_parser(prog).parse_args(argv)
    cfg = load_config(FilterConfig, args.config, args.set)
    flags = {k: getattr(args, k) for k in ("blocklist", "window", "text_key", "on_error", "workers", "tokenizer",
                                           "resample", "seed", "classifier", "classifier_threshold",
                                           "classifier_label", "format", "hits_key") if getattr(args, k) is not None}
    if args.no_progress:
        flags["progress"] = False
    try:
        report = filter_corpus(args.inputs, args.out_dir, cfg, **flags)
    except InputError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    d = report["documents"]
    print(render_markdown(report))
    print(f"removed {d['removed']:,} of {d['input']:,} documents ({100 * d['removed_share']:.2f}%); "
          f"report: {Path(args.out_dir) / 'filter_report.json'}")
    return 0


__all__ = ["FilterConfig", "filter_corpus", "render_markdown", "main"]
