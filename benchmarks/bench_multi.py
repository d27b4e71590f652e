"""Benchmark several updates grafted at once: one, two and three full fine-tunes of the Base onto the Instruct, with
--combine sum and ties, against the one-update graft (targets: two updates <= 1.3x, three <= 1.6x its wall time,
peak RSS unchanged).

bench_graft's Llama-shaped triple; the second and third updates are other fine-tunes of the same Base written the
same way (the Base plus noise of another seed), so every update is read from its own files.

    python benchmarks/bench_multi.py [--size 2B] [--rounds 2] [--work DIR] [--markdown out.md]

Run by hand (minutes); never in the test suite.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from bench_graft import SHADOWMERGE, best, build_triple, machine  # noqa: E402


def more_tuned(base: Path, out: Path, seed: int) -> Path:
    """Another fine-tune of the Base: each tensor plus noise of its own seed, saved as the Base's files are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for p in base.iterdir():
        if p.suffix == ".safetensors":
            with safe_open(p, "pt") as f:
                tensors = {n: (f.get_tensor(n).float() + torch.randn(f.get_slice(n).get_shape(), generator=g)
                               * 0.0002).to(torch.bfloat16) for n in f.keys()}
            save_file(tensors, out / p.name, metadata={"format": "pt"})
        elif p.name != "done":
            shutil.copy(p, out / p.name)
    (out / "done").touch()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    inst, base, tuned = build_triple(args.work / args.size, args.size)
    tuned = [tuned] + [more_tuned(base, args.work / args.size / f"tuned{k}", k) for k in (2, 3)]
    out = args.work / "multi-out"
    rows = []
    for label, count, extra in (("1 update", 1, []), ("2 updates, sum", 2, []), ("3 updates, sum", 3, []),
                                ("2 updates, ties --density 0.5", 2, ["--combine", "ties", "--density", "0.5"]),
                                ("3 updates, ties --density 0.5", 3, ["--combine", "ties", "--density", "0.5"]),
                                ("3 updates, dare_ties --density 0.5", 3,
                                 ["--combine", "dare_ties", "--density", "0.5"])):
        cmd = [*SHADOWMERGE, "graft", "--instruct", inst, "--base", base]
        for t in tuned[:count]:
            cmd += ["--tuned", t]
        cmd += [*extra, "--out", out, "-q"]
        wall, rss = best([str(c) for c in cmd], before=lambda: shutil.rmtree(out, ignore_errors=True),
                         rounds=args.rounds)
        rows.append((label, wall, rss))
    one = rows[0][1]
    lines = [f"### Several updates ({args.size})", "", machine(), "",
             "| graft | wall s | vs 1 update | peak RSS GB |", "|---|---|---|---|"]
    lines += [f"| {label} | {wall:.1f} | {wall / one:.2f}x | {rss:.2f} |" for label, wall, rss in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
