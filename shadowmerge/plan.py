"""Plan: what happens to every output tensor, decided from headers before any tensor data is read.

Each Instruct tensor is grafted (out = I + alpha * delta), copied byte for byte, cast to another
dtype, or dropped; with a vocabulary policy, an embedding can be grafted on its common rows and
copied on the rest. Every check that can fail on headers alone (architecture, names, shapes,
dtypes, vocabulary) fails here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .checkpoint import Checkpoint, TensorInfo
from .deltas import INPUT_EMBEDDINGS, OUTPUT_EMBEDDINGS, tied_away
from .errors import ShadowMergeError
from .patterns import Matcher
from .progress import human_bytes
from .sources import DeltaSource, Entry
from .formats.safetensors import itemsize

VOCAB_POLICIES = ("error", "common")
_VOCAB_NAME = re.compile(r"embed|lm_head|wte|word|output|logits")
VOCAB_NAME = _VOCAB_NAME       # (the shadow finder tells vocabulary rows apart the same way)
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass
class TensorPlan:
    """One output tensor: rows [0, graft_rows) are grafted, the rest come from the Instruct."""

    info: TensorInfo            # the Instruct's tensor
    out_dtype: torch.dtype
    entry: Entry | None         # the delta source's entry, None when nothing is grafted
    graft_rows: int
    reason: str = ""            # why rows are not grafted
    encoder: object = None      # written in the Instruct's own stored format (its codec: --dtype fp8)
    scales_of: "TensorPlan | None" = None     # this is the scale grid of that encoded tensor, written after it

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def stored(self) -> TensorInfo:
        """The tensor as the Instruct's file holds it: what a copy copies."""
        return self.info.codec.weight if self.encoder is not None else self.info

    @property
    def action(self) -> str:
        if self.scales_of is not None:
            return "scales"
        if self.graft_rows == 0:
            return "copy" if self.out_dtype == self.stored.dtype and (self.info.codec is None or self.encoder) \
                else "cast"
        return "graft" if self.graft_rows == self.info.rows else "partial"

    @property
    def out_nbytes(self) -> int:
        return self.info.numel * itemsize(self.out_dtype)


@dataclass
class Plan:
    instruct: Checkpoint
    source: DeltaSource
    alpha: float
    tensors: list[TensorPlan]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)

    def counts(self) -> dict[str, int]:
        counts = {"graft": 0, "partial": 0, "copy": 0, "cast": 0, "drop": len(self.dropped)}
        for t in self.tensors:
            if t.scales_of is None:
                counts[t.action] += 1
        return counts

    def render(self, shard_of: dict[str, int], shard_count: int) -> str:
        """The dry-run text: inputs, formula, output, then one line per tensor."""
        inst = self.instruct
        lines = [f"instruct  {inst.ref}  ({', '.join(inst.architecture[1]) or inst.architecture[0]}, "
                 f"{len(inst.tensors)} tensors, {human_bytes(inst.nbytes)})"]
        lines += [f"{k:<9} {v}" for k, v in self.source.describe().items()]
        lines.append(f"formula   out = I + {self.alpha:g} * delta, in float32, cast once to the output dtype")
        lines.append(f"output    {len(self.tensors)} tensors, {human_bytes(self.total_bytes)}, "
                     f"{shard_count} shard(s)")
        lines.append("actions   " + ", ".join(f"{k} {v}" for k, v in self.counts().items()))
        lines += [f"warning   {w}" for w in self.warnings]
        lines.append("")
        lines.append(f"{'action':<8} {'shard':>5}  {'dtype':<12} {'shape':<18} name")
        for t in self.tensors:
            dt = _SHORT.get(t.info.dtype, str(t.info.dtype).replace("torch.", ""))
            if t.out_dtype != t.info.dtype:
                dt += "->" + _SHORT.get(t.out_dtype, str(t.out_dtype).replace("torch.", ""))
            note = f"  ({t.reason})" if t.reason else ""
            lines.append(f"{t.action:<8} {shard_of[t.name]:>5}  {dt:<12} {str(list(t.info.shape)):<18} "
                         f"{t.name}{note}")
        lines += [f"{'drop':<8} {'-':>5}  {'':<12} {'':<18} {name}  ({why})" for name, why in self.dropped]
        return "\n".join(lines)


class _Filters:
    """--include/--exclude, compiled and matched at a bounded cost (tensor names come from files)."""

    def __init__(self, include: str | None, exclude: str | None):
        self._m = Matcher("")
        self.include, self.exclude = include or None, exclude or None
        for pattern, flag in ((self.include, "--include"), (self.exclude, "--exclude")):
            if pattern is not None:
                self._m.compile(pattern, flag)

    def included(self, name: str) -> bool:
        return self.include is None or self._m.search(self.include, name, "--include") is not None

    def excluded(self, name: str) -> bool:
        return self.exclude is not None and self._m.search(self.exclude, name, "--exclude") is not None


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_architecture(instruct: Checkpoint, others: tuple[Checkpoint, ...]) -> None:
    want = instruct.architecture
    for ckpt in others:
        if ckpt.architecture != want:
            def show(arch):
                return f"{'/'.join(arch[1]) or '?'} ({arch[0]})"
            raise ShadowMergeError(
                f"architectures differ: instruct is {show(want)}, {ckpt.label} is {show(ckpt.architecture)}; "
                f"a graft needs the Base and Instruct of one model family: pass the Base of this "
                f"Instruct and a fine-tune of that Base")


def build_plan(instruct: Checkpoint, source: DeltaSource, *, alpha: float = 1.0, include: str | None = None,
               exclude: str | None = None, dtype: torch.dtype | None = None, vocab: str = "error",
               keep_format: bool = False) -> Plan:
    """The output, tensor by tensor. keep_format (--dtype fp8): a tensor the Instruct stores with a codec is written
    in that stored format (its scale grid after it, as its own tensor), every other one in its own dtype."""
    plan = _build_plan(instruct, source, alpha, include, exclude, dtype, vocab)
    if keep_format:
        coded = [t for t in plan.tensors if t.info.codec is not None]
        if not coded:
            raise ShadowMergeError("--dtype fp8 writes the Instruct's FP8 block format, and the instruct stores no "
                                   "FP8 weights; leave --dtype out (or pass bfloat16)")
        tensors = []
        for t in plan.tensors:
            tensors.append(t)
            if t.info.codec is not None:
                t.encoder, t.out_dtype = t.info.codec, t.info.codec.weight.dtype
                scale = t.info.codec.scale
                tensors.append(TensorPlan(scale, scale.dtype, None, 0, "its scales", scales_of=t))
        plan.tensors = tensors
    return plan


def _build_plan(instruct: Checkpoint, source: DeltaSource, alpha: float, include: str | None, exclude: str | None,
                dtype: torch.dtype | None, vocab: str) -> Plan:
    if vocab not in VOCAB_POLICIES:
        raise ShadowMergeError(f"unknown vocabulary policy {vocab!r}; use one of {', '.join(VOCAB_POLICIES)}")
    check_architecture(instruct, tuple(source.checkpoints))
    filters = _Filters(include, exclude)
    plan = Plan(instruct, source, alpha, [], warnings=list(source.warnings))
    has_input_embedding = any(n.endswith(INPUT_EMBEDDINGS) for n in instruct.tensors)
    missing, shape_errors, vocab_errors, outside = [], [], [], []

    for name, info in instruct.tensors.items():
        if instruct.tie_word_embeddings and has_input_embedding and name.endswith(OUTPUT_EMBEDDINGS):
            plan.dropped.append((name, "the instruct config ties it to the input embedding"))
            continue
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else \
            info.codec.output_dtype if info.codec is not None else info.dtype
        reason = ""
        if not filters.included(name):
            reason = "not matched by --include"
        elif filters.excluded(name):
            reason = "matched by --exclude"
        elif not info.dtype.is_floating_point:
            reason = "not floating point"
        entry = None
        if not reason:
            entry = source.entry(name)
            if entry is None:
                reason = source.absent(name) if hasattr(source, "absent") else None
                if reason:
                    outside.append(name)
                elif source.strict:
                    missing.append(name)
                    continue
                else:
                    reason = "no delta for it"
        if entry is None:
            plan.tensors.append(TensorPlan(info, out_dtype, None, 0, reason))
            continue
        graft_rows = info.rows
        if tuple(entry.shape) != info.shape:
            src_rows = source.rows(entry)
            same_tail = len(entry.shape) == len(info.shape) and tuple(entry.shape[1:]) == info.shape[1:]
            if not (same_tail and _VOCAB_NAME.search(name)):
                shape_errors.append(f"{name}: instruct {list(info.shape)}, {source.kind} delta {list(entry.shape)}")
                continue
            if vocab == "error":
                vocab_errors.append((name, info.rows, src_rows))
                continue
            graft_rows = min(info.rows, src_rows)
            reason = f"vocab: rows {graft_rows}..{info.rows} kept from the instruct"
            if src_rows > info.rows:
                plan.warnings.append(f"{name}: the delta has {src_rows - info.rows} row(s) beyond the instruct's "
                                     f"{info.rows}; they are not grafted (the instruct's tokenizer has no such tokens)")
        plan.tensors.append(TensorPlan(info, out_dtype, entry, graft_rows, reason))

    extra = sorted(n for n in source.names() - set(instruct.tensors)
                   if not filters.excluded(n) and not tied_away(instruct, n))

    def left_out(n: str) -> bool:
        return not filters.included(n) or filters.excluded(n)

    heads = sorted(n for n in source.names() if tied_away(instruct, n) and not left_out(n))
    if heads and source.strict:
        plan.warnings.append("the base/tuned models have their own lm_head but the instruct ties it to the input "
                             "embedding: only the embedding's update is grafted")
    elif heads:
        raise ShadowMergeError(
            f"the {source.kind} delta changes {', '.join(heads)}, but the instruct ties it to the input "
            f"embedding, so merging it would change the input embedding too; leave it out with --exclude lm_head "
            f"(its update is then not grafted), or graft onto an instruct with an untied lm_head")
    if outside:
        plan.warnings.append(f"{len(outside)} tensor(s) of the instruct and base are not in the model a trainer loads "
                             f"(the --tuned model has none; e.g. a multi-token-prediction layer), so they have no "
                             f"update and are kept from the instruct: {_listing(outside, 4)}")
    if not source.strict:
        planned = {t.name for t in plan.tensors if t.entry is not None}
        skipped = sorted(n for n in source.names() if n not in planned and n not in heads
                         and (n in instruct.tensors or tied_away(instruct, n)))
        if skipped:
            plan.warnings.append(f"{len(skipped)} tensor(s) the {source.kind} delta changes are not grafted "
                                 f"(--include/--exclude): {_listing(skipped, 4)}")
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} instruct tensor(s) missing from the {source.kind} delta: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) not in the instruct: {_listing(extra)}")
        raise ShadowMergeError("tensor names differ: " + "; ".join(parts) + "; " + source.mismatch_hint)
    if shape_errors:
        raise ShadowMergeError(f"shapes differ for {len(shape_errors)} tensor(s): {_listing(shape_errors, 4)}; "
                               f"the models must share one architecture and size: {source.mismatch_hint}")
    if vocab_errors:
        name, mine, theirs = vocab_errors[0]
        raise ShadowMergeError(
            f"vocabulary sizes differ for {_listing([v[0] for v in vocab_errors], 3)}: instruct {mine} rows, "
            f"{source.kind} delta {theirs} (tokens added or vocab padded); pass --vocab common to graft the "
            f"{min(mine, theirs)} common rows and keep the instruct's other rows")
    if any(info.dtype != instruct.tensors[info.name].dtype
           for ck in source.checkpoints for info in ck.tensors.values() if info.name in instruct.tensors):
        plan.warnings.append("input dtypes differ between checkpoints; all arithmetic is float32, so this is exact")
    if not any(t.graft_rows for t in plan.tensors):
        why = "--include/--exclude leave out every tensor with a delta" if include or exclude else \
            "no tensor has a delta"
        raise ShadowMergeError(f"nothing to graft ({why}): the output would equal the instruct; check the filters "
                               f"and the inputs")
    return plan
