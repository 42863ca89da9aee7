"""Megatron-LM's ``.bin``/``.idx`` token dataset format, byte-compatible both ways.

``{prefix}.bin`` holds the token ids of every sequence back to back in one dtype.
``{prefix}.idx`` is::

    b"MMIDIDX\\x00\\x00"          9-byte magic
    <Q  version (1)
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count  S
    <Q  document count  D (number of documents + 1)
    int32 [S]  sequence lengths (tokens)
    int64 [S]  sequence byte offsets into the .bin
    int64 [D]  document indices: document d owns sequences [doc[d], doc[d + 1])

Files written here load in Megatron-LM and vice versa.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence

import numpy as np

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1

DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def code_from_dtype(dtype) -> int:
    """Megatron's dtype code for a numpy dtype."""
    key = np.dtype(dtype)
    if key not in _CODE_OF_DTYPE:
        raise ValueError(
            f"dtype {key} has no Megatron .idx code; use one of "
            f"{[np.dtype(v).name for v in DTYPE_CODES.values()]}"
        )
    return _CODE_OF_DTYPE[key]


def dtype_from_code(code: int) -> type[np.generic]:
    """Numpy dtype for a Megatron dtype code."""
    if code not in DTYPE_CODES:
        raise ValueError(f"unknown .idx dtype code {code}; known codes: {sorted(DTYPE_CODES)}")
    return DTYPE_CODES[code]


def optimal_dtype(vocab_size: int | None) -> type[np.generic]:
    """uint16 when every id fits with margin (vocab < 65500), else int32, as Megatron picks."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def get_bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def get_idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _to_numpy(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):  # torch.Tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens)


def write_index(
    idx_path: str,
    dtype,
    sequence_lengths: Sequence[int],
    document_indices: Sequence[int],
) -> None:
    """Write a Megatron ``.idx`` file (pointers are derived from the lengths and dtype)."""
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(lengths.shape[0], dtype=np.int64)
    if lengths.shape[0] > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    documents = np.asarray(document_indices, dtype=np.int64)
    with open(idx_path, "wb") as f:
        f.write(_INDEX_HEADER)
        f.write(struct.pack("<Q", _INDEX_VERSION))
        f.write(struct.pack("<B", code_from_dtype(dtype)))
        f.write(struct.pack("<Q", lengths.shape[0]))
        f.write(struct.pack("<Q", documents.shape[0]))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(documents.tobytes(order="C"))


class IndexedDatasetBuilder:
    """Streams sequences into ``bin_path``; ``finalize(idx_path)`` writes the index.

    A document is one or more sequences; close each with ``end_document()`` (or write it whole
    with ``add_document``).
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.dtype = np.dtype(dtype)
        code_from_dtype(self.dtype)  # fail now, not at finalize
        self.bin_path = bin_path
        self._data_file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def _write(self, tokens) -> int:
        array = _to_numpy(tokens).reshape(-1)
        if array.size and np.issubdtype(array.dtype, np.integer):
            info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
            if info is not None and (array.min() < info.min or array.max() > info.max):
                raise ValueError(
                    f"token ids in [{array.min()}, {array.max()}] do not fit {self.dtype.name}; "
                    f"build the dataset with a wider dtype (optimal_dtype(vocab_size))"
                )
        self._data_file.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        return int(array.size)

    def add_item(self, tokens) -> None:
        """Append one sequence (1-D tensor/array of ids) to the current document."""
        self.sequence_lengths.append(self._write(tokens))

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the last close)."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append a whole document: ``tokens`` [sum(lengths)] split into sequences ``lengths``."""
        lengths = [int(n) for n in lengths]
        written = self._write(tokens)
        if written != sum(lengths):
            raise ValueError(
                f"add_document got {written} tokens but lengths sum to {sum(lengths)}; "
                "lengths must partition the tokens"
            )
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self._data_file.close()
        write_index(idx_path, self.dtype, self.sequence_lengths, self.document_indices)


class IndexedDataset:
    """Memory-mapped reader of ``{path_prefix}.bin/.idx``; item ``i`` is sequence ``i``."""

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = get_idx_path(path_prefix), get_bin_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} not found; build it with tools/preprocess_data.py "
                    f"(--output-prefix gives {{prefix}}_text_document)"
                )
        with open(idx_path, "rb") as f:
            header = f.read(9)
            if header != _INDEX_HEADER:
                raise ValueError(f"{idx_path} is not a Megatron .idx file (header {header!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != _INDEX_VERSION:
                raise ValueError(f"{idx_path} has index version {version}; only 1 is supported")
            (code,) = struct.unpack("<B", f.read(1))
            self.dtype = np.dtype(dtype_from_code(code))
            (self.sequence_count,) = struct.unpack("<Q", f.read(8))
            (self.document_count,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        self._idx_mmap = np.memmap(idx_path, mode="r", order="C")
        buffer = memoryview(self._idx_mmap)
        n = self.sequence_count
        self.sequence_lengths = np.frombuffer(buffer, dtype=np.int32, count=n, offset=offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(buffer, dtype=np.int64, count=n, offset=offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(
            buffer, dtype=np.int64, count=self.document_count, offset=offset
        )
        # np.memmap refuses empty files; an empty dataset has an empty .bin.
        if os.path.getsize(bin_path) > 0:
            self._bin = np.memmap(bin_path, mode="r", order="C", dtype=self.dtype)
        else:
            self._bin = np.zeros(0, dtype=self.dtype)

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.exists(get_idx_path(path_prefix)) and os.path.exists(
            get_bin_path(path_prefix)
        )

    def __len__(self) -> int:
        return self.sequence_count

    def _check_index(self, idx: int) -> int:
        if idx < 0:
            idx += self.sequence_count
        if not 0 <= idx < self.sequence_count:
            raise IndexError(f"sequence {idx} out of range for {self.sequence_count} sequences")
        return idx

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [length] of sequence ``idx`` from ``offset`` (to its end when length is None)."""
        idx = self._check_index(int(idx))
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise ValueError(
                f"get(idx={idx}, offset={offset}, length={length}) exceeds the sequence's "
                f"{size} tokens"
            )
        start = int(self.sequence_pointers[idx]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]

    def __getitem__(self, idx):
        """Sequence ``idx`` as a read-only numpy array; a slice gives a list of them."""
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(self.sequence_count))]
        return self.get(idx)
