"""LoraDelta: the delta source for a LoRA adapter trained on the Base.

For each adapted weight the update is scale * B @ A in float32 (transposed for embeddings and
fan_in_fan_out), exactly as peft computes it; a lora_B bias adds scale * bias. Two kinds need the
Base weights W_B: DoRA, whose merged weight is m * (W_B + dW) / ||W_B + dW|| (norm per output
unit), so the update is that minus W_B; and full copies (modules_to_save, bias="all"), whose
update is copy - W_B. The small A/B matrices of one module are read once and kept while its
rows stream through; Base rows are read chunk by chunk like any other input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..deltas import tied_alias
from ..errors import ShadowMergeError
from .adapter import Adapter, LoraModule

FORMULA = ("out = float32(I) + alpha * scale * (float32(lora_B) @ float32(lora_A)), cast once to the output dtype; "
           "DoRA: alpha * (m * (W_B + dW) / ||W_B + dW|| - W_B); full copies: alpha * (copy - W_B)")


@dataclass(frozen=True, eq=False)
class LoraWeight:
    """A module's weight: scale * B @ A, re-normalised against the Base's weight for DoRA."""

    module: LoraModule
    base: TensorInfo | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.shape

    @property
    def whole(self) -> bool:
        """DoRA normalises over rows here (embeddings, fan_in_fan_out), so the tensor goes in one chunk."""
        return self.module.magnitude is not None and self.module.transposed


@dataclass(frozen=True, eq=False)
class LoraBias:
    """A module's bias: scale * lora_B.bias (lora_bias=True)."""

    module: LoraModule

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.bias.shape


@dataclass(frozen=True, eq=False)
class SavedCopy:
    """A full tensor trained on the Base (modules_to_save, bias="all"): its update is copy - base."""

    saved: TensorInfo
    base: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.saved.shape


class LoraDelta:
    """Deltas from a PEFT LoRA adapter; tensors the adapter does not touch are copied."""

    kind = "lora"
    #: Instruct tensors without an adapter entry are copied, not an error.
    strict = False
    formula = FORMULA
    mismatch_hint = ("the adapter was made for another model: pass the Instruct of the Base it was trained on, or "
                     "leave the extra targets out with --exclude")

    def __init__(self, adapter: Adapter, base: Checkpoint | None, instruct: Checkpoint):
        why = adapter.needs_base()
        if why and base is None:
            raise ShadowMergeError(f"the adapter {'; and '.join(why)}: pass --base, the model the adapter was "
                                   f"trained on (the update cannot be taken from the Instruct)")
        self.adapter, self.base, self.instruct = adapter, base, instruct
        self.checkpoints = (base,) if base is not None else ()
        self.warnings: list[str] = []
        quantized = adapter.quantized_hint()
        if base is not None and base.config.get("quantization_config"):
            quantized = base.ref
        if quantized:
            self.warnings.append(f"the adapter was trained against quantized weights ({quantized}, QLoRA): it "
                                 f"learned to correct the quantized Base, and is grafted as is onto unquantized "
                                 f"Instruct weights")
        self._targets: dict[str, tuple[str, object]] = {}
        for mod in adapter.modules.values():
            self._targets[f"{mod.name}.weight"] = ("weight", mod)
            if mod.bias is not None:
                self._targets[f"{mod.name}.bias"] = ("bias", mod)
        for name, info in adapter.saved.items():
            if name in self._targets:
                raise ShadowMergeError(f"--lora {adapter.ref}: {name} is both LoRA-adapted and saved in full; "
                                       f"the adapter is inconsistent")
            self._targets[name] = ("saved", info)
        self._cache: tuple[str | None, tuple] = (None, ())

    def describe(self) -> dict:
        out = {"lora": self.adapter.describe()}
        if self.base is not None:
            out["base"] = self.base.ref
        if self.adapter.base_copies:
            out["not used"] = (f"{len(self.adapter.base_copies)} copy(ies) of the Base's own weights saved by peft "
                               f"({', '.join(self.adapter.base_copies)}): the Instruct's are kept")
        return out

    def record(self) -> dict:
        """The adapter part of the run record: what was in it and where each key went."""
        a = self.adapter
        return {"adapter": {
            "base_model_name_or_path": a.base_model,
            "modules": {m.name: {"rank": m.rank, "scale": m.scale, "dora": m.magnitude is not None,
                                 "bias": m.bias is not None, "embedding": m.embedding,
                                 "fan_in_fan_out": m.fan_in_fan_out} for m in a.modules.values()},
            "full_copies": sorted(a.saved),
            "base_copies_not_used": sorted(a.base_copies),
            "keys": len(a.tensors)}}

    def names(self) -> set[str]:
        return set(self._targets)

    def rows(self, entry) -> int:
        return entry.shape[0]

    def entry(self, name: str):
        target = self._targets.get(name)
        if target is None:
            return None
        kind, obj = target
        if kind == "bias":
            return LoraBias(obj)
        shape = obj.shape
        base = tied_alias(self.base, name) if self.base is not None else None
        if base is not None and tuple(base.shape) != tuple(shape):
            raise ShadowMergeError(f"shape differs for {name}: base {list(base.shape)}, adapter {list(shape)}; "
                                   f"pass the Base the adapter was trained on")
        if kind == "saved" or obj.magnitude is not None:
            if base is None:
                raise ShadowMergeError(f"--base {self.base.ref} has no tensor {name}, which the adapter needs; pass "
                                       f"the Base the adapter was trained on")
            if not base.dtype.is_floating_point:
                raise ShadowMergeError(f"base tensor {name} is {base.dtype}; exclude it with --exclude")
        if kind == "saved":
            return SavedCopy(obj, base)
        entry = LoraWeight(obj, base if obj.magnitude is not None else None)
        inst = self.instruct.tensors.get(name)
        if entry.whole and inst is not None and tuple(inst.shape) != tuple(shape):
            raise ShadowMergeError(f"{name}: a DoRA update normalises over all {shape[0]} rows, but the instruct has "
                                   f"{inst.shape[0]}; it cannot be grafted onto a resized tensor")
        return entry

    # --- reader thread --------------------------------------------------------------------
    def _matrices(self, mod: LoraModule) -> tuple:
        """A, B (and DoRA's m) of one module as raw bytes, read once per module."""
        name, cached = self._cache
        if name != mod.name:
            read = self.adapter.read_tensor
            cached = tuple(read(info).reshape(-1).view(torch.uint8) if info is not None else None
                           for info in (mod.A, mod.B, mod.magnitude))
            self._cache = (mod.name, cached)
        return cached

    def read(self, entry, row0: int, row1: int, buffers):
        rows = row1 - row0
        if isinstance(entry, SavedCopy):
            return (self.adapter.read_into(entry.saved, row0, row1, buffers("saved", rows * entry.saved.row_bytes)),
                    self.base.read_into(entry.base, row0, row1, buffers("base", rows * entry.base.row_bytes)))
        mod = entry.module
        if isinstance(entry, LoraBias):
            return self.adapter.read_into(mod.bias, row0, row1, buffers("bias", rows * mod.bias.row_bytes))
        a, b, m = self._matrices(mod)
        if not mod.transposed:       # rows of the update are rows of B
            b = b[row0 * mod.B.row_bytes: row1 * mod.B.row_bytes]
        base = None
        if entry.base is not None:
            base = self.base.read_into(entry.base, row0, row1, buffers("base", rows * entry.base.row_bytes))
        return a, b, m, base, row0, row1

    # --- compute (main thread, on the arithmetic device) ----------------------------------
    def delta_into(self, entry, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        if isinstance(entry, SavedCopy):
            saved_raw, base_raw = payload
            return torch.sub(to_float(saved_raw, entry.saved.dtype, "saved"),
                             to_float(base_raw, entry.base.dtype, "base"), out=out)
        mod = entry.module
        if isinstance(entry, LoraBias):
            return torch.mul(to_float(payload, mod.bias.dtype, "bias"), mod.scale, out=out)
        a_raw, b_raw, m_raw, base_raw, row0, row1 = payload
        rows, cols = row1 - row0, mod.shape[1]
        a = to_float(a_raw, mod.A.dtype, "lora_A").view(mod.A.shape)
        d = out.view(rows, cols)
        if mod.transposed:           # peft: (B @ A).T * scale
            b = to_float(b_raw, mod.B.dtype, "lora_B").view(mod.B.shape)
            d.copy_(torch.matmul(b, a[:, row0:row1]).T)
        else:                        # peft: (B @ A) * scale
            b = to_float(b_raw, mod.B.dtype, "lora_B").view(rows, mod.rank)
            torch.matmul(b, a, out=d)
        d.mul_(mod.scale)
        if mod.magnitude is None:
            return out
        # DoRA, as peft merges it into the Base: m / ||W_B + dW|| * (W_B + dW); the update is that - W_B.
        w = to_float(base_raw, entry.base.dtype, "base").view(rows, cols)
        m = to_float(m_raw, mod.magnitude.dtype, "magnitude")
        merged = w + d
        if mod.transposed:           # whole tensor: the norm runs over the rows, per column
            factor = (m / torch.linalg.norm(w.T + d.T, dim=1)).view(1, -1)
        else:
            factor = (m[row0:row1] / torch.linalg.norm(merged, dim=1)).view(-1, 1)
        return torch.sub(merged.mul_(factor), w, out=out.view(rows, cols)).view(-1)
