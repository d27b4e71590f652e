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

import contextlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import jsonfile
from ..errors import NoUpdate, ShadowMergeError
from ..output import fsync_tree, os_error_of
from ..pipeline import graft
from ..record import FILES, relocate
from ..record import read as read_record
from ..record import write as write_record
from . import checkpoints
from .outputs import copy_tokenizer, loss_plot, model_card
from .prepare import Run, prepare
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


def finish(out, *, log=None, command: str | None = None, progress: bool = True) -> TrainSummary:
    """After `--emit-only` and LLaMA-Factory run by hand on the kept configs: graft, σ, loss plot, card and
    run.json into OUT, as a run that trained with LLaMA-Factory itself would have written them."""
    from dataclasses import fields

    folder = Path(str(out)).expanduser().absolute()
    hint = "pass a folder written by `shadowmerge train --backend llamafactory --emit-only`"
    emitted = read_record(folder, (FILES["train"],), "--finish: the run record", hint).data
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
    kind = recipe.kind
    for name, config in zip((f"base-{kind}", f"instruct-{kind}"), emitted["llamafactory"]):
        marker = "adapter_config.json" if kind == "lora" else "config.json"
        if not (folder / name / marker).is_file():
            raise ShadowMergeError(f"--finish: {folder / name} has no {marker}: run `llamafactory-cli train {config}` "
                                   f"first, then --finish")
    return train(recipe, baseline=bool(emitted.get("baseline")), finishing=emitted, log=log, command=command,
                 progress=progress)


def train(recipe: Recipe, *, baseline: bool = False, emit_only: bool = False, force: bool = False,
          resume: bool = False, allow_pickle: bool = False, log=None, command: str | None = None,
          finishing: dict | None = None, progress: bool = True) -> TrainSummary:
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    clock = _Clock(log)
    run = prepare(recipe, baseline=baseline, emit_only=emit_only, force=force, resume=resume,
                  allow_pickle=allow_pickle, log=log, command=command, finishing=finishing, progress=progress)
    clock.lap("prepare")
    if not run.main:
        return _train_elsewhere(run, clock)
    report = None
    try:
        with run.target as tmp:
            tuned = tmp / f"base-{run.kind}"
            stopped = _train_model(run, "base", tuned)
            if stopped:                       # --emit-only: the trainer's configs, nothing trained
                write_record(tmp, run.record)
                run.target.commit()
                log(f"[shadowmerge train] {stopped}")
                return TrainSummary(run.target.target, clock.times, [], run.warnings)
            clock.lap("train")
            _graft(run, tuned, tmp / "shadow")
            clock.lap("graft")
            if baseline:
                _baseline(run, tmp)
                clock.lap("baseline")
            pair = _similarity(run)
            clock.lap("similarity")
            if run.evaluation is not None:
                report = _evaluate(run, tmp)
                clock.lap("eval")
            _write(run, tmp, pair, report, clock)
            run.target.commit()
    except ShadowMergeError:
        if run.work_ours:        # trained, then rejected, or the disk filled: nothing to resume
            shutil.rmtree(run.work, ignore_errors=True)
        raise
    except KeyboardInterrupt as exc:       # the CLI's last line says what was removed and this, what was kept
        newest = checkpoints.last(run.work / "base") if run.work_ours else None
        if newest:
            exc.kept = f"{run.work} keeps {Path(newest).name}: add --resume to go on from there"
        elif run.work_ours:      # nothing to resume: the next run starts over anyway
            shutil.rmtree(run.work, ignore_errors=True)
        raise
    shutil.rmtree(run.work, ignore_errors=True)
    log(f"[shadowmerge train] done in {clock.total():.1f} s: {run.target.target}")
    if report is not None:
        report.out = run.target.target / "eval"
    return TrainSummary(run.target.target, clock.times, run.record["losses"]["base"], run.warnings, report)


class _Clock:
    """Each stage's seconds, printed as it ends and kept for run.json."""

    def __init__(self, log):
        self.log, self.times = log, {}
        self.start = self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name], self.last = now - self.last, now
        self.log(f"[shadowmerge train] {name} done in {self.times[name]:.1f} s")

    def total(self) -> float:
        return time.perf_counter() - self.start


def _train_elsewhere(run: Run, clock: _Clock) -> TrainSummary:
    """A process other than the main one of a distributed launch: it trains beside the main process (each model
    the main process trains) and writes nothing."""
    scratch = Path(tempfile.mkdtemp(prefix="shadowmerge-train-rank"))
    try:
        for role in ("base", "instruct") if run.baseline else ("base",):
            run.backend.train(run, role, scratch / f"{role}-{run.kind}")
            _release()
        return TrainSummary(None, clock.times, [])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_model(run: Run, role: str, out: Path) -> str | None:
    """The train stage of one model: the backend trains it into out, tidies it, and its losses go into the
    record. Returns what the backend wrote instead when it stopped before training (--emit-only).

    The trained model is made durable here (the output's commit would fsync it anyway), so that the kernel's
    writeback of the trainer's files is paid by this stage instead of slowing the graft's writes after it."""
    with _machine_errors(run.final.parent):
        stopped = run.backend.train(run, role, out)
        _release()
        if stopped:
            return stopped
        run.backend.tidy(run, role, out)
        fsync_tree(out)
    run.record.setdefault("losses", {})[role] = run.backend.losses(run, role, out)
    return None


@contextlib.contextmanager
def _machine_errors(where: Path):
    """The trainer's own saves (checkpoints, the trained model) report a full disk in the libraries' exception
    types (safetensors' SafetensorError, torch's RuntimeError): raised as the OSError it is, the output folder
    turns it into one line that names the disk, and removes what was written."""
    try:
        yield
    except (ShadowMergeError, KeyboardInterrupt):
        raise
    except Exception as exc:           # noqa: BLE001 - re-raised unless it is the machine's write failure
        err = os_error_of(exc, where)
        if err is None:
            raise
        raise err from None


def _release() -> None:
    """The trained model, its optimizer state and the trainer are freed now (they hold reference cycles), not at
    some later collection while the graft and σ stages read checkpoints: those stages then cost what they cost
    alone (benchmarks/bench_train.py)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _graft(run: Run, tuned: Path, out: Path) -> None:
    """The graft stage: the trained Base's update onto the Instruct (the roles are known: no role check)."""
    try:
        if run.kind == "lora":
            done = graft(run.inst.folder, out=out, lora=tuned, progress=False, check_roles=False)
        else:
            done = graft(run.inst.folder, run.base.folder, tuned, out, progress=False, check_roles=False)
    except NoUpdate as exc:
        kept = run.keep_rejected(tuned)
        raise ShadowMergeError(
            f"training changed nothing the graft carries: every grafted tensor of the Instruct came out "
            f"unchanged ({exc.unchanged} with a zero update, {exc.identical} with an update below "
            f"the output precision); {run.schedule.describe()}; raise --lr or --max-steps, or check the data. The "
            f"trained {run.kind} is kept in {kept} for inspection") from None
    run.note("graft", done.warnings)


def _baseline(run: Run, tmp: Path) -> None:
    """--baseline: the same recipe on the Instruct, into instruct-KIND/ and instruct-ft/ (the tuned Instruct)."""
    run.log("[shadowmerge train] baseline: the same recipe on the Instruct")
    tuned = tmp / f"instruct-{run.kind}"
    _train_model(run, "instruct", tuned)
    if run.kind == "lora":      # an adapter of the Instruct, merged into it
        done = graft(run.inst.folder, out=tmp / "instruct-ft", lora=tuned, progress=False, check_roles=False)
        run.note("baseline graft", done.warnings)
    else:
        tuned.rename(tmp / "instruct-ft")
        copy_tokenizer(run.inst.folder, tmp / "instruct-ft")


def _similarity(run: Run):
    """σ(Base, Instruct), printed and recorded."""
    from ..analyzer import similarity

    pair = similarity(run.base.folder, run.inst.folder, progress=False).pairs[0]
    run.record["sigma"] = {"official": pair.official, "weighted": pair.weighted}
    official = f"{pair.official:.6f}" if pair.official is not None else "n/a"
    run.log(f"[shadowmerge train] σ(Base, Instruct): official {official}, weighted {pair.weighted:.6f}")
    return pair


def _evaluate(run: Run, tmp: Path):
    """The Instruct, instruct-ft/ (with --baseline) and shadow/ evaluated into tmp/eval/ in the paper's order, the
    Instruct the reference; with --baseline shadow/ against instruct-ft/ is the headline."""
    from .. import evaluate
    from ..evaluate.models import Model

    inst, prepared = run.inst.folder, run.evaluation
    prepared.models = [Model("instruct", str(inst), inst, {"ref": str(inst), "path": str(inst)})]
    for name in (("instruct-ft",) if run.baseline else ()) + ("shadow",):
        prepared.models.append(Model(name, f"{name}/", tmp / name, {"ref": f"{name}/",
                                                                    "path": str(run.target.target / name)}))
    folder = tmp / "eval"
    folder.mkdir()
    data, examples = evaluate.run(prepared, folder, progress=False, command=run.command,
                                  log=lambda text: run.log(f"[shadowmerge train] eval: {text}"))
    evaluate.write(folder, data, examples)
    report = evaluate.EvalReport(data, None)
    run.record["eval"] = {k: report.data[k] for k in ("reference", "compare", "scores", "heldout", "paired",
                                                      "multiplicity")}
    run.record["eval"]["headline"] = [p for p in data["paired"] if p.get("headline")]
    run.record["eval"]["report"] = "eval/report.html"
    return report


def _write(run: Run, tmp: Path, pair, report, clock: _Clock) -> None:
    """The loss plot, shadow/'s card, records naming the final folders, and run.json."""
    record = run.record
    if loss_plot(tmp / "loss.png", record["losses"]):
        record["loss_plot"] = "loss.png"
        shutil.copyfile(tmp / "loss.png", tmp / "shadow" / "loss.png")     # shown by the model card
    model_card(tmp / "shadow", run.recipe, pair, record["losses"]["base"], run.kind, run.inst.folder, run.command,
               report)
    for sub in ("shadow", "instruct-ft"):          # records name the final folders, and cover the card
        relocate(tmp / sub, tmp, run.target.target)
    clock.times["total"] = clock.total()
    record["seconds"] = {k: round(v, 3) for k, v in clock.times.items()}
    record["warnings"] = run.warnings
    write_record(tmp, record)
