"""Benchmark peak memory on tensors whose rows are huge: memory must be bounded by elements, not rows.

Two synthetic bf16 checkpoints (Instruct, Base = Instruct + noise, Tuned = Base + noise):

- embedding: one 1 GiB `[262144, 2048]` embedding (Gemma-3-sized vocabulary) and a norm;
- experts:   one `[4, 8192, 8192]` fused MoE expert weight (transformers 5 layout) and a `[4, 8192]` router;
- wide:      two `[8192, 8192]` attention weights, for LoRAs of rank 2048 and 4096 (float32): rank x width at
             and above `lora/entries.TILE_ELEMENTS`, where a piece's slice of A is read in blocks (entries.Wide).

Each goes through a full graft and a LoRA graft (rank 128, float32, peft's key names): on the
embedding an embedding LoRA, and DoRA with --base (norms over all 262144 rows, from a streamed pass);
on the experts a LoRA on the router with `--dtype float32`, so the 3-D tensor is cast piece by piece; on the
wide pair only the LoRA grafts (no full graft). The embedding and the experts also go through grafts of several
updates (issue 35): two fine-tunes and the LoRA at once, summed, by TIES (the threshold passes over the whole
tensor) and by DARE.
Peak RSS and wall time come from GNU time per process. With `--compare REV`, the same commands also
run on shadowmerge at git revision REV (a worktree), for a before/after.

    python benchmarks/bench_memory.py [--cases embedding experts wide] [--compare 66dcf4d] [--timeout 600]
                                      [--markdown out.md]

Run by hand (~7 GB of disk, minutes); never part of the test suite. A command that passes --timeout is
stopped and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_graft import machine, timed  # noqa: E402

RANK = 128
CASES = {
    "embedding": {"model.embed_tokens.weight": (262144, 2048), "model.norm.weight": (2048,)},
    "experts": {"model.layers.0.mlp.experts.gate_up_proj": (4, 8192, 8192), "model.layers.0.mlp.gate.weight": (4, 8192)},
    "wide": {"model.layers.0.self_attn.q_proj.weight": (8192, 8192),
             "model.layers.0.self_attn.o_proj.weight": (8192, 8192)},
}
WIDE_RANKS = (2048, 4096)
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}


def build(root: Path, case: str) -> list[Path]:
    folders = [root / n for n in ("instruct", "base", "tuned", "tuned2")]
    if all((f / "done").exists() for f in folders):
        return folders
    g = torch.Generator().manual_seed(0)
    for k, folder in enumerate(folders):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        tensors = {}
        for name, shape in CASES[case].items():
            t = torch.empty(shape, dtype=torch.bfloat16)
            for i in range(0, shape[0]):          # fill slice by slice: the builder stays small too
                t[i] = (torch.randn(shape[1:], generator=g) * 0.02 * (1 + 0.01 * k)).to(torch.bfloat16)
            tensors[name] = t
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        del tensors
        (folder / "done").touch()
    return folders


def adapters(root: Path, case: str) -> dict[str, Path]:
    from peft import LoraConfig

    g = torch.Generator().manual_seed(1)
    out = {}
    if case == "embedding":
        specs = {"lora": dict(target_modules=["embed_tokens"]), "dora": dict(target_modules=["embed_tokens"],
                                                                               use_dora=True)}
    elif case == "wide":
        specs = {f"lora-r{r}": dict(target_modules=["q_proj", "o_proj"], r=r) for r in WIDE_RANKS}
    else:
        specs = {"lora": dict(target_modules=["gate"])}
    for kind, kwargs in specs.items():
        folder = root / f"adapter-{kind}"
        out[kind] = folder
        if (folder / "done").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        rank = kwargs.pop("r", RANK)
        LoraConfig(r=rank, lora_alpha=2 * rank, **kwargs).save_pretrained(folder)
        if case == "embedding":
            vocab, dim = CASES[case]["model.embed_tokens.weight"]
            key = "base_model.model.model.embed_tokens"
            tensors = {f"{key}.lora_embedding_A": torch.randn((RANK, vocab), generator=g) * 0.01,
                       f"{key}.lora_embedding_B": torch.randn((dim, RANK), generator=g) * 0.01}
            if kind == "dora":
                tensors[f"{key}.lora_magnitude_vector"] = torch.rand(dim, generator=g) + 0.5
        elif case == "wide":
            tensors = {}
            for name, (rows, cols) in CASES[case].items():
                key = "base_model.model." + name[: -len(".weight")]
                tensors[f"{key}.lora_A.weight"] = torch.randn((rank, cols), generator=g) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn((rows, rank), generator=g) * 0.01
        else:
            experts, hidden = CASES[case]["model.layers.0.mlp.gate.weight"]
            key = "base_model.model.model.layers.0.mlp.gate"
            tensors = {f"{key}.lora_A.weight": torch.randn((RANK, hidden), generator=g) * 0.01,
                       f"{key}.lora_B.weight": torch.randn((experts, RANK), generator=g) * 0.01}
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "done").touch()
    return out


def commands(case: str, folders: list[Path], ads: dict[str, Path], out: Path) -> list[tuple[str, list[str]]]:
    i, b, t, t2 = map(str, folders)
    if case == "wide":
        return [(f"LoRA graft rank {kind[6:]}", ["graft", "--instruct", i, "--lora", str(path), "--out", str(out)])
                for kind, path in ads.items()]
    cmds = [("full graft", ["graft", "--instruct", i, "--base", b, "--tuned", t, "--out", str(out)])]
    extra = ["--dtype", "float32"] if case == "experts" else []
    cmds.append(("LoRA graft" + (" --dtype float32" if extra else ""),
                 ["graft", "--instruct", i, "--lora", str(ads["lora"]), "--out", str(out), *extra]))
    if "dora" in ads:
        cmds.append(("DoRA graft --base", ["graft", "--instruct", i, "--lora", str(ads["dora"]), "--base", b,
                                           "--out", str(out)]))
    several = ["graft", "--instruct", i, "--base", b, "--tuned", t, "--tuned", t2, "--lora", str(ads["lora"])]
    cmds += [("2 fine-tunes + LoRA, sum", [*several, "--out", str(out)]),
             ("2 fine-tunes + LoRA, ties --density 0.3", [*several, "--combine", "ties", "--density", "0.3", "--out",
                                                          str(out)]),
             ("2 fine-tunes + LoRA, dare_ties --density 0.5", [*several, "--combine", "dare_ties", "--density", "0.5",
                                                               "--out", str(out)])]
    return cmds


def worktree(rev: str, work: Path) -> Path:
    path = work / f"shadowmerge-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, capture_output=True)
    return path


def run(cases: list[str], work: Path, compare: str | None, timeout: int) -> list[dict]:
    rows = []
    versions = [("this version", None)] + ([(f"at {compare}", worktree(compare, work))] if compare else [])
    for case in cases:
        root = work / f"memory-{case}"
        folders = build(root, case)
        ads = adapters(root, case)
        inputs = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
        for label, cmd in commands(case, folders, ads, root / "out"):
            for version, tree in versions:
                shutil.rmtree(root / "out", ignore_errors=True)
                # `python -m` puts the working directory first on sys.path: run each version from its own tree
                tree = tree or Path(__file__).resolve().parent.parent
                env = dict(os.environ, PYTHONPATH=str(tree))
                try:
                    wall, rss = timed(["timeout", str(timeout), sys.executable, "-m", "shadowmerge", *cmd, "--quiet"],
                                      env=env, cwd=str(tree))
                except SystemExit as exc:                # timeout's own status: the command was stopped
                    if "command failed (124)" not in str(exc):
                        raise
                    wall = rss = None
                rows.append({"case": case, "tensor GiB": inputs / 2**30, "command": label, "version": version,
                             "wall": wall, "rss": rss})
                said = f"{wall:.1f} s, {rss:.2f} GB" if wall is not None else f"stopped after {timeout} s"
                print(f"[{case}] {label} ({version}): {said}", flush=True)
        shutil.rmtree(root / "out", ignore_errors=True)
    return rows


def markdown(rows: list[dict], timeout: int) -> str:
    out = [machine(), "", "| checkpoint | command | shadowmerge | wall s | peak RSS GB |", "|---|---|---|---|---|"]
    for r in rows:
        shape = " + ".join(str(list(s)) for s in CASES[r["case"]].values())
        said = (f"{r['wall']:.1f} | {r['rss']:.2f}" if r["wall"] is not None
                else f"not finished after {timeout} s (stopped) | –")
        out.append(f"| {r['case']} {shape} | {r['command']} | {r['version']} | {said} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--compare", metavar="REV", help="also run shadowmerge at this git revision (a worktree)")
    ap.add_argument("--timeout", type=int, default=1800, help="stop a command after this many seconds [1800]")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    text = markdown(run(args.cases, args.work, args.compare, args.timeout), args.timeout)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
