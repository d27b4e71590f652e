"""similarity(): how close a Base and its Instruct are (sigma), per tensor, layer, module and tower.

Streams two (or three, with a tuned model) checkpoints through stats.scan, aggregates with
aggregate.PairResult, and, given an output folder, writes report.json, tensors.csv, summary.md,
report.html and the figures (PNG and SVG) into it atomically. `shadowmerge similarity` calls this.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..transports import hub
from ..checkpoint import Checkpoint
from ..devices import parse_device
from ..errors import ShadowMergeError
from ..output import OutputFolder
from ..record import FILES
from ..progress import bar as progress_bar
from ..transports import resolve
from .aggregate import PairResult, TensorRow
from .aggregate import OFFICIAL
from .sample import DEFAULT_SAMPLE, choose, estimate
from .stats import Sums, scan
from .tuned import LoraTuned, is_adapter
from ..transports.stream import sampling

__all__ = ["similarity", "SimilarityReport", "PairResult", "Sums"]


@dataclass
class SimilarityReport:
    pairs: list[PairResult]
    report: dict | None          # the contents of report.json (None without an output folder)
    out: Path | None
    candidates: list[dict] | None = field(default=None)   # the shadow finder's ranking (similarity --candidates)
    interference: dict | None = field(default=None)       # several --tuned: interference between the updates

    def __str__(self) -> str:
        lines = []
        if self.interference is not None:
            from .interference import text

            return text(self.interference) + (f"\nwrote {self.out}: report.json, summary.md, report.html and the "
                                              f"figure" if self.out is not None else "")
        if self.candidates is not None:
            lines.append("shadow candidates for the Instruct, closest first (σ to the Instruct, sampled):")
            for c in self.candidates:
                if c["unusable"]:
                    lines.append(f"  -  {c['candidate']}: unusable: {'; '.join(c['unusable'])}")
                    continue
                iv = f" ({c['interval'][0]:.4f}–{c['interval'][1]:.4f})" if c["interval"] else ""
                notes = f"; {'; '.join(c['notes'])}" if c["notes"] else ""
                lines.append(f"  {c['rank']}. {c['candidate']}: σ {c['sigma']:.4f}{iv}: {c['verdict']}{notes}")
            lines.append("a close sibling is a hypothesis, not a proven Base: graft its update and compare with "
                         "`shadowmerge eval`")
            if self.out is not None:
                lines.append(f"wrote {self.out}: report.html, report.json, summary.md and figures")
            return "\n".join(lines)
        for p in self.pairs:
            if p.sampled is not None:
                s = p.sampled
                off = (f"≈ {s['value']:.4f} ({s['level']:.0%} interval {s['low']:.4f}–{s['high']:.4f}; {s['tensors']} "
                       f"of {s['of']} tensors sampled, seed {s['seed']})")
                lines.append(f"{p.name}: official σ (mean per tensor, model.layers.N.*) {off}; weighted σ over the "
                             f"sample {p.weighted:.4f}")
            else:
                off = f"{p.official:.4f} over {p.official_count} tensors" if p.official is not None else "n/a"
                lines.append(f"{p.name}: official σ (mean per tensor, model.layers.N.*) {off}; weighted σ "
                             f"{p.weighted:.4f} over {len(p.rows)} tensors")
            lines.append(f"  {p.verdict()['line']}")
        if self.out is not None:
            lines.append(f"wrote {self.out}: report.html, report.json, tensors.csv, summary.md and figures")
        return "\n".join(lines)


def _pair_name(ref: str) -> str:
    from .plots import short_label

    return short_label(ref)


def _compare_names(name: str, base: Checkpoint, inst: Checkpoint, tuned: Checkpoint | None):
    common, result = [], PairResult(name, base.ref, inst.ref, tuned.ref if tuned else None, [])
    for n, a in base.tensors.items():
        b = inst.tensors.get(n)
        if b is None:
            result.only_in_base.append(n)
        elif a.shape != b.shape:
            result.shape_differs.append(f"{n}: base {list(a.shape)}, instruct {list(b.shape)}")
        elif not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            result.not_floating.append(n)
        else:
            t = tuned.tensors.get(n) if tuned is not None else None
            if tuned is not None and (t is None or t.shape != a.shape or not t.dtype.is_floating_point):
                result.not_in_tuned.append(n)
                t = None
            common.append((n, a, b, t))
    result.only_in_instruct = [n for n in inst.tensors if n not in base.tensors]
    return common, result


def similarity(base: str | Path | None = None, instruct: str | Path | None = None, tuned: str | Path | None = None,
               *, pairs: dict[str, tuple[str, str]] | None = None, out: str | Path | None = None,
               matrix: str | None = None, matrix_size: int = 48, force: bool = False, allow_pickle: bool = False,
               device: str = "cpu", progress: bool = True, command: str | None = None, sample: int | None = None,
               seed: int = 0, stream: bool = False, candidates: list[str] | None = None) -> SimilarityReport:
    """Compare Base and Instruct (or each NAME -> (BASE, INSTRUCT) in pairs); with tuned, add graft-risk diagnostics.

    `sample=N`: σ from N tensors read by range (Hub ids and URLs never downloaded), with its interval
    (analyzer/sample.py). `candidates=[...]` with `instruct`: the shadow finder — each candidate checked from headers
    (architecture, tensor names and shapes, vocabulary), the usable ones ranked by sampled σ to the Instruct.
    `stream=True`: Hub ids read by range, each file checked against the Hub's sha256. Returns the numbers; with `out`,
    also writes the report folder.
    """
    several = [str(t) for t in tuned] if isinstance(tuned, (list, tuple)) else None
    if several is not None and len(several) > 1:
        return _interference(base, several, out, force, allow_pickle, progress, command)
    if several is not None:
        tuned = several[0] if several else None
    if sample is not None and sample < 2:
        raise ShadowMergeError(f"--sample must be at least 2 (tensors), not {sample}; pass e.g. --sample 64")
    found = None
    todo: list[tuple[str, str, str]] = []
    if candidates:
        if instruct is None or base is not None or tuned is not None or pairs:
            raise ShadowMergeError("--candidates goes with --instruct alone (the Instruct to find a shadow Base for); "
                                   "leave out --base, --tuned and --pair")
        sample = sample or DEFAULT_SAMPLE
        found = _screen(str(instruct), candidates, allow_pickle)
        todo = [(_pair_name(c["candidate"]), c["candidate"], str(instruct)) for c in found if not c["unusable"]]
        if len({n for n, _, _ in todo}) != len(todo):
            todo = [(f"{k + 1}-{n}", b, i) for k, (n, b, i) in enumerate(todo)]
    elif base is not None or instruct is not None:
        if base is None or instruct is None:
            raise ShadowMergeError("--base and --instruct go together (or use --pair NAME=BASE,INSTRUCT)")
        todo.append((_pair_name(str(instruct)), str(base), str(instruct)))
    todo += [(n, str(b), str(i)) for n, (b, i) in (pairs or {}).items()]
    if not todo and not found:
        raise ShadowMergeError("nothing to compare: pass --base and --instruct, or --pair NAME=BASE,INSTRUCT")
    if len({n for n, _, _ in todo}) != len(todo):
        raise ShadowMergeError("two pairs have the same name; name each --pair differently")
    if tuned is not None and len(todo) != 1:
        raise ShadowMergeError("--tuned goes with one pair (--base/--instruct), not with several --pair; "
                               "run one similarity per tuned model")
    if matrix_size < 2:
        raise ShadowMergeError("--matrix-size must be at least 2; pass e.g. --matrix-size 48")
    dev = parse_device(device)
    by_range = stream or sample is not None     # a sample never downloads: Hub ids are read by range

    opened: list[Checkpoint] = []
    try:
        plans = []
        for name, b, i in todo:
            cb = Checkpoint.open(b, "base", allow_pickle, by_range)
            opened.append(cb)
            ci = Checkpoint.open(i, "instruct", allow_pickle, by_range)
            opened.append(ci)
            ct = None
            if tuned is not None:
                where = resolve(tuned, allow_pickle, by_range)
                ct = LoraTuned(cb, tuned, allow_pickle, where) if is_adapter(where) else \
                    Checkpoint(where, "tuned", str(tuned), allow_pickle)
            if ct is not None:
                opened.append(ct)
            items, result = _compare_names(name, cb, ci, ct)
            result.hub = hub.provenance([c for c in (cb, ci, ct) if c is not None])
            if not items:
                raise ShadowMergeError(f"{name}: the base and instruct share no tensor of equal shape; pass a Base "
                                       f"and Instruct of one model family and size")
            if matrix is not None:
                _check_matrix(matrix, items, name)
            population = [n for n, *_ in items if OFFICIAL.search(n)]
            if sample is not None:
                items = choose(items, sample, seed)
                if not items:
                    raise ShadowMergeError(f"{name}: no model.layers.N.* tensor to sample (the official figure's "
                                           f"tensors); leave out --sample for a full scan")
                if matrix is not None and matrix not in {n for n, *_ in items}:
                    items.append(next(it for it in _compare_names(name, cb, ci, ct)[0] if it[0] == matrix))
            plans.append((items, result, cb, ci, ct, population))
        target = None
        if out is not None:
            target = OutputFolder(out, force=force, inputs=[c.folder for c in opened], need_bytes=0,
                                  record=FILES["similarity"])
        total = sum(info.nbytes + b.nbytes + (t.nbytes if t else 0) for items, *_ in plans for _, info, b, t in items)
        if not by_range:
            for c in opened:         # Hub inputs: download the weights, now that everything was checked
                c.fetch(progress)
        with progress_bar(total, progress, "similarity") as bar, (sampling() if sample is not None else
                                                                  contextlib.nullcontext()):
            for items, result, cb, ci, ct, population in plans:
                sums = scan(items, cb, ci, ct, on_bytes=bar.update, device=dev)
                result.rows = [TensorRow(n, a.shape, sums[n]) for n, a, _, _ in items]
                if sample is not None:
                    result.sampled = estimate({r.name: r.sums.sigma for r in result.rows if OFFICIAL.search(r.name)},
                                              population, seed)
        if sample is None:
            from ..pipeline import finish_streams

            for note in finish_streams(opened):
                print(f"warning: {note}", file=sys.stderr)
        results = [p[1] for p in plans]
        if found is not None:
            _rank(found, results)
        if target is None:
            return SimilarityReport(results, None, None, found)
        with target as tmp:
            report = _write(tmp, plans, results, matrix, matrix_size, command, found)
            target.commit()
        return SimilarityReport(results, report, target.target, found)
    finally:
        for c in opened:
            c.close()


def _interference(base, tuned: list[str], out, force: bool, allow_pickle: bool, progress: bool,
                  command: str | None) -> SimilarityReport:
    """Several --tuned of one --base: how their updates interfere (analyzer/interference.py)."""
    from . import interference
    from ..plan import check_architecture

    if base is None:
        raise ShadowMergeError("several --tuned need --base (the model they were tuned from); pass it")
    if len(set(tuned)) != len(tuned):
        raise ShadowMergeError("--tuned names one model twice; name each update once")
    opened: list = []
    try:
        cb = Checkpoint.open(base, "base", allow_pickle)
        opened.append(cb)
        updates = []
        for k, ref in enumerate(tuned, 1):
            where = resolve(ref, allow_pickle)
            u = LoraTuned(cb, ref, allow_pickle, where) if is_adapter(where) else \
                Checkpoint(where, f"tuned {k}", ref, allow_pickle)
            opened.append(u)
            updates.append(u)
        check_architecture(cb, tuple(u for u in updates if isinstance(u, Checkpoint)))
        target = None
        if out is not None:
            target = OutputFolder(out, force=force, inputs=[c.folder for c in opened], need_bytes=0,
                                  record=FILES["similarity"])
        for c in opened:
            c.fetch(progress)
        sums = interference.measure(cb, updates)
        if not any(sums.values()):
            raise ShadowMergeError("the updates share no tensor of the Base's shape; pass fine-tunes or adapters of "
                                   "this --base")
        found = interference.summarize(sums, [_pair_name(t) for t in tuned])
        if target is None:
            return SimilarityReport([], None, None, interference=found)
        from .report import write_all

        with target as tmp:
            figures = interference.figure(found, tmp)
            report = write_all(tmp, [], {"": figures}, command, extra={"interference": found})
            target.commit()
        return SimilarityReport([], report, target.target, interference=found)
    finally:
        for c in opened:
            c.close()


def _screen(instruct: str, candidates: list[str], allow_pickle: bool) -> list[dict]:
    """Each candidate against the Instruct from configs and headers alone (read by range: nothing downloaded)."""
    from .sample import compatibility

    if len(set(candidates)) != len(candidates):
        raise ShadowMergeError("--candidates names a model twice; name each once")
    inst = Checkpoint.open(instruct, "instruct", allow_pickle, True)
    found = []
    try:
        for ref in candidates:
            entry = {"candidate": ref, "unusable": [], "notes": [], "sigma": None, "interval": None, "verdict": None}
            try:
                cand = Checkpoint.open(ref, "candidate", allow_pickle, True)
            except ShadowMergeError as exc:
                entry["unusable"].append(f"cannot be read: {exc}")
            else:
                try:
                    entry["unusable"], entry["notes"] = compatibility(inst, cand)
                finally:
                    cand.close()
            found.append(entry)
    finally:
        inst.close()
    return found


def _rank(found: list[dict], results: list[PairResult]) -> None:
    """The usable candidates' sampled σ and verdicts, ranked closest first (then the unusable, with reasons)."""
    from .sample import shadow_verdict

    by_ref = {r.base: r for r in results}
    for entry in found:
        r = by_ref.get(entry["candidate"])
        if r is not None:
            est = r.sampled
            entry["sigma"] = est["value"] if est else r.official
            entry["interval"] = [est["low"], est["high"]] if est else None
            entry["verdict"] = shadow_verdict(entry["sigma"], est)
    found.sort(key=lambda e: (bool(e["unusable"]), e["sigma"] if e["sigma"] is not None else 0.0))
    for k, entry in enumerate(found, 1):
        entry["rank"] = k if not entry["unusable"] else None


def _check_matrix(name: str, items, pair: str) -> None:
    found = next((a for n, a, _, _ in items if n == name), None)
    if found is None:
        raise ShadowMergeError(f"--matrix {name}: no such tensor compared in {pair}; pass a name from tensors.csv, "
                               f"e.g. {items[len(items) // 2][0]}")
    if len(found.shape) != 2:
        raise ShadowMergeError(f"--matrix {name} has shape {list(found.shape)}; pass a 2-D weight matrix")


def _write(folder: Path, plans, results: list[PairResult], matrix: str | None, size: int,
           command: str | None = None, candidates: list[dict] | None = None) -> dict:
    from . import plots
    from .report import write_all

    figures: dict[str, list[str]] = {"": plots.pair_bars(results, folder) if results else []}
    for k, (items, result, cb, ci, ct, _) in enumerate(plans):
        stem = f"{k + 1:02d}-{_slug(result.name)}"
        names = plots.per_layer_lines(result, folder, f"{stem}-sigma_per_layer")
        names += plots.heatmap(result, folder, f"{stem}-layer_module_heatmap")
        if matrix is not None:
            a, b = (_matrix_slice(c, c.tensors[matrix], size) for c in (cb, ci))
            names += plots.matrix(matrix, a, b, result, folder, f"{stem}-matrix", size=size)
        if ct is not None:
            names += plots.diagnostics(result, folder, f"{stem}-diagnostics")
        figures[result.name] = names
    return write_all(folder, results, figures, command, candidates)


def _matrix_slice(ckpt: Checkpoint, info, size: int):
    """The top-left size x size corner of a 2-D matrix, reading only those elements."""
    import torch

    from ..formats.safetensors import itemsize

    rows, cols = min(size, info.shape[0]), min(size, info.shape[1])
    width = cols * itemsize(info.dtype)
    buf = torch.empty(rows * width, dtype=torch.uint8)
    for r in range(rows):
        ckpt.read_into(info, r * info.shape[1], r * info.shape[1] + cols, buf[r * width:(r + 1) * width])
    return buf.view(info.dtype).reshape(rows, cols).float()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60]
