"""LoRA grafts against real peft: every option, the Base-dependent kinds, retarget, and bad adapters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import assert_close_to_merge, make_adapter, peft_merged, shadow_reference
from conftest import CUDA, DEVICES, run_bad, tree_digest
from tinymodels import state

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (family, instruct dtype, LoraConfig arguments)
PLAIN_CASES = {
    "plain": ("llama", torch.bfloat16, dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)),
    "plain-fp32": ("llama", torch.float32, dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR)),
    "rslora-patterns": ("llama", torch.bfloat16, dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                                     rank_pattern={"q_proj": 4}, alpha_pattern={"down_proj": 3})),
    "lora-bias": ("qwen2", torch.bfloat16, dict(r=4, lora_alpha=8, lora_bias=True,
                                                target_modules=["q_proj", "k_proj", "v_proj"])),
    "embedding": ("llama", torch.bfloat16, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])),
    "tied-embedding": ("qwen3", torch.bfloat16, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
    "fan-in-fan-out": ("gpt2", torch.bfloat16, dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                    target_modules=["c_attn", "c_proj", "c_fc"])),
}


def graft_lora(cli, inst, adapter, out, *extra):
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", out, "-q", *extra)
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_lora_graft_equals_peft_merge(case, make_triple, cli, tmp_path, device):
    family, dtype, lora_kwargs = PLAIN_CASES[case]
    inst, base, _ = make_triple(family, dtype)
    adapter = make_adapter(base, tmp_path / "adapter", **lora_kwargs)
    graft_lora(cli, inst, adapter, tmp_path / "out", "--device", device)
    out, I, B = state(tmp_path / "out"), state(inst), state(base)
    # peft's own merge of the same adapter into the Instruct (the official Shadow-FT recipe)
    peft_i = peft_merged(inst, adapter)
    shadow = shadow_reference(I, B, peft_merged(base, adapter), dtype)
    assert set(out) == set(I)
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    targeted = set(record["grafted"])
    assert targeted and record["identical_to_instruct"] == [] and record["unchanged"] == []
    for name, got in out.items():
        assert_close_to_merge(got, peft_i[name].to(dtype), device, name)
        if dtype != torch.float32:   # in float32, the reference's own rounding of B + dW - B is that large
            assert_close_to_merge(got, shadow[name], device, name, order_differs=True)   # it rounds B + dW
        if name in targeted:
            assert not torch.equal(got, I[name]), f"{name} was targeted but did not change"
        else:
            assert got.view(-1).view(torch.uint8).tolist() == I[name].view(-1).view(torch.uint8).tolist(), name


def test_lora_graft_loads_and_generates(make_triple, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    graft_lora(cli, inst, adapter, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16
    out = state(tmp_path / "out")
    for name, p in model.state_dict().items():
        assert torch.equal(p, out[name]), name
    tokens = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=5, do_sample=False)
    assert tokens.shape == (1, 8)


# name: (family, LoraConfig arguments, what the error says without --base)
BASE_CASES = {
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj", "embed_tokens"]),
             "uses DoRA"),
    "dora-fan-in-fan-out": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True,
                                         target_modules=["c_attn", "c_fc"]), "uses DoRA"),
    "modules-to-save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        "full Base-trained copies of lm_head"),
    "bias-all": ("qwen2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="all"),
                 "full Base-trained copies"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BASE_CASES)
def test_base_dependent_adapters_need_base_and_graft_the_base_update(case, make_triple, cli, tmp_path, device):
    family, lora_kwargs, why = BASE_CASES[case]
    inst, base, _ = make_triple(family)
    adapter = make_adapter(base, tmp_path / "adapter", **lora_kwargs)
    err = run_bad(cli, tmp_path, [inst, base, adapter], "--instruct", inst, "--lora", adapter, expect="pass --base")
    assert why in err
    graft_lora(cli, inst, adapter, tmp_path / "out", "--base", base, "--device", device)
    out, I, B = state(tmp_path / "out"), state(inst), state(base)
    shadow = shadow_reference(I, B, peft_merged(base, adapter), torch.bfloat16)
    changed = 0
    for name, got in out.items():      # DoRA: peft's norms are float32 sums, ours float64
        assert_close_to_merge(got, shadow[name], device, name, order_differs=True, norm_terms=max(got.shape, default=0))
        changed += not torch.equal(got, I[name])
    assert changed >= 2


def test_embedding_copy_saved_by_peft_is_not_grafted(make_triple, cli, tmp_path):
    """peft saves the Base's embedding beside an embedding LoRA; the graft must keep the Instruct's."""
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", save_embedding_layers=True, r=4, lora_alpha=8,
                           target_modules=["embed_tokens"])
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in load_file(adapter / "adapter_model.safetensors"))
    graft_lora(cli, inst, adapter, tmp_path / "out")
    I, B = state(inst), state(base)
    shadow = shadow_reference(I, B, peft_merged(base, adapter), torch.bfloat16)
    got = state(tmp_path / "out")["model.embed_tokens.weight"]
    assert_close_to_merge(got, shadow["model.embed_tokens.weight"], "cpu", "embed_tokens", order_differs=True)
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert record["adapter"]["base_copies_not_used"] == ["model.embed_tokens.weight"]


def test_alpha_exclude_and_dry_run(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--dry-run")
    assert res.exit_code == 0 and "graft" in res.output and "2 modules" not in res.output
    assert "4 modules, rank 4" in res.output and not (tmp_path / "out").exists()
    res = graft_lora(cli, inst, adapter, tmp_path / "out", "--alpha", "0.5", "--exclude", r"layers\.1\.")
    assert "2 tensor(s) the lora delta changes are not grafted" in res.output
    out, I, B = state(tmp_path / "out"), state(inst), state(base)
    merged = peft_merged(base, adapter)
    for name, got in out.items():
        if "layers.1." in name:
            assert torch.equal(got, I[name]), name
        else:
            want = (I[name].float() + 0.5 * (merged[name] - B[name].float())).to(torch.bfloat16)
            assert_close_to_merge(got, want, "cpu", name, order_differs=True)      # the reference rounds B + dW


def test_quantized_base_is_warned_about(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = graft_lora(cli, inst, adapter, tmp_path / "out")
    assert "trained against quantized weights (unsloth/llama-3-8b-bnb-4bit" in res.output


# --- bad adapters ----------------------------------------------------------------------------

def _edit_config(adapter, **changes):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapter_for_a_deeper_model_lists_the_unmatched_modules(make_triple, cli, tmp_path):
    inst, _, _ = make_triple("llama")
    _, deeper_base, _ = make_triple("llama", num_hidden_layers=3)
    adapter = make_adapter(deeper_base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    err = run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
                  expect="1 tensor(s) not in the instruct: model.layers.2.self_attn.q_proj.weight")
    assert "made for another model" in err


def test_adapter_with_wrong_shapes(make_triple, cli, tmp_path):
    inst, _, _ = make_triple("llama")
    _, other, _ = make_triple("llama", intermediate_size=96)
    adapter = make_adapter(other, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["up_proj"])
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="shapes differ for 2 tensor(s): model.layers.0.mlp.up_proj.weight: instruct [128, 64], "
                   "lora delta [96, 64]")


def test_other_adapter_types_are_refused_by_name(make_triple, cli, tmp_path):
    from peft import LoHaConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple("llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoHaConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "loha")
    run_bad(cli, tmp_path, [inst, tmp_path / "loha"], "--instruct", inst, "--lora", tmp_path / "loha",
            expect="is a LoHa adapter; shadowmerge merges LoRA adapters only")


@pytest.mark.parametrize("edit, expect", [
    (dict(init_lora_weights="pissa"), "initialised with pissa, which also changes the base weights"),
    (dict(use_qalora=True), "uses QA-LoRA (use_qalora)"),
    (dict(trainable_token_indices=[1, 2]), "uses trainable tokens (trainable_token_indices)"),
    (dict(r=16), "adapter_config.json says r=16 but lora_A has rank 4"),
    (dict(use_dora=True), "says use_dora but there is no lora_magnitude_vector"),
])
def test_adapter_config_problems(make_triple, cli, tmp_path, edit, expect):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_config(adapter, **edit)
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter, expect=expect)


def test_unknown_adapter_key_and_half_module(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(dict(tensors, **{"base_model.model.model.norm.weight": torch.ones(64)}),
              adapter / "adapter_model.safetensors")
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="key 'model.norm.weight' is neither a LoRA tensor nor in modules_to_save")
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, adapter / "adapter_model.safetensors")
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="module model.layers.1.self_attn.q_proj has lora_A but not both")


def test_lm_head_lora_on_a_tied_instruct_is_refused(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("qwen2")
    untied = make_triple("qwen2", tie_word_embeddings=False)[1]
    adapter = make_adapter(untied, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="changes lm_head.weight, but the instruct ties it to the input embedding")
    res = graft_lora(cli, inst, adapter, tmp_path / "out", "--exclude", "lm_head")
    assert "1 tensor(s) the lora delta changes are not grafted" in res.output


def test_lora_argument_mistakes(make_triple, cli, tmp_path):
    inst, base, tuned = make_triple("llama")
    # (--tuned with --lora is two updates grafted at once since issue 35: tests/test_multi.py)
    run_bad(cli, tmp_path, [inst, tuned], "--instruct", inst, "--lora", tuned,
            expect="no adapter_config.json; pass a PEFT adapter folder (saved with save_pretrained); it looks like "
                   "a full model: pass it as --tuned")


# --- retarget ---------------------------------------------------------------------------------

def test_retarget_points_the_adapter_at_the_instruct(make_triple, cli, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    before = tree_digest(adapter, inst)
    res = cli("lora", "retarget", adapter, "--instruct", inst, "--out", tmp_path / "retargeted")
    assert res.exit_code == 0, res.output
    assert tree_digest(adapter, inst) == before
    out = tmp_path / "retargeted"
    assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(inst.absolute())
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")       # a local Instruct is named in the text, not as base_model
    assert card.data.base_model is None and "shadow-ft" in card.data.tags and card.data.library_name == "peft"
    assert str(inst.absolute()) in card.text and "retargeted, unchanged" in card.text
    assert json.loads((out / "shadowmerge.json").read_text())["retargeted_to"] == str(inst.absolute())
    # peft loads it onto the Instruct and it behaves as the original adapter does there
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(inst, dtype=torch.float32), out)
    merged = model.merge_and_unload().state_dict()
    for name, want in peft_merged(inst, adapter).items():
        assert torch.equal(merged[name], want), name


def test_retarget_refuses_dora_and_mismatches(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    dora = make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    run_bad(cli, tmp_path, [inst, dora], dora, "--instruct", inst, command=("lora", "retarget"),
            expect="cannot retarget: the adapter uses DoRA")
    _, deeper, _ = make_triple("llama", num_hidden_layers=3)
    adapter = make_adapter(deeper, tmp_path / "deeper", r=4, lora_alpha=8, target_modules=["q_proj"])
    run_bad(cli, tmp_path, [inst, adapter], adapter, "--instruct", inst, command=("lora", "retarget"),
            expect="tensor names differ")


def _edit_tensors(adapter, fn):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit, expect", [
    (lambda t: t.update({f"{Q0}.lora_A.bias": torch.ones(4)}), "only lora_B has a bias"),
    (lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 64, 1, 1)}), "LoRA on a convolution"),
    (lambda t: t.update({f"{Q0}.lora_A.weight": torch.ones(4, 64, dtype=torch.int8)}),
     "a quantized adapter cannot be merged exactly"),
    (lambda t: t.update({f"{Q0}.lora_B.weight": torch.ones(64, 3)}), "lora_A has rank 4 but lora_B has 3 columns"),
    (lambda t: t.update({f"{Q0}.lora_B.bias": torch.ones(7)}), "lora_B bias has shape [7], expected [64]"),
])
def test_malformed_adapter_tensors(make_triple, cli, tmp_path, edit, expect):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_tensors(adapter, edit)
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter, expect=expect)


def test_adapter_files_missing_unreadable_or_pickled(make_triple, cli, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple("llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    run_bad(cli, tmp_path, [inst, tmp_path / "pickled"], "--instruct", inst, "--lora", tmp_path / "pickled",
            expect="only pickle weights (adapter_model.bin); pass --allow-pickle")
    run_bad(cli, tmp_path, [inst, tmp_path / "pickled"], "--instruct", inst, "--lora", tmp_path / "pickled",
            "--allow-pickle", expect="the lora update is zero in every grafted tensor")   # read: untrained (B = 0)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_config(adapter, r=0)
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="adapter_config.json r is 0; it must be a positive integer")
    (adapter / "adapter_config.json").write_text("[1, 2]")
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="adapter_config.json is a list, not a JSON object")
    (adapter / "adapter_config.json").write_text("{")
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter, expect="adapter_config.json is not valid JSON")
    adapter = make_adapter(base, tmp_path / "adapter2", r=4, lora_alpha=8, target_modules=["q_proj"])
    (adapter / "adapter_model.safetensors").unlink()
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="no adapter_model.safetensors; pass a PEFT adapter folder")


def test_base_that_does_not_fit_the_adapter(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    dora = make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    # a Base of another size
    _, other, _ = make_triple("llama", intermediate_size=96)
    plain = make_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["up_proj"])
    run_bad(cli, tmp_path, [inst, plain, other], "--instruct", inst, "--lora", plain, "--base", other,
            expect="shape differs for model.layers.0.mlp.up_proj.weight: base [96, 64], adapter [128, 64]")
    # a Base without the tensor DoRA needs, and one where it is not floating point
    for name, value in (("missing", None), ("int", torch.ones(64, 64, dtype=torch.int8))):
        broken = tmp_path / f"base-{name}"
        broken.mkdir()
        for f in base.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        tensors = load_file(broken / "model.safetensors")
        if value is None:
            del tensors["model.layers.1.self_attn.q_proj.weight"]
        else:
            tensors["model.layers.1.self_attn.q_proj.weight"] = value
        save_file(tensors, broken / "model.safetensors")
        expect = "has no tensor model.layers.1.self_attn.q_proj.weight" if value is None else "is torch.int8"
        run_bad(cli, tmp_path, [inst, dora, broken], "--instruct", inst, "--lora", dora, "--base", broken,
                expect=expect)


def test_adapter_inconsistencies_needing_base(make_triple, cli, tmp_path):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_config(adapter, modules_to_save=["q_proj"])
    _edit_tensors(adapter, lambda t: t.update({f"{Q0}.weight": torch.ones(64, 64)}))
    run_bad(cli, tmp_path, [inst, adapter, base], "--instruct", inst, "--lora", adapter, "--base", base,
            expect="model.layers.0.self_attn.q_proj.weight is both LoRA-adapted and saved in full")


def test_dora_on_a_resized_embedding_is_refused(make_triple, cli, tmp_path):
    inst, _, _ = make_triple("llama", vocab_size=300)
    _, base, _ = make_triple("llama")
    dora = make_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])
    run_bad(cli, tmp_path, [inst, dora, base], "--instruct", inst, "--lora", dora, "--base", base, "--vocab", "common",
            expect="a DoRA update normalises over all 256 rows, but the instruct has 300")


def test_adapter_name_in_keys_is_accepted(make_triple, cli, tmp_path):
    """Keys saved with the adapter name (lora_A.default.weight) merge like peft's own (lora_A.weight)."""
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    graft_lora(cli, inst, adapter, tmp_path / "plain")
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()},
              named / "adapter_model.safetensors")
    graft_lora(cli, inst, named, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_untrained_adapter_is_refused(make_triple, cli, tmp_path):
    """A freshly initialised adapter (lora_B = 0) changes nothing: an error, never a copy of the Instruct."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    inst, base, _ = make_triple("llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    run_bad(cli, tmp_path, [inst, tmp_path / "adapter"], "--instruct", inst, "--lora", tmp_path / "adapter",
            expect="the lora update is zero in every grafted tensor (an untrained adapter), so the output would "
                   "be a copy of the instruct; nothing was written")


def test_update_below_output_precision_is_refused_or_reported(make_triple, cli, tmp_path):
    """Below the output precision in every grafted tensor: an error (the output would be the Instruct again);
    in some of them: a warning and the record's list."""
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    _edit_tensors(adapter, lambda t: t.update({k: v * 1e-9 for k, v in t.items() if "lora_B" in k}))
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
            expect="the lora update is below the output dtype's precision in every grafted tensor")
    adapter = make_adapter(base, tmp_path / "adapter2", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _edit_tensors(adapter, lambda t: t.update({k: v * 1e-9 for k, v in t.items() if "q_proj.lora_B" in k}))
    res = graft_lora(cli, inst, adapter, tmp_path / "out")
    assert "2 grafted tensor(s) came out identical to the instruct's (the update is below the output dtype's " \
           "precision)" in res.output
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert len(record["identical_to_instruct"]) == 2 and record["unchanged"] == []


@pytest.mark.gpu
@CUDA
def test_gpu_products_stay_float32_whatever_the_process_set(make_triple, cli, tmp_path, monkeypatch):
    """TF32 turned on by the caller (or a library) must not reach the graft: float32 output within 1 ulp of peft."""
    inst, base, _ = make_triple("llama", torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        graft_lora(cli, inst, adapter, tmp_path / "out", "--device", "cuda")
        assert torch.get_float32_matmul_precision() == "high"          # the caller's setting is given back
    finally:
        torch.set_float32_matmul_precision(saved)
    peft_i = peft_merged(inst, adapter)
    for name, got in state(tmp_path / "out").items():
        assert_close_to_merge(got, peft_i[name], "cuda", name)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter, "--device", "cuda",
            out_name="out2", expect="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set")
