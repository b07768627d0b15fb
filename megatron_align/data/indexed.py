"""Facts about Megatron ``.bin``/``.idx`` pairs read straight from the ``.idx`` header and arrays.

Numpy only (no torch, no megatron import), so study resolution and reports run on login nodes.
"""

from __future__ import annotations

import glob
import os
import struct
import threading
from dataclasses import dataclass

import numpy as np

from megatron_align.config import ConfigError

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}


@dataclass(frozen=True)
class IndexStats:
    prefix: str
    sequences: int
    documents: int
    tokens: int
    token_bytes: int
    mtime_ns: int = 0

    def tokens_in(self, lo: float, hi: float) -> int:
        """Tokens of the sequences Megatron assigns to split range ``[lo, hi)`` of this prefix."""
        beg = int(round(lo * float(self.sequences)))
        end = int(round(hi * float(self.sequences)))
        if beg == 0 and end == self.sequences:
            return self.tokens
        key = (os.path.abspath(self.prefix), self.mtime_ns, self.sequences, beg, end)
        with _lock:
            hit = _range_cache.get(key)
        if hit is None:
            hit = int(_read_lengths(self.prefix, self.sequences)[beg:end].sum(dtype=np.int64))
            with _lock:
                _range_cache[key] = hit
        return hit


_cache: dict[tuple, IndexStats] = {}
_range_cache: dict[tuple, int] = {}
_lock = threading.Lock()


def _read_lengths(prefix: str, sequences: int) -> np.ndarray:
    mm = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
    return np.frombuffer(mm, dtype=np.int32, count=sequences, offset=_HEADER_BYTES)


def index_stats(prefix: str, *, where: str | None = None) -> IndexStats:
    """Sequence, document and token counts of one prefix (cached by path, size and mtime)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    label = f"{where}: " if where else ""
    missing = [p for p in (idx, bin_) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"{label}indexed dataset {prefix!r} has no {', '.join(os.path.basename(m) for m in missing)}; "
                          "run malign data preprocess first")
    st = os.stat(idx)
    key = (os.path.abspath(idx), st.st_size, st.st_mtime_ns)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise ConfigError(f"{label}{idx} is not a Megatron indexed-dataset index (bad header)")
    code = head[17]
    sequences, documents = struct.unpack("<QQ", head[18:34])
    if code not in _DTYPE_SIZES:
        raise ConfigError(f"{label}{idx}: unknown token dtype code {code}")
    need = _HEADER_BYTES + sequences * 12 + documents * 8
    if st.st_size < need:
        raise ConfigError(f"{label}{idx} is truncated ({st.st_size} bytes, header says {need}); rerun preprocessing")
    tokens = int(_read_lengths(prefix, sequences).sum(dtype=np.int64)) if sequences else 0
    stats = IndexStats(prefix=prefix, sequences=int(sequences), documents=max(int(documents) - 1, 0),
                       tokens=tokens, token_bytes=_DTYPE_SIZES[code], mtime_ns=st.st_mtime_ns)
    bin_size = os.path.getsize(bin_)
    if bin_size < tokens * stats.token_bytes:
        raise ConfigError(f"{label}{bin_} holds {bin_size} bytes but {idx} indexes {tokens} tokens "
                          f"({tokens * stats.token_bytes} bytes); the pair is inconsistent, rerun preprocessing")
    with _lock:
        _cache[key] = stats
    return stats


def expand_prefix(prefix: str, *, where: str | None = None) -> list[str]:
    """A prefix or a glob of prefixes -> sorted existing prefixes (each with .bin and .idx)."""
    label = f"{where}: " if where else ""
    if glob.has_magic(prefix):
        found = sorted(p[: -len(".idx")] for p in glob.glob(prefix + ".idx"))
        if not found:
            raise ConfigError(f"{label}glob {prefix!r} matches no .idx files; run malign data preprocess first")
        for p in found:
            index_stats(p, where=where)
        return found
    index_stats(prefix, where=where)
    return [prefix]
