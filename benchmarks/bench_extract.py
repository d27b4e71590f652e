"""Benchmark `shadowmerge extract` against `mergekit-extract-lora` on the same inputs, at equal rank.

Inputs: the synthetic bf16 Llama-shaped Base of bench_graft.py and a tuned copy whose update of every
linear weight has a decaying spectrum (256 directions, singular values ∝ 1/k), stored in bf16 as a
real fine-tune would be (so T − B also holds bf16 rounding noise at full rank); embeddings and norms
change a little too. Both tools then extract a rank-R adapter, with the same policy for what is not
a linear weight (mergekit's default: embeddings, head and norms as full modules_to_save copies;
shadowmerge `--others copy`). Measured per tool: wall time and peak RSS of the process (GNU time),
and the error at that rank, by peft itself: the Base loaded in float32,
`PeftModel.from_pretrained(base, adapter).merge_and_unload()`, and per linear module
‖T − merged‖ / ‖T − B‖ (float64). The best possible value at rank R is the Eckart-Young bound
√(Σ_{i>R} s²) / √(Σ s²), which shadowmerge records as `rel_error` in extract.json.

    python benchmarks/bench_extract.py --sizes 0.5B [--rank 64] [--device cpu cuda] [--work DIR] [--markdown out.md]

Each device gets three rows: shadowmerge with float32 factors, with `--dtype bfloat16` (mergekit's
dtype: equal file sizes), and mergekit-extract-lora (`--device` passed to both).

Run by hand (minutes); never part of the test suite.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import bench_graft  # noqa: E402
from bench_graft import SHADOWMERGE, build_triple, machine, timed  # noqa: E402

RANK = [64]
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MERGEKIT = str(Path(sys.executable).parent / "mergekit-extract-lora")

PEFT_ERRORS = """
import json, sys, torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM
base, tuned, adapter = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
weights = {}
import glob
for f in glob.glob(base + "/*.safetensors"):
    with safe_open(f, "pt") as b:
        for k in b.keys():
            weights[k] = [b.get_tensor(k)]
for f in glob.glob(tuned + "/*.safetensors"):
    with safe_open(f, "pt") as t:
        for k in t.keys():
            weights[k].append(t.get_tensor(k))
out = {}
for name, (b, t) in weights.items():
    if name.endswith("_proj.weight"):
        d = t.double() - b.double()
        out[name] = float((t.double() - merged[name].double()).norm() / d.norm())
print(json.dumps(out))
"""


def build_tuned(base: Path, folder: Path) -> Path:
    """The Base plus a decaying-spectrum update on every linear weight, saved in bf16 like the Base."""
    if (folder / "done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    (folder / "done").unlink()
    g = torch.Generator().manual_seed(7)
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name, w in tensors.items():
            x = w.float()
            if name.endswith("_proj.weight"):
                k = min(256, *x.shape)
                # RMS of the update ≈ 4 % of the weights' mean |w|: ten times bf16's rounding of T
                s = 0.03 * x.abs().mean() * (x.shape[0] * x.shape[1]) ** 0.5 / torch.arange(1, k + 1)
                u = torch.linalg.qr(torch.randn(x.shape[0], k, generator=g))[0]
                v = torch.linalg.qr(torch.randn(x.shape[1], k, generator=g))[0]
                x = x + (u * s) @ v.T
            else:
                x = x + torch.randn(x.shape, generator=g) * 1e-4
            tensors[name] = x.to(torch.bfloat16)
        save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "done").touch()
    return folder


def peft_errors(base: Path, tuned: Path, adapter: Path) -> dict[str, float]:
    import subprocess

    proc = subprocess.run([sys.executable, "-c", PEFT_ERRORS, str(base), str(tuned), str(adapter)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"peft could not merge {adapter}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(size: str, work: Path) -> list[dict]:
    rank = RANK[0]
    root = work / size
    _, base, _ = build_triple(root, size)
    tuned = build_tuned(base, root / "tuned-lowrank")
    rows = []
    runs = []
    for dev in bench_graft.DEVICES:
        on = [] if dev == "cpu" else ["--device", dev]
        for dtype in ([], ["--dtype", "bfloat16"]):
            runs.append((" ".join([f"shadowmerge extract --rank {rank} --others copy", *dtype, *on]),
                         [*SHADOWMERGE, "extract", "--base", str(base), "--tuned", str(tuned), "--rank", str(rank),
                          "--others", "copy", *dtype, *on, "--force", "-q", "--out"]))
        runs.append((" ".join([f"mergekit-extract-lora --max-rank {rank}", *on]),
                     [MERGEKIT, "--base-model", str(base), "--model", str(tuned), "--max-rank", str(rank), *on,
                      "--quiet", "--out-path"]))
    for i, (tool, cmd) in enumerate(runs):
        out = root / f"adapter-{i}-{tool.split()[0]}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = timed([*cmd, str(out)])
        errors = peft_errors(base, tuned, out)
        size_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
        rows.append({"size": size, "tool": tool, "wall": wall, "rss": rss, "errors": errors, "mb": size_mb})
        if tool == runs[0][0]:
            record = json.loads((out / "extract.json").read_text())
            bound = {m["module"] + ".weight": m["rel_error"] for m in record["modules"]}
            rows.append({"size": size, "tool": f"Eckart-Young bound at rank {rank}", "errors": bound})
    return rows


def markdown(rows: list[dict]) -> str:
    out = [machine(), "",
           "| size | command | wall s | peak RSS GB | adapter MB | mean ‖ΔW − BA‖/‖ΔW‖ | max | modules |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = list(r["errors"].values())
        wall = f"{r['wall']:.1f}" if "wall" in r else ""
        rss = f"{r['rss']:.2f}" if "rss" in r else ""
        mb = f"{r['mb']:.0f}" if "mb" in r else ""
        out.append(f"| {r['size']} | {r['tool']} | {wall} | {rss} | {mb} | {sum(e) / len(e):.6f} | {max(e):.6f} | "
                   f"{len(e)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--rank", type=int, default=64)
    known, rest = pre.parse_known_args()
    RANK[0] = known.rank
    sys.argv = [sys.argv[0], *rest]
    bench_graft.main(__doc__, sizes=("0.5B",), run=bench, table=markdown)
