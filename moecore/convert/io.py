"""Safetensors reading and writing with bounded memory (no dependency on the ``safetensors``
package), and the shard files of moecore checkpoints.

Safetensors format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` (offsets
relative to the end of the header), then the raw little-endian tensor bytes. Reading seeks to one
tensor and reads only its bytes; writing streams tensors one at a time into files whose headers
are computed up front from a plan of names, shapes and dtypes, so neither side ever holds more
than the tensor at hand.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable

import torch

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"
_ALIGN = 8  # header padding, as the safetensors package writes it
_MODEL_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (HF's decimal units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 1073741824")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (a view, no copy for contiguous CPU tensors)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


# ---- reading -----------------------------------------------------------------------------------
def read_header(path: str) -> tuple[dict, int]:
    """``(entries, data_start)`` of one safetensors file; entries exclude ``__metadata__``."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        size = os.path.getsize(path)
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}; the file "
                             "is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsReader:
    """Tensors of a Hugging Face model directory: one ``model.safetensors``, a sharded set with
    ``model.safetensors.index.json``, or any ``*.safetensors`` files (headers scanned).

    ``get(name)`` reads one tensor from disk into a new CPU tensor; nothing else is kept.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_FILENAME)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(x for x in os.listdir(directory) if x.endswith(".safetensors"))
            if not files:
                raise ValueError(f"{directory} holds no *.safetensors files (and no "
                                 f"{INDEX_FILENAME}); point --load-dir at a Hugging Face model "
                                 "directory saved with safetensors")
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for fname in files:
            path = os.path.join(directory, fname)
            if not os.path.isfile(path):
                raise ValueError(f"{INDEX_FILENAME} in {directory} names {fname}, which is "
                                 "missing")
            header, start = read_header(path)
            for name, entry in header.items():
                self._entries[name] = (path, entry, start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _dtype_of(self._entry(name)[1]["dtype"], name)

    def _entry(self, name: str):
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the safetensors files of "
                           f"{self.directory}")
        return self._entries[name]

    def get(self, name: str) -> torch.Tensor:
        path, entry, start = self._entry(name)
        dtype = _dtype_of(entry["dtype"], name)
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=dtype)
        if end - begin != out.numel() * out.element_size():
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes but shape "
                             f"{entry['shape']} of {entry['dtype']} needs "
                             f"{out.numel() * out.element_size()}")
        if out.numel():
            with open(path, "rb") as f:
                f.seek(start + begin)
                buf = out.reshape(-1).view(torch.uint8).numpy()
                if f.readinto(memoryview(buf)) != end - begin:
                    raise ValueError(f"{path} is truncated inside tensor {name!r}")
        return out


def _dtype_of(code: str, name: str) -> torch.dtype:
    if code not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has safetensors dtype {code}, which this converter "
                         f"does not read; supported: {sorted(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[code]


# ---- writing -----------------------------------------------------------------------------------
def plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Group ``(name, shape, dtype)`` entries in order into files of at most ``max_shard_bytes``
    (a single tensor larger than that gets a file of its own, as Hugging Face does)."""
    files: list[list] = [[]]
    size = 0
    for entry in entries:
        b = nbytes(entry[1], entry[2])
        if files[-1] and size + b > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += b
    return files


def _header_bytes(entries, metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        b = nbytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + b]}
        offset += b
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Stream tensors into Hugging Face safetensors files following a plan.

    ``plan`` lists every ``(name, shape, dtype)`` in the order :meth:`write` will be called.
    With one file the output is ``model.safetensors``; with more,
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Files are
    written under temporary names and renamed by :meth:`close`, so an interrupted conversion
    leaves no file that looks complete.
    """

    def __init__(self, directory: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, metadata: dict | None = None):
        self.directory = directory
        self.files = plan_shards(plan, max_shard_bytes)
        n = len(self.files)
        self.names = ([SINGLE_FILENAME] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.metadata = {"format": "pt", **(metadata or {})}
        self._queue = [(fi, e) for fi, entries in enumerate(self.files) for e in entries]
        self._pos = 0
        self._file_idx = -1
        self._handle = None
        self.total_size = sum(nbytes(s, d) for _, s, d in plan)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"tensor {name!r} was not planned (all {len(self._queue)} planned "
                             "tensors are written)")
        fi, (pname, shape, dtype) = self._queue[self._pos]
        if name != pname or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"writing {name!r} {tuple(tensor.shape)} {tensor.dtype} but the plan "
                             f"expects {pname!r} {tuple(shape)} {dtype} next")
        if fi != self._file_idx:
            self._open(fi)
        self._handle.write(_raw_bytes(tensor))
        self._pos += 1

    def _open(self, fi: int) -> None:
        self._finish_file()
        self._file_idx = fi
        path = os.path.join(self.directory, self.names[fi] + ".tmp")
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in _finish_file
        self._handle.write(_header_bytes(self.files[fi], self.metadata))

    def _finish_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        """Check every planned tensor was written, rename the files into place and write the
        index (more than one file). Returns the file names."""
        self._finish_file()
        if self._pos != len(self._queue):
            missing = [e[1][0] for e in self._queue[self._pos:self._pos + 5]]
            raise ValueError(f"{len(self._queue) - self._pos} planned tensors were never "
                             f"written, starting with {missing}")
        for name in self.names:
            os.replace(os.path.join(self.directory, name + ".tmp"),
                       os.path.join(self.directory, name))
        index = os.path.join(self.directory, INDEX_FILENAME)
        if len(self.names) > 1:
            weight_map = {e[0]: self.names[fi] for fi, entries in enumerate(self.files)
                          for e in entries}
            write_json(index, {"metadata": {"total_size": self.total_size},
                               "weight_map": weight_map})
        elif os.path.exists(index):
            os.remove(index)
        # Model files of an earlier export into this directory would be loaded as well.
        for name in os.listdir(self.directory):
            if _MODEL_FILE.fullmatch(name) and name not in self.names:
                os.remove(os.path.join(self.directory, name))
        return list(self.names)

    def abort(self) -> None:
        """Close and delete the temporary files after a failure."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        for name in self.names:
            tmp = os.path.join(self.directory, name + ".tmp")
            if os.path.exists(tmp):
                os.remove(tmp)


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON through a temporary file + rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_torch_mmap(path: str) -> dict:
    """``torch.load`` of a moecore shard file with its tensors memory-mapped (read on use)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - truncated zips, bad pickles, I/O errors
        raise ValueError(f"cannot read the checkpoint file {path} ({type(e).__name__}: {e})") \
            from e
