"""The training recipe: the paper's defaults, overridden by a YAML recipe, overridden by flags.

Defaults follow Shadow-FT's setting: LoRA rank 128 with lora_alpha = 2 x rank (LLaMA-Factory's
default, rank doubled), lr 2e-4 for LoRA and 1e-5 for full, 1 epoch, cutoff 4096, per-device
batch 2 x 16 accumulation, cosine schedule, warmup 0.1, bf16 where the device supports it, seed 42.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .. import yamlfile
from ..errors import ShadowMergeError
from . import backends

METHODS = ("lora", "full")
STAGES = ("sft", "dpo")


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
    save_steps: int = 500                   # a checkpoint every N optimizer steps (the latest kept), for --resume;
                                            # 0: none
    dpo_beta: float = 0.1
    template: str | None = None             # LLaMA-Factory template name; None: the Instruct's chat template
    max_samples: int | None = None
    trainer: dict | None = None             # more trainer settings, passed through (TRL's SFTConfig/DPOConfig, or
                                            # LLaMA-Factory's YAML): `trainer:` in a recipe, --trainer-arg KEY=VALUE
    eval: dict | str | None = None          # at the end, `shadowmerge eval` of the Instruct, shadow/ (and instruct-ft/):
                                            # tasks, include_path, heldout, ... (EVAL_KEYS); a string: the tasks

    def resolved(self) -> Recipe:
        """The recipe with every value as it will be used (the defaults that depend on others filled in, local
        paths absolute: the record means the same from any working directory)."""
        from ..record import local_ref

        evaluation = self.eval
        if isinstance(evaluation, dict):
            evaluation = dict(evaluation)
            if evaluation.get("heldout"):
                evaluation["heldout"] = local_ref(evaluation["heldout"])
            paths = evaluation.get("include_path")
            if paths:
                evaluation["include_path"] = [local_ref(p) for p in ([paths] if isinstance(paths, str) else paths)]
        return replace(self, lora_alpha=self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank,
                       lr=self.lr if self.lr is not None else (2e-4 if self.method == "lora" else 1e-5),
                       bf16=_bf16_supported() if self.bf16 is None else self.bf16,
                       base=local_ref(self.base), instruct=local_ref(self.instruct), data=local_ref(self.data),
                       out=str(Path(str(self.out)).expanduser().absolute()), eval=evaluation)

    @property
    def kind(self) -> str:
        """What training writes: an adapter ("lora") or a model ("full"); OUT/base-KIND is named after it."""
        return "lora" if self.method == "lora" else "full"

    def as_dict(self) -> dict:
        """The settings as the run record and the checkpoints' key hold them."""
        return asdict(self)


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


FIELDS = {f.name for f in fields(Recipe)}
#: the settings of a recipe's `eval:` mapping (those of `shadowmerge eval`)
EVAL_KEYS = ("tasks", "include_path", "heldout", "num_fewshot", "limit", "seed", "batch_size", "device", "dtype",
             "apply_chat_template", "heldout_cutoff", "compare")


def eval_settings(value) -> dict | None:
    """A recipe's `eval:` as EvalSettings keywords (None: no evaluation); a one-line error for a bad one."""
    if value is None or value == {}:
        return None
    if isinstance(value, str):
        value = {"tasks": value}
    if not isinstance(value, dict):
        raise ShadowMergeError("`eval:` is task names (mytask,gsm8k) or a mapping (tasks:, heldout:, include_path:, "
                               "...); write it as one of those")
    unknown = sorted(str(k) for k in value if k not in EVAL_KEYS)
    if unknown:
        raise ShadowMergeError(f"`eval:` has unknown setting(s) {', '.join(unknown)[:200]}; use the known ones: "
                               f"{', '.join(EVAL_KEYS)}")
    out = dict(value)
    tasks = out.get("tasks")
    if isinstance(tasks, list):
        tasks = ",".join(str(t) for t in tasks)
    if tasks is not None and not isinstance(tasks, str):
        raise ShadowMergeError("`eval: tasks:` is task names, e.g. mytask,gsm8k; write it as text or a list")
    out["tasks"] = (tasks,) if tasks else ()
    paths = out.get("include_path") or ()
    out["include_path"] = tuple(str(p) for p in ([paths] if isinstance(paths, str) else paths))
    named = out.get("compare") or ()
    if not isinstance(named, (str, list, tuple)) or not all(isinstance(x, str) for x in (
            [named] if isinstance(named, str) else named)):
        raise ShadowMergeError("`eval: compare:` is pairs of model labels, e.g. [shadow:instruct-ft]; write it as "
                               "text or a list of A:B")
    out["compare"] = (named,) if isinstance(named, str) else tuple(named)
    for key, kind in (("heldout", str), ("num_fewshot", int), ("limit", (int, float)), ("seed", int),
                      ("heldout_cutoff", int), ("dtype", str), ("device", str), ("apply_chat_template", bool),
                      ("batch_size", (int, str))):
        if out.get(key) is not None and (not isinstance(out[key], kind) or
                                         (kind is not bool and isinstance(out[key], bool))):
            raise ShadowMergeError(f"`eval: {key}:` has the wrong type ({type(out[key]).__name__}); see "
                                   f"`shadowmerge eval --help` for its values")
    return {k: v for k, v in out.items() if v is not None}


# trainer settings that a recipe setting (or shadowmerge itself) decides: set those through the recipe
RESERVED = {"output_dir": "out", "learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "max_steps",
            "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "lr_scheduler_type": "scheduler", "warmup_steps": "warmup", "warmup_ratio": "warmup", "seed": "seed",
            "data_seed": "seed", "bf16": "bf16", "max_length": "cutoff", "cutoff_len": "cutoff",
            "model_name_or_path": "base", "dataset": "data", "dataset_dir": "data", "template": "template",
            "stage": "stage", "finetuning_type": "method", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
            "lora_dropout": "lora_dropout", "lora_target": "lora_target", "use_cpu": "(from the device)",
            "tokenized_path": "(for its token check)", "mask_history": "(the last turn is trained, as by TRL)",
            "trust_remote_code": "(remote code is never run)",
            "save_steps": "save_steps", "save_strategy": "save_steps", "resume_from_checkpoint": "(--resume)"}


def trainer_args(values: tuple[str, ...] | list[str]) -> dict:
    """--trainer-arg KEY=VALUE options as a mapping; VALUE is read as YAML (1e-3, true, [wandb, tensorboard])."""
    import yaml

    out = {}
    for text in values:
        key, eq, value = str(text).partition("=")
        if not eq or not key.strip():
            raise ShadowMergeError(f"--trainer-arg {text!r}: write KEY=VALUE, e.g. --trainer-arg report_to=wandb")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def load(path: str | Path | None, overrides: dict) -> Recipe:
    """The recipe file's values (if any) under the flags that were given (not None)."""
    values: dict = {}
    if path is not None:
        values = yamlfile.load(path, "recipe") or {}
        if not isinstance(values, dict):
            raise ShadowMergeError(f"{path}: a recipe is a mapping of settings; write it as base:, instruct:, "
                                   f"data:, ... (see docs/recipes/)")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - FIELDS)
        if unknown:
            raise ShadowMergeError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: "
                                   f"{', '.join(sorted(FIELDS))}; fix the spelling")
    extra = overrides.pop("trainer", None)
    evals = {k: overrides.pop(k, None) for k in ("eval", "eval_heldout", "eval_include_path", "eval_limit")}
    if any(evals.values()):
        given = values.get("eval")
        given = {"tasks": given} if isinstance(given, str) else dict(given or {}) if isinstance(given, dict) else {}
        if evals["eval"]:
            given["tasks"] = evals["eval"]
        if evals["eval_heldout"]:
            given["heldout"] = evals["eval_heldout"]
        if evals["eval_include_path"]:
            given["include_path"] = list(evals["eval_include_path"])
        if evals["eval_limit"] is not None:
            given["limit"] = evals["eval_limit"]
        values["eval"] = given
    values.update({k: v for k, v in overrides.items() if v is not None})
    if extra:
        if values.get("trainer") is not None and not isinstance(values["trainer"], dict):
            raise ShadowMergeError(f"{path}: `trainer:` is a mapping of trainer settings; write it as e.g. "
                                   f"`trainer: {{report_to: wandb}}`")
        values["trainer"] = {**(values.get("trainer") or {}), **extra}
    recipe = Recipe(**values)
    _check(recipe)
    return recipe


def _check(r: Recipe) -> None:
    for name in ("base", "instruct", "data", "out"):
        if not getattr(r, name):
            raise ShadowMergeError(f"no {name}: pass --{name} or set `{name}:` in the recipe")
    for name, allowed in (("method", METHODS), ("stage", STAGES), ("backend", backends.names())):
        if getattr(r, name) not in allowed:
            raise ShadowMergeError(f"{name} {getattr(r, name)!r} is not one of {', '.join(allowed)}; pick one of them")
    for name in ("lora_rank", "cutoff", "batch_size", "grad_accum"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ShadowMergeError(f"{name} must be a positive integer, not {value!r}; set it to one")
    for name in ("lr", "lora_alpha", "epochs", "dpo_beta"):
        value = getattr(r, name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ShadowMergeError(f"{name} must be a positive number, not {value!r}; set it to one")
    if r.max_steps is not None and (not isinstance(r.max_steps, int) or r.max_steps < 1):
        raise ShadowMergeError(f"max_steps must be a positive integer, not {r.max_steps!r}; set it to one, or leave "
                               f"it out to train --epochs")
    if r.trainer is not None:
        if not isinstance(r.trainer, dict):
            raise ShadowMergeError("`trainer:` is a mapping of trainer settings; write it as e.g. "
                               "`trainer: {report_to: wandb}`")
        for key, value in r.trainer.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", key):
                raise ShadowMergeError(f"trainer setting {str(key)[:60]!r} is not a setting name; use the trainer's own "
                                       f"setting names (letters, digits, _)")
            if key in RESERVED and RESERVED[key].startswith("("):
                raise ShadowMergeError(f"trainer setting {key} is set by shadowmerge {RESERVED[key]}; leave it out")
            if key in RESERVED:
                raise ShadowMergeError(f"trainer setting {key} is decided by the recipe: set `{RESERVED[key]}` (or its "
                                       f"flag) instead")
            scalars = (str, int, float, bool, type(None))
            if not isinstance(value, scalars) and not (isinstance(value, list) and
                                                       all(isinstance(v, scalars) for v in value)):
                raise ShadowMergeError(f"trainer setting {key} is not a number, text, true/false or a list of "
                                       f"those; give it one of these")
    eval_settings(r.eval)
    if not isinstance(r.save_steps, int) or isinstance(r.save_steps, bool) or r.save_steps < 0:
        raise ShadowMergeError(f"save_steps must be a whole number of optimizer steps (0: no checkpoints), not "
                               f"{r.save_steps!r}; set it to one")
    if not 0 <= r.warmup < 1:
        raise ShadowMergeError(f"warmup is a ratio of the training steps in [0, 1), not {r.warmup!r}; set it to "
                               f"e.g. 0.03")
