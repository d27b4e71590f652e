"""Benchmark FP8 block checkpoints: the plan of a 671B-1T pair from headers alone, the graft's throughput on an FP8
triple against the same triple in bf16, and what `--dtype fp8` keeps of realistic updates.

1. dry run: DeepSeek-V3- and Kimi-K2-shaped checkpoints (61 decoder layers and the MTP layer; 256 / 384 routed
   experts stored one by one; every linear weight F8_E4M3 with its weight_scale_inv; 163 shards) written as
   headers over sparse files (no data on disk), the tuned model bf16 as a trainer saves it (no MTP layer, no
   scales). `shadowmerge graft --dry-run` over them: wall time and peak RSS (target: <= 5 s, <= 1 GB).
2. throughput: a Llama-shaped triple (bench_graft's shapes) with Instruct and Base quantized to FP8 blocks of
   128 x 128 and the tuned model bf16 = bf16(dq(Base)) + an update, against the bf16 triple of the same shapes:
   `shadowmerge graft` wall time, best of --rounds (target: FP8 <= 1.2x bf16).
3. what FP8 keeps: `--dtype fp8` on that FP8 triple with updates of relative size 1e-4 ... 1e-1 of the weights:
   the share of the update the FP8 output keeps along its direction (⟨dq(out) − dq(I), Δ⟩ / ‖Δ‖²), how far the output
   moved (‖dq(out) − dq(I)‖ / ‖Δ‖, re-quantization noise included) and the share of blocks that changed.

    python benchmarks/bench_fp8.py [--models deepseek-v3 kimi-k2] [--size 0.5B] [--rounds 2] [--work DIR]
                                   [--markdown out.md]

Run by hand (minutes; the dry-run inputs are sparse: ~3.5 TB apparent, nothing on disk); never in the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from bench_graft import SHADOWMERGE, best, build_triple, machine, timed  # noqa: E402

from shadowmerge.formats import fp8  # noqa: E402
from shadowmerge.formats.safetensors import build_header  # noqa: E402

BF16, F8, F32 = torch.bfloat16, fp8.FP8, torch.float32
LAYERS = {"deepseek-v3": (61, 256), "kimi-k2": (61, 384)}
H, VOCAB, DENSE, EXPERT, QL, KVL = 7168, 129280, 18432, 2048, 1536, 512


def _linear(name: str, shape, quantized: bool):
    if not quantized:
        return [(name, BF16, shape)]
    grid = tuple(-(-s // 128) for s in shape)
    return [(name, F8, shape), (name[: -len("weight")] + fp8.SCALE_SUFFIX, F32, grid)]


def deepseek_tensors(model: str, quantized: bool, mtp: bool):
    """(name, dtype, shape) of a DeepSeek-V3-architecture checkpoint (Kimi-K2: more experts)."""
    layers, experts = LAYERS[model]
    heads = 128 if model == "deepseek-v3" else 64
    out = [("model.embed_tokens.weight", BF16, (VOCAB, H))]

    def layer(i: int):
        p = f"model.layers.{i}."
        t = [(p + "input_layernorm.weight", BF16, (H,)), (p + "post_attention_layernorm.weight", BF16, (H,)),
             (p + "self_attn.q_a_layernorm.weight", BF16, (QL,)), (p + "self_attn.kv_a_layernorm.weight", BF16, (KVL,))]
        for name, shape in (("q_a_proj", (QL, H)), ("q_b_proj", (heads * 192, QL)), ("kv_a_proj_with_mqa", (576, H)),
                            ("kv_b_proj", (heads * 256, KVL)), ("o_proj", (H, heads * 128))):
            t += _linear(p + f"self_attn.{name}.weight", shape, quantized)
        if i < 3:
            for name, shape in (("gate_proj", (DENSE, H)), ("up_proj", (DENSE, H)), ("down_proj", (H, DENSE))):
                t += _linear(p + f"mlp.{name}.weight", shape, quantized)
            return t
        t += [(p + "mlp.gate.weight", BF16, (experts, H)), (p + "mlp.gate.e_score_correction_bias", F32, (experts,))]
        for e in [*range(experts), "shared"]:
            q = p + ("mlp.shared_experts." if e == "shared" else f"mlp.experts.{e}.")
            for name, shape in (("gate_proj", (EXPERT, H)), ("up_proj", (EXPERT, H)), ("down_proj", (H, EXPERT))):
                t += _linear(q + f"{name}.weight", shape, quantized)
        return t
    for i in range(layers):
        out += layer(i)
    if mtp:
        p = f"model.layers.{layers}."
        out += layer(layers)
        out += [(p + "enorm.weight", BF16, (H,)), (p + "hnorm.weight", BF16, (H,)),
                (p + "shared_head.norm.weight", BF16, (H,)), (p + "embed_tokens.weight", BF16, (VOCAB, H)),
                (p + "shared_head.head.weight", BF16, (VOCAB, H))]
        out += _linear(p + "eh_proj.weight", (H, 2 * H), quantized)
    out += [("model.norm.weight", BF16, (H,)), ("lm_head.weight", BF16, (VOCAB, H))]
    return out


def sparse_checkpoint(folder: Path, model: str, quantized: bool, mtp: bool, shards: int = 163) -> int:
    """Headers over sparse files: the checkpoint as shadowmerge's header-only work sees it. Returns its tensors."""
    if (folder / "done").exists():
        return json.loads((folder / "done").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tensors = deepseek_tensors(model, quantized, mtp)
    layers, experts = LAYERS[model]
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3" if model == "deepseek-v3" else
           "kimi_k2", "num_hidden_layers": layers, "hidden_size": H, "vocab_size": VOCAB, "n_routed_experts": experts,
           "tie_word_embeddings": False, "dtype": "bfloat16", "num_nextn_predict_layers": 1}
    if quantized:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(cfg))
    per = -(-len(tensors) // shards)
    weight_map = {}
    for k in range(shards):
        part = tensors[k * per:(k + 1) * per]
        entries = [(n, d, s, torch.Size(s).numel() * d.itemsize) for n, d, s in part]
        header, _ = build_header(entries, {"format": "pt"})
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        with open(folder / file, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(e[3] for e in entries))      # sparse: no data blocks on disk
        weight_map.update({n: file for n, _, _ in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "done").write_text(json.dumps(len(tensors)))
    return len(tensors)


def dry_runs(models: list[str], work: Path) -> list[dict]:
    rows = []
    for model in models:
        where = work / model
        counts = [sparse_checkpoint(where / "instruct", model, True, True),
                  sparse_checkpoint(where / "base", model, True, True),
                  sparse_checkpoint(where / "tuned", model, False, False)]
        said: list[str] = []
        wall, rss = best([*SHADOWMERGE, "graft", "--instruct", str(where / "instruct"), "--base", str(where / "base"),
                          "--tuned", str(where / "tuned"), "--dry-run", "-q"], stdout=said)
        rows.append({"model": model, "tensors": counts, "wall": wall, "rss": rss,
                     "plan": next((line for line in said[0].splitlines() if line.startswith("actions")), "")})
        print(rows[-1], flush=True)
    return rows


def fp8_triple(work: Path, size: str, update: float) -> list[Path]:
    """Instruct and Base of bench_graft's bf16 triple in FP8 blocks of 128; tuned = bf16(dq(Base)) + an update of
    relative size `update` (what a trainer of the FP8 Base saves)."""
    from safetensors.torch import load_file, save_file

    src = build_triple(work / f"bf16-{size}", size)
    out = [work / f"fp8-{size}" / n for n in ("instruct", "base")] + [work / f"fp8-{size}" / f"tuned-{update:g}"]
    if all((f / "done").exists() for f in out):
        return out
    g = torch.Generator().manual_seed(1)
    for k, (s, d) in enumerate(zip([src[0], src[1], src[1]], out)):
        if (d / "done").exists():
            continue
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cfg = json.loads((s / "config.json").read_text())
        if k < 2:
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                          "activation_scheme": "dynamic"}
        (d / "config.json").write_text(json.dumps(cfg))
        weight_map = {}
        for f in sorted(s.glob("*.safetensors")):
            state, new = load_file(f), {}
            for name, x in state.items():
                linear = x.dim() == 2 and "embed" not in name and "lm_head" not in name
                if k < 2 and linear:
                    q, inv = fp8.quantize(x.float(), (128, 128), False)
                    new[name], new[name[: -len("weight")] + fp8.SCALE_SUFFIX] = q, inv
                elif k == 2 and linear:
                    q, inv = fp8.quantize(x.float(), (128, 128), False)
                    b = fp8.dequantize(q, inv, (128, 128)).to(BF16)
                    new[name] = (b.float() + torch.randn(b.shape, generator=g) * update * b.float().abs().mean()
                                 ).to(BF16)
                else:
                    new[name] = x
            save_file(new, d / f.name, metadata={"format": "pt"})
            weight_map.update({n: f.name for n in new})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "done").touch()
    return out


def throughput(size: str, work: Path) -> dict:
    bf16 = build_triple(work / f"bf16-{size}", size)
    f8 = fp8_triple(work, size, 1e-2)
    out = work / "out"

    def clean():
        shutil.rmtree(out, ignore_errors=True)

    def graft(folders, *extra):
        return [*SHADOWMERGE, "graft", "--instruct", str(folders[0]), "--base", str(folders[1]), "--tuned",
                str(folders[2]), "--out", str(out), "--no-role-check", "-q", *extra]
    row = {"size": size}
    row["bf16"] = best(graft(bf16), before=clean)
    row["fp8"] = best(graft(f8), before=clean)
    row["fp8->fp8"] = best(graft(f8, "--dtype", "fp8"), before=clean)
    clean()
    print(row, flush=True)
    return row


def kept(size: str, work: Path, updates=(1e-4, 1e-3, 1e-2, 1e-1)) -> list[dict]:
    rows = []
    out = work / "out-kept"
    for u in updates:
        i, b, t = fp8_triple(work, size, u)
        shutil.rmtree(out, ignore_errors=True)
        timed([*SHADOWMERGE, "graft", "--instruct", str(i), "--base", str(b), "--tuned", str(t), "--dtype", "fp8",
               "--out", str(out), "--no-role-check", "-q"])
        rec = json.loads((out / "shadowmerge.json").read_text())["fp8"]
        rows.append({"update": u, "kept": rec["kept"], "along": rec["along"],
                     "blocks": rec["blocks_changed"] / max(rec["blocks"], 1)})
        print(rows[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def markdown(dry: list[dict], speed: dict | None, keeps: list[dict]) -> str:
    lines = [f"{machine()}", "", "| dry run over | tensors (instruct, base, tuned) | wall s | peak RSS GB |",
             "|---|---|---|---|"]
    lines += [f"| {r['model']} | {', '.join(map(str, r['tensors']))} | {r['wall']:.2f} | {r['rss']:.2f} |" for r in dry]
    if speed:
        lines += ["", f"| graft, {speed['size']} Llama-shaped triple | wall s | peak RSS GB | vs bf16 |", "|---|---|---|---|"]
        base = speed["bf16"][0]
        for key, label in (("bf16", "bf16 inputs, bf16 output"), ("fp8", "FP8 Instruct and Base, bf16 tuned -> bf16"),
                           ("fp8->fp8", "the same, --dtype fp8")):
            wall, rss = speed[key]
            lines.append(f"| {label} | {wall:.2f} | {rss:.2f} | {wall / base:.2f}x |")
    if keeps:
        lines += ["", "| update size (relative to the weights) | kept along the update ⟨out − I, Δ⟩/‖Δ‖² | output moved "
                  "‖out − I‖/‖Δ‖ | blocks changed |", "|---|---|---|---|"]
        lines += [f"| {r['update']:g} | {r['along']:.1%} | {r['kept']:.1%} | {r['blocks']:.1%} |" for r in keeps]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(LAYERS))
    ap.add_argument("--size", default="0.5B", help="the throughput triple (bench_graft's shapes); none: skip")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    import bench_graft

    bench_graft.OPTIONS["rounds"] = args.rounds
    dry = dry_runs(args.models, args.work / "fp8-headers")
    speed = throughput(args.size, args.work) if args.size != "none" else None
    keeps = kept(args.size, args.work) if args.size != "none" else []
    text = markdown(dry, speed, keeps)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
