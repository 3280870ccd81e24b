"""Reading and writing the safetensors format with numpy only.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
offsets) and the raw little-endian data. jtrain reads it directly rather than through the
`safetensors` package because that package's numpy path has no bfloat16, and its jax path
materialises every tensor on the default device (the opposite of loading onto shardings).
Reads are zero-copy memory maps: only the tensor being converted is ever paged in.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from jtrain.errors import CheckpointError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and byte range (relative to the data section)."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int
    data_offset: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor of one .safetensors file (reads only the header)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        out[name] = TensorInfo(path, _DTYPES[meta["dtype"]], tuple(meta["shape"]), start, end, 8 + n)
    return out


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor as a read-only memory-mapped numpy array (no copy until it is transformed)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    if count * info.dtype.itemsize != info.end - info.start:
        raise CheckpointError(f"{info.file}: byte range of a {info.shape} tensor does not match its dtype")
    if count == 0:
        return np.zeros(info.shape, info.dtype)
    mm = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.data_offset + info.start, shape=(count,))
    return mm.reshape(info.shape)


def write_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (in the given order) to `path`, atomically via a temporary file."""
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise CheckpointError("writing safetensors needs a little-endian host")
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in tensors.items():
        dtype = np.dtype(arr.dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).tobytes())
    os.replace(tmp, path)


def tensor_bytes(shape: Iterable[int], dtype: np.dtype) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(dtype).itemsize
