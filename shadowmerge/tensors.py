"""Tensor helpers every part shares: dtype names, reusable byte buffers, and raw bytes widened to float32.

A leaf module (torch and errors only): the pipeline, the analyzer, train's checks and extract all take
these from here rather than from each other.
"""

from __future__ import annotations

import torch

from .errors import ShadowMergeError

#: every spelling of a floating dtype that --dtype and records accept
DTYPE_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16, "float32": torch.float32, "fp32": torch.float32,
               "float": torch.float32}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPE_NAMES[str(name).lower()]
    except KeyError:
        raise ShadowMergeError(f"unknown dtype {name!r}; use bfloat16, float16 or float32") from None


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """The canonical name of a dtype or of one of its aliases (bf16, half, fp32, ...): bfloat16, float16, float32."""
    if isinstance(dtype, str):
        dtype = DTYPE_NAMES.get(dtype.lower())
    return None if dtype is None else str(dtype).replace("torch.", "")


class Buffers:
    """Named byte buffers, grown on demand and reused (pinned when a GPU does the arithmetic)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.uint8):
        self.device, self.dtype = device, dtype
        self.pin = False
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, n: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=self.dtype, device=self.device, pin_memory=self.pin)
            self._bufs[key] = buf
        return buf[:n]


def widen(raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
    """The elements of `raw` (bytes as stored, in `dtype`; or already that dtype, on any device) as float32, in `out`
    (a float32 buffer of exactly as many elements)."""
    return out.copy_(raw.view(dtype) if raw.dtype == torch.uint8 else raw)
