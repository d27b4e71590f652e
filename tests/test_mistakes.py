"""The mistakes users make, run as a user runs them (the real `shadowmerge` process): a clear one-line error,
exit 1, nothing written, every input and the user's folders intact; never a wrong model with exit 0.

The inputs are real: a tiny Instruct and Base, and a tuned model made by transformers' own Trainer from
that Base (so it carries training_args.bin, as a user's fine-tune does).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinymodels
from adapters import make_adapter
from conftest import one_line_error, tree_digest

SHADOWMERGE = str(Path(sys.executable).parent / "shadowmerge")
ROLES = ("instruct", "base", "tuned")


def shadowmerge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([SHADOWMERGE, *map(str, args)], capture_output=True, text=True, timeout=300)


def expect_refusal(res, tmp_path, listing, inputs, before, expect: str) -> str:
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    err = one_line_error(res.stderr, expect)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "output or temporary folder left behind"
    assert tree_digest(*inputs) == before, "an input was modified"
    return err


def fine_tune(base: Path, folder: Path, lr: float, steps: int = 20) -> Path:
    """The Base tuned by transformers' Trainer on random token sequences, saved with save_model."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 200, (32, 16), generator=g)]
    args = TrainingArguments(output_dir=str(folder.parent / "trainer"), max_steps=steps, learning_rate=lr,
                             per_device_train_batch_size=8, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(str(folder))
    return folder


@pytest.fixture(scope="module", params=["small update", "large update"])
def real_triple(request, tmp_path_factory):
    """(instruct, base, tuned): the update small against the Base-Instruct gap (a usual fine-tune), or half
    of it (geometry alone tells every role apart)."""
    root = tmp_path_factory.mktemp("triple")
    inst, base, _ = tinymodels.triple(root, "llama", torch.bfloat16)
    lr = 1e-5 if request.param == "small update" else 3e-5
    return inst, base, fine_tune(base, root / "tuned", lr)


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))),
                         ids=lambda o: "-".join(ROLES[k] for k in o))
def test_every_permutation_of_real_inputs(real_triple, tmp_path, order):
    """Passed as --instruct/--base/--tuned in this order: only the right one grafts; each other is refused in one
    line that says which flags look exchanged, and --no-role-check overrides it."""
    given = [real_triple[k] for k in order]
    before, listing = tree_digest(*real_triple), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", given[0], "--base", given[1], "--tuned", given[2],
                      "--out", tmp_path / "out", "-q")
    if order == (0, 1, 2):
        assert res.returncode == 0, res.stderr
        return
    err = expect_refusal(res, tmp_path, listing, real_triple, before, "--no-role-check")
    moved = [f"--{ROLES[k]}" for k in range(3) if order[k] != k]
    if len(moved) == 2:
        assert f"{moved[0]} and {moved[1]} look exchanged" in err, err
    else:
        assert "look rotated" in err and all(f"--{r} looks like the {ROLES[order[k]]} model" in err
                                             for k, r in enumerate(ROLES)), err
    if order == (0, 2, 1):           # the override, once: --base and --tuned exchanged on purpose
        res = shadowmerge("graft", "--instruct", given[0], "--base", given[1], "--tuned", given[2],
                          "--out", tmp_path / "out", "-q", "--no-role-check")
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("same", ["tuned=base", "base=instruct", "tuned=instruct"])
def test_one_model_in_two_roles_is_refused(make_triple, tmp_path, same):
    inst, base, tuned = make_triple("llama")
    roles = {"instruct": inst, "base": base, "tuned": tuned}
    a, b = same.split("=")
    roles[a] = roles[b]
    before, listing = tree_digest(inst, base, tuned), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", *(x for r in ROLES for x in (f"--{r}", roles[r])), "--out", tmp_path / "out", "-q")
    err = expect_refusal(res, tmp_path, listing, (inst, base, tuned), before, "are the same model")
    assert f"--{b}" in err and f"--{a}" in err


def test_an_update_that_is_zero_everywhere_is_an_error(make_triple, tmp_path):
    """--tuned a copy of --base (another folder, the same weights): no output that is just the Instruct again."""
    import shutil

    inst, base, _ = make_triple("llama")
    copy = tmp_path / "copy-of-base"
    shutil.copytree(base, copy)
    before, listing = tree_digest(inst, base, copy), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", copy, "--out", tmp_path / "out", "-q")
    expect_refusal(res, tmp_path, listing, (inst, base, copy), before,
                   "update is zero in every grafted tensor (--tuned holds the same weights as --base)")


def test_an_update_below_the_output_precision_is_an_error(make_triple, tmp_path):
    """A bf16 Instruct and an update of 2^-20 of the weights: every grafted tensor comes out bit for bit the
    Instruct's, so the graft would only copy it."""
    import shutil

    from safetensors.torch import load_file, save_file

    inst, base, _ = make_triple("llama")
    tuned = tmp_path / "tuned-tiny"
    shutil.copytree(base, tuned)
    sd = load_file(tuned / "model.safetensors")
    save_file({k: v.float() * (1 + 2 ** -20) for k, v in sd.items()}, tuned / "model.safetensors",
              metadata={"format": "pt"})
    before, listing = tree_digest(inst, base, tuned), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out", "-q")
    expect_refusal(res, tmp_path, listing, (inst, base, tuned), before, "below the output dtype's precision")


def test_an_adapter_passed_as_tuned_says_pass_it_as_lora(make_triple, tmp_path):
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    before, listing = tree_digest(inst, base, adapter), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", adapter, "--out", tmp_path / "out", "-q")
    expect_refusal(res, tmp_path, listing, (inst, base, adapter), before,
                   "this looks like a LoRA adapter (adapter_config.json, no config.json): pass it as --lora")


@pytest.mark.parametrize("command", ["lora retarget", "graft --lora"])
def test_an_adapter_onto_its_own_base_is_refused(make_triple, tmp_path, command):
    """--instruct given the model the adapter names as its base: "retargeting" it there changes nothing, and a
    graft there is the plain LoRA merge into the Base, not Shadow-FT."""
    inst, base, _ = make_triple("llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    before, listing = tree_digest(inst, base, adapter), sorted(p.name for p in tmp_path.iterdir())
    if command == "lora retarget":
        res = shadowmerge("lora", "retarget", adapter, "--instruct", base, "--out", tmp_path / "out")
    else:
        res = shadowmerge("graft", "--instruct", base, "--lora", adapter, "--out", tmp_path / "out", "-q")
    expect_refusal(res, tmp_path, listing, (inst, base, adapter), before,
                   "is the model the adapter was trained on (its base_model_name_or_path)")


def test_force_keeps_a_users_own_folder(make_triple, tmp_path):
    inst, base, tuned = make_triple("llama")
    mywork = tmp_path / "mywork"
    mywork.mkdir()
    (mywork / "notes.txt").write_text("three weeks of notes")
    before, listing = tree_digest(inst, base, tuned, mywork), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", mywork, "--force", "-q")
    expect_refusal(res, tmp_path, listing, (inst, base, tuned, mywork), before,
                   f"{mywork} was not written by shadowmerge")
    assert (mywork / "notes.txt").read_text() == "three weeks of notes"


def test_output_for_people_in_a_log_file(make_triple, tmp_path):
    """stderr to a file or a pipe: one plain line per stage, no carriage-return bar updates."""
    import re

    inst, base, tuned = make_triple("llama")
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and re.search(r"^graft: [\d.]+ [KMGT]?i?B in [\d.]+ s \(", res.stderr, re.M), res.stderr
    res = shadowmerge("similarity", "--base", base, "--instruct", inst, "--out", tmp_path / "sim",
                      "--matrix", "model.layers.0.mlp.up_proj.weight")
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and re.search(r"^similarity: ", res.stderr, re.M), res.stderr
    svg = next((tmp_path / "sim").glob("*matrix.svg")).read_text()
    assert "max |I − B| = " in svg, "the zoomed difference panel must say how large the difference is"


def test_outputs_never_carry_the_instructs_own_description(make_triple, tmp_path):
    """The Instruct's PROVENANCE.txt (or card, or training records) describe the Instruct, not the output."""
    inst, base, tuned = make_triple("llama")
    (inst / "PROVENANCE.txt").write_text("converted from GGUF by hand")
    (inst / "trainer_state.json").write_text("{}")
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & {"PROVENANCE.txt", "trainer_state.json"} and "tokenizer_config.json" in names


@pytest.mark.parametrize("with_instruct", [False, True], ids=["alone", "for-instruct"])
def test_extract_refuses_base_and_tuned_exchanged(real_triple, tmp_path, with_instruct):
    inst, base, tuned = real_triple
    extra = ["--for-instruct", inst] if with_instruct else []
    before, listing = tree_digest(*real_triple), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("extract", "--base", tuned, "--tuned", base, *extra, "--rank", "2", "--out", tmp_path / "lora",
                      "-q")
    expect_refusal(res, tmp_path, listing, real_triple, before, "--base and --tuned look exchanged")
    res = shadowmerge("extract", "--base", base, "--tuned", tuned, *extra, "--rank", "2", "--out", tmp_path / "lora",
                      "-q")
    assert res.returncode == 0, res.stderr


def test_out_on_proc_says_what_is_wrong(make_triple, tmp_path):
    inst, base, tuned = make_triple("llama")
    before, listing = tree_digest(inst, base, tuned), sorted(p.name for p in tmp_path.iterdir())
    res = shadowmerge("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--out", "/proc/x", "-q")
    err = expect_refusal(res, tmp_path, listing, (inst, base, tuned), before,
                         "is on a virtual filesystem (like /proc or /sys) that cannot hold files")
    assert "disk space" not in err
