"""The analyzer's figures, with matplotlib's Agg backend (no display), each saved as PNG and SVG.

1. bars: mean sigma per model pair (paper Fig. 1 style), official and weighted side by side;
2. lines: sigma per layer, one line per module type;
3. heatmap: layer x module sigma;
4. matrix: one weight matrix of Base and Instruct and their difference as 3D surfaces over a slice,
   the difference with its z axis zoomed (paper Fig. 2 style);
5. diagnostics (with a tuned model): update size and cos(T - B, I - B) per layer.
"""

from __future__ import annotations

from pathlib import Path

from .aggregate import MODULES, SIGMA_RANGE, PairResult

# One letter convention everywhere: B = Base, I = Instruct, T = the tuned Base.
SIGMA_LABEL = "σ(B, I) = Σ|I−B| / (Σ|B|+Σ|I|)  (unitless)"
LEGEND_OUTSIDE = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)   # never over the data


def short_label(ref: str) -> str:
    """A model's label for titles and tables: a Hub id as it is, a Hub cache snapshot as its repo id, a local
    folder as its name (never an absolute path)."""
    text = str(ref).rstrip("/")
    parts = Path(text).parts
    if "snapshots" in parts:
        repo = parts[parts.index("snapshots") - 1] if parts.index("snapshots") > 0 else ""
        if repo.startswith(("models--", "datasets--")):
            return "/".join(repo.split("--")[1:])
    if not text.startswith((".", "/", "~")) and text.count("/") == 1 and not Path(text).exists():
        return text
    return Path(text).name or text


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display): for every figure shadowmerge draws."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, stem: str) -> list[str]:
    names = []
    for ext in ("png", "svg"):
        path = folder / f"{stem}.{ext}"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        names.append(path.name)
    pyplot().close(fig)
    return names


def _layer_axis(ax, layers: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=min(16, max(len(layers), 1)), integer=True))
    ax.set_xlabel("decoder layer index")


def pair_bars(pairs: list[PairResult], folder: Path) -> list[str]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(pairs) + 3), 4.5))
    xs = range(len(pairs))
    official = [p.official if p.official is not None else 0.0 for p in pairs]
    weighted = [p.weighted for p in pairs]
    ax.axhspan(*SIGMA_RANGE, color="tab:green", alpha=0.12, zorder=0,
               label=f"Shadow-FT's working range, σ {SIGMA_RANGE[0]:g}–{SIGMA_RANGE[1]:g}")
    ax.bar([x - 0.2 for x in xs], official, width=0.4, label="official: mean of per-tensor σ, model.layers.N.*")
    ax.bar([x + 0.2 for x in xs], weighted, width=0.4, label="weighted: Σ over all tensors")
    for x, v in zip(xs, official):
        ax.annotate(f"{v:.3g}", (x - 0.2, v), ha="center", va="bottom", fontsize=8)
    for x, v in zip(xs, weighted):
        ax.annotate(f"{v:.3g}", (x + 0.2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [short_label(p.name) for p in pairs], rotation=30 if len(pairs) > 3 else 0,
                  ha="right" if len(pairs) > 3 else "center")
    ax.set_ylim(0, max([*official, *weighted, SIGMA_RANGE[1]]) * 1.15)
    ax.set_ylabel(SIGMA_LABEL)
    ax.set_title("Relative gap σ between Base (B) and Instruct (I), per model pair")
    ax.legend(fontsize=8, **LEGEND_OUTSIDE)
    return _save(fig, folder, "sigma_per_pair")


def per_layer_lines(pair: PairResult, folder: Path, stem: str) -> list[str]:
    plt = pyplot()
    grid = pair.layer_module()
    layers = sorted({layer for layer, _ in grid})
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for module in MODULES:
        pts = [(layer, grid[(layer, module)].sigma) for layer in layers if (layer, module) in grid]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=module)
    all_layers = pair.per_layer()
    ax.plot(list(all_layers), [s.sigma for s in all_layers.values()], color="black", linewidth=2.2,
            label="whole layer")
    _layer_axis(ax, layers)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)        # from 0: a wiggle of a few % looks like one
    ax.set_ylabel(SIGMA_LABEL)
    ax.set_title(f"σ(B, I) per layer and module type: {short_label(pair.name)}")
    ax.legend(fontsize=8, ncol=2, **LEGEND_OUTSIDE)
    return _save(fig, folder, stem)


def heatmap(pair: PairResult, folder: Path, stem: str) -> list[str]:
    plt = pyplot()
    grid = pair.layer_module()
    layers = sorted({layer for layer, _ in grid})
    modules = [m for m in MODULES if any((layer, m) in grid for layer in layers)]
    data = [[grid[(layer, m)].sigma if (layer, m) in grid else float("nan") for layer in layers] for m in modules]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 3), 0.45 * len(modules) + 2))
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(modules)), modules)
    step = max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("decoder layer index")
    ax.set_ylabel("module type")
    ax.set_title(f"σ(B, I) per layer × module: {short_label(pair.name)}")
    fig.colorbar(im, ax=ax, label="σ (unitless)")
    return _save(fig, folder, stem)


def matrix(name: str, a, b, pair: PairResult, folder: Path, stem: str, size: int = 48, zoom: float = 10.0):
    """Surfaces of a [size x size] slice of A (Base), B (Instruct) and A - B, the last with z zoomed."""
    import numpy as np

    plt = pyplot()
    a, b = a[:size, :size].float().numpy(), b[:size, :size].float().numpy()
    d = b - a
    yy, xx = np.mgrid[0: a.shape[0], 0: a.shape[1]]
    fig = plt.figure(figsize=(15, 4.8))
    lim = float(max(abs(a).max(), abs(b).max(), 1e-12))
    dmax = float(abs(d).max())
    # the difference keeps the paper's 10x z axis (small against the weights), but its colours span its own
    # range, so that small is told from absent; the title gives its largest value
    panels = ((a, f"B (Base): {short_label(pair.base)}", lim, lim),
              (b, f"I (Instruct): {short_label(pair.instruct)}", lim, lim),
              (d, f"I − B (z zoomed {zoom:g}x; colours on its own scale)\nmax |I − B| = {dmax:.3g}  "
                  f"(max |weight| = {lim:.3g})", lim / zoom, max(dmax, 1e-12)))
    for i, (z, title, zl, cl) in enumerate(panels, 1):
        ax = fig.add_subplot(1, 3, i, projection="3d")
        ax.plot_surface(xx, yy, z, cmap="coolwarm", vmin=-cl, vmax=cl, linewidth=0, antialiased=False)
        ax.set_zlim(-zl, zl)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("input column")
        ax.set_ylabel("output row")
        ax.set_zlabel("weight value")
    fig.suptitle(f"{name}, rows/columns 0..{a.shape[0] - 1} ({short_label(pair.name)})")
    return _save(fig, folder, stem)


def diagnostics(pair: PairResult, folder: Path, stem: str) -> list[str]:
    plt = pyplot()
    layers = pair.per_layer()
    xs = list(layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    top.plot(xs, [s.update_rel for s in layers.values()], marker="o", markersize=3, label="‖T − B‖ / ‖B‖ (update)")
    top.plot(xs, [s.rel_l2 for s in layers.values()], marker="s", markersize=3, label="‖I − B‖ / ‖B‖ (instruct gap)")
    top.set_ylabel("relative L2 norm (unitless)")
    top.set_title(f"Graft-risk diagnostics per layer: {short_label(pair.name)} (T = the tuned Base)")
    top.legend(fontsize=8, **LEGEND_OUTSIDE)
    bottom.plot(xs, [s.update_cos for s in layers.values()], marker="o", markersize=3, color="tab:red")
    bottom.axhline(0, color="gray", linewidth=0.8)
    bottom.axhline(-0.3, color="tab:red", linewidth=0.8, linestyle="--", label="-0.3: update undoes instruct tuning")
    bottom.set_ylabel("cos(T − B, I − B)")
    bottom.set_ylim(-1.05, 1.05)
    bottom.legend(fontsize=8, **LEGEND_OUTSIDE)
    _layer_axis(bottom, xs)
    return _save(fig, folder, stem)
