"""The analyzer's files: report.json (schema-versioned), tensors.csv, summary.md and report.html.

report.json holds every number; report.schema.json (beside this module) is its JSON Schema.
report.html is self-contained: tables plus the PNG figures embedded, so it opens offline.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from pathlib import Path

from ..record import new as new_record
from ..record import write as write_record
from .aggregate import OFFICIAL, SIGMA_RANGE, PairResult
from .plots import short_label
from .stats import Sums

SCHEMA_VERSION = 1
SCHEMA = Path(__file__).with_name("report.schema.json")
DEFINITIONS = {
    "letters": "B = Base, I = Instruct, T = the tuned Base (with --tuned)",
    "sigma": "sum|I-B| / (sum|B| + sum|I|); float32 elements, float64 sums",
    "official_sigma": f"unweighted mean of per-tensor sigma over tensors matching the regular expression {OFFICIAL.pattern} (re.search): "
                      "the official Shadow-FT script's figure",
    "weighted_sigma": "sigma of all compared tensors taken together (each tensor weighted by its size)",
    "rel_l2": "||I-B|| / ||B||",
    "cosine": "cos(B, I)",
    "update_rel": "||T-B|| / ||B||",
    "update_cos": "cos(T-B, I-B): > 0 the update goes where instruction tuning went, < 0 against it",
    "working_range": f"Shadow-FT was shown to work for sigma(Base, Instruct) in {SIGMA_RANGE[0]}-{SIGMA_RANGE[1]}",
}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def metrics(s: Sums, tuned: bool) -> dict:
    out = {"sigma": s.sigma, "rel_l2": _finite(s.rel_l2), "cosine": s.cosine, "numel": s.numel}
    if tuned:
        out.update(update_rel=s.update_rel, update_cos=s.update_cos)
    return out


def pair_dict(p: PairResult, figures: list[str]) -> dict:
    tuned = p.tuned is not None
    return {
        "name": p.name, "base": p.base, "instruct": p.instruct, "tuned": p.tuned, "hub": p.hub,
        "official_sigma": {"value": p.official, "tensors": p.official_count},
        "weighted_sigma": {"value": p.weighted, "tensors": len(p.rows), "parameters": p.total().numel},
        "towers": {k: metrics(s, tuned) for k, s in p.towers().items()},
        "per_module": {k: metrics(s, tuned) for k, s in p.per_module().items()},
        "per_layer": [{"layer": k, **metrics(s, tuned)} for k, s in p.per_layer().items()],
        "verdict": p.verdict(),
        "mismatched": {"only_in_base": p.only_in_base, "only_in_instruct": p.only_in_instruct,
                       "shape_differs": p.shape_differs, "not_in_tuned": p.not_in_tuned,
                       "not_floating": p.not_floating},
        "tensors": [{"name": r.name, "shape": list(r.shape), "layer": r.layer, "module": r.module,
                     "tower": r.tower, **metrics(r.sums, tuned)} for r in p.rows],
        "figures": figures,
        **({"sample": p.sampled} if p.sampled is not None else {}),
    }


def write_all(folder: Path, pairs: list[PairResult], figures: dict[str, list[str]], command: str | None = None,
              candidates: list[dict] | None = None, extra: dict | None = None) -> dict:
    from datetime import datetime, timezone

    report = new_record("similarity", {
        "schema_version": SCHEMA_VERSION, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or "shadowmerge.analyzer.similarity() from Python",
        "definitions": DEFINITIONS, "figures": figures.get("", []),
        "pairs": [pair_dict(p, figures.get(p.name, [])) for p in pairs],
        **({"candidates": candidates} if candidates is not None else {}), **(extra or {})})
    write_record(folder, report, indent=1, allow_nan=False)
    _csv(folder / "tensors.csv", report)
    (folder / "summary.md").write_text(_markdown(report))
    (folder / "report.html").write_text(_html(report, folder))
    return report


_COLUMNS = ("pair", "name", "shape", "layer", "module", "tower", "numel", "sigma", "rel_l2", "cosine",
            "update_rel", "update_cos")


def _csv(path: Path, report: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_COLUMNS)
        for p in report["pairs"]:
            for t in p["tensors"]:
                row = dict(t, pair=p["name"], shape="x".join(map(str, t["shape"])))
                w.writerow(["" if row.get(c) is None else row.get(c) for c in _COLUMNS])


def _digits(values: list) -> int:
    """The fewest significant digits (3 to 8) at which a column's different values print differently."""
    floats = sorted({v for v in values if isinstance(v, float)})
    for d in range(3, 9):
        if len({f"{v:.{d}g}" for v in floats}) == len(floats):
            return d
    return 8


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[list[str]]:
    """Rows as text, each column with the significant digits that tell its values apart."""
    digits = [_digits([r[i] for r in rows]) for i in range(len(header))]
    return [header] + [[_fmt(c, digits[i]) for i, c in enumerate(r)] for r in rows]


def _sections(p: dict) -> list[tuple[str, list[list[str]]]]:
    """(title, table) pairs shared by summary.md and report.html."""
    tuned = p["tuned"] is not None
    extra = ["update_rel", "update_cos"] if tuned else []
    s = p.get("sample")
    agg = _table(["figure", "value", "over"], [
        ["official σ(B, I) (mean of per-tensor σ, model.layers.N.*)", p["official_sigma"]["value"],
         f"{p['official_sigma']['tensors']} tensors" if s is None else
         f"estimated from {s['tensors']} of {s['of']} tensors (seed {s['seed']}), {s['level']:.0%} interval "
         f"{s['low']:.4g}–{s['high']:.4g}"],
        ["weighted σ (all tensors together)", p["weighted_sigma"]["value"],
         f"{p['weighted_sigma']['tensors']} tensors, {p['weighted_sigma']['parameters']:,} parameters"]]
        + [[f"weighted σ, {k} tower", v["sigma"], f"{v['numel']:,} parameters"] for k, v in p["towers"].items()])
    cols = ["sigma", "rel_l2", "cosine", *extra, "numel"]
    modules = _table(["module", *cols], [[k] + [v[c] for c in cols] for k, v in p["per_module"].items()])
    layers = _table(["layer", *cols], [[r["layer"]] + [r[c] for c in cols] for r in p["per_layer"]])
    out = [("Aggregates", agg), ("Per module type (weighted)", modules), ("Per layer (weighted)", layers)]
    mism = p["mismatched"]
    if any(mism.values()):
        out.append(("Not compared", _table(["why", "count", "names"], [
            [k.replace("_", " "), len(v), ", ".join(v[:8]) + (" ..." if len(v) > 8 else "")]
            for k, v in mism.items() if v])))
    return out


def _markdown(report: dict) -> str:
    lines = ["# Similarity report", "", f"shadowmerge {report['version']}, {report['created']}: `{report['command']}`",
             "", "Definitions:", ""]
    lines += [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    if report.get("interference") is not None:
        lines += ["", "## Interference between the updates", "", "| updates | cos | sign conflicts | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| {p['a']} vs {p['b']} | {p['cosine']:+.3f} | {p['sign_conflicts']:.1%} | {p['verdict']} |"
                  for p in report["interference"]["pairs"]]
    if report.get("candidates") is not None:
        lines += ["", "## Shadow candidates", "", "Closest first; a close sibling is a hypothesis to test with "
                  "`shadowmerge eval`, not a proven Base.", "", "| rank | candidate | σ to the Instruct | interval | "
                  "verdict |", "|---|---|---|---|---|"]
        for c in report["candidates"]:
            iv = f"{c['interval'][0]:.4g}–{c['interval'][1]:.4g}" if c.get("interval") else "-"
            say = "unusable: " + "; ".join(c["unusable"]) if c["unusable"] else c["verdict"] + \
                "".join(f"; {n}" for n in c["notes"])
            sigma = "-" if c["sigma"] is None else f"{c['sigma']:.4g}"
            lines.append(f"| {c.get('rank') or '-'} | `{c['candidate']}` | {sigma} | {iv} | {say} |")
    for p in report["pairs"]:
        lines += ["", f"## {short_label(p['name'])}", "", f"B (Base) `{p['base']}`, I (Instruct) `{p['instruct']}`"
                  + (f", T (tuned Base) `{p['tuned']}`" if p["tuned"] else ""), "", f"**Verdict**: {p['verdict']['line']}"]
        for title, table in _sections(p):
            lines += ["", f"### {title}", "", "| " + " | ".join(table[0]) + " |",
                      "|" + "---|" * len(table[0])] + ["| " + " | ".join(r) + " |" for r in table[1:]]
        if p["figures"]:
            lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in p["figures"] if f.endswith(".png"))]
    if report["figures"]:
        lines += ["", "Figures for all pairs: " + ", ".join(f"[{f}]({f})" for f in report["figures"]
                                                           if f.endswith(".png"))]
    return "\n".join(lines) + "\n"


def _html(report: dict, folder: Path) -> str:
    def img(name: str) -> str:
        data = base64.b64encode((folder / name).read_bytes()).decode()
        return f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></figure>'

    def table(rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
        return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>shadowmerge similarity report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;font-variant-numeric:tabular-nums}"
             "td:first-child,th:first-child{text-align:left}th{background:#eee}img{max-width:100%;height:auto}"
             "code{overflow-wrap:anywhere}.verdict{padding:.5em;background:#f4f4f4}.meta{color:#555}"
             "@media (max-width:640px){body{margin:1em auto;padding:0 .5em}td,th{padding:1px 4px;font-size:12px}}",
             "</style><meta name='viewport' content='width=device-width, initial-scale=1'></head><body>"
             "<h1>Similarity report</h1>",
             f"<p class='meta'>shadowmerge {html.escape(report['version'])}, {html.escape(report['created'])}: "
             f"<code>{html.escape(report['command'])}</code></p><ul>"]
    parts += [f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in report["definitions"].items()]
    parts.append("</ul>")
    if report.get("interference") is not None:
        rows = [["updates", "cos", "sign conflicts", "verdict"]] + [
            [f"{p['a']} vs {p['b']}", f"{p['cosine']:+.3f}", f"{p['sign_conflicts']:.1%}", p["verdict"]]
            for p in report["interference"]["pairs"]]
        parts.append(f"<h2>Interference between the updates</h2>{table(rows)}")
    if report.get("candidates") is not None:
        rows = [["rank", "candidate", "σ to the Instruct", "verdict"]] + [
            [str(c.get("rank") or "-"), c["candidate"], "-" if c["sigma"] is None else f"{c['sigma']:.4g}",
             "unusable: " + "; ".join(c["unusable"]) if c["unusable"] else c["verdict"]]
            for c in report["candidates"]]
        parts.append(f"<h2>Shadow candidates</h2>{table(rows)}")
    parts += [img(f) for f in report["figures"] if f.endswith(".png")]
    for p in report["pairs"]:
        parts.append(f"<h2>{html.escape(short_label(p['name']))}</h2><p>B (Base) <code>{html.escape(p['base'])}</code>, "
                     f"I (Instruct) <code>{html.escape(p['instruct'])}</code>"
                     + (f", T (tuned Base) <code>{html.escape(p['tuned'])}</code>" if p["tuned"] else "") + "</p>")
        parts.append(f"<p class='verdict'><b>Verdict</b>: {html.escape(p['verdict']['line'])}</p>")
        for title, rows in _sections(p):
            parts.append(f"<h3>{html.escape(title)}</h3>{table(rows)}")
        parts += [img(f) for f in p["figures"] if f.endswith(".png")]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
