"""`shadowmerge extract`: a full fine-tune's update T - B as a PEFT LoRA adapter (per-module truncated SVD).

Every linear weight (a 2-D `*.weight` that is not an embedding or the head) gets
ΔW = T - B in float32 and its SVD ΔW = U S Vh (on --device); rank r is --rank, or the smallest r
whose singular values hold --energy of Σ s² (capped by --max-rank). The adapter stores
lora_B = U_r √S_r and lora_A = √S_r Vh_r with lora_alpha = r per module (peft's scale 1), so
peft's merge adds exactly the rank-r truncation, the best rank-r approximation in Frobenius norm.
The relative error ‖ΔW - BA‖ / ‖ΔW‖ = √(Σ_{i>r} s²) / √(Σ s²) and the kept energy come from the
singular values themselves and are recorded per module. Factors stored in a narrower --dtype
(bfloat16, float16) are measured instead: the recorded error is that of the factors as stored.

Mixture-of-experts: the 3-D expert parameters a model loads (stacked from experts stored one by one,
or stored fused) each get one LoRA in peft's target_parameters layout, each expert its own truncated
SVD at one rank per parameter.
Other changed tensors (embeddings, head, norms, routers, biases) are dropped by default and their share of
the update is recorded; `--others copy` carries embeddings, head and norms as peft `modules_to_save`
full copies (the tuned Base's values, or, with --for-instruct, the Instruct's plus the update).
Tensors are read one at a time and each result is appended to a spool file as it is made, so memory
holds one ΔW and its SVD, never the adapter; the safetensors file is assembled from the spool at
the end (its header needs every shape, and with --energy a rank is known only after its SVD).
Written by hand: peft builds adapters only around live models, and mergekit's extractor is LGPL
(imported, never copied).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .transports import hub
from .checkpoint import Checkpoint, TensorInfo
from .devices import exact_float32, parse_device
from .errors import ShadowMergeError
from .names import disk_to_memory, meta_model, stacked_experts
from .options import from_call
from .record import FILES
from .output import OutputFolder
from .spec import ExtractSpec
from .pipeline import finish_streams, stream_sources
from .tensors import parse_dtype
from .progress import bar as progress_bar
from .formats.safetensors import build_header

_NOT_LORA = re.compile(r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|lm_head|embed_out|output)\.weight$")


@dataclass
class ExtractSummary:
    out: Path
    modules: list[dict] = field(default_factory=list)
    others: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.modules:
            return f"wrote {self.out}"
        worst = max(self.modules, key=lambda m: m["rel_error"])
        ranks = sorted({m["rank"] for m in self.modules})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        kept = sum(1 for o in self.others if o["kept"])
        return (f"wrote {self.out}: {len(self.modules)} LoRA modules, rank {rank_text}, mean relative error "
                f"{sum(m['rel_error'] for m in self.modules) / len(self.modules):.3g} (worst {worst['rel_error']:.3g}, "
                f"{worst['module']}); {len(self.others)} other changed tensor(s), {kept} kept as full copies; "
                f"{self.seconds:.1f} s" + "".join(f"\nwarning: {w}" for w in self.warnings))


def _read(ckpt: Checkpoint, info: TensorInfo, start: int = 0, count: int | None = None) -> torch.Tensor:
    """A whole tensor (or `count` elements of it from `start`, flat) as float32; memory holds it and its raw bytes."""
    if count is None:
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        ckpt.read_into(info, 0, info.numel, raw)
        return raw.view(info.dtype).reshape(info.shape).float()
    raw = torch.empty(count * info.dtype.itemsize, dtype=torch.uint8)
    ckpt.read_into(info, start, start + count, raw)
    return raw.view(info.dtype).float()


def as_trained(b: Checkpoint, t: Checkpoint, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
    """The Base's values as the trainer saw them: an FP8 Base is loaded decoded and saved in the tuned model's
    dtype, so its untouched tensors are that rounding of the Base (the rule of deltas.FullDelta)."""
    value = _read(b, b.tensors[name], start, count)
    tuned = t.tensors[name]
    if b.tensors[name].codec is not None and tuned.codec is None and tuned.dtype != torch.float32:
        value = value.to(tuned.dtype).float()
    return value


def _rank(s: torch.Tensor, rank: int | None, energy: float | None, max_rank: int) -> int:
    if rank is not None:
        return max(1, min(rank, s.numel()))
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    r = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    return max(1, min(r, max_rank, s.numel()))


_POSITIONAL = ("base", "tuned", "out")


@dataclass(frozen=True)
class _How:
    """An ExtractSpec's settings as the extraction uses them (the dtype and device resolved)."""
    rank: int | None
    energy: float | None
    max_rank: int
    others: str
    out_dtype: torch.dtype | None
    device: torch.device


def extract(*args, **options) -> ExtractSummary:
    """Write the update tuned - base as a LoRA adapter at `out` (for `for_instruct` when given).

    `extract(spec)` with an ExtractSpec, or `extract(base, tuned, out, *, rank=..., energy=..., ...)` with its
    fields as keywords. dtype: of every adapter tensor (default: float32 factors, full copies in the tuned
    model's dtype); device: where the SVDs run; check_roles: refuse inputs that look exchanged (roles.py).
    Returns what was written, per module.
    """
    return run(from_call(ExtractSpec, _POSITIONAL, args, options, "extract"))


def run(spec: ExtractSpec) -> ExtractSummary:
    """The extraction an ExtractSpec describes (its rank, energy and others were checked when it was made)."""
    base, tuned, progress = spec.base, spec.tuned, spec.progress
    out_dtype, dev = parse_dtype(spec.dtype), parse_device(spec.device)
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ShadowMergeError(f"--dtype {spec.dtype}: an adapter's tensors are floating point; use bfloat16, float16 "
                               f"or float32")
    opts = _How(spec.rank, spec.energy, spec.max_rank, spec.others, out_dtype, dev)
    start = time.perf_counter()
    opened: list[Checkpoint] = []
    try:
        for ref, label in ((base, "base"), (tuned, "tuned"), (spec.for_instruct, "instruct")):
            if ref is not None:
                opened.append(Checkpoint.open(ref, label, spec.allow_pickle))
        b, t, inst = (opened + [None])[:3]
        if spec.check_roles and b.folder.resolve() == t.folder.resolve():
            raise ShadowMergeError(f"--base and --tuned are the same model ({base}); pass the fine-tune of the Base as "
                                   f"--tuned")
        names = _check(b, t, inst)
        target = OutputFolder(spec.out, force=spec.force, inputs=[c.folder for c in opened], need_bytes=0,
                              record=FILES["extract"])
        summary = ExtractSummary(target.target)
        ranks: dict[str, int] = {}         # LoRA target -> rank: modules, and (experts) parameters
        keep: set[str] = set()
        with target as tmp, _Spool(tmp / ".adapter.spool") as state:
            applied_to = inst if inst is not None else b
            for c in opened:           # Hub inputs: download the weights, now that everything was checked
                c.fetch(progress, side=["README.md"] if c is applied_to else False)
            if spec.check_roles:
                from . import roles

                roles.check(inst, b, t, names, instruct_flag="--for-instruct")
            with progress_bar(sum(t.tensors[n].nbytes + b.tensors[n].nbytes for n in names), progress,
                              "extract") as bar, exact_float32(dev):
                _extract(names, b, t, inst, opts, summary, state, ranks, keep, bar,
                         disk_to_memory(applied_to.folder, names), meta_model(applied_to.folder, names))
            if not ranks:
                raise ShadowMergeError(f"--tuned {tuned}: no linear weight differs from --base {base}; there is no "
                                       f"update to extract")
            _write(tmp, state, ranks, sorted(keep), *hub.reference(applied_to), model=meta_model(applied_to.folder,
                                                                                               names))
            summary.warnings += finish_streams(opened)     # streamed inputs: each file read checked whole
            summary.seconds = time.perf_counter() - start
            _report(tmp, summary, opened, spec.settings(out_dtype, dev))
            _card(tmp, summary, applied_to, spec)
            target.commit()
        return summary
    finally:
        for c in opened:
            c.close()


def _extract(names, b, t, inst, opts: _How, summary, state, ranks, keep, bar, memory: dict, model) -> None:
    """Each tensor in turn: a linear weight's ΔW as its truncated SVD; other changes dropped or copied.

    Keys are the loaded model's names, which peft sees (`memory`: names.disk_to_memory; vision-language
    checkpoints are renamed on load); a changed tensor that transformers converts on load (fuses, splits)
    cannot be one LoRA target or copy and is refused. Where transformers can build the model (on the meta
    device, `model`), only nn.Linear modules become LoRA targets (an nn.Embedding is an embedding, a
    transposed GPT-2 Conv1D is left to --others); otherwise the names decide."""
    out_dtype, dev = opts.out_dtype, opts.device
    groups = _expert_groups(names, b, memory, model)
    grouped = {d for g in groups.values() for d in g.slots.values()}
    for name in names:
        if name in grouped:
            continue
        bar.update(t.tensors[name].nbytes + b.tensors[name].nbytes)
        tuned_value = _read(t, t.tensors[name])
        delta = tuned_value - as_trained(b, t, name)
        norm = float(delta.double().norm())
        if norm == 0.0:
            continue
        how = memory.get(name)
        if how is not None and how.converter is not None:
            raise ShadowMergeError(f"{name} changed, and it is converted when the model loads ({how.memory}): such "
                                   f"tensors are not extracted yet; graft the full update with shadowmerge graft "
                                   f"--base --tuned instead")
        if delta.dim() > 2 and "expert" in name:
            raise ShadowMergeError(f"{name} has shape {list(delta.shape)}: these expert tensors are not a parameter "
                                   f"of the model transformers builds from config.json, so they are not extracted; "
                                   f"graft the full update with shadowmerge graft --base --tuned instead")
        loaded = how.memory if how is not None else name
        module = loaded[: -len(".weight")] if loaded.endswith(".weight") else loaded
        if delta.dim() == 2 and name.endswith(".weight") and not _NOT_LORA.search(name) and _linear(model, module):
            r, a, b_, kept, error = _factors(delta.to(dev), norm, opts)
            state.add(f"base_model.model.{module}.lora_A.weight", a)
            state.add(f"base_model.model.{module}.lora_B.weight", b_)
            ranks[module] = r
            summary.modules.append({"module": module, "tensor": name, "shape": list(delta.shape), "rank": r,
                                    "rel_error": error, "energy": kept, "update_norm": norm})
            continue
        copyable = opts.others == "copy" and name.endswith(".weight") and (
            _NOT_LORA.search(name) or delta.dim() == 1 or _is(model, module, torch.nn.Embedding)
            or (delta.dim() == 2 and _is(model, module, torch.nn.Module)))   # a router's, a Conv1D's: whole
        summary.others.append({"tensor": name, "shape": list(delta.shape), "update_norm": norm,
                               "kept": bool(copyable)})
        if copyable:
            full = (_read(inst, inst.tensors[name]) + delta) if inst is not None else tuned_value
            state.add(f"base_model.model.{loaded}", full.to(out_dtype or t.tensors[name].dtype))
            keep.add(module)
    _whole_modules(names, b, t, inst, keep, memory, summary, state, out_dtype)
    for group in groups.values():
        _extract_experts(group, b, t, opts, summary, state, ranks, bar)


def _whole_modules(names, b, t, inst, keep, memory: dict, summary, state, out_dtype) -> None:
    """peft loads a modules_to_save copy whole: the other tensors of a copied module (a router's bias, say) go in
    too, as the Instruct's plus the update (or the tuned Base's)."""
    written = {e[0].removeprefix("base_model.model.") for e in state.entries}
    others = {o["tensor"]: o for o in summary.others}
    for name in names:
        how = memory.get(name)
        loaded = how.memory if how is not None else name
        if loaded in written or loaded.rpartition(".")[0] not in keep:
            continue
        tuned_value = _read(t, t.tensors[name])
        full = _read(inst, inst.tensors[name]) + (tuned_value - as_trained(b, t, name)) if inst is not None \
            else tuned_value
        state.add(f"base_model.model.{loaded}", full.to(out_dtype or t.tensors[name].dtype))
        if name in others:
            others[name]["kept"] = True


@dataclass
class _Experts:
    """A fused 3-D expert parameter of the loaded model, [E, d1, d2], and the on-disk tensors it is built from:
    slots (source j, expert e) -> one 2-D tensor each (experts stored one by one: rows of gate, then of up), or
    (0, -1) -> the 3-D tensor itself. Expert e's update as a linear map is (d1, d2), or its transpose when the
    model stores experts (in, out) (`transposed`)."""

    name: str
    shape: tuple[int, int, int]
    transposed: bool
    slots: dict[tuple[int, int], str]

    def update(self, b: Checkpoint, t: Checkpoint, e: int, dev: torch.device) -> torch.Tensor:
        """Expert e's ΔW as (out, in), float32, on dev."""
        if (0, -1) in self.slots:
            disk = self.slots[(0, -1)]
            size = self.shape[1] * self.shape[2]
            delta = (_read(t, t.tensors[disk], e * size, size) - as_trained(b, t, disk, e * size, size))
            delta = delta.reshape(self.shape[1:])
            return (delta.T if self.transposed else delta).contiguous().to(dev)
        rows = [_read(t, t.tensors[d]) - as_trained(b, t, d)
                for d in (self.slots[(j, e)] for j in range(len(self.slots) // self.shape[0]))]
        return torch.cat(rows).to(dev)


def _expert_groups(names: list[str], b: Checkpoint, memory: dict, model) -> dict[str, _Experts]:
    """The fused expert parameters (3-D, as peft's target_parameters sees them) the checkpoint's tensors load into:
    experts stored one by one that transformers stacks (and concatenates gate with up), or stored fused already."""
    if model is None:
        return {}
    groups: dict[str, _Experts] = {}
    for name in names:
        how = memory.get(name)
        loaded = how.memory if how is not None else name
        try:
            param = model.get_parameter(loaded)
            transposed = bool(getattr(model.get_submodule(loaded.rpartition(".")[0]), "is_transposed", False))
        except AttributeError:
            continue
        if param.dim() != 3 or "expert" not in loaded.rpartition(".")[0]:     # not a 3-D probe, say
            continue
        shape = tuple(param.shape)
        if how is not None and how.converter is not None:
            slot = stacked_experts(how)
            if slot is None or transposed:
                continue            # refused below if it changed: transformers converts it some other way
            groups.setdefault(loaded, _Experts(loaded, shape, transposed, {})).slots[slot] = name
        elif tuple(b.tensors[name].shape) == shape:
            groups[loaded] = _Experts(loaded, shape, transposed, {(0, -1): name})
    for g in groups.values():
        if (0, -1) in g.slots:
            continue
        experts, d1, d2 = g.shape
        sources = 1 + max(j for j, _ in g.slots)
        rows = {e: [b.tensors[g.slots[(j, e)]].shape for j in range(sources) if (j, e) in g.slots]
                for e in range(experts)}
        if len(g.slots) != sources * experts or any(
                len(r) != sources or any(len(s) != 2 or s[1] != d2 for s in r) or sum(s[0] for s in r) != d1
                for r in rows.values()):
            raise ShadowMergeError(f"{g.name}: the checkpoint's {len(g.slots)} expert tensors do not make up its "
                                   f"{list(g.shape)} (experts x rows x columns); re-save the model, or graft the full "
                                   f"update with shadowmerge graft --base --tuned")
    return groups


def _extract_experts(g: _Experts, b: Checkpoint, t: Checkpoint, opts: _How, summary, state, ranks, bar) -> None:
    """A fused expert parameter as one LoRA in peft's target_parameters layout: expert e's truncated SVD is
    lora_A rows e·r … (e+1)·r and lora_B columns e, e + E, …; one rank r for all experts (with --energy the
    largest any expert needs). Memory holds one expert's ΔW and the parameter's factors."""
    rank, energy, max_rank, out_dtype, dev = opts.rank, opts.energy, opts.max_rank, opts.out_dtype, opts.device
    experts = g.shape[0]
    out_dim, in_dim = (g.shape[2], g.shape[1]) if g.transposed else (g.shape[1], g.shape[2])
    bar.update(sum(t.tensors[d].nbytes + b.tensors[d].nbytes for d in g.slots.values()))
    if energy is None:
        r = max(1, min(rank, out_dim, in_dim))
    else:                   # a first pass: the largest rank an expert needs (None: no expert changed)
        r = None
        for e in range(experts):
            delta = g.update(b, t, e, dev)
            if float(delta.double().norm()):
                r = max(r or 1, _rank(torch.linalg.svdvals(delta).cpu(), None, energy, max_rank))
        if r is None:
            return
    a_all = torch.zeros(experts * r, in_dim, dtype=out_dtype or torch.float32)
    b_all = torch.zeros(out_dim, r, experts, dtype=out_dtype or torch.float32)
    error2 = kept2 = total2 = 0.0
    for e in range(experts):
        delta = g.update(b, t, e, dev)
        norm = float(delta.double().norm())
        if norm == 0.0:
            continue                          # its factors stay zero
        _, a, b_, kept, error = _factors(delta, norm, replace(opts, rank=r, energy=None))
        k = a.shape[0]                        # r, or fewer where the expert's ΔW has fewer singular values
        a_all[e * r:e * r + k], b_all[:, :k, e] = a, b_
        error2, kept2, total2 = error2 + (error * norm) ** 2, kept2 + kept * norm ** 2, total2 + norm ** 2
    if total2 == 0.0:
        return
    state.add(f"{g.name}\0A", a_all)
    state.add(f"{g.name}\0B", b_all.reshape(out_dim, r * experts))
    ranks[g.name] = r
    summary.modules.append({"module": g.name, "tensor": sorted(g.slots.values()), "shape": list(g.shape),
                            "experts": experts, "rank": r, "rel_error": (error2 / total2) ** 0.5,
                            "energy": kept2 / total2, "update_norm": total2 ** 0.5})


def _factors(delta: torch.Tensor, norm: float, opts: _How):
    """ΔW's truncated SVD as LoRA factors on the CPU: (rank, A, B, energy kept, relative error of B @ A as stored)."""
    rank, energy, max_rank, out_dtype = opts.rank, opts.energy, opts.max_rank, opts.out_dtype
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    s_cpu = s.cpu()
    r = _rank(s_cpu, rank, energy, max_rank)
    root = s[:r].sqrt()
    a, b_ = root[:, None] * vh[:r], u[:, :r] * root[None, :]
    power = s_cpu.double() ** 2
    kept = float(power[:r].sum() / power.sum())
    error = max(0.0, 1.0 - kept) ** 0.5             # Eckart-Young, exact for float32 factors
    if out_dtype is not None and out_dtype != torch.float32:
        a, b_ = a.to(out_dtype), b_.to(out_dtype)
        error = float(torch.linalg.matrix_norm(delta - b_.float() @ a.float()).double()) / norm
    return r, a.cpu(), b_.cpu(), kept, error


def _is(model, module: str, kind: type) -> bool:
    try:
        return model is not None and isinstance(model.get_submodule(module), kind)
    except AttributeError:
        return False


def _linear(model, module: str) -> bool:
    """Whether a module is an nn.Linear of the loaded model (True when the model is unknown: names decided)."""
    return model is None or _is(model, module, torch.nn.Linear)


def _check(b: Checkpoint, t: Checkpoint, inst: Checkpoint | None) -> list[str]:
    """The floating tensors to compare, in order; names and shapes must match (and the Instruct's, if given)."""
    from .deltas import outside_model

    outside = {n for n in set(b.tensors) - set(t.tensors) if outside_model(t, n)}    # e.g. an MTP layer: no update
    if set(b.tensors) - outside != set(t.tensors):
        only = sorted((set(b.tensors) - outside) ^ set(t.tensors))
        raise ShadowMergeError(f"--base and --tuned hold different tensors (e.g. {only[0]!r}); pass the tuned model "
                               f"and the Base it was trained from")
    for name, info in b.tensors.items():
        if name in outside:
            continue
        if tuple(t.tensors[name].shape) != tuple(info.shape):
            raise ShadowMergeError(f"{name}: base {list(info.shape)}, tuned {list(t.tensors[name].shape)}; pass the "
                                   f"tuned model and the Base it was trained from")
        if inst is not None and (name not in inst.tensors or tuple(inst.tensors[name].shape) != tuple(info.shape)):
            raise ShadowMergeError(f"--for-instruct: {name} is not in the instruct with shape {list(info.shape)}; pass "
                                   f"the Instruct sibling of this Base")
    return [n for n, i in b.tensors.items() if i.dtype.is_floating_point and n not in outside]


class _Spool:
    """Tensors appended to a file as they are made; `finish` writes them as one safetensors file."""

    def __init__(self, path: Path):
        self.path, self.entries = path, []

    def __enter__(self) -> "_Spool":
        self.file = open(self.path, "w+b")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close and remove the spool (it is never part of the output)."""
        if not self.file.closed:
            self.file.close()
            self.path.unlink(missing_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        flat = tensor.contiguous().reshape(-1)
        self.file.write(memoryview(flat.view(torch.uint8).numpy()))
        self.entries.append((name, flat.dtype, tuple(tensor.shape), flat.numel() * flat.element_size()))

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        header, _ = build_header(self.entries, metadata)
        self.file.flush()
        with open(path, "wb") as out:
            out.write(header)
            self.file.seek(0)
            shutil.copyfileobj(self.file, out, 16 << 20)
        self.close()


def _write(tmp: Path, state: _Spool, ranks: dict[str, int], keep: list[str], model_ref: str,
           revision: str | None, model=None) -> None:
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {re.escape(m): r for m, r in ranks.items() if r != default}
    params = sorted(n for n in ranks if any(e[0].startswith(n + "\0") for e in state.entries))
    _parameter_keys(state, params, model)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model_ref,
              "revision": revision,
              "r": default, "lora_alpha": default, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(set(ranks) - set(params)), "target_parameters": params or None,
              "modules_to_save": keep or None, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True}
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state.finish(tmp / "adapter_model.safetensors", {"format": "pt"})


def _parameter_keys(state: _Spool, params: list[str], model) -> None:
    """Name the factors of LoRAs on parameters as peft does: a module's targeted parameters wrap it in order of
    registration, so the last is the outermost (module.lora_A) and each earlier one a base_layer deeper."""
    by_module: dict[str, list[str]] = {}
    for name in params:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    keys = {}
    for module, targeted in by_module.items():
        order = [f"{module}.{p}" for p, _ in model.get_submodule(module).named_parameters(recurse=False)]
        targeted.sort(key=order.index)
        for depth, name in enumerate(reversed(targeted)):
            for f in "AB":
                keys[f"{name}\0{f}"] = f"base_model.model.{module}.{'base_layer.' * depth}lora_{f}.weight"
    state.entries = [(keys.get(n, n), *rest) for n, *rest in state.entries]


def _card(tmp: Path, summary: ExtractSummary, applied_to: Checkpoint, spec: ExtractSpec) -> None:
    """The adapter's own card: base_model is the model it loads onto (the Instruct with --for-instruct)."""
    from . import card

    base, tuned, rank, energy, command = spec.base, spec.tuned, spec.rank, spec.energy, spec.command
    ranks = sorted({m["rank"] for m in summary.modules})
    worst = max(m["rel_error"] for m in summary.modules)
    onto = "its Instruct sibling" if applied_to.label == "instruct" else "the Base"
    card.write(tmp, title=f"The update of {Path(str(tuned)).name} as a LoRA adapter for {Path(applied_to.ref).name}",
               made_from={"loads onto": applied_to.ref, "Base": str(base), "tuned Base": str(tuned)},
               relation="adapter", license_from=applied_to.folder, library="peft",
               what=f"The update of a full fine-tune of a Base model (tuned − Base), extracted as a LoRA adapter "
                    f"by truncated SVD per linear module (`shadowmerge extract`), for {onto}. "
                    f"`extract.json` gives each module's rank and relative error ‖ΔW − BA‖/‖ΔW‖.",
               command=command or card.command_line(None),
               details={"rank": rank if rank is not None else f"energy {energy} (ranks {ranks[0]}–{ranks[-1]})",
                        "modules": len(summary.modules), "largest relative error": f"{worst:.4g}",
                        "other changed tensors": spec.others})


def _report(tmp: Path, summary: ExtractSummary, opened: list[Checkpoint], settings: dict) -> None:
    from .analyzer.plots import pyplot
    from .record import new as new_record
    from .record import write as write_record

    by_role = {c.label: c for c in opened}
    record = new_record("extract", {
              "inputs": {"base": by_role["base"].ref, "tuned": by_role["tuned"].ref,
                         "for_instruct": by_role["instruct"].ref if "instruct" in by_role else None},
              "input_paths": {role: str(c.folder.absolute()) for role, c in by_role.items()},
              "hub": hub.provenance(opened),
              "input_urls": stream_sources(opened),
              "settings": settings,
              "seconds": round(summary.seconds, 3), "modules": summary.modules, "others": summary.others})
    write_record(tmp, record)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = range(len(summary.modules))
    ax.bar(xs, [m["rel_error"] for m in summary.modules], color="tab:blue", label="relative error ‖ΔW − BA‖ / ‖ΔW‖")
    ax.plot(xs, [m["energy"] for m in summary.modules], color="tab:orange", marker=".", linestyle="none",
            label="energy kept: share of Σ s² in the top r\nsingular values")
    ax.set_xlabel("module (in checkpoint order)")
    ax.set_ylabel("share (unitless)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"LoRA extraction of T − B per module: {Path(str(by_role['tuned'].folder)).name}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.savefig(tmp / "extract.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
