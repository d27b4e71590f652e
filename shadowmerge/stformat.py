"""The safetensors file format: the dtype table, reading a header, building one.

A file is an 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8, as safetensors itself writes it), then the raw tensor bytes.
"""

from __future__ import annotations

import json
import struct

import torch

from .errors import ShadowMergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path, file_size: int) -> tuple[int, dict, dict]:
    """Return (data_start, tensors, metadata) of one file; raise on anything malformed or truncated.

    tensors maps name -> (dtype, shape, begin, end) with offsets relative to data_start.
    """
    hint = "re-download or re-save the checkpoint"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ShadowMergeError(f"{path}: not a safetensors file (only {len(raw)} bytes); {hint}")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > file_size:
            raise ShadowMergeError(f"{path}: corrupt or truncated safetensors header; {hint}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ShadowMergeError(f"{path}: corrupt safetensors header (not JSON); {hint}") from None
    if not isinstance(header, dict):
        raise ShadowMergeError(f"{path}: corrupt safetensors header; {hint}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = file_size - data_start
    tensors = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ShadowMergeError(f"{path}: tensor {name!r} has an unreadable or unsupported header entry "
                                   f"({entry!r}); {hint}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * itemsize(dtype) or begin < 0:
            raise ShadowMergeError(f"{path}: tensor {name!r} has inconsistent offsets; {hint}")
        if end > data_size:
            raise ShadowMergeError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                                   f"but the file has {file_size}; {hint}")
        tensors[name] = (dtype, shape, begin, end)
    return data_start, tensors, metadata


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes for tensors (name, dtype, shape, nbytes) stored back to back in this order.

    Returns (header_bytes including the 8-byte length, data offsets of each tensor).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets = []
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, offsets
