"""`shadowmerge eval`: the paper's comparison on the user's own tasks: the Instruct, the Instruct tuned
directly and the Shadow-FT graft (or any models), side by side, with paired statistics.

prepare() checks everything cheap first (settings, task names and files, their data, held-out rows, the
models' folders, tokenizers and chat templates); run() then evaluates one model at a time (loaded once,
for lm_eval's tasks and the held-out loss alike, and freed before the next), writes lm_eval's per-item
logs as it goes and compares each model with the reference item by item; write() puts eval.json,
eval.md, eval.png and report.html beside them. evaluate() does all three into an output folder written
like every other (temporary folder, atomic rename, run record with a manifest). An α sweep grafts each
I + α·Δ with pipeline.graft into a hidden folder inside the output, evaluates it and deletes it.

settings.py holds what is asked, runner.py prepare() and run(), harness.py drives lm-evaluation-harness,
heldout.py the held-out loss, stats.py the paired statistics, models.py the model arguments, report.py the
files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ShadowMergeError
from ..record import FILES
from ..record import write as write_record
from .settings import EvalSettings, Sweep

__all__ = ["EvalSettings", "Sweep", "EvalReport", "Prepared", "evaluate", "prepare", "run", "write"]

RECORD = FILES["eval"]


def __getattr__(name):      # the runner (numpy, the statistics) loads on first use: `shadowmerge --help` stays light
    if name in ("Prepared", "prepare", "run"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'shadowmerge.evaluate' has no attribute {name!r}")


@dataclass
class EvalReport:
    data: dict
    out: Path | None

    def __str__(self) -> str:
        """The terminal's summary: every model against the reference, the called differences, the α sweep's choice,
        and last, where it is seen, the pairs the user named (train --baseline: shadow against instruct-ft)."""
        from .report import alpha_lines, headline_rows, sentence, summary_lines, table_rows

        data = self.data
        lines = _text_table(*table_rows(data, compact=True))
        others = {**data, "paired": [p for p in data["paired"] if not p.get("headline")]}
        lines += [""] + summary_lines(others, brief=True) if others["paired"] else []
        alpha = alpha_lines(data)
        lines += [""] + alpha if alpha else []
        headline = headline_rows(data, compact=True)
        if headline:
            named = "; ".join(f"{a} against {b}" for a, b in data["compare"])
            lines += ["", f"{named} (Δ = first − second):"] + _text_table(*headline)
            lines += [sentence(p, data) for p in data["paired"] if p.get("headline")]
        if self.out is not None:
            lines.append(f"wrote {self.out}: eval.json, eval.md, eval.png, report.html, samples/")
        return "\n".join(lines)


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    width = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, width)).rstrip()]
    return lines + ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]


def write(folder: Path, data: dict, examples: dict) -> None:
    """eval.md, eval.png and report.html beside the samples, then eval.json."""
    from . import report

    (folder / "eval.md").write_text(report.markdown(data))
    report.figure(data, folder / "eval.png")
    report.write_html(data, folder, examples)
    write_record(folder, data, default=str)


def evaluate(models: list[str] | list[tuple[str, str]], settings: EvalSettings, *, out: str | Path | None = None,
             force: bool = False, sweep: Sweep | None = None, allow_pickle: bool = False, progress: bool = True,
             command: str | None = None, log=None) -> EvalReport:
    """Evaluate the models (LABEL=PATH strings or (label, path) pairs; the first is the reference) on the same
    tasks and held-out rows; with `out`, write the report folder."""
    from ..output import OutputFolder
    from . import models as modelrefs
    from .runner import prepare, run

    if out is None and sweep is not None:
        raise ShadowMergeError("an α sweep needs an output folder (its models are grafted there, one at a time); "
                               "pass --out DIR")
    pairs = modelrefs.parse(models) if models and isinstance(models[0], str) else list(models)
    prepared = prepare(pairs, settings, sweep=sweep, allow_pickle=allow_pickle, progress=progress)
    try:
        if out is None:
            data, _ = run(prepared, None, progress=progress, command=command, log=log)
            return EvalReport(data, None)
        inputs = [m.folder for m in prepared.models if m.folder is not None]
        target = OutputFolder(out, force=force, inputs=inputs, need_bytes=prepared.sweep_bytes, record=RECORD)
        with target as tmp:
            data, examples = run(prepared, tmp, progress=progress, command=command, log=log)
            write(tmp, data, examples)
            target.commit()                    # seals eval.json with the manifest of every other file
        return EvalReport(data, target.target)
    finally:
        prepared.close()
