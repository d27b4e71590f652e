"""Mixture-of-experts models: peft puts LoRA on the fused 3-D expert parameters (target_parameters, which
`target_modules="all-linear"` adds on Qwen3-MoE and Mixtral); graft merges them as peft does and writes each
expert's update back into the experts the Instruct stores one by one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from adapters import make_adapter, peft_merged, ulp_distance

MOE = ["qwen3_moe", "mixtral"]


def disk_names(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return sorted(f.keys())


@pytest.mark.parametrize("patterns", [{}, {"rank_pattern": {"down_proj": 6}, "alpha_pattern": {"down_proj": 3}}],
                         ids=["plain", "patterns"])
@pytest.mark.parametrize("family", MOE)
def test_all_linear_lora_on_moe_equals_peft_merge(family, patterns, make_triple, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple(family)
    assert any(".experts.3." in n for n in disk_names(inst)), "the Hub layout: experts one by one"
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear", **patterns)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg.get("target_parameters"), "peft no longer adds target_parameters for all-linear on MoE"
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert disk_names(out) == disk_names(inst)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    I = AutoModelForCausalLM.from_pretrained(inst, dtype=torch.bfloat16).state_dict()
    want = peft_merged(inst, adapter)
    changed = set()
    for name, t in got.items():
        assert ulp_distance(t, want[name].to(torch.bfloat16)) <= 1, name
        if not torch.equal(t, I[name]):
            changed.add(name)
    assert {n.rsplit(".", 1)[-1] for n in changed if ".experts." in n} == {"gate_up_proj", "down_proj"}
    assert any(n.endswith("mlp.gate.weight") for n in changed), "the router's LoRA"
    record = json.loads((out / "shadowmerge.json").read_text())
    assert any(".experts.0." in n for n in record["grafted"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_an_adapter_peft_cannot_load_is_refused_too(make_triple, cli, tmp_path):
    """peft writes its own rank for gate_up_proj ('.*\\.gate_up_proj': 2r) before the user's pattern, and its
    loader then takes that one: a user pattern for gate_up_proj gives an adapter peft cannot load. Neither can we."""
    from conftest import run_bad

    inst, base, _ = make_triple("qwen3_moe")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear",
                           rank_pattern={"gate_up_proj": 6})
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_merged(inst, adapter)
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="says r=8 for 4 expert(s), so lora_A should have 32 rows, but it has 24")


def test_fused_experts_on_disk_are_refused_by_name(make_triple, cli, tmp_path):
    """An Instruct saved with its experts fused (the in-memory layout): not merged yet, said by name."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from conftest import run_bad

    inst, base, _ = make_triple("qwen3_moe")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((inst / "config.json").read_bytes())
    state = AutoModelForCausalLM.from_pretrained(inst, dtype=torch.bfloat16).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors", metadata={"format": "pt"})
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(fused / "model.safetensors")
    run_bad(cli, tmp_path, [fused, adapter], "--instruct", fused, "--lora", adapter,
            expect="the fused expert parameter model.layers.0.mlp.experts.")
