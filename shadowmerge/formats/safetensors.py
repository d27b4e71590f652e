"""The safetensors file format: the dtype table, reading a header, building one.

A file is an 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8, as safetensors itself writes it), then the raw tensor bytes. Every header is first
validated by the safetensors library itself (the reference implementation: offsets sorted,
contiguous, covering the data exactly; sizes without overflow; bounded JSON); this module then
reads the one thing the library does not expose, each tensor's byte offsets.
"""

import json
import struct

import torch

from ..errors import ShadowMergeError

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
if hasattr(torch, "float8_e8m0fnu"):         # power-of-two FP8 scales (ue8m0), as transformers stores them
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
MAX_NAME = 1000                  # tensor names of real checkpoints are < 200 characters


def itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_header(path, file_size: int, label: str | None = None) -> tuple[int, dict, dict]:
    """Return (data_start, tensors, metadata) of one file; raise on anything malformed or truncated.

    tensors maps name -> (dtype, shape, begin, end) with offsets relative to data_start. Errors name
    the file as `label` (default: its path).
    """
    hint = "re-download or re-save the checkpoint"
    shown = label or path
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ShadowMergeError(f"{shown}: not a safetensors file (only {len(raw)} bytes); {hint}")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > file_size:
                raise ShadowMergeError(f"{shown}: corrupt or truncated safetensors header; {hint}")
            _validate(path, hint, shown)
            header = json.loads(f.read(n))
    except OSError as exc:
        raise ShadowMergeError(f"{shown}: cannot be read ({exc.strerror or exc}); a weights file must be a "
                               f"regular, readable file: {hint}") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = {}
    for name, entry in header.items():
        if len(name) > MAX_NAME:
            raise ShadowMergeError(f"{shown}: a tensor name is {len(name)} characters long (at most {MAX_NAME}); "
                                   f"this is not a model checkpoint; {hint}")
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ShadowMergeError(f"{shown}: tensor {name!r} has dtype {entry['dtype']}, which shadowmerge does not "
                                   f"merge (quantized or packed); use a bf16/fp16/fp32 checkpoint")
        begin, end = entry["data_offsets"]
        tensors[name] = (dtype, tuple(entry["shape"]), begin, end)
    return data_start, tensors, metadata


def _validate(path, hint: str, shown) -> None:
    """The safetensors library's own header check (it maps the file but reads only the header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:    # SafetensorError, and OSError-like errors of the Rust side
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "incomplete metadata" in reason or "not fully covered" in reason:
            what = "truncated, or has bytes beyond its last tensor"
        elif "json" in reason.lower() or "utf-8" in reason.lower() or "header" in reason.lower():
            what = "corrupt safetensors header"
        else:
            what = "not a valid safetensors file"
        raise ShadowMergeError(f"{shown}: {what} ({reason[:200]}); {hint}") from None


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
