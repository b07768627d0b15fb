"""Generate a JSONL corpus of distinct documents for tokenization benchmarks.

Recipe: a word-bigram Markov chain is fitted on the given source texts (e.g. public-domain books
from Project Gutenberg plus AI-safety prose); every document is built from freshly sampled
256-word pieces (1 to 12 of them, so lengths vary from ~1 KB to ~20 KB), ~1% of words are
replaced by random numbers and ~3% get a random one-letter edit (typos, names, rare forms: a
real corpus has millions of distinct words, a few books only tens of thousands, and word caches
would otherwise hit far more often than on real text); paragraph breaks come from the sources. No piece is ever reused
and every document is checked to be distinct, so tokenizer word caches see realistic text
statistics rather than a repeated corpus.

    python benchmarks/make_corpus.py --sources books/*.txt --size-mb 200 --out /tmp/corpus200.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

PIECE_WORDS = 256


def fit_chain(paths: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    words: list[str] = []
    for p in paths:
        text = open(p, encoding="utf-8", errors="ignore").read().replace("\r\n", "\n")
        words.extend(re.findall(r"\n\s*\n|\S+", text))
    words = ["\n\n" if w.strip() == "" else w for w in words]
    vocab, ids = np.unique(np.array(words, dtype=object), return_inverse=True)
    ids = ids.astype(np.int64)
    # Successor lists: for word w, succ_flat[start[w]: start[w] + count[w]] are its observed followers.
    order = np.argsort(ids[:-1], kind="stable")
    succ_flat = ids[1:][order]
    counts = np.bincount(ids[:-1], minlength=len(vocab))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # A word seen only last has no follower: restart from a random position.
    return vocab, succ_flat, start, counts


def generate(paths: list[str], size_bytes: int, out: str, seed: int = 0) -> dict:
    t0 = time.time()
    vocab, succ_flat, start, counts = fit_chain(paths)
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    written = docs = 0
    tmp = out + ".tmp"
    batch = 20000
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size_bytes:
            cur = rng.integers(0, len(succ_flat), size=batch)
            cur = succ_flat[cur]
            steps = np.empty((PIECE_WORDS, batch), dtype=np.int64)
            for s in range(PIECE_WORDS):
                c = counts[cur]
                dead = c == 0
                pick = start[cur] + (rng.random(batch) * np.maximum(c, 1)).astype(np.int64)
                nxt = succ_flat[np.minimum(pick, len(succ_flat) - 1)]
                if dead.any():
                    nxt[dead] = succ_flat[rng.integers(0, len(succ_flat), size=int(dead.sum()))]
                steps[s] = nxt
                cur = nxt
            words = vocab[steps.T]
            numbers = rng.random(words.shape) < 0.01
            words[numbers] = rng.integers(0, 100000, size=int(numbers.sum())).astype(str)
            edit = np.flatnonzero((rng.random(words.shape) < 0.03).ravel())
            flat = words.reshape(-1)
            letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
            pos_r, let_r = rng.random(len(edit)), rng.integers(0, len(letters), size=len(edit))
            for j, i in enumerate(edit.tolist()):
                w = flat[i]
                if w == "\n\n":
                    continue
                k = int(pos_r[j] * (len(w) + 1))
                flat[i] = w[:k] + letters[let_r[j]] + w[k + 1:]
            pieces = [" ".join(row).replace(" \n\n ", "\n\n").strip() for row in words.tolist()]
            k = 0
            while k < len(pieces) and written < size_bytes:
                n = int(min(12, 1 + rng.geometric(0.35)))
                doc = "\n\n".join(pieces[k: k + n])
                k += n
                h = hashlib.blake2b(doc.encode(), digest_size=16).digest()
                if h in seen:
                    continue
                seen.add(h)
                line = json.dumps({"text": doc, "id": f"doc-{docs}"}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode())
                docs += 1
    os.replace(tmp, out)
    info = {"path": out, "bytes": os.path.getsize(out), "documents": docs, "distinct_documents": len(seen),
            "source_files": [os.path.basename(p) for p in paths], "vocabulary_words": int(len(vocab)),
            "seed": seed, "seconds": round(time.time() - t0, 1)}
    with open(out + ".json", "w") as f:
        json.dump(info, f, indent=2)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", nargs="+", required=True, help="plain-text files to fit the word chain on")
    ap.add_argument("--size-mb", type=float, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    info = generate(args.sources, int(args.size_mb * 1e6), args.out, args.seed)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
