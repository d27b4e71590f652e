"""Tiny FP8 block-quantized models, written the way DeepSeek-V3.x / Kimi-K2 / Qwen3-FP8 releases store them.

A tiny DeepseekV3ForCausalLM (multi-head latent attention, routed experts stored one by one, a shared expert, a
router with e_score_correction_bias) is built from its transformers config and saved in bf16; `to_fp8` rewrites a
folder as the releases do: every linear weight (not embeddings, lm_head, norms, the router) as F8_E4M3 with a
float32 `weight_scale_inv` per block (the block does not divide every side: partial edge blocks), a
quantization_config, optionally power-of-two (ue8m0) scales, a multi-token-prediction layer the model class does not
load (layer index num_hidden_layers), two shards and an index. The tuned model is what a trainer saves: the FP8 Base
loaded decoded, some tensors trained, saved in bf16 by transformers (no MTP layer).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shadowmerge.formats import fp8

BLOCK = (16, 16)
DEEPSEEK = dict(vocab_size=256, hidden_size=64, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=20, qk_rope_head_dim=8,
                qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1, max_position_embeddings=128,
                tie_word_embeddings=False)
_NOT_FP8 = re.compile(r"(embed_tokens|lm_head|norm|mlp\.gate\.weight|e_score_correction_bias|enorm|hnorm|"
                      r"shared_head\.head)")


def build(seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(DeepseekV3Config(**{**DEEPSEEK, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def perturb(model, scale: float, seed: int, only: str | None = None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or re.search(only, name):
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return model


def save_bf16(model, folder: Path, eos: int = 2, template: str = "instruct") -> Path:
    import tinymodels

    return tinymodels.save(model, folder, torch.bfloat16, eos=eos, template=template)


def to_fp8(folder: Path, block=BLOCK, ue8m0: bool = False, mtp: bool = True, shards: int = 2) -> Path:
    """Rewrite a saved model folder as an FP8 block-quantized release (in place)."""
    from safetensors.torch import load_file, save_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    cfg = json.loads((folder / "config.json").read_text())
    if mtp:                                   # DeepSeek's layer num_hidden_layers: the model class never loads it
        n, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
        g = torch.Generator().manual_seed(99)
        for suffix, shape in (("eh_proj.weight", (hidden, 2 * hidden)), ("enorm.weight", (hidden,)),
                              ("hnorm.weight", (hidden,)), ("shared_head.norm.weight", (hidden,)),
                              ("self_attn.q_a_proj.weight", state["model.layers.0.self_attn.q_a_proj.weight"].shape)):
            state[f"model.layers.{n}.{suffix}"] = (torch.randn(shape, generator=g) * 0.05 + (len(shape) == 1)).to(
                torch.bfloat16)
    out = {}
    for name, t in state.items():
        if t.dim() == 2 and name.endswith(".weight") and not _NOT_FP8.search(name):
            q, inv = fp8.quantize(t.float(), block, ue8m0)
            out[name] = q
            out[name[: -len("weight")] + fp8.SCALE_SUFFIX] = inv
        else:
            out[name] = t
    names = sorted(out)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: out[n].contiguous() for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": list(block), **({"scale_fmt": "ue8m0"} if ue8m0 else {})}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder as float32 values, FP8 weights dequantized by the reference formula."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    block = tuple(cfg["quantization_config"]["weight_block_size"]) if "quantization_config" in cfg else None
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    out = {}
    for name, t in state.items():
        if name.endswith(fp8.SCALE_SUFFIX):
            continue
        if t.dtype == fp8.FP8:
            out[name] = fp8.dequantize(t, state[name[: -len("weight")] + fp8.SCALE_SUFFIX], block)
        else:
            out[name] = t.float()
    return out


def pair(root: Path, ue8m0: bool = False) -> tuple[Path, Path]:
    """(instruct, base), both FP8 releases (Base = Instruct + noise), with an MTP layer."""
    inst = to_fp8(save_bf16(build(0), root / "instruct"), ue8m0=ue8m0)
    base = to_fp8(save_bf16(perturb(build(0), 0.05, 1), root / "base", eos=7, template="base"), ue8m0=ue8m0)
    return inst, base


def tuned_from(base: Path, folder: Path, trained: str = r"layers\.1\.(self_attn|mlp\.experts\.0)\.",
               scale: float = 0.02) -> Path:
    """What a trainer saves after tuning the FP8 Base: the Base loaded decoded (the reference dequantization: the
    ceil-div grid, which transformers' CPU dequantization cannot take for partial blocks) into the model class in
    bf16, the tensors matching `trained` changed, saved by transformers in bf16 (the MTP layer is not in the
    model, so it is not saved)."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    staging = folder.with_name(folder.name + ".bf16")
    staging.mkdir(parents=True)
    for p in base.iterdir():
        if p.name.endswith(".json") and "index" not in p.name:
            shutil.copyfile(p, staging / p.name)
    cfg = json.loads((staging / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (staging / "config.json").write_text(json.dumps(cfg, indent=2))
    layers = cfg["num_hidden_layers"]
    state = {n: t.to(torch.bfloat16) for n, t in dequantized(base).items()
             if not re.search(rf"layers\.{layers}\.", n)}
    save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.bfloat16)
    perturb(model, scale, 5, only=trained)
    model.save_pretrained(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, folder / name)
    shutil.rmtree(staging)
    return folder


def decoded_twin(src: Path, folder: Path) -> Path:
    """The same model as a plain bf16 folder: every weight bf16(dq(...)), no quantization_config."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({n: v.to(torch.bfloat16) for n, v in dequantized(src).items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder
