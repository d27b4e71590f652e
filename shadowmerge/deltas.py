"""FullDelta, the delta source of a full fine-tune: tuned minus base, tensor by tensor (the interface all
sources implement is sources.DeltaSource); and the tied-embedding names every source follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import ShadowMergeError
from .sources import register
from .stformat import itemsize

# Names of output / input embedding matrices, to follow tied embeddings across checkpoints.
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                    "transformer.wte.weight", "gpt_neox.embed_in.weight", "model.decoder.embed_tokens.weight",
                    "transformer.word_embeddings.weight")


def tied_away(instruct: Checkpoint, name: str) -> bool:
    """An lm_head the Instruct ties to its input embedding: it stores none, so an update of it has nowhere to go."""
    return instruct.tie_word_embeddings and name.endswith(OUTPUT_EMBEDDINGS)


def tied_alias(ckpt: Checkpoint, name: str) -> TensorInfo | None:
    """The tensor a tied checkpoint uses for `name`: itself, or its input embedding for a missing lm_head."""
    info = ckpt.tensors.get(name)
    if info is None and ckpt.tie_word_embeddings and name.endswith(OUTPUT_EMBEDDINGS):
        prefix = name[: -len("lm_head.weight")] if name.endswith("lm_head.weight") else ""
        for candidate in INPUT_EMBEDDINGS:
            info = ckpt.tensors.get(prefix + candidate) or ckpt.tensors.get(candidate)
            if info is not None:
                break
    return info


@dataclass(frozen=True)
class FullEntry:
    base: TensorInfo
    tuned: TensorInfo

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape


@register
class FullDelta:
    """delta = tuned - base for every same-named tensor (a full fine-tune of the Base)."""

    kind = "full"
    formula = "out = float32(I) + alpha * (float32(T) - float32(B)), cast once to the output dtype"
    mismatch_hint = "pass the Base of this Instruct and its fine-tune, or leave such tensors out with --exclude"
    #: Every grafted Instruct tensor must have a delta; a missing one is an error, not a copy.
    strict = True

    def __init__(self, base: Checkpoint, tuned: Checkpoint):
        self.base, self.tuned = base, tuned
        self.checkpoints = (base, tuned)
        self.warnings: list[str] = []

    @classmethod
    def wanted(cls, spec) -> bool:
        return spec.lora is None

    @classmethod
    def open(cls, spec, instruct: Checkpoint, opened: list) -> "FullDelta":
        for ref, label in ((spec.base, "base"), (spec.tuned, "tuned")):
            opened.append(Checkpoint.open(ref, label, spec.allow_pickle))
        return cls(opened[-2], opened[-1])

    def describe(self) -> dict:
        return {"base": self.base.ref, "tuned": self.tuned.ref}

    def card_inputs(self) -> dict:
        return {}

    def entry(self, name: str) -> FullEntry | None:
        b, t = tied_alias(self.base, name), tied_alias(self.tuned, name)
        if b is None or t is None:
            return None
        if b.shape != t.shape:
            raise ShadowMergeError(f"shape differs for {name}: base {list(b.shape)}, tuned {list(t.shape)}; "
                                   f"the tuned model must be a fine-tune of this base: pass the Base it was tuned from")
        for info, ckpt in ((b, self.base), (t, self.tuned)):
            if not info.dtype.is_floating_point:
                raise ShadowMergeError(f"{ckpt.label} tensor {name} is {info.dtype}, not floating point; "
                                       f"exclude it with --exclude")
        return FullEntry(b, t)

    def record(self) -> dict:
        return {}

    def names(self) -> set[str]:
        """Every tensor name the source holds (to report names the Instruct lacks)."""
        return set(self.base.tensors) | set(self.tuned.tensors)

    def rows(self, entry: FullEntry) -> int:
        return entry.base.rows

    def read(self, entry: FullEntry, e0: int, e1: int, buffers) -> tuple:
        n = e1 - e0
        return (self.tuned.read_into(entry.tuned, e0, e1, buffers("tuned", n * itemsize(entry.tuned.dtype))),
                self.base.read_into(entry.base, e0, e1, buffers("base", n * itemsize(entry.base.dtype))))

    def delta_into(self, entry: FullEntry, payload: tuple, out: torch.Tensor, to_float) -> torch.Tensor:
        tuned_raw, base_raw = payload
        t = to_float(tuned_raw, entry.tuned.dtype, "tuned")
        b = to_float(base_raw, entry.base.dtype, "base")
        return torch.sub(t, b, out=out)
