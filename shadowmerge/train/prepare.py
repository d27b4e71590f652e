"""train's first stage: every cheap check before any training, and the Run the later stages share.

The checks: Base and Instruct are a pair and not the same weights, the data parses and the recipe's schedule
trains on it, the backend is installed and takes the recipe, checkpoints of an earlier run are not thrown
away silently, the Instruct has a chat template (and a processor for image rows), --eval's tasks load, and
OUT is free. A Run is what they found: the resolved recipe, the inputs, the rows, the backend and the record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import jsonfile
from ..transports import hub
from .._version import versions
from ..checkpoint import Checkpoint
from ..errors import ShadowMergeError
from ..output import OutputFolder, TargetLock
from ..record import FILES
from ..record import new as new_record
from ..record import write as write_record
from . import backends, checkpoints, checks, data, llamafactory, schedule
from .recipe import Recipe


@dataclass
class Run:
    """One training run as its stages share it."""
    recipe: Recipe                    # resolved: every value as it is used
    base: Checkpoint                  # closed again: the stages use .folder
    inst: Checkpoint
    rows: list[dict]
    backend: backends.Backend
    schedule: schedule.Schedule
    log: Callable[[str], None]
    main: bool                        # the main process (the only one that writes)
    work: Path                        # OUT.checkpoints
    ckey: dict                        # what the checkpoints belong to
    tokenizer: object = None          # the Instruct's
    baseline: bool = False
    emit_only: bool = False
    resume: bool = False
    resume_from: str | None = None
    finishing: dict | None = None     # the run.json of an --emit-only run, with --finish
    command: str | None = None
    progress: bool = True             # progress bars (-q: none)
    work_ours: bool = False           # this run made OUT.checkpoints (only then may it remove it)
    evaluation: object = None         # evaluate.Prepared, with --eval
    target: OutputFolder | None = None
    warnings: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)     # becomes run.json

    @property
    def kind(self) -> str:
        return self.recipe.kind

    def trained_model(self, role: str) -> Path:
        """The folder of the model a role trains: the Base ("base"), or the Instruct (the baseline)."""
        return self.base.folder if role == "base" else self.inst.folder

    @property
    def final(self) -> Path:
        return Path(str(self.recipe.out)).expanduser().absolute()

    def note(self, stage: str, found: list[str]) -> None:
        """A stage's warnings: printed now, and kept for run.json."""
        for w in found:
            self.warnings.append(f"{stage}: {w}")
            self.log(f"[shadowmerge train] warning: {stage}: {w}")

    def keep_rejected(self, tuned: Path) -> Path:
        """The trained adapter or model of a rejected run, beside OUT as OUT.rejected (replacing an earlier one;
        written aside and renamed, like any output), with the run's record marked rejected."""
        import shutil

        record = dict(self.record, status="rejected", warnings=self.warnings)
        folder = OutputFolder(self.final.parent / f"{self.final.name}.rejected", force=True, inputs=[], need_bytes=0,
                              record=FILES["train"])
        with folder as tmp:
            shutil.copytree(tuned, tmp / tuned.name)
            write_record(tmp, record, default=str)
            folder.commit()
        return folder.target


def prepare(recipe: Recipe, *, baseline: bool, emit_only: bool, force: bool, resume: bool, allow_pickle: bool,
            log, command: str | None, finishing: dict | None, progress: bool = True) -> Run:
    r = recipe.resolved()
    main = int(os.environ.get("RANK", "0")) == 0
    base = Checkpoint.open(r.base, "base", allow_pickle)
    inst = Checkpoint.open(r.instruct, "instruct", allow_pickle)
    try:
        base.needs_local("train")
        inst.needs_local("train")
        checks.check_pair(base, inst)
        for ckpt, role in ((base, "base"), (inst, "instruct")):
            if ckpt.quantized:        # trainers load it decoded by transformers: what it cannot decode, refused now
                from ..formats.fp8 import check_decodable

                check_decodable(ckpt, role)
        base.fetch(main and progress, side=["generation_config.json"])   # Hub ids: the trainers read whole folders
        inst.fetch(main, side=True)
        if checks.same_weights(base, inst):
            raise ShadowMergeError(f"--base {r.base} and --instruct {r.instruct} hold the same weights (σ = 0): "
                                   f"Shadow-FT trains the Base and grafts onto its Instruct; pass the two models")
        rows, data_hash, fmt = _rows(r, finishing)
        plan, adapted = schedule.check(r, len(rows))
        backend = backends.create(r.backend)
        work = checkpoints.folder(r.out)                 # OUT.checkpoints: kept when training is interrupted
        run = Run(r, base, inst, rows, backend, plan, log, main, work, checkpoints.key(r, base.folder, inst.folder,
                  data_hash), baseline=baseline, emit_only=emit_only, resume=resume, finishing=finishing,
                  command=command, progress=progress, warnings=adapted)
        backend.check(run)
        if main:            # a live run of the same OUT (its checkpoints are not an interrupted run's)
            TargetLock.for_target(r.out).check_free()
        if main and not emit_only:
            removed = checkpoints.check(work, run.ckey, resume, force, backend.resumes)
            if removed:
                log(f"[shadowmerge train] {removed}")
        run.resume_from = checkpoints.last(work / "base", prune=main) if resume else None
        from transformers import AutoTokenizer

        run.tokenizer = AutoTokenizer.from_pretrained(inst.folder)
        if not run.tokenizer.chat_template:
            raise ShadowMergeError(f"the instruct {r.instruct} has no chat template; the Base is trained on the "
                                   f"Instruct's chat format, so the Instruct's tokenizer must carry one: pass the "
                                   f"Instruct release (with chat_template.jinja or a chat_template in "
                                   f"tokenizer_config.json)")
        renderer = _processor(r, inst) if any("images" in row for row in rows) else run.tokenizer
        bad = checks.untrained_template_tokens(base, run.tokenizer)
        if bad:
            run.warnings.append(f"the Base's embedding rows for chat-template token(s) {', '.join(bad)} look untrained "
                                f"(tiny or equal to the mean row): the Base has never seen the chat format; consider "
                                f"training the embeddings too (method full) or check the outputs for stray tokens")
        run.evaluation = _eval_prepare(r, main and not emit_only, baseline)
        if main:
            run.target = OutputFolder(r.out, force=force or bool(finishing), inputs=[base.folder, inst.folder],
                                      need_bytes=0, record=FILES["train"])
    finally:
        base.close()
        inst.close()
    run.record = _record(run, data_hash, fmt, renderer)
    log(f"[shadowmerge train] {r.method} {r.stage} of {r.base} ({len(rows)} {fmt} rows) with {r.backend}, "
        f"graft onto {r.instruct}")
    log(f"[shadowmerge train] schedule: {plan.describe()}")
    for w in run.warnings:
        log(f"[shadowmerge train] warning: {w}")
    if run.resume_from:
        run.record["resumed_from"] = Path(run.resume_from).name
        log(f"[shadowmerge train] resuming from {Path(run.resume_from).name} in {work}")
    return run


def _rows(r: Recipe, finishing: dict | None) -> tuple[list[dict], str, str]:
    """The training rows, the data's hash and format: the data file's, or (--finish) those LLaMA-Factory got."""
    if finishing:
        lf_file = Path(r.out) / "llamafactory" / f"{llamafactory.DATASET}.json"
        rows = llamafactory.from_sharegpt(jsonfile.load(lf_file, "--finish: the LLaMA-Factory data", list,
                                                        hint="run --emit-only again"), r.stage)
        return rows, finishing["inputs"]["data"]["hash"], finishing["inputs"]["data"]["format"]
    raw, data_hash = data.read_rows(r.data)
    rows, fmt = data.prepare(raw, r.stage, str(r.data), r.max_samples)
    return rows, data_hash, fmt


def _record(run: Run, data_hash: str, fmt: str, renderer) -> dict:
    """run.json as far as it is known before training."""
    r, plan = run.recipe, run.schedule
    return new_record("train", {"recipe": r.as_dict(), "baseline": run.baseline,
            "inputs": {"base": _describe(run.base), "instruct": _describe(run.inst),
                       "data": {"ref": str(r.data), "hash": data_hash, "format": fmt, "rows": len(run.rows)}},
            "versions": versions("torch", "transformers", "peft", "trl", "datasets", "accelerate"),
            "warnings": run.warnings, "formatted_example": _render(renderer, run.rows[0]),
            "schedule": {"optimizer_steps": plan.steps, "warmup_steps": plan.warmup_steps,
                         "steps_above_lr_0": plan.trained_steps, "peak_lr": plan.peak_lr,
                         "batches_per_epoch": plan.batches_per_epoch, "processes": plan.processes}})


def _describe(ckpt: Checkpoint) -> dict:
    """An input for the run record: Hub id and revision, or a local path with its config's hash."""
    import hashlib

    folder = ckpt.folder.resolve()
    out = {"ref": ckpt.ref, "path": str(folder),
           "config_sha256": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()}
    out.update(hub.provenance([ckpt]).get(ckpt.label, {}))     # a Hub id: repo, revision, sha
    out["weights"] = {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}
    return out


def _eval_prepare(r: Recipe, main: bool, baseline: bool):
    """--eval / the recipe's `eval:`: its tasks, held-out rows and named pairs checked now, before any training.
    With --baseline, shadow/ against instruct-ft/ (the paper's comparison) is always a named pair, the first."""
    from .recipe import eval_settings

    settings = eval_settings(r.eval)
    if settings is None or not main:
        return None
    from ..evaluate import EvalSettings, prepare as prepare_eval
    from ..evaluate.settings import check_pairs

    labels = ["instruct"] + (["instruct-ft"] if baseline else []) + ["shadow"]
    named = check_pairs(settings.get("compare"), labels, "`eval: compare:`")
    if baseline and ("shadow", "instruct-ft") not in named:
        named.insert(0, ("shadow", "instruct-ft"))
    settings["compare"] = tuple(f"{a}:{b}" for a, b in named)
    return prepare_eval([], EvalSettings(**settings), open_models=False)


def _processor(r: Recipe, inst: Checkpoint):
    """The Instruct's processor, for rows with images: they need a vision-language model and the TRL backend."""
    if r.backend != "trl":
        raise ShadowMergeError("rows with images are trained with the TRL backend only; pass --backend trl")
    if "vision_config" not in inst.config:
        raise ShadowMergeError(f"the rows have images, but {r.instruct} is not a vision-language model (its "
                               f"config.json has no vision_config); pass image-free rows, or a vision-language pair")
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(inst.folder)
    except Exception as exc:           # noqa: BLE001 - any failure here means: no usable processor
        raise ShadowMergeError(f"the rows have images, but the processor of {r.instruct} cannot be loaded "
                               f"({type(exc).__name__}); it needs preprocessor_config.json / processor_config.json "
                               f"beside the tokenizer: download the Instruct's processor files into its folder") from None
    if not hasattr(processor, "image_processor"):
        raise ShadowMergeError(f"the rows have images, but {r.instruct} has no image processor "
                               f"(preprocessor_config.json); pass the vision-language Instruct's folder")
    return processor


def _render(tokenizer, row: dict) -> str:
    """The first training example as the trainer will see it: in the Instruct's chat template."""
    msgs = row["prompt"] + (row["completion"] if "completion" in row else row["chosen"])
    return tokenizer.apply_chat_template(msgs, tokenize=False)
