"""Benchmark `shadowmerge graft` against the durable I/O floor and real mergekit task_arithmetic.

Builds synthetic bf16 Llama-shaped triples (Instruct, Base = Instruct + noise, Tuned = Base + noise) in
several shards, then runs, side by side: the durable floor (`cat` of the three inputs, plus `dd
conv=fsync` of as many bytes as the output has: every input byte read, every output byte on disk),
`python -c "import os, torch; os._exit(0)"` (the import alone), `shadowmerge graft`, and `mergekit-yaml`
task_arithmetic (base_model=Base, Instruct and Tuned at weight 1, normalize false), once default (bf16
math) and once exact (dtype float32, out_dtype bfloat16). Each command but mergekit runs --rounds times
(best kept). Prints wall time and peak RSS of each process, the ratio (graft - torch import) / durable
floor, graft's stage timeline (from its record), and checks that the outputs agree. `cat INPUTS | cat >
/dev/null`: GNU cat writing straight to /dev/null does not read the data at all.

`--device cpu cuda` runs shadowmerge once per device and checks the outputs are bit-identical to the
first device's; where mergekit is not installed (a GPU machine), its rows are left out.

    python benchmarks/bench_graft.py --sizes 0.5B 2B [--device cpu cuda] [--rounds 2] [--no-mergekit] [--work DIR]
                                     [--markdown out.md]

Run by hand (minutes, ~25 GB of disk for 2B); never part of the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (256, 1024, 4, 4, 2, 4096),          # to check the script itself in seconds
    "0.5B": (1024, 4096, 28, 16, 8, 32000),
    "2B": (2048, 8192, 30, 16, 8, 32000),
    "5B": (3072, 12288, 36, 24, 8, 32000),       # a floor of 30 s and more on the 2-core VM
    "8B": (4096, 14336, 32, 32, 8, 128256),
}
DEVICES = ["cpu"]           # set by main's --device: where shadowmerge's arithmetic runs, one row each
OPTIONS = {"rounds": 2, "mergekit": True, "peft": True}     # set by main's --rounds, --no-mergekit, --no-peft
SHADOWMERGE = [sys.executable, "-m", "shadowmerge"]
#: the import subtracted from a graft's wall time: without the interpreter's teardown of torch (~0.5 s), which
#: shadowmerge's streaming commands skip (cli.entry), so that the ratio does not credit them with it
IMPORT_TORCH = "import os, torch; os._exit(0)"


def llama_tensors(size: str):
    h, inter, layers, heads, kv, vocab = SHAPES[size]
    kvd = h // heads * kv
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kvd, h)
        yield p + "self_attn.v_proj.weight", (kvd, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def build_triple(root: Path, size: str, shard_bytes: int = 1 << 30) -> list[Path]:
    from transformers import LlamaConfig

    h, inter, layers, heads, kv, vocab = SHAPES[size]
    folders = [root / n for n in ("instruct", "base", "tuned")]
    if all((f / "done").exists() for f in folders):
        return folders
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
        LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                    num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False,
                    dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(f)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"      # only to make the inputs faster
    g = torch.Generator(gen_device).manual_seed(0)
    groups, used = [[]], 0
    for name, shape in llama_tensors(size):
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and used + n > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += n
    index = [{} for _ in folders]
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        shards = [{}, {}, {}]
        for name, shape in group:
            i = torch.randn(shape, generator=g, device=gen_device) * 0.02
            b = i + torch.randn(shape, generator=g, device=gen_device) * 0.0005
            t = b + torch.randn(shape, generator=g, device=gen_device) * 0.0002
            for s, x in zip(shards, (i, b, t)):
                s[name] = x.to(torch.bfloat16).cpu()
        for f, s, idx in zip(folders, shards, index):
            save_file(s, f / fname, metadata={"format": "pt"})
            idx.update({n: fname for n in s})
    for f, idx in zip(folders, index):
        total = sum(os.path.getsize(p) for p in f.glob("*.safetensors"))
        (f / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": idx}))
        (f / "done").touch()
    return folders


# Where GNU time is missing (the GPU machine's image), a tiny Python process plays its part.
MEASURE = """import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[1:])
print("BENCH %.2f %d" % (time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), file=sys.stderr)
sys.exit(rc)
"""


def timed(cmd: list[str], stdout: list | None = None, **kw) -> tuple[float, float]:
    """Run a command under GNU time; return (wall seconds, peak RSS in GB); append its stdout to `stdout`.

    (rusage of a child forked from this process would count this process's own pages.)"""
    gnu = os.path.exists("/usr/bin/time")
    wrap = ["/usr/bin/time", "-f", "BENCH %e %M"] if gnu else [sys.executable, "-c", MEASURE]
    with open(os.devnull, "w") as sink:
        kw["stdout"] = subprocess.PIPE if stdout is not None else sink
        proc = subprocess.run([*wrap, *cmd], stderr=subprocess.PIPE, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {cmd}\n{proc.stderr[-2000:]}")
    if stdout is not None:
        stdout.append(proc.stdout)
    wall, kb = proc.stderr.strip().splitlines()[-1].split()[1:]
    return float(wall), int(kb) / 1024 / 1024


def best(cmd: list[str], stdout: list | None = None, rounds: int | None = None, before=None) -> tuple[float, float]:
    """The fastest of `rounds` runs of a command (wall s, its peak RSS GB); `before()` runs ahead of each round
    (e.g. removing the previous round's output); stdout keeps the fastest round's output."""
    results = []
    for _ in range(rounds or OPTIONS["rounds"]):
        if before:
            before()
        said: list[str] = []
        wall, rss = timed(cmd, stdout=said)
        results.append((wall, rss, said))
    wall, rss, said = min(results, key=lambda r: r[0])
    if stdout is not None:
        stdout += said
    return wall, rss


def durable_floor(inputs: list[str], out_bytes: int, scratch: Path) -> dict:
    """cat of the inputs (every byte read) and dd conv=fsync of out_bytes (every byte on disk), each the best of
    the rounds; their sum is the floor a durable merge cannot beat."""
    cat = ["sh", "-c", 'cat "$@" | cat > /dev/null', "sh", *inputs]
    timed(cat)                              # warm the page cache alike for everyone
    cat_wall, _ = best(cat)
    blocks = max(1, -(-out_bytes // (64 << 20)))
    dd = ["dd", "if=/dev/zero", f"of={scratch}", "bs=64M", f"count={blocks}", "conv=fsync", "status=none"]
    dd_wall, _ = best(dd, before=lambda: scratch.unlink(missing_ok=True))
    scratch.unlink(missing_ok=True)
    torch_wall, _ = best([sys.executable, "-c", IMPORT_TORCH])
    return {"cat": cat_wall, "dd": dd_wall, "floor": cat_wall + dd_wall, "torch": torch_wall}


def timeline_of(folder: Path) -> dict:
    """The stage timeline a graft left in its record (seconds per stage; wall_seconds)."""
    record = json.loads((folder / "shadowmerge.json").read_text())
    line = record.get("timeline") or {}
    return {"wall": line.get("wall_seconds"), **{k: v["seconds"] for k, v in (line.get("stages") or {}).items()}}


def mergekit_config(folders: list[Path], exact: bool) -> str:
    inst, base, tuned = folders
    lines = ["merge_method: task_arithmetic", f"base_model: {base}", "models:",
             f"  - model: {inst}", "    parameters: {weight: 1.0}",
             f"  - model: {tuned}", "    parameters: {weight: 1.0}",
             "parameters: {normalize: false}"]
    lines += ["dtype: float32", "out_dtype: bfloat16"] if exact else ["dtype: bfloat16"]
    return "\n".join(lines) + "\n"


def compare(a: Path, b: Path, inputs: list[Path]) -> tuple[int, int, int, int]:
    """(differing elements, total, of those how many a / b equal the exact reference) between two outputs."""
    def files(folder):
        return {n: f for f in folder.glob("*.safetensors") for n in safe_open(f, "pt").keys()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        raise SystemExit(f"tensor names differ between {a} and {b}")
    fi = [files(f) for f in inputs]
    diff = total = a_ref = b_ref = 0
    for name in sorted(fa):
        with safe_open(fa[name], "pt") as x, safe_open(fb[name], "pt") as y:
            ta, tb = x.get_tensor(name), y.get_tensor(name)
        mask = ta.view(torch.int16) != tb.view(torch.int16)
        n = int(mask.sum())
        if n:
            i, b, t = (safe_open(f[name], "pt").get_tensor(name) for f in fi)
            ref = (i.float() + (t.float() - b.float())).to(ta.dtype).view(torch.int16)
            a_ref += int((ta.view(torch.int16)[mask] == ref[mask]).sum())
            b_ref += int((tb.view(torch.int16)[mask] == ref[mask]).sum())
        diff += n
        total += ta.numel()
    return diff, total, a_ref, b_ref


def bench(size: str, work: Path) -> list[dict]:
    root = work / size
    t0 = time.perf_counter()
    folders = build_triple(root, size)
    print(f"[{size}] inputs ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    inputs = [str(p) for f in folders for p in sorted(f.glob("*.safetensors"))]
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out_bytes = sum(p.stat().st_size for p in folders[0].glob("*.safetensors"))
    rows = []
    bin_dir = Path(sys.executable).parent
    outs = {k: root / f"out-{k}" for k in (*DEVICES, "mergekit", "mergekit-exact")}
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    floor = durable_floor(inputs, out_bytes, root / "dd.bin")
    rows.append({"size": size, "tool": "durable floor: cat of the 3 inputs + dd conv=fsync of the output's size",
                 "wall": floor["floor"], "rss": 0.0, "floor": floor})
    print(f"[{size}] floor: cat {floor['cat']:.2f} s + dd {floor['dd']:.2f} s = {floor['floor']:.2f} s; "
          f"import torch {floor['torch']:.2f} s", flush=True)
    for dev in DEVICES:
        said: list[str] = []
        wall, rss = best([*SHADOWMERGE, "graft", "--instruct", str(folders[0]), "--base", str(folders[1]),
                          "--tuned", str(folders[2]), "--out", str(outs[dev]), "--quiet", "--shard-size", "1GB",
                          "--device", dev], stdout=said, before=lambda: shutil.rmtree(outs[dev], ignore_errors=True))
        line = timeline_of(outs[dev])
        rows.append({"size": size, "tool": f"shadowmerge graft{device_label(dev)}", "wall": wall, "rss": rss,
                     "timeline": line, "vs_floor": (wall - floor["torch"]) / floor["floor"]})
        print(f"[{size}] {rows[-1]['tool']}: {wall:.1f} s, {rss:.2f} GB; (wall - import torch) / floor = "
              f"{rows[-1]['vs_floor']:.2f}", flush=True)
        print("    " + ", ".join(f"{k} {v:.2f}" for k, v in line.items() if v is not None), flush=True)
    for dev in DEVICES[1:]:
        d, n, _, _ = compare(outs[DEVICES[0]], outs[dev], folders)
        rows.append({"size": size, "tool": f"agreement of --device {dev} with --device {DEVICES[0]}", "diff": d,
                     "total": n})
    have_mergekit = (bin_dir / "mergekit-yaml").exists() and OPTIONS["mergekit"]
    for key, exact in (("mergekit", False), ("mergekit-exact", True)) if have_mergekit else ():
        cfg = root / f"{key}.yml"
        cfg.write_text(mergekit_config(folders, exact))
        wall, rss = timed([str(bin_dir / "mergekit-yaml"), str(cfg), str(outs[key]), "--no-copy-tokenizer",
                           "--quiet"])
        label = "mergekit task_arithmetic, " + ("dtype float32 + out_dtype bf16" if exact else "default (bf16 math)")
        rows.append({"size": size, "tool": label, "wall": wall, "rss": rss})
        print(f"[{size}] {label}: {wall:.1f} s", flush=True)
    for key in ("mergekit-exact", "mergekit") if have_mergekit else ():
        d, n, a_ref, b_ref = compare(outs[DEVICES[0]], outs[key], folders)
        rows.append({"size": size, "tool": f"agreement with {key}", "diff": d, "total": n, "a_ref": a_ref,
                     "b_ref": b_ref})
    for o in outs.values():
        shutil.rmtree(o, ignore_errors=True)
    rows.append({"size": size, "tool": "input bytes", "bytes": in_bytes})
    return rows


def device_label(dev: str) -> str:
    """' --device cuda' in a row's label, nothing for a CPU-only run (the tables before GPUs read the same)."""
    return "" if DEVICES == ["cpu"] else f" --device {dev}"


def machine(extra: str = "") -> str:
    """The line every benchmark table starts with: date, machine, torch (and the GPU, where one is used)."""
    gpu = ""
    if any(d.startswith("cuda") for d in DEVICES):
        gpu = f", GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return (f"Measured {datetime.date.today()} on {platform.node()} ({os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM{gpu}), "
            f"torch {torch.__version__}, warm page cache{extra}.")


def wall_table(rows: list[dict], floor_prefix: str, floor_label: str) -> list[str]:
    """Markdown rows of wall time and RSS per command, with the ratio to the floor command of the same size."""
    out = [f"| size | command | wall s | peak RSS GB | vs {floor_label} |", "|---|---|---|---|---|"]
    floor = {r["size"]: max(r["wall"], 0.01) for r in rows if r["tool"].startswith(floor_prefix)}
    for r in rows:
        if "wall" in r:
            out.append(f"| {r['size']} | {r['tool']} | {r['wall']:.1f} | {r['rss']:.2f} | "
                       f"{r['wall'] / floor[r['size']]:.2f}x |")
    return out


def timeline_table(rows: list[dict]) -> list[str]:
    """Each graft's stage timeline (busy seconds per stage, from its record; stages overlap on threads)."""
    lines = [r for r in rows if "timeline" in r]
    if not lines:
        return []
    stages = list(dict.fromkeys(k for r in lines for k in r["timeline"]))
    out = ["", "Stage timeline of each graft (busy seconds per stage, summed over threads; `wall` is the run's own, "
               "without start-up):", "", "| size | command | " + " | ".join(stages) + " |",
           "|---|---|" + "---|" * len(stages)]
    for r in lines:
        cells = [f"{r['timeline'][k]:.2f}" if r["timeline"].get(k) is not None else "" for k in stages]
        out.append(f"| {r['size']} | {r['tool']} | " + " | ".join(cells) + " |")
    return out


def markdown(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["size"], {})[r["tool"]] = r
    out = [machine(f"; best of {OPTIONS['rounds']} rounds (mergekit: one)"), "",
           "| size | command | wall s | peak RSS GB | vs mergekit exact | (wall - import torch) / durable floor |",
           "|---|---|---|---|---|---|"]
    for size, tools in by.items():
        floor = next(r["floor"] for r in tools.values() if "floor" in r)
        exact = tools.get("mergekit task_arithmetic, dtype float32 + out_dtype bf16", {}).get("wall")
        out.append(f"| {size} | cat of the 3 inputs | {floor['cat']:.2f} | | | |")
        out.append(f"| {size} | dd conv=fsync of the output's size | {floor['dd']:.2f} | | | |")
        out.append(f"| {size} | python -c 'import torch' | {floor['torch']:.2f} | | | |")
        for tool, r in tools.items():
            if "wall" in r:
                vs = f"{r['wall'] / exact:.2f}x" if exact else "(no mergekit here)"
                gbs = f", {tools['input bytes']['bytes'] / max(r['wall'], 0.01) / 1e9:.2f} GB/s of input" \
                    if "input bytes" in tools and "floor" not in r else ""
                ratio = f"**{r['vs_floor']:.2f}**" if "vs_floor" in r else ""
                out.append(f"| {size} | {tool}{gbs} | {r['wall']:.2f} | {r['rss']:.2f} | {vs} | {ratio} |")
        for tool, r in tools.items():
            if "diff" in r and "a_ref" not in r:
                out.append(f"| {size} | shadowmerge output {tool}: {r['diff']:,} of {r['total']:,} elements differ "
                           f"| | | | |")
            elif "diff" in r:
                out.append(f"| {size} | shadowmerge output {tool}: {r['diff']:,} of {r['total']:,} elements differ "
                           f"({100 * r['diff'] / r['total']:.4f} %); of those, shadowmerge equals the exact "
                           f"reference in {r['a_ref']:,}, mergekit in {r['b_ref']:,} | | | | |")
    return "\n".join(out + timeline_table(rows)) + "\n"


def main(doc: str = __doc__, sizes=("0.5B", "2B"), run=bench, table=markdown):
    """The command line of a benchmark script: run `run` per size, print `table` of the rows."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(sizes), choices=list(SHAPES))
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("--device", nargs="+", default=["cpu"], help="run shadowmerge on each (cpu, cuda)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each command (the fastest is kept)")
    ap.add_argument("--no-mergekit", action="store_true", help="leave mergekit's rows out (it takes minutes)")
    ap.add_argument("--no-peft", action="store_true", help="bench_lora.py: leave peft's rows out")
    args = ap.parse_args()
    DEVICES[:] = args.device
    OPTIONS.update(rounds=args.rounds, mergekit=not args.no_mergekit, peft=not args.no_peft)
    rows = []
    for size in args.sizes:
        rows += run(size, args.work)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
