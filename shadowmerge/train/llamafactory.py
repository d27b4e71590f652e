"""The LLaMA-Factory backend: write the equivalent LLaMA-Factory config and dataset registration, and
run `llamafactory-cli train` when it is installed (or stop after writing, with --emit-only).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

from ..errors import ShadowMergeError

DATASET = "shadowmerge_data"
# LLaMA-Factory template names by config.json model_type (a recipe's `template:` overrides the guess).
TEMPLATES = {"qwen3": "qwen3", "qwen2": "qwen", "llama": "llama3", "gemma3": "gemma3", "gemma3_text": "gemma3",
             "gemma2": "gemma", "mistral": "mistral", "falcon": "falcon", "phi3": "phi"}


def template_for(recipe: dict, model_type: str | None) -> tuple[str, str | None]:
    """(template, warning) for the recipe and the Instruct's model_type."""
    if recipe.get("template"):
        return recipe["template"], None
    name = TEMPLATES.get(model_type or "", "default")
    return name, (f"LLaMA-Factory template guessed as {name!r} from model_type {model_type!r}; set `template:` in "
                  f"the recipe if that is not the Instruct's chat format")


def write(recipe: dict, rows: list[dict], folders: tuple[Path, Path], model: str, output_dir: Path,
          template: str) -> Path:
    """Write dataset, dataset_info.json and the training YAML into folders[0] (to be read from folders[1])."""
    folder, final = folders
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DATASET}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    if recipe["stage"] == "dpo":
        info = {"file_name": f"{DATASET}.json", "formatting": "sharegpt", "ranking": True,
                "columns": {"messages": "prompt", "chosen": "chosen", "rejected": "rejected"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    else:
        info = {"file_name": f"{DATASET}.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    (folder / "dataset_info.json").write_text(json.dumps({DATASET: info}, indent=2) + "\n")
    cfg = {
        "model_name_or_path": str(model),
        "stage": recipe["stage"],
        "do_train": True,
        "finetuning_type": recipe["method"],
        "dataset": DATASET,
        "dataset_dir": str(final),
        "template": template,
        "cutoff_len": recipe["cutoff"],
        "output_dir": str(output_dir),
        "per_device_train_batch_size": recipe["batch_size"],
        "gradient_accumulation_steps": recipe["grad_accum"],
        "learning_rate": recipe["lr"],
        "num_train_epochs": recipe["epochs"],
        "lr_scheduler_type": recipe["scheduler"],
        "warmup_ratio": recipe["warmup"],
        "bf16": recipe["bf16"],
        "seed": recipe["seed"],
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": True,
        "overwrite_output_dir": True,
        "report_to": "none",
    }
    if recipe["max_steps"]:
        cfg["max_steps"] = recipe["max_steps"]
    if recipe["max_samples"]:
        cfg["max_samples"] = recipe["max_samples"]
    if recipe["method"] == "lora":
        cfg.update(lora_rank=recipe["lora_rank"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                   lora_target="all" if recipe["lora_target"] == "all-linear" else recipe["lora_target"])
    if recipe["stage"] == "dpo":
        cfg.update(pref_beta=recipe["dpo_beta"], pref_loss="sigmoid")
    cfg.update(recipe.get("trainer") or {})      # --trainer-arg / `trainer:`, passed through as given
    path = folder / f"train_{Path(str(output_dir)).name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def as_sharegpt(rows: list[dict], stage: str) -> list[dict]:
    """Rows in LLaMA-Factory's sharegpt layout (role/content messages)."""
    if stage == "dpo":
        return [{"prompt": r["prompt"], "chosen": r["chosen"][-1], "rejected": r["rejected"][-1]} for r in rows]
    return [{"messages": r["prompt"] + r["completion"]} for r in rows]


def run(config: Path) -> None:
    cli = shutil.which("llamafactory-cli")
    if cli is None:
        raise ShadowMergeError("llamafactory-cli is not installed; pip install llamafactory, or pass --emit-only "
                               f"to stop after writing {config}")
    proc = subprocess.run([cli, "train", str(config)])
    if proc.returncode != 0:
        raise ShadowMergeError(f"llamafactory-cli train {config} failed (exit {proc.returncode}); see its output above")


def losses(output_dir: Path) -> list[dict]:
    """The loss curve LLaMA-Factory logs into output_dir/trainer_log.jsonl (empty if it is not there)."""
    path = output_dir / "trainer_log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in entry:
            out.append({"step": entry.get("current_steps"), "loss": entry["loss"]})
    return out
