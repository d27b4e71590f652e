"""The kinds of LoRA targets and entries: what an adapter key changes (a target, mapped from the adapter before
planning), and what a piece of it needs and computes (an entry: its own read() on the reader thread and delta()
on the compute device). LoraDelta (source.py) holds the adapter, the Base and the targets; a new kind is a
target class and an entry class here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..checkpoint import TensorInfo
from ..errors import ShadowMergeError
from ..formats.safetensors import itemsize
from .adapter import LoraModule

if TYPE_CHECKING:
    from .source import LoraDelta

TILE_ELEMENTS = 1 << 24     # of lora_A or lora_B read ahead for a piece: 64 MiB of float32
BLOCK_ELEMENTS = 1 << 22    # of a Wide factor per block: 16 MiB of float32


class Wide:
    """The wide factor of a piece whose slice of it would pass TILE_ELEMENTS (rank x width: a high rank on a wide
    layer; A's columns, or B's rows where the update is transposed). It is not read ahead: the compute thread reads
    it in blocks of at most BLOCK_ELEMENTS, each once, into that thread's own scratch (pageable memory: a copy
    from it to a GPU returns once the bytes are staged, so the next block may overwrite it). So a piece of many
    whole rows reads the factor once, where pieces of one row segment each would read it once per row: memory
    stays bounded without the rereading (see docs/benchmarks.md, "graft --lora")."""

    def __init__(self, src: "LoraDelta", mod: LoraModule, which: str, lo: int, hi: int):
        self.src, self.mod, self.which, self.lo, self.hi = src, mod, which, lo, hi

    def blocks(self):
        """(k0, k1, raw bytes) per block: [k0, k1) counted from lo; the bytes are valid until the next block."""
        step = max(1, BLOCK_ELEMENTS // max(self.mod.rank, 1))
        scratch = self.src.scratch()
        info = self.mod.A if self.which == "A" else self.mod.B
        for k in range(self.lo, self.hi, step):
            k1 = min(k + step, self.hi)
            out = scratch("wide", (k1 - k) * self.mod.rank * itemsize(info.dtype))
            yield k - self.lo, k1 - self.lo, self.src.factor(self.mod, self.which, k, k1, out)


@dataclass(frozen=True, eq=False)
class LoraWeight:
    """A module's weight: scale * B @ A, re-normalised against the Base's weight for DoRA."""

    module: LoraModule
    base: TensorInfo | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.shape

    @property
    def tile(self) -> int:
        """Rows per piece, so that the slice of A or B a piece reads ahead stays bounded (the other is Wide
        where it would pass the bound)."""
        return max(1, TILE_ELEMENTS // max(self.module.rank, 1))

    def read(self, src: "LoraDelta", e0: int, e1: int, buffers):
        mod = self.module
        a, b, geo = src.factors(mod, e0, e1, buffers)
        m = norms = base = None
        if mod.magnitude is not None:
            r0, r1, c0, c1 = geo
            u0, u1 = (c0, c1) if mod.transposed else (r0, r1)
            m = src.adapter.read_into(mod.magnitude, u0, u1,
                                      buffers("magnitude", (u1 - u0) * itemsize(mod.magnitude.dtype)))
            if mod.transposed or c1 - c0 != mod.shape[1]:     # the piece does not hold whole normalisation units
                norms = src.norms(self)[u0:u1].view(torch.uint8)
            base = src.base.read_into(self.base, e0, e1, buffers("base", (e1 - e0) * itemsize(self.base.dtype)))
        return a, b, m, norms, base, geo

    def delta(self, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        mod = self.module
        a_raw, b_raw, m_raw, norms_raw, base_raw, geo = payload
        r0, r1, c0, c1 = geo
        d = product(mod, a_raw, b_raw, geo, out, to_float)
        if mod.magnitude is None:
            return out
        # DoRA, as peft merges it into the Base: m / ||W_B + dW|| * (W_B + dW); the update is that - W_B.
        w = to_float(base_raw, self.base.dtype, "base").view(r1 - r0, c1 - c0)
        m = to_float(m_raw, mod.magnitude.dtype, "magnitude")
        merged = w + d
        if norms_raw is None:        # whole rows of an untransposed weight: each row's norm, here
            factor = (m / torch.linalg.norm(merged, dim=1)).view(-1, 1)
        else:
            factor = (m / to_float(norms_raw, torch.float32, "norms")).view((1, -1) if mod.transposed else (-1, 1))
        return torch.sub(merged.mul_(factor), w, out=d).view(-1)


@dataclass(frozen=True, eq=False)
class LoraBias:
    """A module's bias: scale * lora_B.bias (lora_bias=True)."""

    module: LoraModule

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.bias.shape

    def read(self, src: "LoraDelta", e0: int, e1: int, buffers):
        bias = self.module.bias
        return src.adapter.read_into(bias, e0, e1, buffers("bias", (e1 - e0) * itemsize(bias.dtype)))

    def delta(self, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        return torch.mul(to_float(payload, self.module.bias.dtype, "bias"), self.module.scale, out=out)


@dataclass(frozen=True, eq=False)
class SavedCopy:
    """A full tensor trained on the Base (modules_to_save, bias="all"): its update is copy - base."""

    saved: TensorInfo
    base: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.saved.shape

    def read(self, src: "LoraDelta", e0: int, e1: int, buffers):
        n = e1 - e0
        return (src.adapter.read_into(self.saved, e0, e1, buffers("saved", n * itemsize(self.saved.dtype))),
                src.base.read_into(self.base, e0, e1, buffers("base", n * itemsize(self.base.dtype))))

    def delta(self, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        saved_raw, base_raw = payload
        return torch.sub(to_float(saved_raw, self.saved.dtype, "saved"), to_float(base_raw, self.base.dtype, "base"),
                         out=out)


# --- targets: what an adapter key changes, before the plan asks for entries -------------------------------
@dataclass(frozen=True, eq=False)
class WeightTarget:
    """A module's weight (plain LoRA or DoRA)."""

    module: LoraModule

    def entry(self, src: "LoraDelta", name: str):
        mod = self.module
        base = src.base_for(name, mod.shape, needed=mod.magnitude is not None)
        inst = src.instruct.tensors.get(name)
        if mod.magnitude is not None and mod.transposed and inst is not None and tuple(inst.shape) != tuple(mod.shape):
            raise ShadowMergeError(f"{name}: a DoRA update normalises over all {mod.shape[0]} rows, but the instruct "
                                   f"has {inst.shape[0]}; it cannot be grafted onto a resized tensor: exclude it with "
                                   f"--exclude, or pass an Instruct with the Base's vocabulary")
        return LoraWeight(mod, base if mod.magnitude is not None else None)


@dataclass(frozen=True, eq=False)
class BiasTarget:
    """A module's bias (lora_bias=True)."""

    module: LoraModule

    def entry(self, src: "LoraDelta", name: str):
        return LoraBias(self.module)


@dataclass(frozen=True, eq=False)
class SavedTarget:
    """A full copy saved by peft (modules_to_save, bias="all")."""

    info: TensorInfo

    def entry(self, src: "LoraDelta", name: str):
        return SavedCopy(self.info, src.base_for(name, self.info.shape, needed=True))


@dataclass(frozen=True, eq=False)
class ParameterTarget:
    """A 3-D expert parameter of peft's target_parameters, resolved to FusedExperts or per-expert WeightTargets
    against the instruct's names before planning."""

    module: LoraModule
    shape: tuple[int, int, int]
    transposed: bool


def product(mod: LoraModule, a_raw, b_raw, geo: tuple, out: torch.Tensor, to_float) -> torch.Tensor:
    """scale * B @ A for one piece (float32), as a (rows, cols) view of out; a_raw and b_raw hold the piece's
    slices as stored (one of them may be Wide), to_float(raw, dtype, key) widens them on the compute device."""
    r0, r1, c0, c1 = geo
    rows, cols, rank = r1 - r0, c1 - c0, mod.rank
    d = out.view(rows, cols)
    if mod.transposed:           # peft: (B @ A).T * scale; rows of the update are columns of A
        a = to_float(a_raw, mod.A.dtype, "lora_A").view(rank, rows)
        if isinstance(b_raw, Wide):
            for k0, k1, raw in b_raw.blocks():
                d[:, k0:k1].copy_(torch.matmul(to_float(raw, mod.B.dtype, "wide").view(k1 - k0, rank), a).T)
        else:
            d.copy_(torch.matmul(to_float(b_raw, mod.B.dtype, "lora_B").view(cols, rank), a).T)
    else:                        # peft: (B @ A) * scale
        b = to_float(b_raw, mod.B.dtype, "lora_B").view(rows, rank)
        if isinstance(a_raw, Wide):
            for k0, k1, raw in a_raw.blocks():
                d[:, k0:k1].copy_(torch.matmul(b, to_float(raw, mod.A.dtype, "wide").view(rank, k1 - k0)))
        else:
            torch.matmul(b, to_float(a_raw, mod.A.dtype, "lora_A").view(rank, cols), out=d)
    return d.mul_(mod.scale)


@dataclass(frozen=True, eq=False)
class FusedExperts:
    """A fused expert parameter stored as it is loaded, [E, d1, d2]: expert e's update is its own LoRA."""

    shape: tuple[int, int, int]
    experts: list

    @property
    def tile(self) -> int:
        """Rows per piece, as for a LoraWeight (every expert has the adapter's rank)."""
        return max(1, TILE_ELEMENTS // max((m.rank for m in self.experts), default=1))

    def entry(self, src: "LoraDelta", name: str) -> "FusedExperts":
        return self                  # its own entry: the per-expert modules hold everything a piece needs

    def read(self, src: "LoraDelta", e0: int, e1: int, buffers):
        return [(mod, f0 - e0, src.factors(mod, g0, g1, buffers, f"{k}"))
                for k, (mod, f0, g0, g1) in enumerate(self.subpieces(e0, e1))]

    def delta(self, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        for mod, at, (a_raw, b_raw, geo) in payload:
            r0, r1, c0, c1 = geo
            product(mod, a_raw, b_raw, geo, out[at: at + (r1 - r0) * (c1 - c0)], to_float)
        return out

    def subpieces(self, e0: int, e1: int):
        """The flat piece [e0, e1) as (expert's module, flat start, g0, g1): [g0, g1) within that expert's
        (d1, d2) update, each whole rows or one row's segment (what a LoRA piece is)."""
        _, d1, d2 = self.shape
        size = d1 * d2
        f = e0
        while f < e1:
            e, g = divmod(f, size)
            end = min(e1 - e * size, size)
            if g % d2:                                     # the rest of a started row
                stop = min(end, (g // d2 + 1) * d2)
            elif end - g >= d2:                            # whole rows
                stop = g + (end - g) // d2 * d2
            else:                                          # the start of a row
                stop = end
            yield self.experts[e], f, g, stop
            f = e * size + stop


