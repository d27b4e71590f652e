"""The evaluation's files besides eval.json: eval.md (the paper's table: one row per model, one column per
task, value ± stderr and Δ against the reference), eval.png (grouped bars with error bars, and held-out
loss beside them), and report.html (both, the paired comparisons, and example items where models disagree;
self-contained, it opens offline)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path


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


def _paired(data, model, task, metric, filt="none"):
    return next((p for p in data["paired"] if p["model"] == model and p["task"] == task and p["metric"] == metric
                 and p["filter"] == filt), None)


def _num(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _signed(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _delta(p: dict | None, digits=3, compact: bool = False) -> str:
    if p is None:
        return ""
    if compact:                  # a terminal: the interval is in the sentences below the table
        return f" (Δ {_signed(p['delta'], digits)}, {p['verdict']})"
    return (f" (Δ {_signed(p['delta'], digits)} [{_signed(p['ci95'][0], digits)}, {_signed(p['ci95'][1], digits)}], "
            f"{p['verdict']})")


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith("s") else f"{n} {word}s"


def _column(task, metric, filt) -> str:
    return f"{task} ({metric}{'' if filt == 'none' else ', ' + filt})"


def table_rows(data: dict, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The main table's header and rows (strings), shared by eval.md, report.html and (compact: no intervals)
    the printed summary."""
    keys = primary(data)
    header = ["model"] + [_column(*k) for k in keys] + (["held-out NLL/token"] if data["heldout"] else [])
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
                                                                             f" [{_num(h['ci95'][0], 4)}, "
                                                                             f"{_num(h['ci95'][1], 4)}]")
            row.append(cell + ("" if ref else _delta(_paired(data, label, "heldout", "nll_per_token"), 4, compact)))
        rows.append(row)
    return header, rows


def summary_lines(data: dict) -> list[str]:
    """Plain sentences: which differences are real and which are within noise."""
    lines = []
    for p in data["paired"]:
        what = "held-out NLL/token" if p["task"] == "heldout" else _column(p["task"], p["metric"], p["filter"])
        digits = 4 if p["task"] == "heldout" else 3
        mcnemar = "" if p["p"] is None else f", McNemar p = {p['p']:.3g}"
        if p["verdict"] == "within noise":
            lines.append(f"{p['model']} vs {data['reference']} on {what}: Δ {_signed(p['delta'], digits)} is within "
                         f"noise (95 % interval [{_signed(p['ci95'][0], digits)}, {_signed(p['ci95'][1], digits)}]"
                         f"{mcnemar}; {_count(p['wins'], 'win')}, "
                         f"{_count(p['losses'], 'loss')}): no evidence either way.")
        else:
            lines.append(f"{p['model']} vs {data['reference']} on {what}: {p['verdict']}, Δ "
                         f"{_signed(p['delta'], digits)} (95 % interval [{_signed(p['ci95'][0], digits)}, "
                         f"{_signed(p['ci95'][1], digits)}]{mcnemar}; "
                         f"{_count(p['wins'], 'win')}, {_count(p['losses'], 'loss')}).")
    return lines


def markdown(data: dict) -> str:
    header, rows = table_rows(data)
    out = [f"# Evaluation: {', '.join(data['models'])}", "",
           f"Reference: **{data['reference']}**. Value ± lm_eval's stderr; Δ = model − reference with its paired "
           f"95 % interval and verdict (see docs/eval.md). Held-out: mean NLL per answer token [95 % interval], "
           f"lower is better.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    if data.get("best_alpha"):
        out += ["", "## Best α", "", "| task | best α | value |", "|---|---|---|"]
        for task, b in data["best_alpha"]["per_task"].items():
            out.append(f"| {task} | {b['alpha']} | {_num(b['value'], 4)} |")
        if data["best_alpha"].get("overall"):
            b = data["best_alpha"]["overall"]
            out.append(f"| overall ({b['by']}) | {b['alpha']} | {_num(b['value'], 4)} |")
    if data["paired"]:
        out += ["", "## Paired comparisons", ""] + [f"- {line}" for line in summary_lines(data)]
    s = data["settings"]
    shots = s["num_fewshot"] if s["num_fewshot"] is not None else "each task's own"
    out += ["", "## Settings", "", f"tasks: {', '.join(s['tasks']) or 'none'}; num_fewshot: {shots}; "
            f"limit: {s['limit'] or 'all items'}; seed: {s['seed'] if s['seed'] is not None else 'lm_eval default'}; "
            f"apply_chat_template: {s['apply_chat_template']}; backend: {s['backend']}; dtype: {s['dtype']}; "
            f"batch size: {s['batch_size']}; device: {s['device']}.", "", f"Command: `{data['command']}`", ""]
    return "\n".join(out)


def figure(data: dict, path: Path) -> None:
    from ..analyzer.plots import pyplot

    plt = pyplot()
    keys = primary(data)
    labels = list(data["models"])
    panels = (1 if keys else 0) + (1 if data["heldout"] else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(max(5.0, 1.6 * len(keys) * max(len(labels), 2) / 2 + 3)
                                                        + (3.5 if data["heldout"] else 0), 4.2), squeeze=False)
    axes = list(axes[0])
    width = 0.8 / max(len(labels), 1)
    colors = plt.get_cmap("tab10")
    if keys:
        ax = axes.pop(0)
        for j, label in enumerate(labels):
            vals, errs = [], []
            for key in keys:
                s = _score(data, label, key)
                vals.append(s["value"] if s else float("nan"))
                errs.append(s["stderr"] if s and s["stderr"] is not None else 0.0)
            xs = [k + (j - (len(labels) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, vals, width, yerr=errs, capsize=3, label=label, color=colors(j % 10))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([_column(*k) for k in keys], rotation=20, ha="right")
        ax.set_ylabel("score (± stderr)")
        ax.set_title(f"tasks (reference: {data['reference']})")
        ax.legend(frameon=False, fontsize=8)
    if data["heldout"]:
        ax = axes.pop(0)
        for j, label in enumerate(labels):
            h = next((h for h in data["heldout"] if h["model"] == label), None)
            if h is None:
                continue
            lo, hi = h["ci95"]
            ax.bar(j, h["nll_per_token"], 0.6, yerr=[[h["nll_per_token"] - lo], [hi - h["nll_per_token"]]],
                   capsize=3, color=colors(j % 10))
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right")
        ax.set_ylabel("NLL per answer token (95 % interval)")
        ax.set_title("held-out loss (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table_html(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_html(data: dict, folder: Path, examples: dict) -> None:
    header, rows = table_rows(data)
    png = (folder / "eval.png").read_bytes()
    parts = [f"<h1>Evaluation: {html.escape(', '.join(data['models']))}</h1>",
             f"<p>Reference: <b>{html.escape(data['reference'])}</b>. Δ = model − reference, with its paired 95 % "
             f"interval; a difference is called better or worse only when the interval excludes 0 (and, for "
             f"right/wrong metrics, McNemar's p &lt; 0.05).</p>", _table_html(header, rows),
             f"<p><img alt='scores' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"]
    if data["paired"]:
        parts.append("<h2>Paired comparisons</h2><ul>" +
                     "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(data)) + "</ul>")
        cols = ["model", "task", "metric", "filter", "Δ", "95 % interval", "wins", "losses", "ties", "p", "verdict"]
        prow = [[p["model"], p["task"], p["metric"], p["filter"], _signed(p["delta"], 4),
                 f"[{_signed(p['ci95'][0], 4)}, {_signed(p['ci95'][1], 4)}]", str(p["wins"]), str(p["losses"]),
                 str(p["ties"]), "" if p["p"] is None else f"{p['p']:.3g}", p["verdict"]] for p in data["paired"]]
        parts.append(_table_html(cols, prow))
    if examples:
        parts.append("<h2>Where the models disagree (a few items per task)</h2>")
        for (model, task), items in examples.items():
            parts.append(f"<h3>{html.escape(model)} vs {html.escape(data['reference'])}: {html.escape(task)}</h3>")
            cols = ["item", "outcome", "prompt (end)", "target", data["reference"], model]
            parts.append(_table_html(cols, [[str(x) for x in item] for item in items]))
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
             "img{max-width:100%}")
    (folder / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>shadowmerge eval"
                                        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
