"""The built-in backend: TRL's SFTTrainer / DPOTrainer (with peft for LoRA), on CPU or GPUs.

The tokenizer, and so the chat template, is the Instruct's even when the Base is trained: the graft
must learn the format the Instruct will see. Rows with images train a vision-language model
(AutoModelForImageTextToText) with the Instruct's processor; `all-linear` LoRA then means the
language model's linear layers (the vision tower stays as it is). Under `accelerate launch` / torchrun, TRL and
transformers do the distribution; only the main process saves.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import ShadowMergeError
from . import checkpoints
from .backends import name_base, register

MIN_TRL = "0.29"        # measured with transformers 5: older SFTTrainers mask the wrong prompt length (they take
                        # the length of apply_chat_template's dict), older DPOTrainers do not import


def problem() -> str | None:
    """None when a TRL this backend works with is installed; else the one-line error that says what to do."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        found = version("trl")
    except PackageNotFoundError:
        return (f"the trl backend needs TRL: pip install 'trl>={MIN_TRL}' 'datasets>=3' (or, in a shadowmerge "
                f"checkout, pip install -e '.[train]'), or use --backend llamafactory")
    if Version(found) < Version(MIN_TRL):
        return (f"the trl backend needs trl>={MIN_TRL}, not {found}: with transformers 5 older TRL trains on the "
                f"prompt tokens too (SFT) or cannot import its DPOTrainer; pip install 'trl>={MIN_TRL}', or use "
                f"--backend llamafactory (LLaMA-Factory 0.9.5 pins trl<=0.24: give it its own virtualenv)")
    return None


def build(recipe, model_path: Path, tokenizer_path: Path, rows: list[dict], work: Path, bars: bool | None = None):
    """The TRL trainer for the recipe, its data tokenized (`trainer.train_dataset`), not yet trained; its
    checkpoints go into `work` (every recipe.save_steps steps, the latest kept). bars: progress bars (default:
    on a terminal only; a bar in a log file is hundreds of \\r updates)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, set_seed

    set_seed(recipe.seed)
    bars = sys.stderr.isatty() if bars is None else bars
    if not bars:                    # the libraries' own bars (loading, tokenizing) too
        import datasets
        from transformers.utils import logging

        logging.disable_progress_bar()
        datasets.disable_progress_bars()
    vision = any("images" in r for r in rows)
    processor = AutoProcessor.from_pretrained(tokenizer_path) if vision else None
    tokenizer = processor.tokenizer if vision else AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    from ..formats.fp8 import load_kwargs

    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    decode = load_kwargs(model_path, "the model to train")
    model = auto.from_pretrained(model_path, dtype=dtype, **decode)
    if decode:             # FP8 blocks decoded: one dtype for every weight, saved as the plain model it now is
        model = model.to(dtype)
        model.config.quantization_config = None
        model.hf_quantizer = None
    peft_config = None
    if recipe.method == "lora":
        from peft import LoraConfig

        target = recipe.lora_target
        if vision and target == "all-linear":
            target = language_model_linears(model)
        peft_config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha,
                                 lora_dropout=recipe.lora_dropout, target_modules=target,
                                 task_type=None if vision else "CAUSAL_LM")
    save = recipe.save_steps or 0
    common = dict(output_dir=str(work), learning_rate=recipe.lr,
                  num_train_epochs=recipe.epochs, max_steps=recipe.max_steps or -1,
                  per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=recipe.grad_accum,
                  lr_scheduler_type=recipe.scheduler, warmup_steps=recipe.warmup, seed=recipe.seed,
                  data_seed=recipe.seed, bf16=recipe.bf16, use_cpu=not torch.cuda.is_available(),
                  logging_steps=1, report_to=[], max_length=recipe.cutoff,
                  disable_tqdm=not bars,
                  save_strategy="steps" if save else "no", save_steps=save or 500, save_total_limit=1)
    common.update(recipe.trainer or {})
    dataset = Dataset.from_list(rows)
    if vision:          # paths, decoded to images when the trainer reads a row
        from datasets import Image, Sequence

        dataset = dataset.cast_column("images", Sequence(Image()))
    if recipe.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset,
                             processing_class=processor or tokenizer, peft_config=peft_config)
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, beta=recipe.dpo_beta), train_dataset=dataset,
                             processing_class=tokenizer, peft_config=peft_config)
    return trainer


def train(recipe, model_path: Path, tokenizer_path: Path, rows: list[dict], out: Path, work: Path,
          resume: str | None = None, bars: bool | None = None) -> dict:
    """Train model_path on rows with the recipe (from checkpoint `resume`, if given); save the adapter (LoRA)
    or model (full) into out."""
    trainer = build(recipe, model_path, tokenizer_path, rows, work, bars)
    trainer.train(resume_from_checkpoint=resume)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    main = trainer.is_world_process_zero()
    if main:
        trainer.model.save_pretrained(out)
    return {"losses": losses, "main_process": main, "steps": trainer.state.global_step}


def check_settings(recipe) -> None:
    """Every --trainer-arg / `trainer:` setting is one of TRL's config fields for this stage, before training."""
    import dataclasses

    extra = recipe.trainer or {}
    if not extra:
        return
    if recipe.stage == "sft":
        from trl import SFTConfig as Config
    else:
        from trl import DPOConfig as Config
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(k for k in extra if k not in known)
    if unknown:
        raise ShadowMergeError(f"trainer setting(s) {', '.join(unknown)}: not a {Config.__name__} setting of this TRL; "
                               f"see its documentation for the names")


def language_model_linears(model) -> str:
    """A peft target_modules regex for the linear layers of a vision-language model's language model."""
    import re

    import torch

    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".language_model." in f".{n}." and "lm_head" not in n})
    return rf".*\.language_model\..*\.({'|'.join(map(re.escape, names))})$"


@register
class Trl:
    """The built-in backend: TRL's trainers in this process (and in every process of a distributed launch).
    Checkpoints go into OUT.checkpoints/ROLE/, so --resume continues a run cut short."""

    name = "trl"
    resumes = True

    def __init__(self):
        self._losses: dict[str, list[dict]] = {}

    def check(self, run) -> None:
        if run.emit_only:
            raise ShadowMergeError("--emit-only writes LLaMA-Factory's configs and stops; the trl backend trains in "
                                   "this process: leave --emit-only out, or pass --backend llamafactory")
        hint = problem()            # says what to install
        if hint:
            raise ShadowMergeError(hint)
        check_settings(run.recipe)

    def train(self, run, role: str, out: Path) -> None:
        model = run.trained_model(role)
        work = run.work / role
        if role == "base":
            if run.main:
                checkpoints.start(run.work, run.ckey)
                run.work_ours = True
            resume_from = run.resume_from
        else:
            resume_from = checkpoints.last(work, prune=run.main) if run.resume else None
        done = train(run.recipe, model, run.inst.folder, run.rows, out, work, resume_from,
                     bars=run.progress and sys.stderr.isatty())
        self._losses[role] = done["losses"]

    def tidy(self, run, role: str, out: Path) -> None:
        if run.recipe.method == "lora":
            name_base(out, run.trained_model(role))

    def losses(self, run, role: str, out: Path) -> list[dict]:
        return self._losses.get(role, [])
