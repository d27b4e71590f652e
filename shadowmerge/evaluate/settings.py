"""What an evaluation is asked to do: EvalSettings (the same for every model) and Sweep (an α sweep), frozen,
checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ShadowMergeError


@dataclass(frozen=True)
class EvalSettings:
    """The same settings for every model."""
    tasks: tuple[str, ...] = ()
    include_path: tuple[str, ...] = ()
    heldout: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    seed: int | None = None
    batch_size: int | str = 8
    device: str | None = None          # None: cuda when there is one, else cpu
    dtype: str = "auto"
    apply_chat_template: bool = True
    backend: str = "hf"
    model_args: str = ""
    heldout_cutoff: int = 4096

    def checked(self) -> "EvalSettings":
        tasks = tuple(t.strip() for item in self.tasks for t in str(item).split(",") if t.strip())
        if not tasks and not self.heldout:
            raise ShadowMergeError("nothing to evaluate: pass --tasks (lm_eval task names) and/or --heldout FILE")
        if len(set(tasks)) != len(tasks):
            raise ShadowMergeError(f"a task is named twice in --tasks ({', '.join(tasks)}); name each once")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ShadowMergeError("--num-fewshot must be 0 or more; pass e.g. --num-fewshot 5")
        if self.limit is not None and (not math.isfinite(self.limit) or self.limit <= 0):
            raise ShadowMergeError("--limit must be a positive number of items (or a fraction below 1); pass e.g. "
                                   "--limit 200")
        if self.limit is not None and self.limit > 1 and self.limit != int(self.limit):
            raise ShadowMergeError(f"--limit {self.limit}: give a whole number of items, or a fraction below 1")
        if self.heldout_cutoff < 2:
            raise ShadowMergeError("--heldout-cutoff must be at least 2 tokens; pass e.g. --heldout-cutoff 4096")
        batch = self.batch_size
        if isinstance(batch, str) and batch != "auto" and not batch.startswith("auto:"):
            if not batch.isdigit():
                raise ShadowMergeError(f"--batch-size {batch!r}: give a number, or auto")
            batch = int(batch)
        if isinstance(batch, int) and batch < 1:
            raise ShadowMergeError("--batch-size must be at least 1 (or auto); pass e.g. --batch-size 8")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ShadowMergeError(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.backend not in ("hf", "vllm"):
            raise ShadowMergeError(f"--backend {self.backend!r}: use hf or vllm")
        if any(k.strip().split("=")[0] in ("pretrained", "dtype") for k in self.model_args.split(",") if k.strip()):
            raise ShadowMergeError("--model-args must not set pretrained or dtype: the models are the arguments, "
                                   "the dtype is --dtype")
        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif not (device == "cpu" or device == "cuda" or device.startswith("cuda:") or device == "mps"):
            raise ShadowMergeError(f"--device {device!r}: use cpu, cuda or cuda:N")
        return EvalSettings(tasks=tasks, include_path=tuple(self.include_path), heldout=self.heldout,
                            num_fewshot=self.num_fewshot, limit=self.limit, seed=self.seed, batch_size=batch,
                            device=device, dtype=self.dtype, apply_chat_template=self.apply_chat_template,
                            backend=self.backend, model_args=self.model_args, heldout_cutoff=self.heldout_cutoff)


@dataclass(frozen=True)
class Sweep:
    """Evaluate I + α·Δ for each α (Δ: --lora, or --tuned minus --base), each exactly what `graft --alpha`
    writes."""
    instruct: str
    alphas: tuple[float, ...]
    base: str | None = None
    tuned: str | None = None
    lora: str | None = None

    def label(self, alpha: float) -> str:
        return f"alpha={alpha:g}"
