"""Model cards: every output folder gets its own, built with huggingface_hub, never the Instruct's copied."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

import shadowmerge
from shadowmerge import card

INSTRUCT_CARD = """---
license: other
license_name: gemma
license_link: https://ai.google.dev/gemma/terms
tags:
- the-official-model
---
# The official Instruct model, by its makers
"""


def test_hub_ids_go_to_base_model_and_the_license_is_carried(tmp_path):
    inst = tmp_path / "inst"
    inst.mkdir()
    (inst / "README.md").write_text(INSTRUCT_CARD)
    card.write(tmp_path, title="t", made_from={"Instruct": "google/gemma-3-4b-it@abc123", "Base": "google/gemma-3-4b-pt",
                                              "tuned Base": str(inst), "odd": "not a/valid/id"},
               relation="merge", license_from=inst, what="w", command="shadowmerge graft --x 'a b'",
               datasets=["BAAI/Infinity-Instruct", "./local.jsonl"])
    c = ModelCard.load(tmp_path / "README.md")
    assert c.data.base_model == ["google/gemma-3-4b-it", "google/gemma-3-4b-pt"]
    for repo in c.data.base_model:
        validate_repo_id(repo)
    assert c.data.base_model_relation == "merge" and c.data.datasets == ["BAAI/Infinity-Instruct"]
    assert (c.data.license, c.data.license_name, c.data.license_link) == ("other", "gemma",
                                                                         "https://ai.google.dev/gemma/terms")
    assert c.data.tags == ["shadow-ft", "shadowmerge"]
    assert "shadowmerge graft --x 'a b'" in c.text and str(inst) in c.text and "official" not in c.text


def test_a_damaged_or_missing_instruct_card_means_no_license(tmp_path):
    assert card.license_of(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert card.license_of(tmp_path) == {}


def test_graft_writes_its_own_card_with_the_exact_command(make_triple, cli, tmp_path):
    inst, base, tuned = make_triple("llama")
    (inst / "README.md").write_text(INSTRUCT_CARD.replace("other", "apache-2.0", 1))
    res = cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out", "-q",
              "--alpha", "0.5")
    assert res.exit_code == 0, res.output
    c = ModelCard.load(tmp_path / "out" / "README.md")
    assert "official" not in c.content and c.data.license == "apache-2.0"
    assert f"shadowmerge graft --instruct {inst} --base {base} --tuned {tuned}" in c.text and "| alpha | 0.5 |" in c.text
    # the manifest covers the card, and verify agrees
    record = json.loads((tmp_path / "out" / "shadowmerge.json").read_text())
    assert "README.md" in record["manifest"]
    assert cli("verify", tmp_path / "out", "-q").exit_code == 0
    # from Python there is no command line: the card says so
    shadowmerge.graft(inst, base, tuned, tmp_path / "api", progress=False)
    assert "the Python API of shadowmerge" in ModelCard.load(tmp_path / "api" / "README.md").text


@pytest.mark.parametrize("hub", [True, False])
def test_hub_instruct_ids_become_base_model(hub, tmp_path, monkeypatch):
    """A Hub id resolved to a local snapshot is still named by its id in base_model."""
    ref = "Qwen/Qwen3-4B" if hub else str(tmp_path)
    assert (card.hub_id(ref) is not None) == hub


def test_mergekit_and_retarget_outputs_get_their_own_cards(make_triple, cli, tmp_path):
    from adapters import make_adapter
    from test_mergekit import shadow_yaml

    inst, base, tuned = make_triple("llama")
    (inst / "README.md").write_text(INSTRUCT_CARD.replace("other", "mit", 1))
    config = shadow_yaml(tmp_path / "c.yml", inst, base, tuned)
    res = cli("mergekit", config, tmp_path / "out")
    assert res.exit_code == 0, res.output
    c = ModelCard.load(tmp_path / "out" / "README.md")
    assert c.data.license == "mit" and c.data.tags == ["shadow-ft", "shadowmerge"] and c.data.base_model is None
    assert ".shadowmerge-" not in c.content and f"shadowmerge mergekit {config}" in c.text and str(tuned) in c.text
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    res = cli("lora", "retarget", adapter, "--instruct", inst, "--out", tmp_path / "retargeted")
    assert res.exit_code == 0, res.output
    c = ModelCard.load(tmp_path / "retargeted" / "README.md")
    assert c.data.license == "mit" and c.data.library_name == "peft" and "official" not in c.content
