"""Vision-language models: peft adapters use the loaded model's names (model.language_model.*), checkpoints
store others (language_model.model.*, visual.*); graft maps them with transformers' conversion mapping and
merges exactly as peft does, keeping the Instruct's on-disk layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tinymodels as tm
from adapters import make_adapter, peft_merged, ulp_distance
from conftest import run_bad

LM_ONLY = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# checkpoint names that differ from the loaded model's, per family (as save_pretrained writes them)
RENAMED = {"gemma3": True, "gemma3-hub": True, "mllama": True, "qwen2_vl": True, "qwen2_5_vl": True, "qwen3_vl": False}
# the layout of the Hub's own checkpoints, where it differs from what save_pretrained writes here
HUB_PREFIXES = {"gemma3-hub": ("vision_tower.", "vision_tower.vision_model.")}


def disk_names(folder):
    with safe_open(folder / "model.safetensors", "pt") as f:
        return sorted(f.keys())


def to_hub_layout(folder, old, new):
    tensors = load_file(folder / "model.safetensors")
    save_file({(new + k[len(old):] if k.startswith(old) else k): v for k, v in tensors.items()},
              folder / "model.safetensors", metadata={"format": "pt"})


def vlm_pair(tmp_path, case):
    family = case.split("-")[0]
    inst, base = tm.vlm_triple(tmp_path, family)
    if case in HUB_PREFIXES:
        for folder in (inst, base):
            to_hub_layout(folder, *HUB_PREFIXES[case])
    return inst, base


@pytest.mark.parametrize("targets", ["language-model", "all-linear"])
@pytest.mark.parametrize("case", list(RENAMED))
def test_vlm_lora_graft_equals_peft_merge(case, targets, cli, tmp_path):
    from transformers import AutoModelForImageTextToText as Auto

    inst, base = vlm_pair(tmp_path, case)
    if case in HUB_PREFIXES:
        assert any(n.startswith(HUB_PREFIXES[case][1]) for n in disk_names(inst))
    adapter = make_adapter(base, tmp_path / "adapter", auto=Auto, r=4, lora_alpha=8,
                           target_modules=LM_ONLY if targets == "language-model" else "all-linear")
    res = cli("graft", "--instruct", inst, "--lora", adapter, "--out", tmp_path / "out", "-q")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert disk_names(out) == disk_names(inst), "the output must keep the Instruct's on-disk layout"
    record = json.loads((out / "shadowmerge.json").read_text())
    assert (record["adapter"]["renamed_to_checkpoint_names"] > 0) == RENAMED[case]
    got = Auto.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    I = Auto.from_pretrained(inst, dtype=torch.bfloat16).state_dict()
    want = peft_merged(inst, adapter, auto=Auto)
    changed = set()
    for name, t in got.items():
        assert ulp_distance(t, want[name].to(torch.bfloat16)) <= 1, name
        if not torch.equal(t, I[name]):
            changed.add(name)
    assert any(".language_model." in n for n in changed)
    vision = {n for n in changed if ".language_model." not in n and "lm_head" not in n}
    assert bool(vision) == (targets == "all-linear"), sorted(vision)[:3]
    if targets == "all-linear":     # the same names decide whether the adapter fits the Instruct unmerged
        res = cli("lora", "retarget", adapter, "--instruct", inst, "--out", tmp_path / "retargeted")
        assert res.exit_code == 0, res.output
    model = Auto.from_pretrained(out)
    ids = model.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 8)


def test_adapter_of_another_model_is_refused_not_copied(make_triple, cli, tmp_path):
    """Nothing of the adapter fits: an error naming the mismatch, never a hint that leads to a plain copy."""
    inst, _ = tm.vlm_triple(tmp_path / "vlm", "gemma3")
    _, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    err = run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
                  expect="none of its 4 target(s) is in the instruct")
    assert "--exclude" not in err


def test_filters_that_leave_nothing_to_graft_are_an_error(cli, tmp_path):
    from transformers import AutoModelForImageTextToText as Auto

    inst, base = tm.vlm_triple(tmp_path / "vlm", "gemma3")
    adapter = make_adapter(base, tmp_path / "adapter", auto=Auto, r=4, lora_alpha=8, target_modules=LM_ONLY)
    run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter, "--exclude", "language_model",
            expect="nothing to graft (--include/--exclude leave out every tensor with a delta)")


@pytest.mark.parametrize("edit", [
    lambda c: c["text_config"].update(num_hidden_layers=10**9),          # would build a billion layers
    lambda c: c["vision_config"].update(num_hidden_layers=2**40),
    lambda c: c.update(auto_map={"AutoConfig": "evil.Config"}, architectures=["EvilModel"]),  # remote code
    lambda c: c.update(architectures=["os.system"]),
])
def test_hostile_configs_never_build_a_huge_or_foreign_model(edit, cli, tmp_path):
    """Mapping names builds the model class on the meta device: a stranger's config must not make that loop for
    minutes or run code; the names are then compared as they are, and the error says what does not fit."""
    import signal

    from transformers import AutoModelForImageTextToText as Auto

    inst, base = tm.vlm_triple(tmp_path / "vlm", "gemma3")
    adapter = make_adapter(base, tmp_path / "adapter", auto=Auto, r=4, lora_alpha=8, target_modules=LM_ONLY)
    cfg = json.loads((inst / "config.json").read_text())
    edit(cfg)
    (inst / "config.json").write_text(json.dumps(cfg))
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(120)
    try:
        run_bad(cli, tmp_path, [inst, adapter], "--instruct", inst, "--lora", adapter,
                expect="transformers cannot say how it loads the instruct")
    finally:
        signal.alarm(0)
