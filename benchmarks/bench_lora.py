"""Benchmark `shadowmerge graft --lora` against a durable `cp -r` of the Instruct and against peft's merge.

Uses the synthetic bf16 Llama-shaped Instruct of bench_graft.py and writes a rank-128 LoRA adapter on
q/k/v/o/gate/up/down (float32, peft's key names, the config written by peft's LoraConfig). Then runs,
side by side: `cp -r` of the Instruct folder then `sync` (the durable floor: every byte read, written
and on disk once), `shadowmerge graft --lora` (best of --rounds, with its stage timeline), and peft
(`PeftModel.from_pretrained(instruct).merge_and_unload()` then `save_pretrained`) twice: loading the
Instruct in bf16 (the usual way) and in float32 with a cast at save (exact). Prints wall time and peak
RSS of each process (GNU time) and compares the outputs.

`--device cpu cuda` runs shadowmerge once per device (rows and agreement checks for each).

    python benchmarks/bench_lora.py --sizes 2B [--device cpu cuda] [--no-peft] [--work DIR] [--markdown out.md]

Run by hand (minutes; the 2B inputs take ~12 GB of disk); never part of the test suite.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import bench_graft  # noqa: E402
from bench_graft import (DEVICES, IMPORT_TORCH, OPTIONS, SHADOWMERGE, best, build_triple, device_label,  # noqa: E402
                         llama_tensors, machine, timed, timeline_of, timeline_table, wall_table)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 128

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
inst, adapter, out, dtype = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(inst, dtype=getattr(torch, dtype))
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.to(torch.bfloat16).save_pretrained(out, max_shard_size="1GB")
"""


def build_adapter(folder: Path, size: str) -> Path:
    from peft import LoraConfig

    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS)).save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in llama_tensors(size):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_dim, in_dim = shape
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((RANK, in_dim), generator=g) / in_dim ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn((out_dim, RANK), generator=g) * 1e-4
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "done").touch()
    return folder


def ulp_stats(a: Path, b: Path) -> tuple[int, int, int]:
    """(elements that differ, total, largest distance in bf16 ulps) between two outputs."""
    def files(folder):
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        raise SystemExit(f"tensor names differ between {a} and {b}: {sorted(set(fa) ^ set(fb))[:5]}")
    diff = total = worst = 0
    for name in sorted(fa):
        with safe_open(fa[name], "pt") as x, safe_open(fb[name], "pt") as y:
            ta, tb = x.get_tensor(name).view(torch.int16).int(), y.get_tensor(name).view(torch.int16).int()
        ta = torch.where(ta < 0, -(ta & 0x7FFF), ta)
        tb = torch.where(tb < 0, -(tb & 0x7FFF), tb)
        d = (ta - tb).abs()
        diff += int((d > 0).sum())
        worst = max(worst, int(d.max()))
        total += ta.numel()
    return diff, total, worst


def bench(size: str, work: Path) -> list[dict]:
    root = work / size
    inst = build_triple(root, size)[0]
    adapter = build_adapter(root / "lora-r128", size)
    peft = ("peft-bf16", "peft-fp32") if OPTIONS["peft"] else ()
    outs = {k: root / f"out-{k}" for k in ("cp", *DEVICES, *peft)}
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    rows = []
    timed(["sh", "-c", 'cat "$@" | cat > /dev/null', "sh", *map(str, inst.glob("*.safetensors"))])  # warm cache
    torch_wall, _ = best([sys.executable, "-c", IMPORT_TORCH])
    for label, key, cmd in (
            ("cp -r of the Instruct folder + sync (durable floor)", "cp",
             ["sh", "-c", 'cp -r "$1" "$2" && sync', "sh", str(inst), str(outs["cp"])]),
            *((f"shadowmerge graft --lora{device_label(dev)}", dev,
               [*SHADOWMERGE, "graft", "--instruct", str(inst), "--lora", str(adapter), "--out", str(outs[dev]),
                "--quiet", "--shard-size", "1GB", "--device", dev]) for dev in DEVICES),
            ("peft merge_and_unload, Instruct loaded in bf16", "peft-bf16",
             [sys.executable, "-c", PEFT_SCRIPT, str(inst), str(adapter), str(root / "out-peft-bf16"), "bfloat16"]),
            ("peft merge_and_unload, Instruct loaded in float32 (exact)", "peft-fp32",
             [sys.executable, "-c", PEFT_SCRIPT, str(inst), str(adapter), str(root / "out-peft-fp32"), "float32"])):
        if key not in outs:
            continue
        said: list[str] = []
        if key.startswith("peft"):
            wall, rss = timed(cmd, stdout=said)
        else:
            wall, rss = best(cmd, stdout=said, before=lambda: shutil.rmtree(outs[key], ignore_errors=True))
        rows.append({"size": size, "tool": label, "wall": wall, "rss": rss})
        if key in DEVICES:
            rows[-1]["timeline"] = timeline_of(outs[key])
            rows[-1]["tool"] += f" (wall - import torch {torch_wall:.2f} s = {wall - torch_wall:.2f} s)"
        print(f"[{size}] {rows[-1]['tool']}: {wall:.1f} s, {rss:.2f} GB", flush=True)
        if key == "cp":
            shutil.rmtree(outs["cp"])
    for dev in DEVICES:
        for key in (*peft[::-1], *DEVICES[:1] * (dev != DEVICES[0])):
            d, n, worst = ulp_stats(outs[dev], outs[key])
            other = f"--device {key}" if key in DEVICES else key
            rows.append({"size": size, "tool": f"{device_label(dev).strip() or 'output'} agreement with {other}",
                         "diff": d, "total": n, "worst": worst})
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    out = [machine(f"; rank-{RANK} LoRA on {'/'.join(TARGETS)}; best of {OPTIONS['rounds']} rounds (peft: one)"), "",
           *wall_table(rows, "cp -r", "durable cp -r")]
    for r in rows:
        if "diff" in r:
            out.append(f"| {r['size']} | shadowmerge {r['tool']}: {r['diff']:,} of {r['total']:,} elements "
                       f"differ ({100 * r['diff'] / r['total']:.4f} %), at most {r['worst']} bf16 ulp | | | |")
    return "\n".join(out + timeline_table(rows)) + "\n"


if __name__ == "__main__":
    bench_graft.main(__doc__, ("2B",), bench, markdown)
