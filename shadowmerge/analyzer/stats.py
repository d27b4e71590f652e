"""Per-tensor sums for the similarity analyzer, streamed from two (or three) checkpoints.

Each tensor is read in pieces bounded by elements (chunks.ranges; pread, a reader thread one piece ahead), converted to
float32 on the chosen device (cpu, or cuda from pinned buffers), and reduced into float64 sums: sum |A - B|, |A|, |B|, (A - B)^2, A^2, B^2, and with a tuned
model T also (T - A)^2 and (T - A).(B - A). Every number of the report derives from these sums, so
memory is bounded by the chunk, never by a tensor or a model.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..chunks import SUM_CHUNK_ELEMENTS, ranges
from ..formats.safetensors import itemsize
from ..tensors import Buffers, widen
from ..transports.stream import is_sampling, sampling

F64 = torch.float64


@dataclass
class Sums:
    """float64 sums over the elements of one tensor (or of many, added up). A = base, B = instruct."""

    numel: int = 0
    abs_diff: float = 0.0       # sum |A - B|
    abs_a: float = 0.0
    abs_b: float = 0.0
    sq_diff: float = 0.0        # sum (A - B)^2
    sq_a: float = 0.0
    sq_b: float = 0.0
    sq_update: float = 0.0      # sum (T - A)^2            (with a tuned model)
    dot_update: float = 0.0     # sum (T - A) * (B - A)    (with a tuned model)

    def __add__(self, other: "Sums") -> "Sums":
        return Sums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def sigma(self) -> float:
        """The relative gap: sum |A - B| / (sum |A| + sum |B|); 0 identical, 1 one dwarfs the other."""
        den = self.abs_a + self.abs_b
        return self.abs_diff / den if den else 0.0

    @property
    def rel_l2(self) -> float:
        """||A - B|| / ||A||."""
        return math.sqrt(self.sq_diff / self.sq_a) if self.sq_a else (0.0 if not self.sq_diff else math.inf)

    @property
    def cosine(self) -> float:
        """cos(A, B), from A.B = (|A|^2 + |B|^2 - |A - B|^2) / 2."""
        den = math.sqrt(self.sq_a * self.sq_b)
        return (self.sq_a + self.sq_b - self.sq_diff) / (2 * den) if den else (1.0 if not self.sq_diff else 0.0)

    @property
    def update_rel(self) -> float:
        """||T - A|| / ||A||: how big the fine-tuning update is."""
        return math.sqrt(self.sq_update / self.sq_a) if self.sq_a else 0.0

    @property
    def update_cos(self) -> float:
        """cos(T - A, B - A): > 0 the update goes where instruction tuning went, < 0 it undoes it."""
        den = math.sqrt(self.sq_update * self.sq_diff)
        return self.dot_update / den if den else 0.0


def _reduce(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, scratch: torch.Tensor) -> Sums:
    d = torch.sub(b, a, out=scratch[: a.numel()])
    s = Sums(a.numel(),
             float(d.abs().sum(dtype=F64)), float(a.abs().sum(dtype=F64)), float(b.abs().sum(dtype=F64)),
             float(torch.linalg.vector_norm(d, dtype=F64) ** 2), float(torch.linalg.vector_norm(a, dtype=F64) ** 2),
             float(torch.linalg.vector_norm(b, dtype=F64) ** 2))
    if t is not None:
        u = t.sub_(a)           # t is a scratch copy
        s.sq_update = float(torch.linalg.vector_norm(u, dtype=F64) ** 2)
        s.dot_update = float(torch.dot(u.to(F64), d.to(F64)))
    return s


def scan(items: list[tuple[str, TensorInfo, TensorInfo, TensorInfo | None]], a: Checkpoint, b: Checkpoint,
         t: Checkpoint | None = None, on_bytes=None, chunk_elements: int = SUM_CHUNK_ELEMENTS,
         device: torch.device = torch.device("cpu")) -> dict[str, Sums]:
    """Sums per tensor name, for items (name, info in A, info in B, info in T or None) of equal shapes."""
    jobs = []
    for name, ia, ib, it in items:
        jobs += [(name, ia, ib, it, e0, e1) for e0, e1 in ranges(0, ia.numel, ia.row_numel, chunk_elements)] or \
            [(name, ia, ib, it, 0, 0)]
    cuda = device.type == "cuda"
    slots = [Buffers(torch.device("cpu")), Buffers(torch.device("cpu"))]
    for slot in slots:
        slot.pin = cuda
    work = Buffers(device, torch.float32)

    sampled = is_sampling()             # (--sample: the reader thread's reads are samples too)

    def read(k: int):
        with sampling() if sampled else contextlib.nullcontext():
            return _read(k)

    def _read(k: int):
        name, ia, ib, it, e0, e1 = jobs[k]
        buf, n = slots[k % 2], e1 - e0
        raw = [a.read_into(ia, e0, e1, buf("a", n * itemsize(ia.dtype))),
               b.read_into(ib, e0, e1, buf("b", n * itemsize(ib.dtype)))]
        if it is not None:
            raw.append(t.read_into(it, e0, e1, buf("t", n * itemsize(it.dtype))))
        return raw

    def as_float(raw: torch.Tensor, info: TensorInfo, key: str, copy: bool = False) -> torch.Tensor:
        n = raw.numel() // itemsize(info.dtype)
        if info.dtype == torch.float32 and not copy and not cuda:
            return raw.view(torch.float32)
        # to the device first (bytes as stored), then widened there; the reductions below synchronise
        return widen(raw.view(info.dtype).to(device, non_blocking=True) if cuda else raw, info.dtype, work(key, n))

    out: dict[str, Sums] = {}
    if not jobs:
        return out
    with ThreadPoolExecutor(1, thread_name_prefix="shadowmerge-similarity") as pool:
        pending = pool.submit(read, 0)
        for k, (name, ia, ib, it, _, _) in enumerate(jobs):
            raw = pending.result()
            if k + 1 < len(jobs):
                pending = pool.submit(read, k + 1)
            fa, fb = as_float(raw[0], ia, "a"), as_float(raw[1], ib, "b")
            ft = as_float(raw[2], it, "t", copy=True) if it is not None else None
            s = _reduce(fa, fb, ft, work("d", fa.numel()))
            out[name] = out[name] + s if name in out else s
            if on_bytes is not None:
                on_bytes(sum(r.numel() for r in raw))
    return out
