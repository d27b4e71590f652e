"""What an evaluation is asked to do: EvalSettings (the same for every model) and Sweep (an α sweep), frozen,
checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ShadowMergeError
from ..options import option


def _tasks(text: str | None) -> tuple[str, ...]:
    return (text,) if text else ()


@dataclass(frozen=True)
class EvalSettings:
    """The same settings for every model (`shadowmerge eval`'s options are generated from these fields)."""
    tasks: tuple[str, ...] = field(default=(), metadata=option(
        "--tasks", "lm_eval task names (built-in, or defined in --include-path).", metavar="T1,T2", default=None,
        convert=_tasks))
    include_path: tuple[str, ...] = field(default=(), metadata=option(
        "--include-path", "A folder of your own lm_eval task YAMLs (e.g. dataset_path: json); repeatable.",
        multiple=True, metavar="DIR"))
    heldout: str | None = field(default=None, metadata=option(
        "--heldout", "Held-out rows (the formats `train --data` takes): NLL per answer token and perplexity of each "
                     "model, masked as training masks.", metavar="FILE"))
    num_fewshot: int | None = field(default=None, metadata=option(
        "--num-fewshot", "Few-shot examples per item [default: each task's own].", type=int, metavar="K"))
    limit: float | None = field(default=None, metadata=option(
        "--limit", "Only the first N items of each task (a fraction if < 1).", type=float, metavar="N"))
    seed: int | None = field(default=None, metadata=option(
        "--seed", "One seed for lm_eval's random, numpy, torch and few-shot sampling [default: lm_eval's (0, 1234, "
                  "1234, 1234)].", type=int))
    batch_size: int | str = field(default=8, metadata=option(
        "--batch-size", "lm_eval batch size (a number, or auto).", default="8", show_default=True))
    device: str | None = field(default=None, metadata=option(       # None: cuda when there is one, else cpu
        "--device", "cpu, cuda, cuda:N [default: cuda when there is one, else cpu]."))
    dtype: str = field(default="auto", metadata=option(
        "--dtype", "dtype the models are evaluated in (auto: each model's own).",
        choices=("auto", "float32", "bfloat16", "float16"), show_default=True))
    apply_chat_template: bool = field(default=True, metadata=option(
        ("--apply-chat-template/--no-apply-chat-template",), "Format every prompt with each model's own chat "
        "template (the Instruct's, in a graft).", show_default=True))
    backend: str = field(default="hf", metadata=option(
        "--backend", "lm_eval's engine: transformers, or vLLM where it is installed.", choices=("hf", "vllm"),
        show_default=True))
    model_args: str = field(default="", metadata=option(
        "--model-args", "More lm_eval model arguments, e.g. tensor_parallel_size=2,data_parallel_size=2 (vllm) or "
                        "parallelize=True (hf).", metavar="K=V,..."))
    heldout_cutoff: int = field(default=4096, metadata=option(
        "--heldout-cutoff", "Tokens per held-out row, as `train --cutoff` cuts them.", type=int, show_default=True))
    compare: tuple[str, ...] = field(default=(), metadata=option(
        "--compare", "Also compare model A with model B item by item (Δ = A − B), e.g. --compare shadow:ft; "
                     "repeatable. Every model is compared with the reference anyway; the pairs named here are the "
                     "headline of the table, the summary and the report.", multiple=True, metavar="A:B"))

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
        limit = self.limit
        if limit is not None and limit >= 1:
            limit = int(limit)                      # a number of items: printed and recorded as one
        device = self.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif not (device == "cpu" or device == "cuda" or device.startswith("cuda:") or device == "mps"):
            raise ShadowMergeError(f"--device {device!r}: use cpu, cuda or cuda:N")
        elif device == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise ShadowMergeError("--device mps asked for, but Apple's MPS is not available here; use --device cpu")
        elif device != "cpu":
            from ..devices import parse_device

            parse_device(device)           # CUDA there, and that device: checked now, not after loading a model
        from ..record import local_ref

        return EvalSettings(tasks=tasks, include_path=tuple(local_ref(p) for p in self.include_path),
                            heldout=local_ref(self.heldout),
                            num_fewshot=self.num_fewshot, limit=limit, seed=self.seed, batch_size=batch,
                            device=device, dtype=self.dtype, apply_chat_template=self.apply_chat_template,
                            backend=self.backend, model_args=self.model_args, heldout_cutoff=self.heldout_cutoff,
                            compare=tuple(_items(self.compare)))


def _items(compare) -> list[str]:
    items = [compare] if isinstance(compare, str) else list(compare or ())
    return [x.strip() for text in items for x in str(text).split(",") if x.strip()]


def pairs(compare) -> list[tuple[str, str]]:
    """--compare A:B values (or one text with several, comma-separated) as (A, B) label pairs, each once (checked
    by check_pairs)."""
    out: list[tuple[str, str]] = []
    for item in _items(compare):
        a, _, b = item.partition(":")
        if (a.strip(), b.strip()) not in out:
            out.append((a.strip(), b.strip()))
    return out


def check_pairs(compare, labels: list[str], where: str = "--compare") -> list[tuple[str, str]]:
    """The --compare pairs, each two different labels of the run's models; a one-line error naming the labels (and
    a pair of them that works) if not."""
    example = f"e.g. {where} {labels[-1]}:{labels[0]}"
    for item in _items(compare):
        a, colon, b = (x.strip() for x in item.partition(":"))
        if not colon or not a or not b or ":" in b:
            raise ShadowMergeError(f"{where} {item!r} is not a pair: write two of the model labels ({', '.join(labels)}) "
                                   f"as A:B (Δ = A − B), {example}")
        if a == b:
            raise ShadowMergeError(f"{where} {item!r} compares a model with itself; name two different labels of "
                                   f"{', '.join(labels)}, {example}")
        for label in (a, b):
            if label not in labels:
                raise ShadowMergeError(f"{where} {a}:{b}: no model is labelled {label!r}; name two of the labels "
                                       f"{', '.join(labels)}, {example}")
    return pairs(compare)


ALPHA_LABEL = "alpha="          # an α sweep's models are labelled alpha=0.5, alpha=1, ...


@dataclass(frozen=True)
class Sweep:
    """Evaluate I + α·Δ for each α (Δ: --lora, or --tuned minus --base), each exactly what `graft --alpha`
    writes. With several updates, a small grid too: several weight sets (`weights` "1,1;1,0.5": sets separated by
    ';') and several combine methods (`combine` "sum,ties"), every α of every setting grafted and evaluated."""
    instruct: str
    alphas: tuple[float, ...]
    base: str | None = None
    tuned: str | tuple[str, ...] | None = None
    lora: str | tuple[str, ...] | None = None
    weights: str | None = None               # several updates: graft's --weights (sets separated by ';'),
    combine: str = "sum"                     # --combine (methods separated by ','), --density, --seed
    density: float | None = None
    seed: int = 0

    def weight_sets(self) -> list[str | None]:
        return [None] if self.weights is None else [w.strip() for w in str(self.weights).split(";")]

    def methods(self) -> list[str]:
        return [c.strip() for c in str(self.combine).split(",")]

    def settings(self) -> list[dict]:
        """Each setting of the grid: graft's options besides the inputs and α (density and seed where the method
        uses them)."""
        return [{"weights": w, "combine": c, "density": self.density if c != "sum" else None,
                 "seed": self.seed if c.startswith("dare") else 0}
                for w in self.weight_sets() for c in self.methods()]

    def graft_options(self, setting: int = 0) -> dict:
        """What graft takes besides the inputs and α for one setting: how several updates are combined."""
        return self.settings()[setting]

    def tag(self, setting: int) -> str:
        """The setting in a label: what varies over the grid (w=1_0.5, ties), '' when nothing does."""
        options, parts = self.settings()[setting], []
        if len(self.weight_sets()) > 1:
            parts.append("w=" + options["weights"].replace(",", "_"))
        if len(self.methods()) > 1:
            parts.append(options["combine"])
        return "+".join(parts)

    def described(self, setting: int) -> str:
        """The setting in words, for reports ('' for a sweep of one setting)."""
        options, parts = self.settings()[setting], []
        if len(self.weight_sets()) > 1:
            parts.append(f"weights {options['weights']}")
        if len(self.methods()) > 1:
            parts.append(options["combine"])
        return ", ".join(parts)

    def label(self, alpha: float, setting: int = 0) -> str:
        tag = self.tag(setting)
        return f"{ALPHA_LABEL}{alpha:g}" + (f"+{tag}" if tag else "")

    def points(self) -> list[tuple[str, float, int]]:
        """(label, α, setting) of every swept model, setting by setting."""
        return [(self.label(a, k), a, k) for k in range(len(self.settings())) for a in self.alphas]
