"""FullDelta, the delta source of a full fine-tune: tuned minus base, tensor by tensor (the interface all
sources implement is sources.DeltaSource); and the tied-embedding names every source follows."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, TensorInfo
from .errors import ShadowMergeError
from .sources import register
from .formats.safetensors import itemsize

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


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def outside_model(ckpt: Checkpoint, name: str) -> bool:
    """Whether a tensor name is outside the model transformers builds from ckpt's config: a layer index at or past
    num_hidden_layers (DeepSeek-V3's multi-token-prediction layer 61 of 61), or a pattern its class ignores on load."""
    cfg = ckpt.config.get("text_config") if isinstance(ckpt.config.get("text_config"), dict) else ckpt.config
    layers = cfg.get("num_hidden_layers")
    found = _LAYER.search(name)
    if found and isinstance(layers, int) and int(found.group(1)) >= layers:
        return True
    import transformers

    for arch in ckpt.architecture[1]:
        cls = getattr(transformers, arch, None) if arch.isidentifier() else None
        for pattern in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ():
            try:
                if re.search(pattern, name):
                    return True
            except (re.error, TypeError):
                continue
    return False


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
            opened.append(Checkpoint.open(ref, label, spec.allow_pickle, spec.stream))
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
        return (self.tuned.read_piece(entry.tuned, e0, e1, buffers("tuned", n * itemsize(entry.tuned.dtype))),
                self.base.read_piece(entry.base, e0, e1, buffers("base", n * itemsize(entry.base.dtype))))

    def delta_into(self, entry: FullEntry, payload: tuple, out: torch.Tensor, to_float) -> torch.Tensor:
        tuned_raw, base_raw = payload
        t = to_float(tuned_raw, entry.tuned.dtype, "tuned")
        b = to_float(base_raw, entry.base.dtype, "base")
        if entry.base.codec is not None and entry.tuned.codec is None and entry.tuned.dtype != torch.float32:
            # the Base as the trainer saw it: loaded decoded (FP8 -> float32 values) and saved in the tuned dtype, so a
            # tensor training never touched is exactly that rounding of the Base, and its update exactly zero
            b = b.to(entry.tuned.dtype).float()
        return torch.sub(t, b, out=out)

    def absent(self, name: str) -> str | None:
        """Why an Instruct tensor the Base has but the tuned model lacks gets no update (None: it is an error): it is
        outside the model a trainer loads (layer index >= num_hidden_layers, as DeepSeek's multi-token-prediction
        layer, or a name the architecture's transformers class ignores on load)."""
        if self.base.tensors.get(name) is None or name in self.tuned.tensors:
            return None
        return "not in the model a trainer loads: kept from the instruct" if outside_model(self.tuned, name) else None
