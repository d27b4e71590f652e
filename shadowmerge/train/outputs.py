"""What a train run writes beside the models it trains: shadow/'s model card (with the evaluation's table), the
loss plot, and the Instruct's tokenizer for a full baseline."""

from __future__ import annotations

import shutil
from pathlib import Path

from .recipe import Recipe


def loss_plot(path: Path, losses: dict) -> bool:
    """The training loss per optimizer step (the Base's, and the Instruct baseline's), as a PNG."""
    curves = {k: v for k, v in losses.items() if v}
    if not curves:
        return False
    from ..analyzer.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for name, points in curves.items():
        label = {"base": "Base (grafted onto the Instruct)", "instruct": "Instruct (baseline)"}.get(name, name)
        ax.plot([p["step"] for p in points], [p["loss"] for p in points], marker="o" if len(points) < 30 else None,
                label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("shadowmerge train: training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def copy_tokenizer(src: Path, dst: Path) -> None:
    """src's tokenizer, chat template and other side files into dst (a full model trained without them)."""
    from ..sidefiles import DESCRIBE_THE_INPUT, side_files

    for p in side_files(src):
        if p.name != "config.json" and p.name not in DESCRIBE_THE_INPUT and not (dst / p.name).exists():
            shutil.copyfile(p, dst / p.name)


def model_card(folder: Path, r: Recipe, pair, losses: list[dict], kind: str, inst_folder: Path, command: str | None,
               report=None) -> None:
    """shadow/'s own model card: what was trained, how, σ, the loss, the recipe (huggingface_hub's ModelCard)."""
    from .. import card

    official = f"{pair.official:.4f}" if pair.official is not None else "n/a"
    loss = f"{losses[0]['loss']:.4f} → {losses[-1]['loss']:.4f} over {len(losses)} logged steps" if losses else "n/a"
    details = {"σ(Base, Instruct), official (mean of per-tensor σ over model.layers.N.*)": official,
               "σ(Base, Instruct), weighted": f"{pair.weighted:.4f}",
               "training loss": loss + (" ![training loss](loss.png)" if (folder / "loss.png").is_file() else "")}
    details.update({f"recipe: {k}": f"`{v}`" for k, v in r.as_dict().items() if k != "out"})
    card.write(folder, title=f"Shadow-FT: {Path(str(r.instruct)).name} + a {kind} {r.stage.upper()} of "
                             f"{Path(str(r.base)).name}",
               made_from={"Instruct": r.instruct, "Base (trained)": r.base, "data": r.data},
               relation="merge", license_from=inst_folder, datasets=[str(r.data)],
               what=f"`{r.instruct}` with the update of a {kind} {r.stage.upper()} fine-tune of its Base "
                    f"`{r.base}` grafted onto it by `shadowmerge train`. It keeps the Instruct's tokenizer, chat "
                    f"template and generation config; the Base was trained on data formatted with the Instruct's chat "
                    f"template.", command=command or card.command_line(None), details=details,
               evaluation=eval_section(report))


def eval_section(report) -> str | None:
    """The model card's evaluation: the headline comparison (shadow/ against instruct-ft/ with --baseline), eval.md's
    table and the verdicts (the files are in the run folder's eval/)."""
    if report is None:
        return None
    from ..evaluate.report import headline_rows, md_table, summary_lines, table_rows

    lines = ["## Evaluation", "", "`shadowmerge train --eval` (the run folder's eval/ has report.html and the per-item "
             "logs):", ""]
    headline = headline_rows(report.data)
    if headline:
        lines += md_table(*headline) + [""]
    lines += md_table(*table_rows(report.data))
    lines += [""] + [f"- {line}" for line in summary_lines(report.data)]
    return "\n".join(lines) + "\n"
