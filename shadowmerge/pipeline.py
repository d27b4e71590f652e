"""graft(): the whole Shadow-FT merge, end to end.

Checkpoints -> Plan -> delta source -> Writer, into a temporary folder renamed at the end.
`shadowmerge.graft(...)` and `shadowmerge graft` both call this.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import card, engine
from .transports import hub
from ._version import versions
from .checkpoint import Checkpoint
from .devices import parse_device, start_early
from .errors import NoUpdate, ShadowMergeError
from .options import from_call
from .output import OutputFolder
from .record import new as new_record
from .record import write as write_record
from .formats import fp8
from .sidefiles import copy_side_files
from .plan import Plan, build_plan
from .progress import bar as progress_bar
from .progress import human_bytes
from .sources import open_source
from .spec import GraftSpec
from .tensors import dtype_name, parse_dtype
from .timeline import IMPORTED, Timeline
from .writer import ShardWriter, layout, parse_size


class _RoleCheck:
    """roles.check on a thread of its own, beside the engine (it samples the inputs while the graft reads them).
    A refusal stops the engine (`failed`) and wait() raises it while the output is still in its temporary
    folder, which is then removed: nothing is written."""

    def __init__(self, ckpts: list, plan: Plan, timeline: Timeline):
        self.error: BaseException | None = None
        self.failed = threading.Event()          # set on a refusal: the engine stops (engine.run's cancel)
        self.thread = threading.Thread(target=self._run, args=(ckpts, plan, timeline), daemon=True,
                                       name="shadowmerge-role-check")
        self.thread.start()

    def _run(self, ckpts, plan, timeline) -> None:
        from . import roles
        from .transports.stream import sampling

        try:
            with timeline("role check"), sampling():          # streamed inputs: its reads are kept for the graft's
                roles.check(*ckpts, [t.name for t in plan.tensors if t.graft_rows])
        except BaseException as exc:
            self.error = exc
            self.failed.set()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


@dataclass
class GraftSummary:
    """What a graft did (or, with dry_run, would do)."""

    out: Path | None
    counts: dict[str, int]
    bytes: int
    shards: int
    seconds: float
    dry_run: bool
    warnings: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)   # changed by the update, but not in the output dtype
    grafted: int = 0                                     # tensors with rows grafted
    timeline: Timeline | None = None                     # where the time went (printed with profile)
    profile: bool = False
    plan_text: str = ""

    def __str__(self) -> str:
        acts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        if self.dry_run:
            return self.plan_text
        rate = self.bytes / self.seconds / 1e6 if self.seconds else 0
        final = self.timeline.seconds if self.timeline is not None else {}     # the final step's parts
        parts = "".join(f", {label} {final[stage]:.1f} s" for stage, label in (("manifest", "sha256 manifest"),
                                                                                ("fsync", "fsync")) if stage in final)
        lines = [f"wrote {self.out}: {acts}; {human_bytes(self.bytes)} in {self.shards} shard(s), "
                 f"{self.seconds:.1f} s ({rate:.0f} MB/s{parts})"]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.profile and self.timeline is not None:
            lines.append(self.timeline.render())
        return "\n".join(lines)


def _card(plan: Plan, spec: GraftSpec, inst_folder: Path) -> card.Early:
    """The output's own model card (never the Instruct's: it would claim to be the official model), rendered on
    a thread while the data moves."""
    multi = plan.source.kind == "multi"
    made_from = {"Instruct": spec.instruct, "Base": spec.base, "tuned Base": None if multi else spec.tuned,
                 "LoRA adapter (trained on the Base)": None if multi else spec.lora, **plan.source.card_inputs()}
    kind = "LoRA adapter" if spec.lora is not None else "fine-tune"
    if multi:
        kind = f"{len(plan.source.parts)} fine-tunes or adapters"
    details = {"alpha": spec.alpha, "output dtype": spec.dtype or "as the Instruct's tensors",
               **({"combine": spec.combine, "weights": ", ".join(f"{w:g}" for w in plan.source.weights),
                   **({"density": spec.density} if spec.density is not None else {}),
                   **({"seed": spec.seed} if spec.combine.startswith("dare") else {})} if multi else {}),
               "tensors grafted": sum(1 for t in plan.tensors if t.graft_rows),
               "tensors copied from the Instruct": sum(1 for t in plan.tensors if not t.graft_rows)}
    details.update({k: f"`{v}`" for k, v in (("--include", spec.include), ("--exclude", spec.exclude)) if v})
    return card.Early(title=f"{Path(spec.instruct).name} + the update of a {kind} of its Base (Shadow-FT)",
                      made_from=made_from, relation="merge", license_from=inst_folder,
                      what=f"The Instruct model with the update learned by a {kind} of its Base grafted onto it "
                           f"(`shadowmerge graft`). It keeps the Instruct's config, tokenizer, chat template and "
                           f"generation config.", command=spec.command or card.command_line(None), details=details)


_POSITIONAL = ("instruct", "base", "tuned", "out")


def graft(*args, **options) -> GraftSummary:
    """Graft a Base model's fine-tuning update onto its Instruct sibling: out = I + alpha * delta.

    `graft(spec)` with a GraftSpec, or `graft(instruct, base=None, tuned=None, out=None, *, lora=..., alpha=...,
    ...)` with GraftSpec's fields as keywords. The delta is tuned - base (a full fine-tune: `base`, `tuned`) or a
    PEFT LoRA adapter trained on the Base (`lora`; `base` too for DoRA and modules_to_save). Arithmetic is
    float32, cast once to the output dtype (the Instruct tensor's, unless `dtype`). With `dry_run=True` only
    headers are read and the plan is returned, nothing is written. Inputs whose roles look exchanged
    (roles.py) are refused unless `check_roles=False`.
    """
    return run(from_call(GraftSpec, _POSITIONAL, args, options, "graft"))


def run(spec: GraftSpec) -> GraftSummary:
    """The graft a GraftSpec describes."""
    start = time.perf_counter()
    timeline = Timeline(start)
    if spec.command is not None:      # a command-line run: the interpreter and imports before it
        timeline.add("start-up", start - IMPORTED)
    lora = spec.lora                  # (the inputs and alpha were checked when the spec was made)
    if spec.out is None and not spec.dry_run:
        raise ShadowMergeError("--out is required (the folder to write the grafted model into)")
    out_dtype = None if spec.dtype == "fp8" else parse_dtype(spec.dtype)
    dev = parse_device(spec.device)
    shard_bytes = parse_size(spec.shard_size)
    if not spec.dry_run:
        start_early(dev, timeline)

    ckpts: list = []
    try:
        with timeline("plan"):
            plan = open_and_plan(ckpts, spec)
        inst, source = plan.instruct, plan.source
        multi = source.kind == "multi"        # several updates: checked each against the Instruct, not as one triangle
        if spec.check_roles and not multi:
            _refuse_misplaced_inputs(ckpts, lora)
        shards = layout([(t.name, t.out_dtype, t.info.shape, t.out_nbytes) for t in plan.tensors], shard_bytes)
        shard_of = {e[0]: i for i, s in enumerate(shards, 1) for e in s.entries}
        if spec.dry_run:
            return GraftSummary(None, plan.counts(), plan.total_bytes, len(shards), time.perf_counter() - start,
                                True, plan.warnings, [], plan_text=plan.render(shard_of, len(shards)))
        need = sum(s.size for s in shards) + inst.side_bytes()
        target = OutputFolder(spec.out, force=spec.force, inputs=[c.folder for c in ckpts], need_bytes=need)
        with target as tmp:
            for c in ckpts:          # Hub inputs: download what the graft reads, now that everything was checked
                c.fetch(spec.progress, side=c is inst)
            readme = _card(plan, spec, inst.folder)       # (after the fetch: it reads the Instruct's card)
            role_check = _RoleCheck(ckpts, plan, timeline) if spec.check_roles and lora is None and not multi \
                else None
            if role_check is not None and any(c.transport.streams for c in ckpts):
                role_check.wait()        # streamed: its samples first, kept ahead of the graft's reads, not read twice
            with progress_bar(plan.total_bytes, spec.progress, "graft") as bar:
                writer = ShardWriter(tmp, shards, on_bytes=bar.update, timeline=timeline)
                try:
                    stats = engine.run(plan, writer, dev, spec.allow_nonfinite, timeline=timeline,
                                       cancel=role_check.failed if role_check is not None else None)
                    writer.finish()
                finally:
                    writer.abort()
                    if role_check is not None:
                        role_check.wait()      # its refusal wins over what the graft of exchanged inputs raised
            target.digests = writer.digests
            warnings = list(plan.warnings)
            with timeline("stream checks"):
                warnings += finish_streams(ckpts)
            if stats.nonfinite:
                warnings.append(f"{len(stats.nonfinite)} tensor(s) written with NaN/Inf values: "
                                f"{', '.join(stats.nonfinite[:5])}")
            grafted = sum(1 for t in plan.tensors if t.graft_rows)
            flag = "--tuned" if lora is None else "--lora"
            if grafted and len(stats.unchanged) == grafted:
                why = "--tuned holds the same weights as --base" if lora is None else "an untrained adapter"
                raise NoUpdate(f"the {source.kind} update is zero in every grafted tensor ({why}), so the output "
                               f"would be a copy of the instruct; nothing was written; pass the fine-tuned model as "
                               f"{flag}", len(stats.unchanged), 0)
            if grafted and len(stats.unchanged) + len(stats.identical) == grafted:
                raise NoUpdate(f"the {source.kind} update is below the output dtype's precision in every grafted "
                               f"tensor, so the output would equal the instruct bit for bit; nothing was written; "
                               f"check that {flag} is the trained model, or keep the update with --dtype float32",
                               len(stats.unchanged), len(stats.identical))
            if stats.unchanged:
                warnings.append(f"{len(stats.unchanged)} grafted tensor(s) had a zero update, "
                                f"e.g. {stats.unchanged[0]}")
            if stats.identical:
                warnings.append(f"{len(stats.identical)} grafted tensor(s) came out identical to the instruct's "
                                f"(the update is below the output dtype's precision), e.g. {stats.identical[0]}")
            decoded = [t for t in plan.tensors if t.info.codec is not None and t.encoder is None]
            written = dtype_name(out_dtype or (decoded[0].out_dtype if decoded else None))
            if stats.kept:
                warnings += fp8_kept_warnings(stats.kept)
            if decoded:
                warnings.append(f"the instruct's {decoded[0].info.codec.describe()} weights ({len(decoded)} tensors) "
                                f"are written as {written} (dequantized in float32, cast once); config.json loses its "
                                f"quantization_config")
            with timeline("side files"):
                side = copy_side_files(inst.folder, tmp, written, skip=("README.md",),
                                       drop=("quantization_config",) if decoded else ())
            with timeline("card"):
                readme.write(tmp, _fp8_note(stats.kept, written if decoded else None, len(decoded)))
            with timeline("record"):
                seconds = time.perf_counter() - start
                write_record(tmp, _record(plan, spec, ckpts, shards, side, shard_bytes, dev, stats, warnings,
                                          seconds))
            target.commit(timeline)
        return GraftSummary(target.target, plan.counts(), plan.total_bytes, len(shards),
                            time.perf_counter() - start, False, warnings, stats.unchanged, stats.identical,
                            grafted, timeline=timeline, profile=spec.profile)
    finally:
        for c in ckpts:
            c.close()


def finish_streams(stores) -> list[str]:
    """Streamed inputs, once the run has read them: every file read checked whole (a mismatch raises, before the
    output is renamed into place); the one line each has on retries and re-reads."""
    notes = [store.finish() for store in stores if store.transport.streams]
    return [n for n in notes if n]


def stream_sources(stores) -> dict:
    """For run records: each streamed input's URL and the files read, with versions and digests, by role."""
    return {_role(s.label): s.transport.source() for s in stores if s.transport.streams}


def _role(label: str) -> str:
    """A record's name for an input: its label, an adapter's as lora ("adapter 2" -> "lora 2")."""
    return "lora" + label[len("adapter"):] if label.startswith("adapter") else label


def check_roles(spec: GraftSpec) -> Plan:
    """graft's role checks alone, before a graft is run (eval's α sweep: before any model is evaluated): one model
    in two roles, an adapter onto its own model, and (a full fine-tune) roles exchanged, from a sample of the
    data (a Hub input's weights are downloaded for it, as the graft would). Returns the plan it checked."""
    ckpts: list = []
    try:
        plan = open_and_plan(ckpts, spec)
        if plan.source.kind == "multi":
            return plan
        _refuse_misplaced_inputs(ckpts, spec.lora)
        if spec.lora is None:
            from . import roles

            for c in ckpts:
                c.fetch(spec.progress)
            roles.check(*ckpts, [t.name for t in plan.tensors if t.graft_rows])
        return plan
    finally:
        for c in ckpts:
            c.close()


def _refuse_misplaced_inputs(ckpts, lora) -> None:
    """From names alone: one folder (or Hub snapshot) passed in two roles, so the update or the instruction
    tuning would be zero (an adapter written for the Instruct by extract --for-instruct, whose full copies are
    the Instruct's plus the update, takes the Instruct as --base too); or an adapter grafted onto the model it
    was trained on. (Roles exchanged between three distinct models are checked on their data: roles.py.)"""
    flags = ["--instruct", "--base", "--tuned"][: len(ckpts) - (lora is not None)]
    folders = [c.folder.resolve() for c in ckpts[: len(flags)]]
    for a in range(len(flags)):
        for b in range(a + 1, len(flags)):
            if folders[a] == folders[b] and not (lora is not None and ckpts[-1].made_for(ckpts[0])):
                raise ShadowMergeError(f"{flags[a]} and {flags[b]} are the same model ({ckpts[a].ref}); a graft needs "
                                       f"the Instruct, its Base and the Base's fine-tune: pass each in its role")
    if lora is not None:
        ckpts[-1].refuse_own_base(ckpts[0], hint="grafting there is a plain merge, not Shadow-FT: pass the "
                                                 "Instruct sibling of that Base, or --no-role-check to merge it "
                                                 "into its own model")


def fp8_kept(kept: dict) -> dict:
    """What --dtype fp8 kept of the update, overall and per tensor: `kept` = ‖dq(out) − dq(I)‖ / ‖αΔ‖ (how far the
    output moved, the re-quantization's own noise included), `along` = ⟨dq(out) − dq(I), αΔ⟩ / ‖αΔ‖² (the share of the
    update that survives in its own direction: 1 when kept exactly, 0 when lost), and the blocks that changed."""
    def share(moved, update, dot):
        return ((moved / update) ** 0.5, dot / update) if update else (None, None)

    def summary(v):
        k, a = share(v[0], v[1], v[4])
        return {"kept": k, "along": a, "blocks_changed": v[2], "blocks": v[3]}

    total = [sum(v[i] for v in kept.values()) for i in range(5)]
    return {**summary(total), "tensors": {n: summary(v) for n, v in kept.items()}}


def fp8_kept_warnings(kept: dict) -> list[str]:
    k = fp8_kept(kept)
    if k["kept"] is None:
        return []
    line = (f"FP8 keeps {k['along']:.1%} of the update along its direction (the output moved by {k['kept']:.1%} of "
            f"‖αΔ‖, re-quantization noise included); {k['blocks_changed']} of {k['blocks']} blocks of the grafted FP8 "
            f"weights changed")
    if k["along"] < 0.5:
        line += ("; most of the update is below one FP8 step and was lost: write bf16 (leave out --dtype fp8) to "
                 "keep it")
    return [line]


def _fp8_note(kept: dict, written: str | None, decoded: int) -> str | None:
    """The card's word on an FP8 Instruct: what the FP8 output kept of the update, or that it was decoded."""
    if kept:
        k = fp8_kept(kept)
        share = "n/a" if k["along"] is None else f"{k['along']:.1%}"
        return (f"## FP8\n\nWritten in the Instruct's FP8 block format (`--dtype fp8`): blocks without an update keep "
                f"the Instruct's bytes, the others are quantized again. FP8 keeps {share} of the update along its "
                f"direction (⟨dq(out) − dq(I), αΔ⟩ / ‖αΔ‖²); {k['blocks_changed']} of {k['blocks']} blocks changed.")
    if written:
        return (f"## FP8\n\nThe Instruct's {decoded} FP8 weights are written as {written}, dequantized exactly "
                f"(float32(q) × the block's scale) and added in float32, so the update is kept whole.")
    return None


def open_and_plan(ckpts: list, spec: GraftSpec) -> Plan:
    """Open the inputs (appended to ckpts, for the caller to close) and build the plan, from headers only."""
    ckpts.append(Checkpoint.open(spec.instruct, "instruct", spec.allow_pickle, spec.stream))
    source = open_source(spec, ckpts[0], ckpts)
    fp8.check_same_blocks(ckpts)
    keep = spec.dtype == "fp8"
    return build_plan(ckpts[0], source, alpha=spec.alpha, include=spec.include, exclude=spec.exclude,
                      dtype=None if keep else parse_dtype(spec.dtype), vocab=spec.vocab, keep_format=keep)


def _record(plan: Plan, spec: GraftSpec, ckpts, shards, side, shard_bytes, device, stats, warnings,
            seconds) -> dict:
    source = plan.source
    return new_record("graft", {
        "formula": source.formula,
        "inputs": {"instruct": plan.instruct.ref, **source.describe()},
        # absolute folders of the inputs, to re-read them from anywhere (shadowmerge verify --recompute)
        "input_paths": {_role(c.label): str(c.folder.absolute()) for c in ckpts},
        "hub": hub.provenance(ckpts),   # Hub inputs: id, revision asked for, the commit sha it resolved to
        # streamed inputs: URL, and each file read with its pinned version and digests (verify --recompute re-reads)
        "input_urls": stream_sources(ckpts),
        "allow_pickle": spec.allow_pickle,
        "delta": source.kind,
        "alpha": plan.alpha,
        "include": spec.include,
        "exclude": spec.exclude,
        "dtype": spec.dtype or "as the instruct",     # (verify rebuilds the graft from "spec"; kept for readers)
        "vocab": spec.vocab,
        "shard_size": shard_bytes,
        "device": str(device),
        "counts": plan.counts(),
        "grafted": [t.name for t in plan.tensors if t.graft_rows],
        **source.record(),
        "dropped": [{"name": n, "why": w} for n, w in plan.dropped],
        "unchanged": stats.unchanged,
        "identical_to_instruct": stats.identical,
        **({"fp8": fp8_kept(stats.kept)} if stats.kept else {}),
        "warnings": warnings,
        "shards": [s.filename for s in shards],
        "bytes": plan.total_bytes,
        "side_files": side,
        "seconds": round(seconds, 3),
        "versions": versions("torch", "safetensors", "transformers"),
        "spec": spec.as_record(),
    })
