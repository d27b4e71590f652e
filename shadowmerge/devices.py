"""Devices: a `--device` name becomes a torch.device (or a one-line error); GPU float32 stays IEEE float32;
CUDA starts on a thread of its own while the inputs' headers are read (start_early)."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import torch

from .errors import ShadowMergeError


def parse_device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ShadowMergeError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise ShadowMergeError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ShadowMergeError(f"--device {name} asked for, but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ShadowMergeError(f"--device {name}: this machine has {count} CUDA device(s), "
                                   f"cuda:0 to cuda:{count - 1}; pass one of them")
    return device


@contextmanager
def exact_float32(device: torch.device):
    """float32 matrix products in full IEEE precision for the time of a run: never TF32 on a GPU.

    Whatever the caller's process has set (torch.set_float32_matmul_precision("high"), a library
    that turns TF32 on), a LoRA product B @ A on a GPU must round like float32, or a float32 output
    is thousands of ulps off peft's merge. TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 would win over any
    setting, so it is refused.
    """
    if device.type != "cuda":
        yield
        return
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") not in ("", "0"):
        raise ShadowMergeError("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set, which forces TF32 matrix products on the "
                               "GPU; unset it (or use --device cpu) for an exact result")
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = torch.get_float32_matmul_precision(), matmul.allow_tf32, cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        matmul.allow_tf32, cudnn.allow_tf32 = saved[1], saved[2]


def start_early(device: torch.device, timeline=None) -> None:
    """Start CUDA (its context, the caching allocator and cuBLAS) on a thread, so that the seconds it takes
    pass while the headers are read, the plan is built and the first pieces are read, not before them. torch's
    lazy initialisation is guarded by a lock, so a compute thread that gets there first simply waits for it.
    An error is left for that first real use to report. Nothing happens on a CPU."""
    if device.type != "cuda":
        return

    def start() -> None:
        t0 = time.perf_counter()
        try:
            with torch.cuda.device(device):
                x = torch.ones(8, 8, device=device)
                (x @ x).sum().item()
        except Exception:      # (reported where the engine first uses the device)
            return
        if timeline is not None:
            timeline.add("cuda start", time.perf_counter() - t0)

    threading.Thread(target=start, daemon=True, name="shadowmerge-cuda-start").start()
