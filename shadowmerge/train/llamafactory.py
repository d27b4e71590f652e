"""The LLaMA-Factory backend: write the equivalent LLaMA-Factory config and dataset registration, and
run `llamafactory-cli train` when it is installed (or stop after writing, with --emit-only).

LLaMA-Factory reads the tokenizer from `model_name_or_path` and has no setting for another one, so the
Base is given to it as a *model view*: a folder of links to the Base's weights and config beside a copy
of the Instruct's tokenizer, chat template and processor files (the Base's folder is never touched).
With no `template:` LLaMA-Factory parses the Instruct's chat template from that tokenizer, and
`mask_history` trains the last assistant turn only, as the TRL backend does. After a run, the token ids
LLaMA-Factory trained on (its `tokenized_path` dataset) are compared with the Instruct's chat template
tokenized the way TRL does it (`token_mismatch`): a run that trained on another format is not grafted.
Written by hand: LLaMA-Factory has no API for either, and it runs in its own environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from ..errors import ShadowMergeError
from ..output import rewrite_text
from ..record import final_paths
from ..sidefiles import WEIGHT_INDEXES, WEIGHT_SUFFIXES, side_files
from .backends import name_base, register
from .data import expected_tokens

DATASET = "shadowmerge_data"
VIEW = "base-model"                      # OUT/llamafactory/base-model: the Base with the Instruct's tokenizer
TOKENS = "tokenized"                     # OUT/llamafactory/tokenized: what an emitted config's run trained on
BASE_SIDE_FILES = ("config.json", "generation_config.json")
NOT_TOKENIZER = ("README", "LICENSE", "NOTICE", "USE_POLICY", ".")
CHECKED_ROWS = 1000                      # rows whose token ids are compared after a run (the first ones)
INSTALL = ("llamafactory-cli is not installed; install LLaMA-Factory (pip install llamafactory==0.9.5; in its own "
           "virtualenv when its pins clash with yours, with its bin/ on PATH), or pass --emit-only to write its "
           "configs and stop")


def model_view(base: Path, instruct: Path, folder: Path) -> Path:
    """folder: links to the Base's weights, weight index, config and generation config, and copies of the
    Instruct's other top-level files (tokenizer, chat template, processor; not code or READMEs)."""
    folder.mkdir(parents=True)
    base, instruct = Path(base).absolute(), Path(instruct).absolute()
    for p in sorted(base.iterdir()):
        if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name in WEIGHT_INDEXES
                            or p.name in BASE_SIDE_FILES):
            os.symlink(p, folder / p.name)
    for p in side_files(instruct):
        if (not p.name.endswith((".py", ".md")) and p.name not in BASE_SIDE_FILES
                and not p.name.startswith(NOT_TOKENIZER)):
            shutil.copyfile(p, folder / p.name)
    return folder


def write(recipe, rows: list[dict], folders: tuple[Path, Path], model: str, output_dir: Path,
          tokens: bool = False) -> Path:
    """Write dataset, dataset_info.json and the training YAML into folders[0] (to be read from folders[1]);
    with tokens, the YAML has LLaMA-Factory save the token ids it trains on beside it (for --finish's check)."""
    folder, final = folders
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{DATASET}.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    if recipe.stage == "dpo":
        info = {"file_name": f"{DATASET}.json", "formatting": "sharegpt", "ranking": True,
                "columns": {"messages": "prompt", "chosen": "chosen", "rejected": "rejected"}, "tags": tags}
    else:
        info = {"file_name": f"{DATASET}.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": tags}
    (folder / "dataset_info.json").write_text(json.dumps({DATASET: info}, indent=2) + "\n")
    cfg = {
        "model_name_or_path": str(model),
        "trust_remote_code": False,
        "stage": recipe.stage,
        "do_train": True,
        "finetuning_type": recipe.method,
        "dataset": DATASET,
        "dataset_dir": str(final),
    }
    if tokens:
        cfg["tokenized_path"] = str(final / TOKENS)
    if recipe.template:                 # else: parsed from the tokenizer's (the Instruct's) chat template
        cfg["template"] = recipe.template
    if recipe.stage == "sft":
        cfg["mask_history"] = True         # the loss on the last assistant turn only, as TRL's prompt/completion
    cfg.update({
        "cutoff_len": recipe.cutoff,
        "output_dir": str(output_dir),
        "per_device_train_batch_size": recipe.batch_size,
        "gradient_accumulation_steps": recipe.grad_accum,
        "learning_rate": recipe.lr,
        "num_train_epochs": recipe.epochs,
        "lr_scheduler_type": recipe.scheduler,
        "warmup_ratio": recipe.warmup,
        "bf16": recipe.bf16,
        "seed": recipe.seed,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": True,
        "overwrite_output_dir": True,
        "report_to": "none",
    })
    if recipe.max_steps:
        cfg["max_steps"] = recipe.max_steps
    if recipe.max_samples:
        cfg["max_samples"] = recipe.max_samples
    if recipe.method == "lora":
        cfg.update(lora_rank=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                   lora_target="all" if recipe.lora_target == "all-linear" else recipe.lora_target)
    if recipe.stage == "dpo":
        cfg.update(pref_beta=recipe.dpo_beta, pref_loss="sigmoid")
    cfg.update(recipe.trainer or {})      # --trainer-arg / `trainer:`, passed through as given
    path = folder / f"train_{Path(str(output_dir)).name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def as_sharegpt(rows: list[dict], stage: str) -> list[dict]:
    """Rows in LLaMA-Factory's sharegpt layout (role/content messages)."""
    if stage == "dpo":
        return [{"prompt": r["prompt"], "chosen": r["chosen"][-1], "rejected": r["rejected"][-1]} for r in rows]
    return [{"messages": r["prompt"] + r["completion"]} for r in rows]


def from_sharegpt(rows: list, stage: str) -> list[dict]:
    """as_sharegpt's rows back in the trainers' prompt/completion (or prompt/chosen/rejected) layout."""
    try:
        if stage == "dpo":
            return [{"prompt": r["prompt"], "chosen": [r["chosen"]], "rejected": [r["rejected"]]} for r in rows]
        return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    except (TypeError, KeyError):
        raise ShadowMergeError(f"--finish: {DATASET}.json does not hold the rows --emit-only wrote") from None


def cli() -> str | None:
    """llamafactory-cli on PATH, or beside this Python (a virtualenv used without activating it)."""
    import sys

    beside = Path(sys.executable).parent / "llamafactory-cli"
    return shutil.which("llamafactory-cli") or (str(beside) if os.access(beside, os.X_OK) else None)


def run(config: Path) -> None:
    found = cli()
    if found is None:
        raise ShadowMergeError(INSTALL)
    env = dict(os.environ, PYTHONWARNINGS=",".join(filter(None, (os.environ.get("PYTHONWARNINGS"),
                                                                  "ignore::FutureWarning"))))
    proc = subprocess.run([found, "train", str(config)], env=env)
    if proc.returncode != 0:
        raise ShadowMergeError(f"llamafactory-cli train {config} failed (exit {proc.returncode}); see its output above")


def tidy_output(folder: Path, paths: dict[str, str]) -> None:
    """LLaMA-Factory's output folder as kept: its text files (model card, logs, states) name the final
    folders and the Base instead of the temporary run folder and the model view (`paths`: old -> new, in
    order), and the Trainer's pickled training_args.bin goes (it names the temporary folder; the kept YAML
    config and run.json hold the same settings)."""
    (folder / "training_args.bin").unlink(missing_ok=True)
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".md", ".json", ".jsonl", ".yaml", ".txt"):
            text = p.read_text(errors="surrogateescape")
            new = text
            for old, now in paths.items():
                new = new.replace(old, now)
            if new != text:
                rewrite_text(p, new)


def token_mismatch(tokenized: Path, rows: list[dict], tokenizer, stage: str, cutoff: int) -> tuple[str | None, int]:
    """(None, rows compared) when the token ids and trained positions LLaMA-Factory saved in `tokenized`
    equal those of the Instruct's chat template on the first CHECKED_ROWS rows (rows longer than the cutoff
    are skipped: both trainers truncate them, differently); else (what differs, in words, rows compared)."""
    from datasets import load_from_disk

    try:
        saved = load_from_disk(str(tokenized))
        saved = saved["train"] if "train" in saved else saved
        columns = set(saved.column_names)
    except Exception as exc:       # noqa: BLE001 - whatever datasets raises on a folder it cannot read
        raise ShadowMergeError(f"LLaMA-Factory's tokenized data {tokenized} cannot be read ({type(exc).__name__}); "
                               f"run LLaMA-Factory again") from None
    want = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels")} if stage == "dpo" else \
        {"input_ids", "labels"}
    if not want <= columns:
        raise ShadowMergeError(f"LLaMA-Factory's tokenized data {tokenized} lacks {', '.join(sorted(want - columns))}; "
                               f"run LLaMA-Factory again")
    if len(saved) != len(rows):
        return f"LLaMA-Factory tokenized {len(saved)} of the {len(rows)} rows (it drops rows it cannot read)", 0
    sides = [("chosen", "chosen"), ("rejected", "rejected")] if stage == "dpo" else [("completion", "")]
    compared = 0
    for i, row in enumerate(rows[:min(CHECKED_ROWS, len(saved))]):
        got_row, checked = saved[i], False
        for key, prefix in sides:
            want, start = expected_tokens(tokenizer, row["prompt"], row[key][-1:] if prefix else row[key])
            if len(want) > cutoff:
                continue
            checked = True
            name = f"{prefix}_" if prefix else ""
            ids, labels = list(got_row[f"{name}input_ids"]), list(got_row[f"{name}labels"])
            trained = [k for k, label in enumerate(labels) if label != -100]
            if ids != want or trained != list(range(start, len(want))):
                k = next((k for k, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
                what = (f"LLaMA-Factory's token ids differ from the Instruct's chat template at row {i + 1}"
                        f"{f' ({key})' if prefix else ''}, token {k}: {tokenizer.decode(ids[k:k + 8])!r} instead "
                        f"of {tokenizer.decode(want[k:k + 8])!r}" if ids != want else
                        f"LLaMA-Factory trains other tokens than the completion at row {i + 1}"
                        f"{f' ({key})' if prefix else ''}: positions {trained[:1]}..{trained[-1:]} instead of "
                        f"[{start}]..[{len(want) - 1}]")
                return what, compared
        compared += checked
    return None, compared


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


@register
class LlamaFactory:
    """`llamafactory-cli train` on the configs this module writes: both models' configs are written when the
    Base's training starts (and are all --emit-only writes); with --finish, LLaMA-Factory ran by hand into OUT
    and its outputs are adopted. Its token ids are compared with the Instruct's chat template (tidy)."""

    name = "llamafactory"
    resumes = False

    def __init__(self):
        self.configs: list[Path] = []

    def check(self, run) -> None:
        if not run.emit_only and not run.finishing and cli() is None:
            raise ShadowMergeError(INSTALL)

    def train(self, run, role: str, out: Path) -> str | None:
        tmp, final = out.parent, run.final
        if role == "base":
            run.record["llamafactory_template"] = (run.recipe.template or
                                                   "the Instruct's chat template, parsed from its tokenizer")
            if run.finishing:           # LLaMA-Factory ran by hand into OUT: its files, linked into the new OUT
                _adopt(final, tmp)
                run.record["llamafactory"] = run.finishing["llamafactory"]
                run.record["finished_by"] = run.command or "finish()"
                return None
            self.configs = self._write(run, tmp, final)
            run.record["llamafactory"] = [str(final / "llamafactory" / c.name) for c in self.configs]
            if run.emit_only:
                return (f"wrote the LLaMA-Factory configs: {', '.join(run.record['llamafactory'])}; after running "
                        f"them, `shadowmerge train --finish {final}` grafts")
        if not run.finishing:
            _run_config(self.configs[0 if role == "base" else 1], tmp, final)
        return None

    def tidy(self, run, role: str, out: Path) -> None:
        tmp, final = out.parent, run.final
        finished = run.finishing is not None
        view = final / "llamafactory" / VIEW if finished else tmp / "llamafactory" / VIEW
        trained_on = run.trained_model(role)
        tidy_output(out, {str(view): str(trained_on), str(tmp): str(final)})
        if run.recipe.method == "lora":
            name_base(out, trained_on)
        tokens = tmp / "llamafactory" / TOKENS if finished else tmp / f".tokens-{role}"
        if role == "base":
            self._compare_tokens(run, tokens, out)
        shutil.rmtree(tmp / f".tokens-{role}", ignore_errors=True)
        shutil.rmtree(tokens, ignore_errors=True)

    def losses(self, run, role: str, out: Path) -> list[dict]:
        return losses(out)

    @staticmethod
    def _write(run, tmp: Path, final: Path) -> list[Path]:
        """The model view, the data and each model's config into tmp/llamafactory/ (naming OUT's folders)."""
        r, kind = run.recipe, run.kind
        lf = (tmp / "llamafactory", final / "llamafactory")      # written here, read from there
        rows = as_sharegpt(run.rows, r.stage)
        model_view(run.base.folder, run.inst.folder, lf[0] / VIEW)
        configs = [write(r, rows, lf, str(lf[1] / VIEW), final / f"base-{kind}", tokens=run.emit_only)]
        if run.baseline:
            configs.append(write(r, rows, lf, str(run.inst.folder), final / f"instruct-{kind}"))
        return configs

    @staticmethod
    def _compare_tokens(run, tokens: Path, out: Path) -> None:
        """The token ids LLaMA-Factory trained the Base on against the Instruct's chat template: a run on
        another format is rejected (unless the recipe names a template), a mismatch it names is a warning."""
        r = run.recipe
        if tokens.exists():
            mismatch, compared = token_mismatch(tokens, run.rows, run.tokenizer, r.stage, r.cutoff)
        else:
            mismatch, compared = None, 0
            run.note("llamafactory", ["the token ids LLaMA-Factory trained on were not saved (no tokenized_path), so "
                                      "they were not compared with the Instruct's chat template"])
        if mismatch and not r.template:
            kept = run.keep_rejected(out)
            raise ShadowMergeError(f"{mismatch}; name a LLaMA-Factory template that matches in the recipe "
                                   f"(`template:`), or use --backend trl. The trained {run.kind} is kept in {kept}")
        if mismatch:
            run.note("llamafactory", [f"{mismatch} (template {r.template!r})"])
        elif compared:
            run.log(f"[shadowmerge train] LLaMA-Factory trained on the Instruct's chat template: token ids equal on "
                    f"{compared} row(s)")
        run.record["llamafactory_tokens"] = {"rows_compared": compared, "equal": mismatch is None and compared > 0}


def _run_config(config: Path, tmp: Path, final: Path) -> None:
    """Run a kept LLaMA-Factory config with its folders in the temporary run folder (its output and model
    view are there until the end) and its tokenized data saved for the token check; the config names OUT again
    afterwards."""
    kept = config.read_text()
    cfg = final_paths(yaml.safe_load(kept), str(final), str(tmp))
    cfg["tokenized_path"] = str(tmp / f".tokens-{Path(cfg['output_dir']).name.split('-')[0]}")
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        run(config)
    finally:
        config.write_text(kept)


def _adopt(final: Path, tmp: Path) -> None:
    """Everything in the emitted run folder but its run.json, hard-linked into the new one (no copy of weights)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for p in sorted(final.iterdir()):
        if p.name == "run.json":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, tmp / p.name, symlinks=True, copy_function=link)
        else:
            link(p, tmp / p.name) if not p.is_symlink() else os.symlink(os.readlink(p), tmp / p.name)
