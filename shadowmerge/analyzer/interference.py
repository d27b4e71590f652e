"""Interference between several updates of one Base (`similarity --base B --tuned T1 --tuned T2 ...`), before
grafting them at once: per pair of updates, per layer and module type, the cosine of the updates and the share of
elements where both change and their signs conflict; a figure and a plain verdict on whether TIES/DARE may matter.

Each update is Δ_k = T_k − B (a model, or the Base plus an adapter's update: tuned.LoraTuned), read in pieces of
at most SUM_CHUNK_ELEMENTS (float32 values, float64 sums): memory is bounded by the pieces. Two independent
updates are near orthogonal (cos ≈ 0) with about half the signs of their shared elements in conflict; that is where
TIES (sign election) and DARE (dropping) change the result most against a plain sum. Updates pointing the same
way (cos > 0.3) sum without much loss; opposed ones (cos < −0.1) cancel in a sum, and TIES keeps the stronger
sign per element. Written here: a few float64 sums; no library computes them over streamed tensors.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import torch

from ..chunks import SUM_CHUNK_ELEMENTS, ranges
from ..formats.safetensors import itemsize
from ..tensors import Buffers, widen
from .aggregate import layer_of, module_of


def _zero():
    return {"dot": 0.0, "aa": 0.0, "bb": 0.0, "both": 0, "conflict": 0}


def measure(base, updates: list, names: list[str] | None = None) -> dict:
    """{(a, b): {"tensors": {name: sums}}} for each pair of updates (indices into `updates`, readers like a
    Checkpoint), over the tensors all have with the Base's shape."""
    common = [n for n, info in base.tensors.items() if info.dtype.is_floating_point and len(info.shape) >= 1
              and all(n in u.tensors and tuple(u.tensors[n].shape) == tuple(info.shape) for u in updates)
              and (names is None or n in names)]
    raw, work = Buffers(torch.device("cpu")), Buffers(torch.device("cpu"), torch.float32)
    pairs = list(combinations(range(len(updates)), 2))
    sums = {p: {} for p in pairs}

    def values(store, info, e0, e1, key):
        data = store.read_into(info, e0, e1, raw(key, (e1 - e0) * itemsize(info.dtype)))
        return widen(data, info.dtype, work(key, e1 - e0))

    for name in common:
        info = base.tensors[name]
        tensor_sums = {p: _zero() for p in pairs}
        for e0, e1 in ranges(0, info.numel, info.row_numel, SUM_CHUNK_ELEMENTS):
            b = values(base, info, e0, e1, "base")
            d = [values(u, u.tensors[name], e0, e1, f"u{k}").sub(b) for k, u in enumerate(updates)]
            for a, c in pairs:
                s = tensor_sums[(a, c)]
                s["dot"] += float(torch.dot(d[a].double(), d[c].double()))
                s["aa"] += float(d[a].double().square().sum())
                s["bb"] += float(d[c].double().square().sum())
                both = (d[a] != 0) & (d[c] != 0)
                s["both"] += int(both.sum())
                s["conflict"] += int((both & (torch.sign(d[a]) != torch.sign(d[c]))).sum())
        for p in pairs:
            sums[p][name] = tensor_sums[p]
    return sums


def _figures(s: dict) -> dict:
    cos = s["dot"] / math.sqrt(s["aa"] * s["bb"]) if s["aa"] and s["bb"] else 0.0
    return {"cosine": cos, "sign_conflicts": s["conflict"] / s["both"] if s["both"] else 0.0,
            "elements_both_change": s["both"]}


def _add(x: dict, y: dict) -> dict:
    return {k: x[k] + y[k] for k in x}


def summarize(sums: dict, labels: list[str]) -> dict:
    """Per pair: overall, per module type and per layer figures, and the verdict."""
    out = []
    for (a, c), tensors in sums.items():
        total, modules, layers = _zero(), {}, {}
        for name, s in tensors.items():
            total = _add(total, s)
            modules[module_of(name)] = _add(modules.get(module_of(name), _zero()), s)
            if layer_of(name) is not None:
                layers[layer_of(name)] = _add(layers.get(layer_of(name), _zero()), s)
        overall = _figures(total)
        out.append({"a": labels[a], "b": labels[c], **overall,
                    "per_module": {m: _figures(s) for m, s in sorted(modules.items())},
                    "per_layer": [{"layer": k, **_figures(s)} for k, s in sorted(layers.items())],
                    "verdict": verdict(overall["cosine"], overall["sign_conflicts"])})
    return {"pairs": out}


def verdict(cos: float, conflicts: float) -> str:
    if cos > 0.3:
        return (f"the updates point the same way (cos {cos:+.2f}, {conflicts:.0%} of shared elements in sign "
                f"conflict): a plain sum keeps most of both; TIES/DARE are unlikely to matter much")
    if cos < -0.1:
        return (f"the updates oppose each other (cos {cos:+.2f}, {conflicts:.0%} in sign conflict): a sum cancels "
                f"them; TIES keeps the stronger sign per element and is likely to matter: compare with eval")
    return (f"the updates are near orthogonal (cos {cos:+.2f}) with {conflicts:.0%} of shared elements in sign "
            f"conflict, as independent updates are: TIES/DARE change the result where they overlap; choose by eval "
            f"(a sum keeps both at full strength)")


def text(report: dict) -> str:
    lines = ["interference between the updates (per pair):"]
    for p in report["pairs"]:
        lines.append(f"  {p['a']} vs {p['b']}: cos {p['cosine']:+.3f}, sign conflicts {p['sign_conflicts']:.1%} of "
                     f"{p['elements_both_change']:,} elements both change")
        lines.append(f"    {p['verdict']}")
        worst = sorted(p["per_module"].items(), key=lambda kv: kv[1]["cosine"])[:3]
        lines.append("    lowest cosine by module: " + ", ".join(f"{m} {f['cosine']:+.3f}" for m, f in worst))
    return "\n".join(lines)


def figure(report: dict, folder: Path, stem: str = "interference") -> list[str]:
    """Per layer: the cosine and the sign-conflict share of each pair of updates."""
    from .plots import _layer_axis, _save, pyplot

    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for p in report["pairs"]:
        layers = [r["layer"] for r in p["per_layer"]]
        label = f"{p['a']} vs {p['b']}"
        top.plot(layers, [r["cosine"] for r in p["per_layer"]], marker="o", markersize=3, label=label)
        bottom.plot(layers, [r["sign_conflicts"] for r in p["per_layer"]], marker="o", markersize=3, label=label)
    layers = sorted({r["layer"] for p in report["pairs"] for r in p["per_layer"]})
    if layers:
        _layer_axis(bottom, layers)
    bottom.set_ylim(0, 1)
    top.axhline(0, color="grey", linewidth=0.8)
    top.set_ylabel("cos(Δa, Δb)")
    bottom.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    bottom.set_ylabel("sign conflicts\n(share of elements both change)")
    bottom.set_xlabel("layer")
    top.set_title("Interference between updates, per layer")
    top.legend(fontsize=8)
    return _save(fig, folder, stem)
