"""Mixture-of-experts models: peft puts LoRA on the fused 3-D expert parameters (target_parameters, which
`target_modules="all-linear"` adds on Qwen3-MoE and Mixtral); graft merges them as peft does and writes each
expert's update back into the experts the Instruct stores one by one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from adapters import assert_close_to_merge, make_adapter, peft_merged, ulp_distance

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


@pytest.fixture
def busy_machine():
    """Every core spinning in another process while the test runs (a loaded CI machine, a training job)."""
    import os
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("family", MOE)
def test_peft_all_linear_moe_adapter_grafts_on_a_busy_machine(family, make_triple, cli, tmp_path, busy_machine):
    """peft writes rank_pattern {'.*\\.gate_up_proj': 2r} itself; the time a busy machine spends opening the
    models must not be charged to that pattern (it was refused as catastrophic backtracking)."""
    inst, base, _ = make_triple(family)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    assert json.loads((adapter / "adapter_config.json").read_text()).get("rank_pattern"), "peft's own pattern"
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    want = peft_merged(inst, adapter)
    for name, t in got.items():
        assert ulp_distance(t, want[name].to(torch.bfloat16)) <= 1, name


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


def fused_copy(inst, folder, dtype=torch.bfloat16):
    """The Instruct saved in the in-memory layout (experts fused), as some tools write it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir()
    (folder / "config.json").write_bytes((inst / "config.json").read_bytes())
    state = AutoModelForCausalLM.from_pretrained(inst, dtype=dtype).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("pieces", [None, (100, 64)], ids=["whole", "small-pieces"])
@pytest.mark.parametrize("case", ["gpt_oss", "qwen3_moe-fused"])
def test_lora_on_experts_fused_on_disk_equals_peft_merge(case, pieces, make_triple, cli, tmp_path, monkeypatch):
    """GPT-OSS stores its experts fused, (experts, in, out); a Qwen3-MoE saved in the in-memory layout stores
    them fused (experts, out, in). Pieces cut inside experts and rows, and factors read in blocks, must not change
a bit."""
    from transformers import AutoModelForCausalLM

    if pieces:
        from shadowmerge import engine
        from shadowmerge.lora import entries

        run = engine.run
        monkeypatch.setattr(engine, "run", lambda *a, **k: run(*a, **k, chunk_elements=pieces[0]))
        monkeypatch.setattr(entries, "TILE_ELEMENTS", pieces[1])
        monkeypatch.setattr(entries, "BLOCK_ELEMENTS", pieces[1] // 4)      # factors read in blocks (Wide)
    family = case.split("-")[0]
    inst, base, _ = make_triple(family)
    if case.endswith("fused"):
        inst = fused_copy(inst, tmp_path / "fused")
    targets = dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]) \
        if family == "gpt_oss" else dict(target_modules="all-linear")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, **targets)
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    assert disk_names(tmp_path / "out") == disk_names(inst)
    assert any(".experts.gate_up_proj" in n for n in disk_names(inst))
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    I = AutoModelForCausalLM.from_pretrained(inst, dtype=torch.bfloat16).state_dict()
    want = peft_merged(inst, adapter)
    for name, t in got.items():
        assert_close_to_merge(t, want[name].to(torch.bfloat16), "cpu", name, order_differs=bool(pieces))
    assert not torch.equal(got["model.layers.1.mlp.experts.down_proj"], I["model.layers.1.mlp.experts.down_proj"])
    assert not torch.equal(got["model.layers.0.mlp.experts.gate_up_proj"][3],
                           I["model.layers.0.mlp.experts.gate_up_proj"][3])
