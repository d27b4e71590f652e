"""LoraDelta: the delta source for a LoRA adapter trained on the Base (its kinds of targets and entries, each
reading and computing its own pieces, are in entries.py).

For each adapted weight the update is scale * B @ A in float32 (transposed for embeddings and
fan_in_fan_out), exactly as peft computes it; a lora_B bias adds scale * bias. Two kinds need the
Base weights W_B: DoRA, whose merged weight is m * (W_B + dW) / ||W_B + dW|| (norm per output
unit), so the update is that minus W_B; and full copies (modules_to_save, bias="all"), whose
update is copy - W_B.

Adapter keys use the names of the loaded model; a checkpoint that transformers renames on loading
(vision-language models: `language_model.model.*` on disk, `model.language_model.*` in memory) has its
targets renamed to the on-disk names with transformers' own conversion mapping (names.disk_to_memory),
so the output keeps the Instruct's layout.

Memory is bounded by elements, like every other source: each piece (chunks.ranges, at most
`tile = entries.TILE_ELEMENTS // rank` rows) reads only the rows of B and the columns of A it needs. Where
the one along the update's columns would pass TILE_ELEMENTS (rank x width: a high rank on a wide layer), it
is an entries.Wide, read by the compute thread in blocks as it multiplies, once per piece. Where a piece
cannot see a whole DoRA normalisation unit (embeddings and fan_in_fan_out normalise over all rows; a row
longer than a chunk is cut into segments), the norms are computed first in a streamed pass over the same
pieces, accumulated in float64.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import torch

from ..checkpoint import Checkpoint, TensorInfo
from ..chunks import CHUNK_ELEMENTS, geometry, ranges
from ..deltas import tied_alias, tied_away
from ..errors import ShadowMergeError
from ..names import converted_error, disk_to_memory, parameters_of, stacked_experts
from ..sources import register
from ..formats.safetensors import itemsize
from ..tensors import Buffers
from . import entries
from .adapter import Adapter, LoraModule
from .entries import BiasTarget, FusedExperts, LoraWeight, ParameterTarget, SavedTarget, WeightTarget, product

OTHER = "pass the Instruct of the model the adapter was trained on"      # the next step for a foreign adapter
FORMULA = ("out = float32(I) + alpha * scale * (float32(lora_B) @ float32(lora_A)), cast once to the output dtype; "
           "DoRA: alpha * (m * (W_B + dW) / ||W_B + dW|| - W_B); full copies: alpha * (copy - W_B)")


@register
class LoraDelta:
    """Deltas from a PEFT LoRA adapter; tensors the adapter does not touch are copied."""

    kind = "lora"
    #: Instruct tensors without an adapter entry are copied, not an error.
    strict = False
    formula = FORMULA
    mismatch_hint = ("the adapter was made for another model: pass the Instruct of the Base it was trained on, or "
                     "leave the extra targets out with --exclude")

    def __init__(self, adapter: Adapter, base: Checkpoint | None, instruct: Checkpoint, flag: str = "--lora"):
        why = adapter.needs_base()
        if why and base is None:
            raise ShadowMergeError(f"the adapter {'; and '.join(why)}: pass --base, the model the adapter was "
                                   f"trained on (the update cannot be taken from the Instruct)")
        self.adapter, self.base, self.instruct = adapter, base, instruct
        self.checkpoints = (base,) if base is not None else ()
        self.warnings: list[str] = []
        quantized = adapter.quantized_hint()      # a quantized --base itself is refused when it is opened
        if quantized:
            self.warnings.append(f"the adapter was trained against quantized weights ({quantized}, QLoRA): it "
                                 f"learned to correct the quantized Base, and is grafted as is onto unquantized "
                                 f"Instruct weights")
        self._targets: dict[str, object] = {}        # name -> a target (above), or FusedExperts
        for mod in adapter.modules.values():
            if mod.on_parameter:
                self._targets.update(self._parameter_target(mod, instruct))
                continue
            self._targets[f"{mod.name}.weight"] = WeightTarget(mod)
            if mod.bias is not None:
                self._targets[f"{mod.name}.bias"] = BiasTarget(mod)
        for name, info in adapter.saved.items():
            if name in self._targets:
                raise ShadowMergeError(f"--lora {adapter.ref}: {name} is both LoRA-adapted and saved in full; "
                                       f"the adapter is inconsistent: re-save it with peft's save_pretrained")
            self._targets[name] = SavedTarget(info)
        self.renamed: dict[str, str] = {}
        self._mapping_known = True
        self._to_disk_names(instruct)
        self._fused_on_disk(instruct)
        if not any(n in instruct.tensors or tied_away(instruct, n) for n in self._targets):
            base_model = f" (its base_model_name_or_path is {adapter.base_model})" if adapter.base_model else ""
            model = instruct.label
            if not self._mapping_known:
                raise ShadowMergeError(
                    f"{flag} {adapter.ref}: none of its {len(self._targets)} target(s) is in the {model} by name (e.g. "
                    f"{sorted(self._targets)[0]}), and transformers cannot say how it loads the {model} (its "
                    f"config.json names no architecture it can build here), so the adapter's in-memory names cannot "
                    f"be mapped; pass a {model} with transformers' own config.json, the one the adapter was made "
                    f"for{base_model}")
            which = "the Instruct of the Base it was trained on" if model == "instruct" else "the Base it was trained on"
            raise ShadowMergeError(
                f"{flag} {adapter.ref}: none of its {len(self._targets)} target(s) is in the {model} "
                f"(e.g. {sorted(self._targets)[0]}): the adapter was made for another model{base_model}; pass "
                f"{which}")
        self._norms_of: dict = {}         # entry -> DoRA norms, the last few (the reader and TIES' passes ask)
        self._norms_lock = threading.Lock()
        self._local = threading.local()

    def _to_disk_names(self, instruct: Checkpoint) -> None:
        """Rename targets given in the loaded model's names to the names the instruct stores them under."""
        unmatched = [n for n in self._targets if n not in instruct.tensors and not tied_away(instruct, n)]
        if not unmatched:
            return
        by_memory: dict[str, list] = {}
        loaded_as = disk_to_memory(instruct.folder, list(instruct.tensors))
        self._mapping_known = bool(loaded_as)
        for loaded in loaded_as.values():
            if loaded.memory != loaded.disk:
                by_memory.setdefault(loaded.memory, []).append(loaded)
        for name in unmatched:
            found = by_memory.get(name)
            if not found:
                continue
            target = self._targets[name]
            if isinstance(target, ParameterTarget) and found[0].converter is not None:
                del self._targets[name]
                self._targets.update(self._expert_targets(target, found, instruct))
                self.renamed[name] = f"{len(found)} tensors"
                continue
            if found[0].converter is not None or len(found) > 1:
                raise converted_error(self.adapter.ref, name, found)
            self.renamed[name] = found[0].disk
            self._targets[found[0].disk] = self._targets.pop(name)

    def _fused_on_disk(self, instruct: Checkpoint) -> None:
        """Fused expert parameters the instruct stores as they are loaded: one 3-D tensor, expert by expert."""
        for name, target in list(self._targets.items()):
            if not isinstance(target, ParameterTarget):
                continue
            mod, shape, transposed = target.module, target.shape, target.transposed
            info = instruct.tensors.get(name)
            if info is None or tuple(info.shape) != tuple(shape):
                raise ShadowMergeError(
                    f"--lora {self.adapter.ref}: the adapter changes the fused expert parameter {name} "
                    f"{list(shape)}, which the instruct "
                    f"{'stores as ' + str(list(info.shape)) if info is not None else 'does not hold'}; pass the "
                    f"Instruct of the Base the adapter was trained on")
            experts, d1, d2 = shape
            per_expert = [_expert_module(mod, name, e, experts, 0, d2 if transposed else d1, transposed)
                          for e in range(experts)]
            self._targets[name] = FusedExperts(tuple(shape), per_expert)

    def _parameter_target(self, mod: LoraModule, instruct: Checkpoint) -> dict:
        """The parameter a LoRA of peft's target_parameters changes, found as peft finds it: the module's own
        parameters in the order it registers them, matched against target_parameters; nested wrappers
        (module.base_layer...) hold the earlier ones, the outermost the last."""
        ad = self.adapter
        module = mod.name.replace(".base_layer", "")
        depth = mod.name.count(".base_layer")
        found = parameters_of(instruct.folder, list(instruct.tensors), module)
        where = f"--lora {ad.ref}: module {mod.name} (LoRA on parameters, target_parameters)"
        if found is None:
            raise ShadowMergeError(f"{where}: the instruct's model has no module {module}; the adapter was made for "
                                   f"another model: {OTHER}")
        params, transposed = found
        wanted = ad.config.get("target_parameters") or []
        matched = [(p, shape) for p, shape in params
                   if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in wanted)]
        if depth >= len(matched):
            raise ShadowMergeError(f"{where}: {module} has {len(matched)} targeted parameter(s), too few for this "
                                   f"nesting; the adapter does not match the instruct's model: {OTHER}")
        param, shape = matched[len(matched) - 1 - depth]
        name = f"{module}.{param}"
        if len(shape) == 2:          # a 2-D parameter (a router's weight): peft merges it like a linear layer
            ad.parameter_scale(mod, name, 1)
            mod.on_parameter = False
            return {name: WeightTarget(replace(mod, name=module))}
        if len(shape) != 3:
            raise ShadowMergeError(f"{where}: {name} has {len(shape)} dimensions; only 2-D and 3-D (experts) "
                                   f"parameters are merged: leave it out of target_parameters")
        experts, d1, d2 = shape
        ad.parameter_scale(mod, name, experts)
        in_dim, out_dim = (d1, d2) if transposed else (d2, d1)
        if tuple(mod.A.shape) != (mod.rank * experts, in_dim) or tuple(mod.B.shape) != (out_dim, mod.rank * experts):
            raise ShadowMergeError(f"{where}: lora_A {list(mod.A.shape)} / lora_B {list(mod.B.shape)} do not fit "
                                   f"{name} {list(shape)}; the adapter was made for another model: {OTHER}")
        return {name: ParameterTarget(mod, tuple(shape), transposed)}

    def _expert_targets(self, target: ParameterTarget, found: list, instruct: Checkpoint) -> dict:
        """Per-expert on-disk tensors of a fused parameter, each a slice of one expert's update."""
        mod, (experts, d1, d2), transposed = target.module, target.shape, target.transposed
        where = f"--lora {self.adapter.ref}: the fused expert parameter of {mod.name}"
        slots = {}
        for loaded in found:
            slot = stacked_experts(loaded)
            if slot is None or transposed:
                raise converted_error(self.adapter.ref, loaded.memory, found)
            slots[slot] = loaded.disk
        sources = 1 + max(j for j, _ in slots)
        if set(slots) != {(j, e) for j in range(sources) for e in range(experts)}:
            raise ShadowMergeError(f"{where}: the instruct stores {len(slots)} expert tensors for it, not "
                                   f"{sources * experts}; it does not match the adapter's model: {OTHER}")
        out = {}
        for e in range(experts):
            row0 = 0
            for j in range(sources):
                disk = slots[(j, e)]
                info = instruct.tensors[disk]
                if len(info.shape) != 2 or info.shape[1] != d2:
                    raise converted_error(self.adapter.ref, found[0].memory, found)
                out[disk] = WeightTarget(_expert_module(mod, disk, e, experts, row0, info.shape[0]))
                row0 += info.shape[0]
            if row0 != d1:
                raise ShadowMergeError(f"{where}: expert {e}'s tensors have {row0} rows together, the fused "
                                       f"parameter {d1}; {OTHER}")
        return out

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.lora is not None

    @classmethod
    def open(cls, spec, instruct: Checkpoint, opened: list) -> "LoraDelta":
        base = None
        if spec.base is not None:
            base = Checkpoint.open(spec.base, "base", spec.allow_pickle, spec.stream)
            opened.append(base)
        opened.append(Adapter.open(spec.lora, spec.allow_pickle, spec.stream))
        return cls(opened[-1], base, instruct)

    def card_inputs(self) -> dict:
        if self.base is None and self.adapter.base_model:
            return {"Base (the adapter's base_model_name_or_path)": self.adapter.base_model}
        return {}

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
            "renamed_to_checkpoint_names": len(self.renamed),
            "base_copies_not_used": sorted(a.base_copies),
            "keys": len(a.tensors)}}

    def names(self) -> set[str]:
        return set(self._targets)

    def rows(self, entry) -> int:
        return entry.shape[0]

    def entry(self, name: str):
        target = self._targets.get(name)
        return None if target is None else target.entry(self, name)

    def base_for(self, name: str, shape, needed: bool) -> TensorInfo | None:
        """The Base's tensor for a target (None without --base), checked; `needed`: DoRA and full copies."""
        base = tied_alias(self.base, name) if self.base is not None else None
        if base is not None and tuple(base.shape) != tuple(shape):
            raise ShadowMergeError(f"shape differs for {name}: base {list(base.shape)}, adapter {list(shape)}; "
                                   f"pass the Base the adapter was trained on")
        if needed:
            if base is None:
                raise ShadowMergeError(f"--base {self.base.ref} has no tensor {name}, which the adapter needs; pass "
                                       f"the Base the adapter was trained on")
            if not base.dtype.is_floating_point:
                raise ShadowMergeError(f"base tensor {name} is {base.dtype}; exclude it with --exclude")
        return base

    # --- reader thread: each entry reads its own bytes ----------------------------------------
    def read(self, entry, e0: int, e1: int, buffers):
        return entry.read(self, e0, e1, buffers)

    def factors(self, mod: LoraModule, e0: int, e1: int, buffers, key: str = "") -> tuple:
        """Raw bytes of the rows of B and the columns of A that the piece [e0, e1) of the update needs; the one
        along the update's columns is entries.Wide where its slice would pass entries.TILE_ELEMENTS."""
        geo = geometry(e0, e1, mod.shape[1])
        r0, r1, c0, c1 = geo
        (a0, a1), (b0, b1) = ((r0, r1), (c0, c1)) if mod.transposed else ((c0, c1), (r0, r1))
        rank, wide = mod.rank, mod.rank * (c1 - c0) > entries.TILE_ELEMENTS
        if wide and mod.transposed:
            b = entries.Wide(self, mod, "B", b0, b1)
        else:
            b = self.factor(mod, "B", b0, b1, buffers("lora_B" + key, (b1 - b0) * rank * itemsize(mod.B.dtype)))
        if wide and not mod.transposed:
            a = entries.Wide(self, mod, "A", a0, a1)
        else:
            a = self.factor(mod, "A", a0, a1, buffers("lora_A" + key, (a1 - a0) * rank * itemsize(mod.A.dtype)))
        return a, b, geo

    def factor(self, mod: LoraModule, which: str, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Raw bytes of A's columns or B's rows [lo, hi), as a contiguous (rank, hi - lo) or (hi - lo, rank) block."""
        if which == "A":
            return self.adapter.read_columns(mod.A, lo, hi, out)
        if mod.expert is None:
            return self.adapter.read_into(mod.B, lo * mod.rank, hi * mod.rank, out)
        return self._expert_columns(mod, lo, hi, out)

    def scratch(self) -> Buffers:
        """The calling thread's own host buffers (Wide factors are read by the compute threads)."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = Buffers(torch.device("cpu"))
        return buffers

    def _expert_columns(self, mod: LoraModule, b0: int, b1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [b0, b1) of B's columns e, e + E, ... (expert e's rank columns), read in blocks of whole rows
        bounded by entries.TILE_ELEMENTS, as raw bytes of a contiguous (b1 - b0, rank) block."""
        e, experts = mod.expert
        width, size = mod.B.shape[1], itemsize(mod.B.dtype)
        block = max(1, entries.TILE_ELEMENTS // width)
        dst = out.view(mod.B.dtype).view(b1 - b0, mod.rank)
        scratch = torch.empty(min(block, b1 - b0) * width * size, dtype=torch.uint8)
        for k in range(b0, b1, block):
            n = min(block, b1 - k)
            rows = self.adapter.read_into(mod.B, k * width, (k + n) * width, scratch[: n * width * size])
            dst[k - b0: k - b0 + n].copy_(rows.view(mod.B.dtype).view(n, width)[:, e::experts])
        return out[: (b1 - b0) * mod.rank * size]

    def norms(self, entry: LoraWeight) -> torch.Tensor:
        """DoRA's ||W_B + dW|| per output unit, streamed over the tensor (float64 sums), for one entry at a time."""
        with self._norms_lock:
            got = self._norms_of.get(id(entry))
        if got is not None and got[0] is entry:
            return got[1]
        mod = entry.module
        rows, cols = mod.shape
        sums = torch.zeros(cols if mod.transposed else rows, dtype=torch.float64)

        def alloc(key, n):
            return torch.empty(n, dtype=torch.uint8)

        def to_float(raw, dtype, key):
            return raw.view(dtype).float()

        for e0, e1 in ranges(0, rows * cols, cols, CHUNK_ELEMENTS, entry.tile):
            a, b, geo = self.factors(mod, e0, e1, alloc)
            r0, r1, c0, c1 = geo
            d = torch.empty((r1 - r0) * (c1 - c0), dtype=torch.float32)
            product(mod, a, b, geo, d, to_float)
            w = self.base.read_into(entry.base, e0, e1, alloc("base", (e1 - e0) * itemsize(entry.base.dtype)))
            sq = (w.view(entry.base.dtype).float().view(r1 - r0, c1 - c0) + d.view(r1 - r0, c1 - c0)).double().square()
            if mod.transposed:
                sums[c0:c1] += sq.sum(0)
            else:
                sums[r0:r1] += sq.sum(1)
        norms = sums.sqrt().float()
        with self._norms_lock:
            while len(self._norms_of) >= 4:
                self._norms_of.pop(next(iter(self._norms_of)))
            self._norms_of[id(entry)] = (entry, norms)
        return norms

    # --- compute (main thread, on the arithmetic device): each entry computes its own delta ---------
    def delta_into(self, entry, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        return entry.delta(payload, out, to_float)


def _expert_module(mod: LoraModule, disk: str, e: int, experts: int, row0: int, rows: int,
                   transposed: bool = False) -> LoraModule:
    """Rows [row0, row0 + rows) of B for expert e, as a plain LoRA: B's rank columns for expert e are
    e, e + E, ... (read strided), A's rows e * r .. (e + 1) * r. Where the model stores experts (in, out)
    (transposed), the update is (B @ A).T, as for fan_in_fan_out."""
    r, size = mod.rank, itemsize(mod.A.dtype)
    if mod.A.offset is None or mod.B.offset is None:
        raise ShadowMergeError(f"{mod.name}: LoRA on expert parameters needs a safetensors adapter; re-save it")
    a = replace(mod.A, name=f"{mod.A.name}[expert {e}]", shape=(r, mod.A.shape[1]),
                offset=mod.A.offset + e * r * mod.A.shape[1] * size, nbytes=r * mod.A.shape[1] * size)
    width, bsize = mod.B.shape[1], itemsize(mod.B.dtype)
    b = replace(mod.B, name=f"{mod.B.name}[rows {row0}..{row0 + rows}]", shape=(rows, width),
                offset=mod.B.offset + row0 * width * bsize, nbytes=rows * width * bsize)
    return replace(mod, name=disk[: -len(".weight")] if disk.endswith(".weight") else disk, A=a, B=b,
                   expert=(e, experts), on_parameter=False, keys=list(mod.keys), fan_in_fan_out=transposed)
