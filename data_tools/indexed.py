"""Megatron-Core IndexedDataset files (``PREFIX.bin`` / ``PREFIX.idx``), written without holding the index.

The ``.idx`` layout (megatron/core/datasets/indexed_dataset.py, ``_IndexWriter``)::

    b"MMIDIDX\\x00\\x00"  <Q version=1>  <B dtype code>
    <Q sequence_count>  <Q document_count>
    int32[sequence_count]   sequence lengths (tokens)
    int64[sequence_count]   sequence byte offsets into .bin
    int64[document_count]   document_indices: 0, then the sequence index that ends each document

One document is one sequence here (as in Megatron-LM's preprocess_data.py without sentence
splitting), so ``document_indices`` is ``0..N``. Megatron's builder keeps every length in Python
lists; here lengths are spooled to a side file and the index is written in blocks, so memory
stays flat for billions of documents. The bytes are identical (tested against
``IndexedDatasetBuilder``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7,
               np.uint16: 8}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_BLOCK = 1 << 22  # index entries per write block


def optimal_dtype(vocab_size: int) -> type:
    """Megatron-Core's ``DType.optimal_dtype``: uint16 below 65,500 ids, int32 otherwise."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_from_name(name: str) -> type:
    try:
        return {"uint16": np.uint16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}[name]
    except KeyError:
        raise ValueError(f"unsupported token dtype {name!r} (uint16, int32, int64, uint8)") from None


def _iter_spool(path: str | os.PathLike, count: int) -> Iterator[np.ndarray]:
    mm = np.memmap(path, dtype=np.int32, mode="r", shape=(count,)) if count else np.zeros(0, np.int32)
    for i in range(0, count, _BLOCK):
        yield np.array(mm[i: i + _BLOCK])


def write_idx_from_spool(idx_path: str | os.PathLike, dtype: type, spool_path: str | os.PathLike, count: int) -> None:
    """Build the .idx from a file of int32 document lengths (see :class:`LengthSpool`)."""
    itemsize = np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(INDEX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", count))
        f.write(struct.pack("<Q", count + 1))
        for block in _iter_spool(spool_path, count):
            f.write(block.tobytes())
        carry = 0
        for block in _iter_spool(spool_path, count):
            ends = np.cumsum(block.astype(np.int64) * itemsize) + carry
            starts = np.empty_like(ends)
            starts[0:1] = carry
            starts[1:] = ends[:-1]
            f.write(starts.tobytes())
            carry = int(ends[-1]) if ends.size else carry
        for i in range(0, count + 1, _BLOCK):
            f.write(np.arange(i, min(count + 1, i + _BLOCK), dtype=np.int64).tobytes())


class IdxInfo:
    """The parsed header of an .idx plus memory-mapped arrays."""

    def __init__(self, idx_path: str | os.PathLike):
        self.path = str(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(9 + 8 + 1 + 8 + 8)
        if len(head) < 34 or head[:9] != INDEX_HEADER:
            raise ValueError(f"{idx_path}: not a Megatron .idx file (bad header)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != 1:
            raise ValueError(f"{idx_path}: unsupported .idx version {version}")
        code = head[17]
        if code not in CODE_DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        self.sequence_count, self.document_count = struct.unpack("<QQ", head[18:34])
        n = self.sequence_count
        expected = 34 + n * 4 + n * 8 + self.document_count * 8
        size = os.path.getsize(idx_path)
        if size not in (expected, expected + n):  # + n: multimodal mode bytes
            raise ValueError(f"{idx_path}: size {size} does not match its header ({expected} expected); the file is "
                             "truncated or corrupt")
        self.lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=34, shape=(n,)) if n else np.zeros(0, np.int32)
        self.pointers = (np.memmap(idx_path, dtype=np.int64, mode="r", offset=34 + 4 * n, shape=(n,)) if n
                         else np.zeros(0, np.int64))
        self.document_indices = np.memmap(idx_path, dtype=np.int64, mode="r", offset=34 + 12 * n,
                                          shape=(self.document_count,))

    def total_tokens(self) -> int:
        total = 0
        for i in range(0, self.sequence_count, _BLOCK):
            total += int(self.lengths[i: i + _BLOCK].sum(dtype=np.int64))
        return total

    def check_bin(self, bin_path: str | os.PathLike) -> None:
        """Raise ValueError unless the .bin has exactly the bytes the index points to."""
        want = self.total_tokens() * np.dtype(self.dtype).itemsize
        have = os.path.getsize(bin_path)
        if want != have:
            raise ValueError(f"{bin_path}: {have} bytes but its .idx describes {want}; the pair is inconsistent")


class LengthSpool:
    """Append-only int32 file of document lengths (the index, spooled to disk)."""

    def __init__(self, path: str | os.PathLike, resume_count: int | None = None):
        self.path = Path(path)
        if resume_count is None:
            self._f = open(self.path, "wb")
            self.count = 0
        else:
            self._f = open(self.path, "r+b")
            self._f.truncate(resume_count * 4)
            self._f.seek(resume_count * 4)
            self.count = resume_count

    def append(self, lengths: np.ndarray) -> None:
        self._f.write(np.asarray(lengths, dtype=np.int32).tobytes())
        self.count += len(lengths)

    def flush(self, fsync: bool = True) -> None:
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


__all__ = ["optimal_dtype", "write_idx_from_spool", "IdxInfo", "LengthSpool", "DTYPE_CODES", "dtype_from_name"]
