"""Benchmark `shadowmerge similarity` against the I/O floor: `cat` of the two inputs.

Uses the synthetic bf16 Llama-shaped Base and Instruct of bench_graft.py and runs, side by side,
`cat BASE INSTRUCT | cat > /dev/null` and `shadowmerge similarity --base BASE --instruct INSTRUCT`
(report and figures included), with wall time and peak RSS per process from GNU time. It also
checks the official sigma against a straightforward float64 computation over the same tensors.

`--device cpu cuda` runs the analysis once per device.

    python benchmarks/bench_similarity.py --sizes 2B [--device cpu cuda] [--work DIR] [--markdown out.md]

Run by hand (minutes); never part of the test suite.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import bench_graft  # noqa: E402
from bench_graft import DEVICES, SHADOWMERGE, build_triple, device_label, machine, timed, wall_table  # noqa: E402


def reference_official(base: Path, inst: Path) -> float:
    """Mean of per-tensor sigma over model.layers.N. tensors, computed plainly in float64."""
    def files(folder):
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()}

    fb, fi = files(base), files(inst)
    sig = []
    for name in sorted(fb):
        if re.search(r"model\.layers\.(\d+)\.", name):
            a = safe_open(fb[name], "pt").get_tensor(name).double()
            b = safe_open(fi[name], "pt").get_tensor(name).double()
            sig.append(float((a - b).abs().sum() / (a.abs().sum() + b.abs().sum())))
    return sum(sig) / len(sig)


def bench(size: str, work: Path) -> list[dict]:
    root = work / size
    inst, base, _ = build_triple(root, size)
    inputs = [str(p) for f in (base, inst) for p in sorted(f.glob("*.safetensors"))]
    out = root / "out-similarity"
    shutil.rmtree(out, ignore_errors=True)
    floor = ["sh", "-c", 'cat "$@" | cat > /dev/null', "sh", *inputs]
    timed(floor)                                       # warm the page cache alike for both
    rows = []
    wall, rss = timed(floor)
    rows.append({"size": size, "tool": "cat of the 2 inputs (I/O floor)", "wall": wall, "rss": rss})
    want = None
    for dev in DEVICES:
        label = f"shadowmerge similarity{device_label(dev)}"
        wall, rss = timed([*SHADOWMERGE, "similarity", "--base", str(base), "--instruct", str(inst), "--out", str(out),
                           "--quiet", "--device", dev])
        rows.append({"size": size, "tool": label, "wall": wall, "rss": rss})
        print(f"[{size}] {label}: {wall:.1f} s, {rss:.2f} GB", flush=True)
        got = json.loads((out / "report.json").read_text())["pairs"][0]["official_sigma"]["value"]
        want = reference_official(base, inst) if want is None else want
        rows.append({"size": size, "tool": "check", "got": got, "want": want, "label": label})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    out = [machine(), "", *wall_table(rows, "cat", "cat")]
    for r in rows:
        if "got" in r:
            out.append(f"| {r['size']} | official σ: {r['label']} {r['got']:.10f}, plain float64 reference "
                       f"{r['want']:.10f} (relative difference {abs(r['got'] - r['want']) / r['want']:.1e}) | | | |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    bench_graft.main(__doc__, ("2B",), bench, markdown)
