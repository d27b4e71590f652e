"""The evaluation's files besides eval.json: eval.md (the headline comparisons the user named, then the paper's
table: one row per model, one column per task with its number of items, value ± stderr and Δ against the
reference with its verdict and how many items differ), eval.png (scores with their verdicts and every paired
difference with its interval; for an α sweep each metric against α), and report.html (all of it, and the items
where two models differ: the full prompt, each model's raw output beside the answer it was scored on, and the
gold answer; self-contained, it opens offline)."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from . import stats

_SHORT = {stats.BETTER: "better", stats.WORSE: "worse", stats.NOISE: "within noise", stats.TOO_FEW: "too few"}


def primary(data: dict) -> list[tuple[str, str, str]]:
    """(task, metric, filter) of each task's first reported metric, in the order lm_eval reported them."""
    seen, out = set(), []
    for s in data["scores"]:
        if s["model"] == data["reference"] and s["task"] not in seen:
            seen.add(s["task"])
            out.append((s["task"], s["metric"], s["filter"]))
    return out


def _score(data, model, key):
    return next((s for s in data["scores"] if s["model"] == model and (s["task"], s["metric"], s["filter"]) == key),
                None)


def _paired(data, model, task, metric, filt="none", against=None):
    against = against or data["reference"]
    return next((p for p in data["paired"] if p["model"] == model and p.get("against", data["reference"]) == against
                 and p["task"] == task and p["metric"] == metric and p["filter"] == filt), None)


def _num(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _signed(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _interval(ci, digits=3) -> str:
    return f"[{_signed(ci[0], digits)}, {_signed(ci[1], digits)}]"


def _digits(p: dict) -> int:
    return 4 if p["task"] == "heldout" else 3


def _delta(p: dict | None, compact: bool = False) -> str:
    """A table cell's comparison: Δ, (the interval,) the verdict and how many items differ."""
    if p is None:
        return ""
    d = _digits(p)
    differ = f"{p['differing']}/{p['n']} differ" if compact else f"{p['differing']} of {p['n']} differ"
    if compact:                  # a terminal: the interval is in the sentences below the table
        return f" (Δ {_signed(p['delta'], d)}, {_SHORT.get(p['verdict'], p['verdict'])}: {differ})"
    return f" (Δ {_signed(p['delta'], d)} {_interval(p['ci95'], d)}, {p['verdict']}, {differ})"


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _column(task, metric, filt) -> str:
    return f"{task} ({metric}{'' if filt == 'none' else ', ' + filt})"


def items_of(data: dict, key) -> int | None:
    """The number of items a task was scored on (lm_eval's effective count, or the paired count)."""
    s = _score(data, data["reference"], key)
    if s is not None and s.get("n") is not None:
        return int(s["n"])
    p = next((p for p in data["paired"] if (p["task"], p["metric"], p["filter"]) == tuple(key)), None)
    return None if p is None else p["n"]


def _heading(data: dict, key) -> str:
    n = items_of(data, key)
    return _column(*key)[:-1] + (f", n={n})" if n is not None else ")")


def _heldout_heading(data: dict) -> str:
    rows = data.get("heldout_data", {}).get("rows")
    return "held-out NLL/token" + (f" (n={rows} rows)" if rows else "")


def table_rows(data: dict, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The main table's header and rows (strings), shared by eval.md, report.html and (compact: no intervals)
    the printed summary: one row per model, each cell the score and its comparison with the reference."""
    keys = primary(data)
    header = ["model"] + [_heading(data, k) for k in keys] + ([_heldout_heading(data)] if data["heldout"] else [])
    rows = []
    for label in data["models"]:
        ref = label == data["reference"]
        row = [f"{label} (reference)" if ref else label]
        for key in keys:
            s = _score(data, label, key)
            cell = "n/a" if s is None else f"{_num(s['value'])} ± {_num(s['stderr'])}"
            row.append(cell + ("" if ref else _delta(_paired(data, label, *key), compact=compact)))
        h = next((h for h in data["heldout"] if h["model"] == label), None)
        if data["heldout"]:
            cell = "n/a" if h is None else f"{_num(h['nll_per_token'], 4)}" + ("" if compact else
                                                                             f" {_interval_plain(h['ci95'], 4)}")
            row.append(cell + ("" if ref else _delta(_paired(data, label, "heldout", "nll_per_token"), compact)))
        rows.append(row)
    return header, rows


def _interval_plain(ci, digits) -> str:
    return f"[{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


def headline_rows(data: dict, compact: bool = False) -> tuple[list[str], list[list[str]]] | None:
    """The comparisons the user named (--compare; train --baseline: shadow vs instruct-ft) as the paper lays them
    out: one row per task, a column per model of those pairs and the reference (in the run's order), and a column
    per named pair with Δ, its verdict and how many items differ. None when no pair was named."""
    named = [tuple(p) for p in data.get("compare") or ()]
    if not named:
        return None
    inside = {label for pair in named for label in pair} | {data["reference"]}
    models = [label for label in data["models"] if label in inside]          # the run's order: Instruct, FT, ...
    header = ["task"] + models + [f"Δ({a} − {b})" for a, b in named]
    rows = []
    for key in primary(data):
        row = [_heading(data, key)]
        for label in models:
            s = _score(data, label, key)
            row.append("n/a" if s is None else _num(s["value"]))
        for a, b in named:
            p = _paired(data, a, *key, against=b)
            row.append("n/a" if p is None else _delta(p, compact).strip()[1:-1])
        rows.append(row)
    if data["heldout"]:
        row = [_heldout_heading(data)]
        for label in models:
            h = next((h for h in data["heldout"] if h["model"] == label), None)
            row.append("n/a" if h is None else _num(h["nll_per_token"], 4))
        for a, b in named:
            p = _paired(data, a, "heldout", "nll_per_token", against=b)
            row.append("n/a" if p is None else _delta(p, compact).strip()[1:-1])
        rows.append(row)
    return header, rows


def _family(p: dict, data: dict) -> int:
    """How many comparisons p's Holm correction was over."""
    name = "named pairs" if p.get("headline") else "against the reference"
    return next((f["comparisons"] for f in (data.get("multiplicity") or {}).get("families", ())
                 if f["family"] == name), 0)


def sentence(p: dict, data: dict) -> str:
    """One comparison in words: the verdict, Δ with its interval, the test, and how many items differ."""
    what = "held-out NLL/token" if p["task"] == "heldout" else _column(p["task"], p["metric"], p["filter"])
    against = p.get("against", data["reference"])
    d = _digits(p)
    test = "" if p["p"] is None else (f", {'McNemar' if 'McNemar' in p['test'] else 't-test'} p = "
                                      f"{p['p']:.3g}")
    family = _family(p, data)
    if p.get("p_holm") is not None and family > 1 and p["verdict"] in (stats.BETTER, stats.WORSE):
        test += f", Holm-adjusted over {family} comparisons p = {p['p_holm']:.3g}"
    unit = "rows" if p["task"] == "heldout" else "items"
    split = (f"{p['differing']} of {p['n']} {unit} differ: {_count(p['wins'], 'win')}, "
             f"{_count(p['losses'], 'loss')}")
    head = f"{p['model']} vs {against} on {what}"
    needed = (f"; about {p['needed']} {unit} would be needed to detect a difference this size (80 % power at 0.05)"
              if p.get("needed") else "")
    if p["verdict"] == stats.TOO_FEW:
        if p["differing"] == 0:
            return (f"{head}: too few differing {unit} to decide (0 of {p['n']}): the two models scored every one "
                    f"alike, Δ {_signed(p['delta'], d)}.")
        return (f"{head}: too few differing {unit} to decide ({p['differing']} of {p['n']}): Δ "
                f"{_signed(p['delta'], d)} (95 % interval {_interval(p['ci95'], d)}{test}; {_count(p['wins'], 'win')}"
                f", {_count(p['losses'], 'loss')}); with 5 or fewer differing {unit} no result can reach p < 0.05"
                f"{needed}.")
    if p["verdict"] == stats.NOISE:
        return (f"{head}: Δ {_signed(p['delta'], d)} is within noise (95 % interval {_interval(p['ci95'], d)}{test}; "
                f"{split}): these {unit} cannot tell the two apart{needed}.")
    return f"{head}: {p['verdict']}, Δ {_signed(p['delta'], d)} (95 % interval {_interval(p['ci95'], d)}{test}; {split})."


def multiplicity_line(data: dict) -> str | None:
    """Holm's correction in words: per family, how many better/worse verdicts hold, and which do not."""
    families = [f for f in (data.get("multiplicity") or {}).get("families", ()) if f["comparisons"] > 1]
    if not families:
        return None
    total = sum(f["comparisons"] for f in families)
    called = [f for f in families if f["called"]]
    if not called:
        return (f"{total} comparisons were tested and none was called better or worse, so Holm's correction for "
                f"testing several (familywise, at 0.05) changes nothing.")
    parts = [f"{f['called_after_holm']} of the {f['called']} better/worse verdicts among the {f['comparisons']} "
             f"{'comparisons of the named pairs' if f['family'] == 'named pairs' else 'comparisons with the reference'}"
             for f in called]
    line = "Corrected for testing several with Holm's method (familywise, at 0.05): " + "; ".join(parts) + " hold"
    lost = [p for p in data["paired"] if p["verdict"] in (stats.BETTER, stats.WORSE)
            and p.get("p_holm") is not None and p["p_holm"] >= stats.ALPHA]
    if lost:
        line += " (not: " + "; ".join(f"{p['model']} vs {p.get('against', data['reference'])} on "
                                      f"{'held-out loss' if p['task'] == 'heldout' else p['task']}" for p in lost) + ")"
    return line + "."


def summary_lines(data: dict, brief: bool = False) -> list[str]:
    """Plain sentences, the named pairs first: which differences are real, which are within noise, and where
    there were too few differing items to decide. brief (a terminal): the named pairs and the called differences
    in full, the rest counted."""
    ordered = sorted(data["paired"], key=lambda p: not p.get("headline", False))
    shown = [p for p in ordered if not brief or p.get("headline") or p["verdict"] in (stats.BETTER, stats.WORSE)]
    lines = [sentence(p, data) for p in shown]
    if len(shown) < len(ordered):
        rest = len(ordered) - len(shown)
        lines.append(f"{rest} other comparison{'s are' if rest > 1 else ' is'} within noise or {'have' if rest > 1 else 'has'} "
                     f"too few differing items to decide; eval.md says each in words.")
    extra = multiplicity_line(data)
    return lines + ([extra] if extra else [])


def alpha_lines(data: dict) -> list[str]:
    """The α sweep's choice, the held-out choice beside it, each with its comparisons, and what the grid cannot
    tell."""
    b = data.get("best_alpha") or {}
    if not b:
        return []
    lines = []
    overall, held = b.get("overall"), b.get("heldout")
    if overall and overall["by"] != "held-out NLL per token":
        choice = f"best α by the tasks ({overall['by']}): {_pick(overall)}"
        choice += f"; by held-out loss: {_pick(held)}" if held else ""
        lines.append(choice)
    elif held:
        lines.append(f"best α by held-out loss: {_pick(held)}")
    for task, t in list(b.get("per_task", {}).items()) + ([("held-out loss", held)] if held else []):
        parts = []
        for name, p in (("against the reference", t.get("vs_reference")), ("against α = 1", t.get("vs_alpha_1"))):
            if p is not None:
                d = 4 if task == "held-out loss" else 3
                parts.append(f"{name} Δ {_signed(p['delta'], d)} {_interval(p['ci95'], d)}, {p['verdict']} "
                             f"({p['differing']} of {p['n']} differ)")
        pick = _alpha_list(t["tied"]) + " (tied)" if t["tied"] else _pick(t)
        lines.append(f"  {task}: α = {pick}" + (": " + "; ".join(parts) if parts else ""))
    lines += [f"note: {n}" for n in b.get("notes", [])]
    return lines


def _pick(b: dict) -> str:
    """A best α, with its setting when the sweep had several (weight sets, combine methods)."""
    return f"{b['alpha']:g}" + (f" with {b['setting']}" if b.get("setting") else "")


def _alpha_list(values) -> str:
    return ", ".join(f"{a:g}" if isinstance(a, (int, float)) else str(a) for a in values)


def md_table(header, rows) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                            for r in esc[1:]]


def _limit(value) -> str:
    if value is None:
        return "all items"
    return str(int(value)) if float(value) >= 1 and float(value) == int(value) else f"{value:g} of each task"


def markdown(data: dict) -> str:
    header, rows = table_rows(data)
    out = [f"# Evaluation: {', '.join(data['models'])}", ""]
    headline = headline_rows(data)
    if headline:
        out += ["## " + "; ".join(f"{a} against {b}" for a, b in data["compare"]), ""] + md_table(*headline)
        out += ["", "Δ = first − second of the pair, with its 95 % interval, verdict and how many items differ "
                "(see docs/eval.md).", "", "## All models", ""]
    out += [f"Reference: **{data['reference']}**. Value ± lm_eval's stderr; n = items per task; Δ = model − reference "
            f"with its paired 95 % interval, verdict and how many items differ (see docs/eval.md). Held-out: mean "
            f"NLL per answer token [95 % interval], lower is better.", ""] + md_table(header, rows)
    if data.get("best_alpha"):
        out += ["", "## Best α", ""] + [f"- {line.strip()}" for line in alpha_lines(data)]
    if data["paired"]:
        out += ["", "## Paired comparisons", ""] + [f"- {line}" for line in summary_lines(data)]
    s = data["settings"]
    shots = s["num_fewshot"] if s["num_fewshot"] is not None else "each task's own"
    counts = ", ".join(f"{k[0]} {items_of(data, k)}" for k in primary(data) if items_of(data, k) is not None)
    out += ["", "## Settings", "", f"tasks: {', '.join(s['tasks']) or 'none'}; num_fewshot: {shots}; "
            f"limit: {_limit(s['limit'])}" + (f" (items scored: {counts})" if counts else "") + "; seed: "
            f"{s['seed'] if s['seed'] is not None else 'lm_eval default'}; "
            f"apply_chat_template: {s['apply_chat_template']}; backend: {s['backend']}; dtype: {s['dtype']}; "
            f"batch size: {s['batch_size']}; device: {s['device']}.", "", f"Command: `{data['command']}`", ""]
    return "\n".join(out)


# ---- eval.png -------------------------------------------------------------------------------------------------

def figure(data: dict, path: Path) -> None:
    """eval.png: for an α sweep each metric against α; otherwise the scores and every paired difference."""
    from ..analyzer.plots import pyplot

    plt = pyplot()
    if data.get("best_alpha"):
        fig = _sweep_figure(plt, data)
    else:
        fig = _comparison_figure(plt, data)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _comparison_figure(plt, data: dict):
    """Scores per task (n, stderr, each model's verdict against the reference), held-out loss, and the paired
    differences with their intervals: the named pairs' when there are any (the others are the bars' verdicts),
    else every comparison; task scores and held-out loss on separate axes (their scales differ)."""
    keys = primary(data)
    labels = list(data["models"])
    named = [p for p in data["paired"] if p.get("headline")]
    rows = named or list(data["paired"])
    score_rows = [p for p in rows if p["task"] != "heldout"]
    loss_rows = [p for p in rows if p["task"] == "heldout"]
    left = [name for name, on in (("scores", keys), ("heldout", data["heldout"])) if on]
    right = [name for name, on in (("forest", score_rows), ("forest-loss", loss_rows)) if on]
    widths = {"scores": max(3.5, 1.2 * len(keys) * max(len(labels), 2) / 2 + 1.5), "heldout": 3.2}
    tall = max(4.2, 0.42 * (len(score_rows) + len(loss_rows)) + 2.2)
    if not left and not right:
        left = ["scores"]
    mosaic = [[name for name in left] + ([r] if right else []) for r in (right or [None])]
    mosaic = [[cell if cell is not None else "." for cell in row] for row in mosaic]
    ratios = [widths.get(name, 3.5) for name in left] + ([6.0] if right else [])
    heights = [max(1, len(score_rows)) + 1.5 if r == "forest" else max(1, len(loss_rows)) + 1.5 for r in right] or [1]
    fig, axes = plt.subplot_mosaic(mosaic, figsize=(sum(ratios), tall), width_ratios=ratios, height_ratios=heights,
                                   empty_sentinel=".")
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(len(labels), 1)
    if "scores" in axes and keys:
        ax = axes["scores"]
        for j, label in enumerate(labels):
            vals, errs = [], []
            for key in keys:
                s = _score(data, label, key)
                vals.append(s["value"] if s else float("nan"))
                errs.append(s["stderr"] if s and s["stderr"] is not None else 0.0)
            xs = [k + (j - (len(labels) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, vals, width, yerr=errs, capsize=3, label=label, color=colors(j % 10))
            if label != data["reference"]:
                for x, v, e, key in zip(xs, vals, errs, keys):
                    p = _paired(data, label, *key)
                    if p is not None and math.isfinite(v):
                        ax.text(x, v + e + 0.01, _SHORT[p["verdict"]], rotation=90, ha="center", va="bottom",
                                fontsize=7)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{_column(*k)}\nn={items_of(data, k)}" for k in keys], rotation=15, ha="right",
                           fontsize=8)
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) * 1.45)
        ax.set_ylabel("score (± stderr)")
        ax.set_title(f"scores; each model's verdict against {data['reference']}", fontsize=9)
        ax.legend(frameon=False, fontsize=7, loc="upper left", ncol=min(len(labels), 3))
    if "heldout" in axes:
        ax = axes["heldout"]
        for j, label in enumerate(labels):
            h = next((h for h in data["heldout"] if h["model"] == label), None)
            if h is None:
                continue
            lo, hi = h["ci95"]
            ax.bar(j, h["nll_per_token"], 0.6, yerr=[[h["nll_per_token"] - lo], [hi - h["nll_per_token"]]],
                   capsize=3, color=colors(j % 10))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("NLL per answer token (95 % interval)")
        ax.set_title(f"held-out loss, {data.get('heldout_data', {}).get('rows', '?')} rows (lower is better)",
                     fontsize=9)
    what = "the named pairs" if named else "each model against the reference"
    if "forest" in axes:
        _forest(axes["forest"], data, score_rows, f"task score differences: {what}", "Δ score with 95 % interval")
    if "forest-loss" in axes:
        _forest(axes["forest-loss"], data, loss_rows, f"held-out loss differences: {what}",
                "−Δ NLL per token with 95 % interval (right of 0: lower loss)", sign=-1)
    return fig


def _forest(ax, data: dict, rows: list[dict], title: str, xlabel: str, sign: int = 1) -> None:
    """Paired differences with their 95 % intervals, 0 marked, each labelled with its verdict and k of n; right of 0
    is the first model better (a loss's Δ is drawn negated)."""
    ys = list(range(len(rows)))[::-1]
    for y, p in zip(ys, rows):
        lo, hi = sorted((sign * p["ci95"][0], sign * p["ci95"][1]))
        color = {stats.BETTER: "tab:green", stats.WORSE: "tab:red", stats.NOISE: "tab:gray"}.get(p["verdict"],
                                                                                                "silver")
        ax.plot([lo, hi], [y, y], color=color, lw=2, ls=":" if p["verdict"] == stats.TOO_FEW else "-")
        ax.plot([sign * p["delta"]], [y], "o", color=color, ms=5)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{p['model']} − {p.get('against', data['reference'])}"
                        f"{'' if p['task'] == 'heldout' else ': ' + p['task']}\n"
                        f"{p['verdict']}, {p['differing']} of {p['n']} differ" for p in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)


def _sweep_figure(plt, data: dict):
    """Each task's first metric against α with its 95 % interval (one line per setting when the sweep had several:
    weight sets, combine methods), the reference as a line with its band; the held-out loss the same way."""
    from .settings import ALPHA_LABEL

    keys = primary(data)
    lines: dict[str, list] = {}                 # setting tag ('' for one setting) -> [(α, label)] sorted by α
    for m in data["models"]:
        if m.startswith(ALPHA_LABEL):
            alpha, _, tag = m[len(ALPHA_LABEL):].partition("+")
            lines.setdefault(tag, []).append((float(alpha), m))
    for tag in lines:
        lines[tag].sort()
    panels = len(keys) + (1 if data["heldout"] else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.2 * max(panels, 1), 3.8), squeeze=False)
    axes = list(axes[0])
    colors = plt.get_cmap("tab10")

    def draw(ax, value_of, ref, title, ylabel, best):
        for j, (tag, alphas) in enumerate(lines.items()):
            points = [value_of(label) for _, label in alphas]
            ys = [v for v, _ in points]
            err = [[max(v - ci[0], 0) if ci else 0 for v, ci in points],
                   [max(ci[1] - v, 0) if ci else 0 for v, ci in points]]
            ax.errorbar([a for a, _ in alphas], ys, yerr=err, marker="o", capsize=3, color=colors(j % 10),
                        label=f"I + α·Δ{', ' + tag if tag else ''} (95 % interval)")
        if ref is not None:
            v, ci = ref
            ax.axhline(v, color="tab:gray", ls="--", label=f"{data['reference']} (reference)")
            if ci:
                ax.axhspan(ci[0], ci[1], color="tab:gray", alpha=0.15)
        if best is not None:
            ax.axvline(best["alpha"], color="tab:green", lw=0.8, ls=":", label=f"best α = {_pick(best)}")
        ax.set_xlabel("α")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(frameon=False, fontsize=7)

    b = data["best_alpha"]
    for key in keys:
        ax = axes.pop(0)

        def score(label, key=key):
            s = _score(data, label, key)
            return s["value"] if s else float("nan"), s.get("ci95") if s else None

        r = _score(data, data["reference"], key)
        t = b.get("per_task", {}).get(key[0])
        draw(ax, score, (r["value"], r.get("ci95")) if r else None, f"{_column(*key)}, n={items_of(data, key)}",
             "score", t if t and not t["tied"] else None)
    if data["heldout"]:
        ax = axes.pop(0)
        held = {h["model"]: h for h in data["heldout"]}
        r = held.get(data["reference"])
        t = b.get("heldout")
        draw(ax, lambda label: (held[label]["nll_per_token"], held[label]["ci95"]) if label in held else
             (float("nan"), None), (r["nll_per_token"], r["ci95"]) if r else None,
             f"held-out loss, {data.get('heldout_data', {}).get('rows', '?')} rows (lower is better)",
             "NLL per answer token", t if t and not t["tied"] else None)
    return fig


# ---- report.html -----------------------------------------------------------------------------------------------

def _table_html(header, rows, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table{f' class={cls!r}' if cls else ''}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def common_ends(prompts: list[str]) -> tuple[int, int]:
    """How many characters every prompt of a task shares at its start and at its end (a system prompt, the chat
    template's generation prompt), never cutting a word: the summary of an item shows what is its own."""
    prompts = [p for p in prompts if p]
    if len(prompts) < 2:
        return 0, 0
    first, last = min(prompts), max(prompts)
    start = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    rev = [p[::-1] for p in prompts]
    a, b = min(rev), max(rev)
    end = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    shortest = min(len(p) for p in prompts)
    start, end = min(start, shortest), min(end, max(shortest - start, 0))
    p = prompts[0]
    while 0 < start < len(p) and p[start - 1].isalnum() and p[start].isalnum():
        start -= 1
    while end > 0 and 0 < len(p) - end < len(p) and p[len(p) - end - 1].isalnum() and p[len(p) - end].isalnum():
        end -= 1
    return start, end


def _summary(prompt: str, ends: tuple[int, int], width: int = 140) -> str:
    start, end = ends
    own = prompt[start:len(prompt) - end] if start + end < len(prompt) else prompt
    own = re.sub(r"\s+", " ", own).strip() or re.sub(r"\s+", " ", prompt).strip()
    if len(own) <= width:
        return own
    cut = own[-width:]
    space = cut.find(" ")
    return "…" + (cut[space + 1:] if 0 <= space < width // 3 else cut)


def _answer_cell(a: dict) -> str:
    answer, raw = a.get("answer", ""), a.get("raw", "")
    out = f"<div class='ans'>{html.escape(answer)}</div>"
    if raw and raw != answer:
        out += f"<div class='raw'><span class='tag'>raw</span> {html.escape(raw)}</div>"
    return out


def _examples_html(data: dict, examples: dict) -> list[str]:
    parts = ["<h2>Where two models differ</h2><p>For each comparison and task: the items where the two models scored "
             "differently, up to 10 each way. The summary is the part of the prompt that is the item's own; open it "
             "for the full prompt. Each model's answer is what the metric scored; <i>raw</i> is the model's own "
             "output (a generation, or each choice's log-likelihood). samples/ has every item.</p>"]
    ordered = sorted(examples.items(), key=lambda kv: (not any(list(p) == [kv[0][0], kv[0][1]]
                                                               for p in data.get("compare") or ()),))
    for (model, against, task), shown in ordered:
        rows = shown["rows"]
        prompts = [r["model"].get("prompt", "") or r["against"].get("prompt", "") for r in rows]
        ends = tuple(shown.get("ends") or common_ends(prompts))
        differ = f"{shown['differ']} item{' differs' if shown['differ'] == 1 else 's differ'}"
        parts.append(f"<h3>{html.escape(model)} vs {html.escape(against)}: {html.escape(task)} "
                     f"<span class='muted'>({differ}; {len(rows)} shown)</span></h3>")
        body = []
        for r, prompt in zip(rows, prompts):
            who = model if r["outcome"] == "win" else against
            gold = r["model"].get("target") or r["against"].get("target", "")
            body.append(f"<tr><td>{html.escape(str(r['item']))}</td><td>{html.escape(who)} right</td>"
                        f"<td class='prompt'><details><summary>{html.escape(_summary(prompt, ends))}</summary>"
                        f"<pre>{html.escape(prompt)}</pre></details></td><td>{html.escape(gold)}</td>"
                        f"<td>{_answer_cell(r['model'])}</td><td>{_answer_cell(r['against'])}</td></tr>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ("item", "better", "prompt", "gold", model, against))
        parts.append(f"<table class='items'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    return parts


def write_html(data: dict, folder: Path, examples: dict) -> None:
    header, rows = table_rows(data)
    png = (folder / "eval.png").read_bytes()
    parts = [f"<h1>Evaluation: {html.escape(', '.join(data['models']))}</h1>"]
    headline = headline_rows(data)
    if headline:
        parts += ["<h2>" + html.escape("; ".join(f"{a} against {b}" for a, b in data["compare"])) + "</h2>",
                  _table_html(*headline, cls="headline")]
    parts += [f"<p>Reference: <b>{html.escape(data['reference'])}</b>. n = items per task. Δ = model − reference, "
              f"with its paired 95 % interval and how many items differ; a difference is called better or worse "
              f"only when its test gives p &lt; 0.05 and the interval excludes 0; with 5 or fewer differing items "
              f"it is <i>too few to decide</i>.</p>", _table_html(header, rows, cls="main"),
              f"<p><img id='figure' alt='scores and paired differences' "
              f"src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"]
    if data.get("best_alpha"):
        parts.append("<h2>Best α</h2><ul>" + "".join(f"<li>{html.escape(line.strip())}</li>"
                                                    for line in alpha_lines(data)) + "</ul>")
    if data["paired"]:
        parts.append("<h2>Paired comparisons</h2><ul>" +
                     "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(data)) + "</ul>")
        cols = ["model", "against", "task", "metric", "filter", "n", "differ", "wins", "losses", "Δ",
                "95 % interval", "p", "p (Holm)", "verdict"]
        prow = [[p["model"], p.get("against", data["reference"]), p["task"], p["metric"], p["filter"], str(p["n"]),
                 str(p["differing"]), str(p["wins"]), str(p["losses"]), _signed(p["delta"], 4),
                 _interval(p["ci95"], 4), "" if p["p"] is None else f"{p['p']:.3g}",
                 "" if p.get("p_holm") is None else f"{p['p_holm']:.3g}", p["verdict"]] for p in data["paired"]]
        parts.append(_table_html(cols, prow, cls="paired"))
    if examples:
        parts += _examples_html(data, examples)
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}table{border-collapse:"
             "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
             "img{max-width:100%}.muted{color:#777;font-weight:normal;font-size:13px}.prompt{max-width:420px}"
             "summary{cursor:pointer}pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f6f6f6;"
             "padding:6px;max-height:30em;overflow:auto}.raw{color:#555;font-size:12px;margin-top:4px;"
             "white-space:pre-wrap;word-break:break-word}.tag{background:#eee;border-radius:3px;padding:0 4px}"
             "table.headline td,table.headline th{font-size:14px}")
    (folder / "report.html").write_text(f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
                                        f"shadowmerge eval</title><style>{style}</style></head><body>{''.join(parts)}"
                                        f"</body></html>\n")
