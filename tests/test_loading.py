"""Outputs load the ways users load them, on the tested set (constraints.txt): adapters that shadowmerge writes
(lora retarget, extract) through peft's PeftModel.from_pretrained and through transformers' own adapter loading
(load_adapter, set_adapter, active_adapters), giving the same logits; where the installed pair cannot, the
command says so in one line."""

from __future__ import annotations

import pytest
import torch

from adapters import make_adapter

PROMPT = torch.tensor([[1, 5, 6, 7, 9]])


def logits_both_ways(instruct, adapter) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32),
                                            adapter)(PROMPT).logits
        model = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32)
        model.load_adapter(str(adapter), adapter_name="shadow")
        model.set_adapter("shadow")
        assert model.active_adapters() == ["shadow"]
        by_transformers = model(PROMPT).logits
        plain = AutoModelForCausalLM.from_pretrained(instruct, dtype=torch.float32)(PROMPT).logits
    assert not torch.equal(by_peft, plain), "the adapter changed nothing"
    return by_peft, by_transformers


@pytest.mark.parametrize("command", ["retarget", "extract"])
def test_written_adapters_load_in_peft_and_in_transformers(command, make_triple, cli, tmp_path):
    inst, base, tuned = make_triple("llama", torch.float32)
    out = tmp_path / "out"
    if command == "retarget":
        adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        res = cli("lora", "retarget", adapter, "--instruct", inst, "--out", out)
    else:
        res = cli("extract", "--base", base, "--tuned", tuned, "--out", out, "--rank", "4", "--for-instruct", inst,
                  "--others", "copy", "-q")
    assert res.exit_code == 0, res.output
    assert "warning:" not in res.stderr, "the tested set must load adapters both ways"
    by_peft, by_transformers = logits_both_ways(inst, out)
    torch.testing.assert_close(by_transformers, by_peft, rtol=1e-5, atol=1e-5)


def test_a_pair_that_cannot_load_adapters_is_named(make_triple, cli, tmp_path, monkeypatch):
    """transformers >= 5.24 refuses its own adapter loading with peft < 0.22: the command says which to use."""
    import transformers.integrations.peft as tp

    monkeypatch.setattr(tp, "MIN_PEFT_VERSION", "99.0")
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    res = cli("lora", "retarget", adapter, "--instruct", inst, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    warning = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "needs peft >= 99.0" in warning[0] and "PeftModel.from_pretrained" in warning[0]
