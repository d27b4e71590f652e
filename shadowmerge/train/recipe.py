"""The training recipe: the paper's defaults, overridden by a YAML recipe, overridden by flags.

Defaults follow Shadow-FT's setting: LoRA rank 128 with lora_alpha = 2 x rank (LLaMA-Factory's
default, rank doubled), lr 2e-4 for LoRA and 1e-5 for full, 1 epoch, cutoff 4096, per-device
batch 2 x 16 accumulation, cosine schedule, warmup 0.1, bf16 where the device supports it, seed 42.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .. import yamlfile
from ..errors import ShadowMergeError

METHODS = ("lora", "full")
STAGES = ("sft", "dpo")
BACKENDS = ("trl", "llamafactory")


@dataclass
class Recipe:
    base: str | None = None
    instruct: str | None = None
    data: str | None = None
    out: str | None = None
    method: str = "lora"
    stage: str = "sft"
    backend: str = "trl"
    lora_rank: int = 128
    lora_alpha: float | None = None         # None: 2 x lora_rank
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"
    lr: float | None = None                 # None: 2e-4 for LoRA, 1e-5 for full
    epochs: float = 1.0
    max_steps: int | None = None
    cutoff: int = 4096
    batch_size: int = 2
    grad_accum: int = 16
    scheduler: str = "cosine"
    warmup: float = 0.1                     # a ratio of the training steps
    bf16: bool | None = None                # None: where the device supports it
    seed: int = 42
    dpo_beta: float = 0.1
    template: str | None = None             # LLaMA-Factory template name; None: guessed from the model type
    max_samples: int | None = None

    def resolved(self) -> dict:
        """Every value as it will be used (the defaults that depend on others filled in)."""
        out = asdict(self)
        out["lora_alpha"] = self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank
        out["lr"] = self.lr if self.lr is not None else (2e-4 if self.method == "lora" else 1e-5)
        if self.bf16 is None:
            out["bf16"] = _bf16_supported()
        return out


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


FIELDS = {f.name for f in fields(Recipe)}


def load(path: str | Path | None, overrides: dict) -> Recipe:
    """The recipe file's values (if any) under the flags that were given (not None)."""
    values: dict = {}
    if path is not None:
        values = yamlfile.load(path, "recipe") or {}
        if not isinstance(values, dict):
            raise ShadowMergeError(f"{path}: a recipe is a mapping of settings (base:, instruct:, data:, ...)")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - FIELDS)
        if unknown:
            raise ShadowMergeError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe(**values)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    for name in ("base", "instruct", "data", "out"):
        if not getattr(r, name):
            raise ShadowMergeError(f"no {name}: pass --{name} or set `{name}:` in the recipe")
    for name, allowed in (("method", METHODS), ("stage", STAGES), ("backend", BACKENDS)):
        if getattr(r, name) not in allowed:
            raise ShadowMergeError(f"{name} {getattr(r, name)!r} is not one of {', '.join(allowed)}")
    for name in ("lora_rank", "cutoff", "batch_size", "grad_accum"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ShadowMergeError(f"{name} must be a positive integer, not {value!r}")
    for name in ("lr", "lora_alpha", "epochs", "dpo_beta"):
        value = getattr(r, name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ShadowMergeError(f"{name} must be a positive number, not {value!r}")
    if r.max_steps is not None and (not isinstance(r.max_steps, int) or r.max_steps < 1):
        raise ShadowMergeError(f"max_steps must be a positive integer, not {r.max_steps!r}")
    if not 0 <= r.warmup < 1:
        raise ShadowMergeError(f"warmup is a ratio of the training steps in [0, 1), not {r.warmup!r}")
