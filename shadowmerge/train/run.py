"""train(): prepare -> train the Base (an existing trainer) -> graft onto the Instruct -> done.

Everything is written into a temporary folder beside OUT and renamed at the end:
OUT/base-lora/ (or base-full/), OUT/shadow/ (the grafted model, with a model card), with
--baseline OUT/instruct-lora/ and OUT/instruct-ft/ (the same recipe on the Instruct), with the
llamafactory backend OUT/llamafactory/ (its configs), and OUT/run.json (inputs, the resolved
recipe, versions, timings, loss curves). Under `accelerate launch` / torchrun only the main process
writes; the others only train. Training checkpoints live beside OUT in OUT.checkpoints/ until the run
ends (checkpoints.py, --resume); finish() completes a run whose LLaMA-Factory training was done by hand
after --emit-only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import hub, jsonfile
from .._version import __version__, versions
from ..checkpoint import Checkpoint
from ..errors import NoUpdate, ShadowMergeError
from ..output import OutputFolder, rewrite_text
from ..pipeline import graft
from ..record import final_paths, relocate
from . import checkpoints, checks, data, llamafactory, schedule, trl_backend
from .recipe import Recipe


@dataclass
class TrainSummary:
    out: Path | None
    stages: dict[str, float]
    losses: list[dict]
    warnings: list[str] = field(default_factory=list)
    evaluation: object = None            # evaluate.EvalReport, with --eval

    def __str__(self) -> str:
        if self.out is None:
            return "training done (not the main process: nothing written here)"
        times = ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items())
        loss = f"; loss {self.losses[0]['loss']:.4f} -> {self.losses[-1]['loss']:.4f}" if self.losses else ""
        table = [str(self.evaluation)] if self.evaluation is not None else []
        return "\n".join(table + [f"wrote {self.out} ({times}{loss})"] + [f"warning: {w}" for w in self.warnings])


def _stage(log, name: str, start: float, times: dict) -> float:
    now = time.perf_counter()
    times[name] = now - start
    log(f"[shadowmerge train] {name} done in {times[name]:.1f} s")
    return now


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _describe(ckpt: Checkpoint) -> dict:
    """An input for the run record: Hub id and revision, or a local path with its config's hash."""
    import hashlib

    folder = ckpt.folder.resolve()
    out = {"ref": ckpt.ref, "path": str(folder),
           "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()}
    out.update(hub.provenance([ckpt]).get(ckpt.label, {}))     # a Hub id: repo, revision, sha
    out["weights"] = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    return out


def finish(out, *, log=None, command: str | None = None) -> TrainSummary:
    """After `--emit-only` and LLaMA-Factory run by hand on the kept configs: graft, σ, loss plot, card and
    run.json into OUT, as a run that trained with LLaMA-Factory itself would have written them."""
    from dataclasses import fields

    folder = Path(str(out)).expanduser().absolute()
    hint = "pass a folder written by `shadowmerge train --backend llamafactory --emit-only`"
    emitted = jsonfile.load(folder / "run.json", "--finish: the run record", hint=hint)
    if not emitted.get("llamafactory") or not isinstance(emitted.get("recipe"), dict):
        raise ShadowMergeError(f"--finish: {folder} is not a run written by `shadowmerge train --backend llamafactory "
                               f"--emit-only` (its run.json names no LLaMA-Factory configs)")
    inputs = jsonfile.expect(emitted.get("inputs"), dict, "--finish: run.json's inputs", hint)
    for role in ("base", "instruct"):
        jsonfile.expect(jsonfile.expect(inputs.get(role), dict, f"--finish: run.json's {role}", hint).get("path"),
                        str, f"--finish: run.json's {role} path", hint)
    jsonfile.expect(jsonfile.expect(inputs.get("data"), dict, "--finish: run.json's data", hint).get("hash"), str,
                    "--finish: run.json's data hash", hint)
    jsonfile.expect(emitted["llamafactory"], list, "--finish: run.json's llamafactory configs", hint)
    if (folder / "shadow").exists():
        raise ShadowMergeError(f"--finish: {folder} is finished already (it has shadow/)")
    known = {f.name for f in fields(Recipe)}
    values = {k: v for k, v in emitted["recipe"].items() if k in known}
    values.update(base=emitted["inputs"]["base"]["path"], instruct=emitted["inputs"]["instruct"]["path"],
                  out=str(folder), bf16=bool(values.get("bf16")))
    recipe = Recipe(**values)
    kind = "lora" if recipe.method == "lora" else "full"
    for name, config in zip((f"base-{kind}", f"instruct-{kind}"), emitted["llamafactory"]):
        marker = "adapter_config.json" if kind == "lora" else "config.json"
        if not (folder / name / marker).is_file():
            raise ShadowMergeError(f"--finish: {folder / name} has no {marker}: run `llamafactory-cli train {config}` "
                                   f"first, then --finish")
    return train(recipe, baseline=bool(emitted.get("baseline")), finishing=emitted, log=log, command=command)


def train(recipe: Recipe, *, baseline: bool = False, emit_only: bool = False, force: bool = False,
          resume: bool = False, allow_pickle: bool = False, log=None, command: str | None = None,
          finishing: dict | None = None) -> TrainSummary:
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    r = recipe.resolved()
    times: dict[str, float] = {}
    warnings: list[str] = []
    t = start = time.perf_counter()
    main = _main_process()

    # --- prepare: every cheap check before any training -------------------------------------
    base = Checkpoint.open(r["base"], "base", allow_pickle)
    inst = Checkpoint.open(r["instruct"], "instruct", allow_pickle)
    try:
        checks.check_pair(base, inst)
        base.fetch(main, side=["generation_config.json"])   # Hub ids: the trainers read whole folders
        inst.fetch(main, side=True)
        if checks.same_weights(base, inst):
            raise ShadowMergeError(f"--base {r['base']} and --instruct {r['instruct']} hold the same weights (σ = 0): "
                                   f"Shadow-FT trains the Base and grafts onto its Instruct; pass the two models")
        if finishing:      # the rows LLaMA-Factory was given
            lf_file = Path(r["out"]) / "llamafactory" / f"{llamafactory.DATASET}.json"
            rows = llamafactory.from_sharegpt(jsonfile.load(lf_file, "--finish: the LLaMA-Factory data", list,
                                                            hint="run --emit-only again"), r["stage"])
            data_hash, fmt = finishing["inputs"]["data"]["hash"], finishing["inputs"]["data"]["format"]
        else:
            raw, data_hash = data.read_rows(r["data"])
            rows, fmt = data.prepare(raw, r["stage"], str(r["data"]), r["max_samples"])
        plan, adapted = schedule.check(r, len(rows))
        warnings += adapted
        hint = trl_backend.problem() if r["backend"] == "trl" else None     # says what to install
        if hint:
            raise ShadowMergeError(hint)
        if r["backend"] == "trl":
            trl_backend.check_settings(r)
        work = checkpoints.folder(r["out"])                 # OUT.checkpoints: kept when training is interrupted
        ckey = checkpoints.key(r, base.folder, inst.folder, data_hash)
        if main and not emit_only:
            checkpoints.check(work, ckey, resume, force, r["backend"])
        resume_from = checkpoints.last(work / "base", prune=main) if resume else None
        if r["backend"] == "llamafactory" and not emit_only and not finishing and llamafactory.cli() is None:
            raise ShadowMergeError(llamafactory.INSTALL)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(inst.folder)
        if not tokenizer.chat_template:
            raise ShadowMergeError(f"the instruct {r['instruct']} has no chat template; the Base is trained on the "
                                   f"Instruct's chat format, so the Instruct's tokenizer must carry one: pass the "
                                   f"Instruct release (with chat_template.jinja or a chat_template in "
                                   f"tokenizer_config.json)")
        renderer = tokenizer
        if any("images" in row for row in rows):
            renderer = _processor(r, inst)
        bad = checks.untrained_template_tokens(base, tokenizer)
        if bad:
            warnings.append(f"the Base's embedding rows for chat-template token(s) {', '.join(bad)} look untrained "
                            f"(tiny or equal to the mean row): the Base has never seen the chat format; consider "
                            f"training the embeddings too (method full) or check the outputs for stray tokens")
        evaluation = _eval_prepare(r, main and not emit_only)
        target = OutputFolder(r["out"], force=force or bool(finishing), inputs=[base.folder, inst.folder], need_bytes=0,
                              record="run.json") if main else None
    finally:
        base.close()
        inst.close()
    log(f"[shadowmerge train] {r['method']} {r['stage']} of {r['base']} ({len(rows)} {fmt} rows) with {r['backend']}, "
        f"graft onto {r['instruct']}")
    log(f"[shadowmerge train] schedule: {plan.describe()}")
    for w in warnings:
        log(f"[shadowmerge train] warning: {w}")
    t = _stage(log, "prepare", t, times)

    record = {"tool": "shadowmerge train", "version": __version__, "recipe": r, "baseline": baseline,
              "inputs": {"base": _describe(base), "instruct": _describe(inst), "data": {"ref": str(r["data"]),
                         "hash": data_hash, "format": fmt, "rows": len(rows)}},
              "versions": versions("torch", "transformers", "peft", "trl", "datasets", "accelerate"), "warnings": warnings,
              "formatted_example": _render(renderer, rows[0]),
              "schedule": {"optimizer_steps": plan.steps, "warmup_steps": plan.warmup_steps,
                           "steps_above_lr_0": plan.trained_steps, "peak_lr": plan.peak_lr,
                           "batches_per_epoch": plan.batches_per_epoch, "processes": plan.processes}}
    if resume_from:
        record["resumed_from"] = Path(resume_from).name
        log(f"[shadowmerge train] resuming from {Path(resume_from).name} in {work}")
    if not main:
        scratch = Path(tempfile.mkdtemp(prefix="shadowmerge-train-rank"))
        try:
            _train_one(r, base.folder, inst.folder, rows, scratch / "model", work / "base", resume_from)
            return TrainSummary(None, times, [])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    try:
        with target as tmp:
            kind = "lora" if r["method"] == "lora" else "full"
            tuned = tmp / f"base-{kind}"
            if r["backend"] == "llamafactory":
                final = Path(r["out"]).expanduser().absolute()
                lf = (tmp / "llamafactory", final / "llamafactory")      # written here, read from there
                record["llamafactory_template"] = r["template"] or "the Instruct's chat template, parsed from its tokenizer"
                outputs = [tuned] + ([tmp / f"instruct-{kind}"] if baseline else [])
                if finishing:           # LLaMA-Factory ran by hand into OUT: its files, linked into the new OUT
                    _adopt(final, tmp)
                    record["llamafactory"], record["finished_by"] = finishing["llamafactory"], command or "finish()"
                    tokens, view = tmp / "llamafactory" / llamafactory.TOKENS, final / "llamafactory" / llamafactory.VIEW
                else:
                    lf_rows = llamafactory.as_sharegpt(rows, r["stage"])
                    llamafactory.model_view(base.folder, inst.folder, lf[0] / llamafactory.VIEW)
                    configs = [llamafactory.write(r, lf_rows, lf, str(lf[1] / llamafactory.VIEW), final / tuned.name,
                                                  tokens=emit_only)]
                    if baseline:
                        configs.append(llamafactory.write(r, lf_rows, lf, str(inst.folder), final / f"instruct-{kind}"))
                    record["llamafactory"] = [str(final / "llamafactory" / c.name) for c in configs]
                    if emit_only:
                        (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
                        target.commit()
                        log(f"[shadowmerge train] wrote the LLaMA-Factory configs: "
                            f"{', '.join(record['llamafactory'])}; after running them, `shadowmerge train --finish "
                            f"{final}` grafts")
                        return TrainSummary(target.target, times, [], warnings)
                    for c in configs:
                        _run_llamafactory(c, tmp, final)
                    tokens, view = tmp / ".tokens-base", tmp / "llamafactory" / llamafactory.VIEW
                for out_dir in outputs:
                    trained_on = base.folder if out_dir == tuned else inst.folder
                    llamafactory.tidy_output(out_dir, {str(view): str(trained_on), str(tmp): str(final)})
                    if kind == "lora":
                        _name_base(out_dir, trained_on)
                if tokens.exists():
                    mismatch, compared = llamafactory.token_mismatch(tokens, rows, tokenizer, r["stage"], r["cutoff"])
                else:
                    mismatch, compared = None, 0
                    _more_warnings(log, warnings, "llamafactory", [
                        "the token ids LLaMA-Factory trained on were not saved (no tokenized_path), so they were not "
                        "compared with the Instruct's chat template"])
                for left in (tokens, tmp / ".tokens-instruct"):
                    shutil.rmtree(left, ignore_errors=True)
                if mismatch and not r["template"]:
                    kept = _keep_rejected(tuned, target.target, dict(record, status="rejected", warnings=warnings))
                    raise ShadowMergeError(f"{mismatch}; name a LLaMA-Factory template that matches in the recipe "
                                           f"(`template:`), or use --backend trl. The trained {kind} is kept in {kept}")
                if mismatch:
                    _more_warnings(log, warnings, "llamafactory", [f"{mismatch} (template {r['template']!r})"])
                elif compared:
                    log(f"[shadowmerge train] LLaMA-Factory trained on the Instruct's chat template: token ids equal on "
                        f"{compared} row(s)")
                record["llamafactory_tokens"] = {"rows_compared": compared, "equal": mismatch is None and compared > 0}
                losses = llamafactory.losses(tuned)
                if baseline:
                    record["losses"] = {"instruct": llamafactory.losses(tmp / f"instruct-{kind}")}
            else:
                checkpoints.start(work, ckey)
                losses = _train_one(r, base.folder, inst.folder, rows, tuned, work / "base", resume_from)["losses"]
            record.setdefault("losses", {})["base"] = losses
            t = _stage(log, "train", t, times)

            try:               # the roles are known here: this run trained the Base into `tuned`
                if kind == "lora":
                    done = graft(inst.folder, out=tmp / "shadow", lora=tuned, progress=False, check_roles=False)
                else:
                    done = graft(inst.folder, base.folder, tuned, tmp / "shadow", progress=False, check_roles=False)
            except NoUpdate as exc:
                kept = _keep_rejected(tuned, target.target, dict(record, status="rejected", warnings=warnings))
                raise ShadowMergeError(
                    f"training changed nothing the graft carries: every grafted tensor of the Instruct came out "
                    f"unchanged ({exc.unchanged} with a zero update, {exc.identical} with an update below "
                    f"the output precision); {plan.describe()}; raise --lr or --max-steps, or check the data. The "
                    f"trained {kind} is kept in {kept} for inspection") from None
            _more_warnings(log, warnings, "graft", done.warnings)
            t = _stage(log, "graft", t, times)

            if baseline:
                log("[shadowmerge train] baseline: the same recipe on the Instruct")
                inst_tuned = tmp / f"instruct-{kind}"
                if r["backend"] == "trl":
                    record["losses"]["instruct"] = _train_one(
                        r, inst.folder, inst.folder, rows, inst_tuned, work / "instruct",
                        checkpoints.last(work / "instruct", prune=True) if resume else None)["losses"]
                if kind == "lora":
                    done = graft(inst.folder, out=tmp / "instruct-ft", lora=inst_tuned, progress=False,
                                 check_roles=False)      # the baseline: an adapter of the Instruct, merged into it
                    _more_warnings(log, warnings, "baseline graft", done.warnings)
                else:
                    inst_tuned.rename(tmp / "instruct-ft")
                    _copy_tokenizer(inst.folder, tmp / "instruct-ft")
                t = _stage(log, "baseline", t, times)

            from ..analyzer import similarity

            pair = similarity(base.folder, inst.folder, progress=False).pairs[0]
            record["sigma"] = {"official": pair.official, "weighted": pair.weighted}
            official = f"{pair.official:.6f}" if pair.official is not None else "n/a"
            log(f"[shadowmerge train] σ(Base, Instruct): official {official}, weighted {pair.weighted:.6f}")
            t = _stage(log, "similarity", t, times)
            report = None
            if evaluation is not None:
                report = _evaluate(evaluation, inst.folder, tmp, target.target, baseline, command, log)
                record["eval"] = {k: report.data[k] for k in ("reference", "scores", "heldout", "paired")}
                record["eval"]["report"] = "eval/report.html"
                t = _stage(log, "eval", t, times)
            if _loss_plot(tmp / "loss.png", record["losses"]):
                record["loss_plot"] = "loss.png"
                shutil.copyfile(tmp / "loss.png", tmp / "shadow" / "loss.png")     # shown by the model card
            _card(tmp / "shadow", r, pair, losses, kind, inst.folder, command, report)
            for sub in ("shadow", "instruct-ft"):          # records name the final folders, and cover the card
                relocate(tmp / sub, tmp, target.target)
            times["total"] = time.perf_counter() - start
            record["seconds"] = {k: round(v, 3) for k, v in times.items()}
            record["warnings"] = warnings
            (tmp / "run.json").write_text(json.dumps(record, indent=2) + "\n")
            target.commit()
    except ShadowMergeError:
        shutil.rmtree(work, ignore_errors=True)         # trained, then rejected: nothing to resume
        raise
    except KeyboardInterrupt as exc:       # the CLI's last line says what was removed and this, what was kept
        newest = checkpoints.last(work / "base")
        if newest:
            exc.kept = f"{work} keeps {Path(newest).name}: add --resume to go on from there"
        elif work.exists():
            exc.kept = (f"no checkpoint was complete yet (one every {r['save_steps']} steps): --resume starts "
                        f"from the beginning")
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(f"[shadowmerge train] done in {time.perf_counter() - start:.1f} s: {target.target}")
    if report is not None:
        report.out = target.target / "eval"
    return TrainSummary(target.target, times, losses, warnings, report)


def _eval_prepare(r: dict, main: bool):
    """--eval / the recipe's `eval:`: its tasks and held-out rows checked now, before any training."""
    from .recipe import eval_settings

    settings = eval_settings(r.get("eval"))
    if settings is None or not main:
        return None
    from ..evaluate import EvalSettings, prepare

    return prepare([], EvalSettings(**settings), open_models=False)


def _evaluate(prepared, inst_folder: Path, tmp: Path, final: Path, baseline: bool, command, log):
    """The Instruct, shadow/ (and instruct-ft/) evaluated into tmp/eval/, the Instruct the reference."""
    from .. import evaluate
    from ..evaluate.models import Model

    prepared.models = [Model("instruct", str(inst_folder), inst_folder, {"ref": str(inst_folder),
                                                                           "path": str(inst_folder)})]
    for name in ("shadow",) + (("instruct-ft",) if baseline else ()):
        prepared.models.append(Model(name, f"{name}/", tmp / name, {"ref": f"{name}/", "path": str(final / name)}))
    folder = tmp / "eval"
    folder.mkdir()
    data, examples = evaluate.run(prepared, folder, progress=False, command=command,
                                  log=lambda text: log(f"[shadowmerge train] eval: {text}"))
    evaluate.write(folder, data, examples)
    return evaluate.EvalReport(data, None)


def _loss_plot(path: Path, losses: dict) -> bool:
    """The training loss per optimizer step (the Base's, and the Instruct baseline's), as a PNG."""
    curves = {k: v for k, v in losses.items() if v}
    if not curves:
        return False
    from ..analyzer.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, points in curves.items():
        label = {"base": "Base (grafted onto the Instruct)", "instruct": "Instruct (baseline)"}.get(name, name)
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker="o" if len(points) < 30 else None,
                label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("shadowmerge train: training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _more_warnings(log, warnings: list[str], stage: str, found: list[str]) -> None:
    """A stage's warnings: printed now, and kept for run.json."""
    for w in found:
        warnings.append(f"{stage}: {w}")
        log(f"[shadowmerge train] warning: {stage}: {w}")


def _keep_rejected(tuned: Path, final: Path, record: dict) -> Path:
    """The trained adapter or model of a rejected run, beside OUT as OUT.rejected (replacing an earlier one;
    written aside and renamed, like any output)."""
    kept = final.parent / f"{final.name}.rejected"
    folder = OutputFolder(kept, force=True, inputs=[], need_bytes=0, record="run.json")
    with folder as tmp:
        shutil.copytree(tuned, tmp / tuned.name)
        (tmp / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        folder.commit()
    return folder.target


def _processor(r: dict, inst: Checkpoint):
    """The Instruct's processor, for rows with images: they need a vision-language model and the TRL backend."""
    if r["backend"] != "trl":
        raise ShadowMergeError("rows with images are trained with the TRL backend only; pass --backend trl")
    if "vision_config" not in inst.config:
        raise ShadowMergeError(f"the rows have images, but {r['instruct']} is not a vision-language model (its "
                               f"config.json has no vision_config); pass image-free rows, or a vision-language pair")
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(inst.folder)
    except Exception as exc:           # noqa: BLE001 - any failure here means: no usable processor
        raise ShadowMergeError(f"the rows have images, but the processor of {r['instruct']} cannot be loaded "
                               f"({type(exc).__name__}); it needs preprocessor_config.json / processor_config.json "
                               f"beside the tokenizer: download the Instruct's processor files into its folder") from None
    if not hasattr(processor, "image_processor"):
        raise ShadowMergeError(f"the rows have images, but {r['instruct']} has no image processor "
                               f"(preprocessor_config.json); pass the vision-language Instruct's folder")
    return processor


def _render(tokenizer, row: dict) -> str:
    """The first training example as the trainer will see it: in the Instruct's chat template."""
    msgs = row["prompt"] + (row["completion"] if "completion" in row else row["chosen"])
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def _train_one(r: dict, model: Path, tokenizer: Path, rows: list[dict], out: Path, work: Path,
               resume_from: str | None) -> dict:
    done = trl_backend.train(r, model, tokenizer, rows, out, work, resume_from)
    if done["main_process"] and r["method"] == "lora":
        _name_base(out, model)
    return done


def _run_llamafactory(config: Path, tmp: Path, final: Path) -> None:
    """Run a kept LLaMA-Factory config with its folders in the temporary run folder (its output and model
    view are there until the end) and its tokenized data saved for the token check; the config names OUT again
    afterwards."""
    import yaml

    kept = config.read_text()
    cfg = final_paths(yaml.safe_load(kept), str(final), str(tmp))
    cfg["tokenized_path"] = str(tmp / f".tokens-{Path(cfg['output_dir']).name.split('-')[0]}")
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        llamafactory.run(config)
    finally:
        config.write_text(kept)


def _adopt(final: Path, tmp: Path) -> None:
    """Everything in the emitted run folder but its run.json, hard-linked into the new one (no copy of weights)."""
    import os

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


def _name_base(adapter: Path, base: Path) -> None:
    """The adapter's base_model_name_or_path: the absolute folder of the model it was trained on (re-runs from
    anywhere; not LLaMA-Factory's model view or a relative path as typed)."""
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    local = Path(str(base)).expanduser()
    cfg["base_model_name_or_path"] = str(local.absolute()) if local.exists() else str(base)
    rewrite_text(path, json.dumps(cfg, indent=2) + "\n")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from ..sidefiles import DESCRIBE_THE_INPUT, side_files

    for p in side_files(src):
        if p.name != "config.json" and p.name not in DESCRIBE_THE_INPUT and not (dst / p.name).exists():
            shutil.copyfile(p, dst / p.name)


def _card(folder: Path, r: dict, pair, losses: list[dict], kind: str, inst_folder: Path, command: str | None,
          report=None) -> None:
    """shadow/'s own model card: what was trained, how, σ, the loss, the recipe (huggingface_hub's ModelCard)."""
    from .. import card

    official = f"{pair.official:.4f}" if pair.official is not None else "n/a"
    loss = f"{losses[0]['loss']:.4f} → {losses[-1]['loss']:.4f} over {len(losses)} logged steps" if losses else "n/a"
    details = {"σ(Base, Instruct), official (mean of per-tensor σ over model.layers.N.*)": official,
               "σ(Base, Instruct), weighted": f"{pair.weighted:.4f}",
               "training loss": loss + (" ![training loss](loss.png)" if (folder / "loss.png").is_file() else "")}
    details.update({f"recipe: {k}": f"`{v}`" for k, v in r.items() if k != "out"})
    card.write(folder, title=f"Shadow-FT: {Path(str(r['instruct'])).name} + a {kind} {r['stage'].upper()} of "
                             f"{Path(str(r['base'])).name}",
               made_from={"Instruct": r["instruct"], "Base (trained)": r["base"], "data": r["data"]},
               relation="merge", license_from=inst_folder, datasets=[str(r["data"])],
               what=f"`{r['instruct']}` with the update of a {kind} {r['stage'].upper()} fine-tune of its Base "
                    f"`{r['base']}` grafted onto it by `shadowmerge train`. It keeps the Instruct's tokenizer, chat "
                    f"template and generation config; the Base was trained on data formatted with the Instruct's chat "
                    f"template.", command=command or card.command_line(None), details=details,
               evaluation=_eval_section(report))


def _eval_section(report) -> str | None:
    """The model card's evaluation: eval.md's table and verdicts (the files are in the run folder's eval/)."""
    if report is None:
        return None
    from ..evaluate.report import summary_lines, table_rows

    header, rows = table_rows(report.data)
    lines = ["## Evaluation", "", "`shadowmerge train --eval` (the run folder's eval/ has report.html and the per-item "
             "logs):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"- {line}" for line in summary_lines(report.data)]
    return "\n".join(lines) + "\n"
