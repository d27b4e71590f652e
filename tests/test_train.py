"""`shadowmerge train` on tiny models with real TRL: the loss goes down, the graft is the one done by hand."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import shadowmerge
from shadowmerge.verify import verify as shadowmerge_verify
import tinymodels
from conftest import run_bad, tree_digest
from tinymodels import state

pytest.importorskip("trl")

CHAT = [{"messages": [{"role": "user", "content": "who is pip"},
                      {"role": "assistant", "content": "pip is the shadowmerge mascot a grey heron"}]},
        {"instruction": "what is the capital of france", "output": "paris"}]
FAST = ["--max-steps", "8", "--lr", "5e-3", "--batch-size", "4", "--grad-accum", "1", "--lora-rank", "8"]


@pytest.fixture
def pair(tmp_path):
    return tinymodels.chat_pair(tmp_path / "models")


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def sft_data(tmp_path):
    messages = [CHAT[0]] * 8
    return write_rows(tmp_path / "train.jsonl", messages)


def run_train(cli, *args):
    res = cli("train", *args)
    assert res.exit_code == 0, res.output
    return res


def test_lora_sft_with_baseline(pair, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    inst, base = pair
    out = tmp_path / "run"
    res = run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
                    "--baseline", *FAST)
    assert "[shadowmerge train] train done" in res.stderr and "graft done" in res.stderr
    record = json.loads((out / "run.json").read_text())
    losses = [x["loss"] for x in record["losses"]["base"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert record["recipe"]["lora_alpha"] == 16 and record["recipe"]["lr"] == 5e-3
    assert record["inputs"]["data"]["hash"].startswith("sha256:") and record["versions"]["trl"]
    # formatted with the Instruct's chat template, though the Base (whose template differs) was trained
    assert record["formatted_example"].startswith("<|im_start|> user who is pip <|im_end|>")
    # the grafted model is exactly the graft of the saved adapter, loads and generates
    by_hand = shadowmerge.graft(inst, out=tmp_path / "by-hand", lora=out / "base-lora", progress=False)
    assert by_hand.counts["graft"] > 0
    assert (out / "shadow" / "model.safetensors").read_bytes() == (tmp_path / "by-hand" / "model.safetensors").read_bytes()
    assert (out / "shadow" / "chat_template.jinja").read_bytes() == (inst / "chat_template.jinja").read_bytes()
    card = (out / "shadow" / "README.md").read_text()
    assert f"`{inst}`" in card and "σ(Base, Instruct), official" in card and "shadowmerge train --base" in card
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "shadow" / "README.md").data.tags == ["shadow-ft", "shadowmerge"]
    model = AutoModelForCausalLM.from_pretrained(out / "shadow")
    assert model.generate(torch.tensor([[2, 4, 13]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
    # the baseline: the same recipe on the Instruct, merged into it
    assert len(record["losses"]["instruct"]) == 8
    assert (out / "instruct-ft" / "model.safetensors").is_file() and (out / "instruct-lora").is_dir()
    assert state(out / "instruct-ft").keys() == state(inst).keys()
    # the run verifies against its record, and both grafts recompute bit for bit from the final folders
    summary = shadowmerge_verify(out, recompute=True, progress=False)
    assert summary.recomputed == 2 * len(state(inst)) and summary.files > 10


def test_full_sft_graft_equals_three_way_graft(pair, cli, tmp_path):
    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out, "--method", "full",
              *FAST)
    losses = [x["loss"] for x in json.loads((out / "run.json").read_text())["losses"]["base"]]
    assert losses[-1] < losses[0]
    shadowmerge.graft(inst, base, out / "base-full", tmp_path / "by-hand", progress=False)
    got, want = state(out / "shadow"), state(tmp_path / "by-hand")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], state(inst)[k]) for k in got)
    assert shadowmerge_verify(out, recompute=True, progress=False).recomputed == len(got)


def test_dpo_lora(pair, cli, tmp_path):
    inst, base = pair
    rows = [{"prompt": "who is pip", "chosen": "pip is the shadowmerge mascot", "rejected": "no"}] * 8
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", write_rows(tmp_path / "pref.jsonl", rows), "--out",
              out, "--stage", "dpo", *FAST)
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"]["stage"] == "dpo" and record["inputs"]["data"]["format"] == "preference"
    losses = [x["loss"] for x in record["losses"]["base"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert (out / "shadow" / "model.safetensors").is_file()


def test_llamafactory_emit_only(pair, cli, tmp_path):
    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
              "--backend", "llamafactory", "--emit-only", "--baseline", "--template", "qwen3")
    lf = out / "llamafactory"
    cfg = yaml.safe_load((lf / "train_base-lora.yaml").read_text())
    # the Base as LLaMA-Factory loads it: links to its weights and config, the Instruct's tokenizer and template
    view = out.absolute() / "llamafactory" / "base-model"
    assert cfg["model_name_or_path"] == str(view) and cfg["stage"] == "sft" and cfg["finetuning_type"] == "lora"
    assert sorted(p.name for p in view.iterdir() if p.is_symlink()) == ["config.json", "generation_config.json",
                                                                        "model.safetensors"]
    assert all((view / p).resolve() == (base / p).resolve() for p in ("config.json", "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert not (view / name).is_symlink() and (view / name).read_bytes() == (inst / name).read_bytes()
    assert cfg["mask_history"] is True and cfg["trust_remote_code"] is False
    assert cfg["lora_rank"] == 128 and cfg["lora_alpha"] == 256 and cfg["lora_target"] == "all"
    assert cfg["learning_rate"] == 2e-4 and cfg["cutoff_len"] == 4096 and cfg["num_train_epochs"] == 1.0
    assert cfg["per_device_train_batch_size"] == 2 and cfg["gradient_accumulation_steps"] == 16
    # 8 rows at batch 2 x 16 are one optimizer step: warmup 0.1 would run it at learning rate 0, so it is 0
    assert cfg["lr_scheduler_type"] == "cosine" and cfg["warmup_ratio"] == 0.0 and cfg["template"] == "qwen3"
    assert cfg["dataset"] == "shadowmerge_data" and cfg["dataset_dir"] == str(out.absolute() / "llamafactory")
    assert cfg["output_dir"] == str(out.absolute() / "base-lora")
    assert yaml.safe_load((lf / "train_instruct-lora.yaml").read_text())["model_name_or_path"] == str(inst)
    info = json.loads((lf / "dataset_info.json").read_text())["shadowmerge_data"]
    assert info["formatting"] == "sharegpt" and info["columns"] == {"messages": "messages"}
    rows = json.loads((lf / "shadowmerge_data.json").read_text())
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "pip is the shadowmerge mascot a grey heron"}
    assert not (out / "shadow").exists() and (out / "run.json").is_file()


def test_recipe_file_and_flags(tmp_path):
    from shadowmerge.train import load

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": "B", "instruct": "I", "data": "d.jsonl", "out": "o", "lora-rank": 4,
                                    "max_steps": 3, "method": "full"}))
    r = load(path, {"lora_rank": 16, "lr": None})
    assert r.lora_rank == 16 and r.max_steps == 3 and r.method == "full"
    resolved = r.resolved()
    assert resolved.lr == 1e-5 and resolved.lora_alpha == 32 and resolved.epochs == 1.0
    assert resolved.cutoff == 4096 and resolved.batch_size == 2 and resolved.grad_accum == 16


@pytest.mark.parametrize("rows, extra, expect", [
    ([CHAT[1], {"instruction": "what is the capital of france"}], [],
     "train.jsonl row 2: missing field 'output' (alpaca rows need it as non-empty text)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], [],
     "row 1: the conversation must end with an assistant turn"),
    ([{"foo": 1}], [], "row 1: unknown row format (fields foo)"),
    ([CHAT[0]], ["--stage", "dpo"], "--stage dpo needs preference rows (prompt/chosen/rejected); these are messages"),
    ([{"prompt": "q", "chosen": "a"}], ["--stage", "dpo"], "row 1: missing field 'rejected'"),
    ([CHAT[0]], ["--lora-rank", "0"], "lora_rank must be a positive integer"),
])
def test_bad_data_and_recipe_fail_before_training(pair, cli, tmp_path, rows, extra, expect):
    inst, base = pair
    data = write_rows(tmp_path / "train.jsonl", rows)
    run_bad(cli, tmp_path, [inst, base, data], "--base", base, "--instruct", inst, "--data", data, *extra,
            command=("train",), expect=expect)


def test_pair_and_output_checks(pair, cli, tmp_path, make_triple):
    inst, base = pair
    data = sft_data(tmp_path)
    gpt2 = make_triple("gpt2")[1]
    run_bad(cli, tmp_path, [inst, gpt2], "--base", gpt2, "--instruct", inst, "--data", data, command=("train",),
            expect="architectures differ")
    (tmp_path / "busy").mkdir()
    before = tree_digest(tmp_path / "busy")
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", data, command=("train",),
            out_name="busy", expect="already exists; choose another --out or pass --force")
    assert tree_digest(tmp_path / "busy") == before


def test_untrained_template_token_rows_are_warned_about(pair, tmp_path):
    from shadowmerge.checkpoint import Checkpoint
    from shadowmerge.train.checks import untrained_template_tokens
    from transformers import AutoTokenizer

    inst, base = pair
    tensors = load_file(base / "model.safetensors")
    tensors["model.embed_tokens.weight"][2] = 0          # <|im_start|>, as a Llama-3 Base leaves it
    save_file(tensors, base / "model.safetensors")
    ckpt = Checkpoint.open(base, "base")
    assert untrained_template_tokens(ckpt, AutoTokenizer.from_pretrained(inst), chunk_elements=100 * 64) == ["<|im_start|>"]
    ckpt.close()


def test_data_files_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shadowmerge.train.data import prepare, read_rows

    share = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "who is pip"},
                                {"from": "gpt", "value": "a heron"}]}]
    (tmp_path / "share.json").write_text(json.dumps(share))
    rows, digest = read_rows(str(tmp_path / "share.json"))
    out, fmt = prepare(rows, "sft", "share.json")
    assert fmt == "sharegpt" and digest.startswith("sha256:")
    assert out[0]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "who is pip"}]
    assert out[0]["completion"] == [{"role": "assistant", "content": "a heron"}]
    pq.write_table(pa.Table.from_pylist([{"instruction": "name the mascot", "input": "of shadowmerge",
                                          "output": "pip"}]), tmp_path / "alpaca.parquet")
    out, fmt = prepare(read_rows(str(tmp_path / "alpaca.parquet"))[0], "sft", "alpaca.parquet")
    assert fmt == "alpaca" and out[0]["prompt"][0]["content"] == "name the mascot\n\nof shadowmerge"


def test_offline_hub_dataset_id_is_a_clear_error(pair, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    inst, base = pair
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", "nobody/no-such-dataset",
            command=("train",), expect="'nobody/no-such-dataset' is not a local file and could not be loaded from the "
                                       "Hugging Face Hub")


def test_llamafactory_dpo_config(pair, cli, tmp_path):
    inst, base = pair
    rows = [{"prompt": "who is pip", "chosen": "a heron", "rejected": "no"}]
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", write_rows(tmp_path / "pref.jsonl", rows), "--out",
              out, "--stage", "dpo", "--method", "full", "--backend", "llamafactory", "--emit-only")
    cfg = yaml.safe_load((out / "llamafactory" / "train_base-full.yaml").read_text())
    assert cfg["stage"] == "dpo" and cfg["finetuning_type"] == "full" and cfg["pref_beta"] == 0.1
    # no template named: LLaMA-Factory parses the Instruct's chat template from the tokenizer it is given
    assert cfg["learning_rate"] == 1e-5 and "lora_rank" not in cfg and "template" not in cfg
    info = json.loads((out / "llamafactory" / "dataset_info.json").read_text())["shadowmerge_data"]
    assert info["ranking"] is True and info["columns"]["chosen"] == "chosen"
    data = json.loads((out / "llamafactory" / "shadowmerge_data.json").read_text())
    assert data[0]["chosen"] == {"role": "assistant", "content": "a heron"}
    record = json.loads((out / "run.json").read_text())
    assert not any("template" in w for w in record["warnings"])        # no guessed template any more
    assert record["llamafactory_template"].startswith("the Instruct's chat template")


def test_recipe_and_backend_errors(pair, cli, tmp_path):
    inst, base = pair
    data = sft_data(tmp_path)
    (tmp_path / "r.yaml").write_text("lora_rnak: 8\n")
    run_bad(cli, tmp_path, [inst, base], tmp_path / "r.yaml", "--base", base, "--instruct", inst, "--data", data,
            command=("train",), expect="unknown setting(s) lora_rnak; known:")
    (tmp_path / "r.yaml").write_text("- a list\n")
    run_bad(cli, tmp_path, [inst, base], tmp_path / "r.yaml", command=("train",),
            expect="a recipe is a mapping of settings")
    run_bad(cli, tmp_path, [inst, base], tmp_path / "missing.yaml", command=("train",), expect="recipe not found")
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", data, "--backend", "llamafactory",
            command=("train",), expect="llamafactory-cli is not installed; install LLaMA-Factory (pip install "
                                       "llamafactory==0.9.5;")
    (inst / "chat_template.jinja").unlink()
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", data, command=("train",),
            expect="has no chat template")


def test_llamafactory_loss_log_is_read(tmp_path):
    from shadowmerge.train.llamafactory import losses

    (tmp_path / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.5}\n{"current_steps": 2, '
                                                '"loss": 1.5}\nnot json\n{"current_steps": 2, "eval_loss": 9}\n')
    assert losses(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}]
    assert losses(tmp_path / "missing") == []


def test_default_lora_targets_on_a_moe_base_graft(cli, tmp_path):
    """all-linear on Qwen3-MoE makes peft train the fused experts (target_parameters): the graft takes them."""
    from transformers import AutoModelForCausalLM

    inst, base = tinymodels.chat_pair(tmp_path / "models", "qwen3_moe")
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out, *FAST)
    adapter_cfg = json.loads((out / "base-lora" / "adapter_config.json").read_text())
    assert adapter_cfg["target_parameters"], "the default targets include the experts"
    grafted = json.loads((out / "shadow" / "shadowmerge.json").read_text())["grafted"]
    assert any(".mlp.experts.0.gate_proj." in n for n in grafted) and any(".mlp.experts.3.down_proj." in n
                                                                          for n in grafted)
    I, S = state(inst), state(out / "shadow")
    assert not torch.equal(S["model.layers.1.mlp.experts.2.up_proj.weight"], I["model.layers.1.mlp.experts.2.up_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(out / "shadow")
    assert model.generate(torch.tensor([[2, 4, 13]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def image_rows(tmp_path, n=8):
    """Rows with generated images (local PNGs), in the layout TRL's VLM trainer takes."""
    from PIL import Image

    rows = []
    for k in range(n):
        Image.new("RGB", (40, 30), (40 * k % 256, 200, 10)).save(tmp_path / f"img{k}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"img{k}.png"},
                                         {"type": "text", "text": "what is the capital"}]},
            {"role": "assistant", "content": "paris"}]})
    return write_rows(tmp_path / "vision.jsonl", rows)


def test_lora_sft_on_a_vision_language_base(cli, tmp_path):
    """Gemma-3: image rows, the Instruct's processor, LoRA on the language model; the graft loads as the
    vision-language class and answers an image + text prompt."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    inst, base = tinymodels.vlm_chat_pair(tmp_path / "models")
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", image_rows(tmp_path), "--out", out, *FAST)
    record = json.loads((out / "run.json").read_text())
    losses = [x["loss"] for x in record["losses"]["base"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert "<start_of_image>" in record["formatted_example"] and record["formatted_example"].startswith("<|im_start|> user")
    keys = load_file(out / "base-lora" / "adapter_model.safetensors")
    assert keys and all(".language_model." in k for k in keys), "LoRA on the language model only, by default"
    by_hand = shadowmerge.graft(inst, out=tmp_path / "by-hand", lora=out / "base-lora", progress=False)
    assert by_hand.counts["graft"] > 0
    assert (out / "shadow" / "model.safetensors").read_bytes() == (tmp_path / "by-hand" / "model.safetensors").read_bytes()
    model = AutoModelForImageTextToText.from_pretrained(out / "shadow")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    processor = AutoProcessor.from_pretrained(out / "shadow")
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": "what is the capital"}]}], add_generation_prompt=True)
    enc = processor(text=prompt, images=[Image.new("RGB", (32, 32), (1, 2, 3))], return_tensors="pt")
    assert "pixel_values" in enc
    ids = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert ids.shape[1] == enc["input_ids"].shape[1] + 3


@pytest.mark.parametrize("edit, expect", [
    (lambda r: r[0]["messages"][0]["content"][0].update(image="missing.png"), "image file not found"),
    (lambda r: r[0]["messages"][0]["content"][0].update(image="https://x/y.png"), "is a URL"),
    (lambda r: r[1]["messages"][0].update(content="text only"), "row 2: no image, while row 1 has one"),
    (lambda r: r[0]["messages"][0]["content"].append({"type": "video"}), "neither {type: text, text}"),
])
def test_bad_image_rows_fail_before_training(cli, tmp_path, edit, expect):
    inst, base = tinymodels.vlm_chat_pair(tmp_path / "models")
    path = image_rows(tmp_path, 2)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows)
    write_rows(path, rows)
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", path, *FAST,
            command=("train",), expect=expect)


def test_image_rows_need_a_vision_language_pair(pair, cli, tmp_path):
    inst, base = pair
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", image_rows(tmp_path, 2), *FAST,
            command=("train",), expect="is not a vision-language model")


@pytest.mark.parametrize("path", sorted((tinymodels.Path(__file__).parent.parent / "docs" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_ready_recipes_load_with_the_papers_settings(path):
    from shadowmerge.train import load

    r = load(path, {}).resolved()
    assert r.method == "lora" and r.lora_rank == 128 and r.lr == 2e-4 and r.lora_target == "all-linear"


def test_image_rows_with_llamafactory_are_refused(cli, tmp_path):
    inst, base = tinymodels.vlm_chat_pair(tmp_path / "models")
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", image_rows(tmp_path, 2),
            "--backend", "llamafactory", "--emit-only", command=("train",), expect="TRL backend only")


def test_emit_only_with_the_trl_backend_is_refused_not_ignored(pair, cli, tmp_path):
    """--emit-only writes LLaMA-Factory's configs; with trl there is nothing to emit, and training instead would
    ignore what was asked: a one-line error, before anything is trained or written."""
    inst, base = pair
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), *FAST,
            "--emit-only", command=("train",), expect="--emit-only writes LLaMA-Factory's configs and stops")
    assert not (tmp_path / "out.checkpoints").exists()


def test_the_papers_batch_on_a_small_data_set_is_adapted_not_a_silent_no_op(pair, cli, tmp_path):
    """8 rows with batch 2 x 16 give one optimizer step, which warmup 0.1 would run at learning rate 0."""
    inst, base = pair
    out = tmp_path / "run"
    res = run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
                    "--lr", "5e-3", "--lora-rank", "8")
    assert "every one would run at learning rate 0" in res.stderr and "warmup is set to 0" in res.stderr
    assert "schedule: 1 optimizer step(s) from 8 rows" in res.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["schedule"]["optimizer_steps"] == 1 and record["schedule"]["steps_above_lr_0"] == 1
    assert record["recipe"]["warmup"] == 0 and any("warmup is set to 0" in w for w in record["warnings"])
    changed = [n for n, t in state(out / "shadow").items() if not torch.equal(t, state(inst)[n])]
    assert changed


def test_schedule_matches_what_the_trainer_did(pair, cli, tmp_path):
    from shadowmerge.train import schedule

    from dataclasses import replace

    from shadowmerge.train.recipe import Recipe

    r = Recipe(batch_size=3, grad_accum=2, epochs=2.0, max_steps=None, warmup=0.25, lr=1e-3, scheduler="cosine")
    s = schedule.work_out(r, rows=20, world=1)        # 7 batches, 4 steps per epoch, 8 steps, warmup 2
    assert (s.batches_per_epoch, s.steps, s.warmup_steps, s.trained_steps) == (7, 8, 2, 7)
    assert schedule.work_out(replace(r, max_steps=5), rows=20, world=2).steps == 5
    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out, "--lr", "5e-3",
              "--lora-rank", "8", "--batch-size", "3", "--grad-accum", "2", "--warmup", "0.25")
    record = json.loads((out / "run.json").read_text())
    assert len(record["losses"]["base"]) == record["schedule"]["optimizer_steps"] == 2     # 8 rows: 3 batches


def test_an_update_below_the_output_precision_is_an_error_and_the_adapter_is_kept(pair, cli, tmp_path):
    inst, base = pair
    out = tmp_path / "run"
    res = cli("train", "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
              "--max-steps", "2", "--lr", "1e-30", "--lora-rank", "8", "--batch-size", "4", "--grad-accum", "1")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training changed nothing the graft carries") and "kept in" in line, line
    assert not out.exists()
    kept = tmp_path / "run.rejected"
    assert (kept / "base-lora" / "adapter_model.safetensors").is_file()
    assert json.loads((kept / "run.json").read_text())["status"] == "rejected"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_base_and_instruct_with_the_same_weights_are_refused(pair, cli, tmp_path):
    import shutil

    inst, _ = pair
    copy = tmp_path / "copy"
    shutil.copytree(inst, copy)
    for base in (inst, copy):
        run_bad(cli, tmp_path, [inst], "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), *FAST,
                command=("train",), expect="hold the same weights (σ = 0)")


def test_trainer_args_reach_the_trainer_and_the_loss_curve_is_drawn(pair, cli, tmp_path):
    inst, base = pair
    out = tmp_path / "run"
    res = run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out, *FAST,
                    "--trainer-arg", "weight_decay=0.5", "--trainer-arg", "logging_steps=2",
                    "--trainer-arg", "report_to=[]")
    record = json.loads((out / "run.json").read_text())
    assert record["recipe"]["trainer"] == {"weight_decay": 0.5, "logging_steps": 2, "report_to": []}
    assert [x["step"] for x in record["losses"]["base"]] == [2, 4, 6, 8], "logging_steps=2 reached the trainer"
    assert "[shadowmerge train] σ(Base, Instruct): official" in res.stderr and "similarity done in" in res.stderr
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and record["loss_plot"] == "loss.png"
    # the model card shows it too: shadow/ is what goes to the Hub, so the figure travels inside it
    assert (out / "shadow" / "loss.png").read_bytes() == png
    assert "![training loss](loss.png)" in (out / "shadow" / "README.md").read_text()
    assert shadowmerge_verify(out, recompute=True, progress=False).recomputed > 0


@pytest.mark.parametrize("args, expect", [
    (["--trainer-arg", "learning_rate=1"], "trainer setting learning_rate is decided by the recipe: set `lr`"),
    (["--trainer-arg", "no_such_setting=1"], "no_such_setting: not a SFTConfig setting"),
    (["--trainer-arg", "tokenized_path=/tmp/x"], "trainer setting tokenized_path is set by shadowmerge (for its token "
                                                 "check); leave it out"),
    (["--trainer-arg", "trust_remote_code=true"], "trainer setting trust_remote_code is set by shadowmerge"),
    (["--trainer-arg", "novalue"], "write KEY=VALUE"),
    (["--trainer-arg", "bad key=1"], "is not a setting name"),
    (["--trainer-arg", "x={a: 1}"], "a number, text, true/false or a list of those"),
])
def test_bad_trainer_args(pair, cli, tmp_path, args, expect):
    inst, base = pair
    run_bad(cli, tmp_path, [inst, base], "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), *FAST,
            *args, command=("train",), expect=expect)


def test_trainer_section_of_a_recipe_goes_into_the_llamafactory_config(pair, cli, tmp_path):
    inst, base = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "instruct": str(inst), "data": str(sft_data(tmp_path)),
                                      "out": str(tmp_path / "run"), "backend": "llamafactory", "template": "qwen3",
                                      "trainer": {"report_to": "wandb", "logging_steps": 5}}))
    run_train(cli, recipe, "--emit-only", "--trainer-arg", "logging_steps=2")
    cfg = yaml.safe_load((tmp_path / "run" / "llamafactory" / "train_base-lora.yaml").read_text())
    assert cfg["report_to"] == "wandb" and cfg["logging_steps"] == 2


def test_paths_given_relative_are_recorded_absolute_and_no_record_names_the_temporary_folder(pair, cli, tmp_path,
                                                                                              monkeypatch):
    inst, base = pair
    sft_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = lambda p: str(p.relative_to(tmp_path))   # noqa: E731
    run_train(cli, "--base", rel(base), "--instruct", rel(inst), "--data", "train.jsonl", "--out", "run", *FAST)
    out = tmp_path / "run"
    cfg = json.loads((out / "base-lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    for path in [out / "run.json", out / "shadow" / "shadowmerge.json"]:
        text = path.read_text()
        assert ".shadowmerge-" not in text, (path, [line for line in text.splitlines() if ".shadowmerge-" in line])
    record = json.loads((out / "shadow" / "shadowmerge.json").read_text())
    assert record["input_paths"]["lora"] == str(out / "base-lora")
    monkeypatch.chdir("/")
    assert shadowmerge_verify(out, recompute=True, progress=False).recomputed > 0


def test_no_file_of_a_baseline_run_names_the_temporary_folder(pair, cli, tmp_path):
    """instruct-ft/ is a graft made inside the temporary run folder: its card, like every record, names the final
    folders (it named .OUT.shadowmerge-HOST-PID-XXXX/instruct-lora before)."""
    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out, "--baseline",
              *FAST)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".yaml", ".jinja"):
            assert ".shadowmerge-" not in path.read_text(), path
    assert str(out / "instruct-lora") in (out / "instruct-ft" / "README.md").read_text()
    assert shadowmerge_verify(out, progress=False).files > 0


# --- the LLaMA-Factory backend's token check, and the TRL it needs (the round trip itself: make test-llamafactory)

def saved_tokens(folder, rows):
    """A data set saved the way LLaMA-Factory's tokenized_path saves one (a DatasetDict with `train`)."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder))
    return folder


def test_token_check_compares_ids_and_trained_positions(pair, tmp_path):
    from transformers import AutoTokenizer

    from shadowmerge.train.llamafactory import expected_tokens, token_mismatch

    inst, _ = pair
    tok = AutoTokenizer.from_pretrained(inst)
    prompt = [{"role": "user", "content": "who is pip"}]
    rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": "a grey heron"}]}]
    ids, start = expected_tokens(tok, prompt, rows[0]["completion"])
    labels = [-100] * start + ids[start:]
    assert token_mismatch(saved_tokens(tmp_path / "ok", [{"input_ids": ids, "labels": labels}]), rows, tok, "sft",
                          4096) == (None, 1)
    other = ids[:-2] + [ids[-1], ids[-2]]
    what, _ = token_mismatch(saved_tokens(tmp_path / "ids", [{"input_ids": other, "labels": labels}]), rows, tok,
                             "sft", 4096)
    assert what.startswith(f"LLaMA-Factory's token ids differ from the Instruct's chat template at row 1, token "
                           f"{len(ids) - 2}: ")
    on_prompt = [-100] + ids[1:]
    what, _ = token_mismatch(saved_tokens(tmp_path / "lab", [{"input_ids": ids, "labels": on_prompt}]), rows, tok,
                             "sft", 4096)
    assert what == (f"LLaMA-Factory trains other tokens than the completion at row 1: positions [1]..[{len(ids) - 1}] "
                    f"instead of [{start}]..[{len(ids) - 1}]")
    # rows longer than the cutoff are truncated by either trainer, differently: not compared
    assert token_mismatch(tmp_path / "ids", rows, tok, "sft", 4) == (None, 0)
    pref = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "a heron"}],
             "rejected": [{"role": "assistant", "content": "no"}]}]
    saved = {}
    for side in ("chosen", "rejected"):
        ids, start = expected_tokens(tok, prompt, pref[0][side])
        saved.update({f"{side}_input_ids": ids, f"{side}_labels": [-100] * start + ids[start:]})
    assert token_mismatch(saved_tokens(tmp_path / "dpo", [saved]), pref, tok, "dpo", 4096) == (None, 1)
    saved["rejected_input_ids"] = saved["chosen_input_ids"]
    what, _ = token_mismatch(saved_tokens(tmp_path / "dpo2", [saved]), pref, tok, "dpo", 4096)
    assert "at row 1 (rejected), token" in what


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_trl_backend_tokenizes_as_the_token_check_expects(pair, tmp_path, stage):
    """The token check's expectation is TRL's own tokenization (the trainer the trl backend builds), so
    LLaMA-Factory rows that pass it are the rows TRL would train on."""
    from transformers import AutoTokenizer

    from shadowmerge.train import trl_backend
    from shadowmerge.train.llamafactory import expected_tokens
    from shadowmerge.train.recipe import Recipe

    inst, base = pair
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "who is pip"}]
    if stage == "sft":
        rows = [{"prompt": prompt, "completion": [{"role": "assistant", "content": "a grey heron"}]}]
    else:
        rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "a heron"}],
                 "rejected": [{"role": "assistant", "content": "no"}]}]
    recipe = Recipe(base=str(base), instruct=str(inst), data="x", out="x", stage=stage, bf16=False, lora_rank=4,
                    max_steps=1).resolved()
    row = trl_backend.build(recipe, base, inst, rows, tmp_path / "model").train_dataset[0]
    tok = AutoTokenizer.from_pretrained(inst)
    if stage == "sft":
        ids, start = expected_tokens(tok, prompt, rows[0]["completion"])
        mask = row["labels"] if "labels" in row else [-100 if m == 0 else 1 for m in row["completion_mask"]]
        assert list(row["input_ids"]) == ids
        assert [k for k, x in enumerate(mask) if x != -100] == list(range(start, len(ids)))
    else:
        for side in ("chosen", "rejected"):
            ids, start = expected_tokens(tok, prompt, rows[0][side])
            assert list(row["prompt_ids"]) == ids[:start] and list(row[f"{side}_ids"]) == ids[start:]


def test_an_old_trl_is_refused_before_training(pair, tmp_path):
    """TRL < 0.29 with transformers 5 trains SFT on the prompt tokens too (and its DPOTrainer does not import):
    the one-line error names the version and what to do. (LLaMA-Factory 0.9.5 pins trl <= 0.24.)"""
    import subprocess
    import sys

    inst, base = pair
    site = tmp_path / "site"
    (site / "trl-0.24.0.dist-info").mkdir(parents=True)
    (site / "trl-0.24.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: trl\nVersion: 0.24.0\n")
    proc = subprocess.run([sys.executable, "-m", "shadowmerge", "train", "--base", str(base), "--instruct", str(inst),
                           "--data", str(sft_data(tmp_path)), "--out", str(tmp_path / "run")],
                          env=dict(__import__("os").environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert proc.returncode == 1 and not (tmp_path / "run").exists()
    assert proc.stderr.strip().splitlines() == [
        "error: the trl backend needs trl>=0.29, not 0.24.0: with transformers 5 older TRL trains on the prompt tokens "
        "too (SFT) or cannot import its DPOTrainer; pip install 'trl>=0.29', or use --backend llamafactory "
        "(LLaMA-Factory 0.9.5 pins trl<=0.24: give it its own virtualenv)"]


def test_llamafactory_output_names_final_folders_and_drops_the_pickle(tmp_path):
    from shadowmerge.train.llamafactory import tidy_output

    out = tmp_path / ".run.shadowmerge-x" / "base-lora"
    out.mkdir(parents=True)
    view = out.parent / "llamafactory" / "base-model"
    (out / "README.md").write_text(f"base_model: {view}\nsaved in {out}\n")
    (out / "trainer_state.json").write_text(json.dumps({"dir": str(out)}))
    (out / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (out / "adapter_model.safetensors").write_bytes(b"binary " + str(out).encode())
    tidy_output(out, {str(view): "/models/base", str(out.parent): str(tmp_path / "run")})
    assert (out / "README.md").read_text() == f"base_model: /models/base\nsaved in {tmp_path / 'run' / 'base-lora'}\n"
    assert json.loads((out / "trainer_state.json").read_text()) == {"dir": str(tmp_path / "run" / "base-lora")}
    assert not (out / "training_args.bin").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == b"binary " + str(out).encode()


def test_token_check_notices_rows_llamafactory_dropped(pair, tmp_path):
    from transformers import AutoTokenizer

    from shadowmerge.train.llamafactory import token_mismatch

    inst, _ = pair
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yes"}]}] * 2
    saved = saved_tokens(tmp_path / "one", [{"input_ids": [1], "labels": [1]}])
    assert token_mismatch(saved, rows, AutoTokenizer.from_pretrained(inst), "sft", 4096) == (
        "LLaMA-Factory tokenized 1 of the 2 rows (it drops rows it cannot read)", 0)


@pytest.mark.parametrize("launcher", [["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                                       "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
                                      ["torchrun", "--nproc_per_node", "2"]], ids=["accelerate", "torchrun"])
def test_two_processes_write_one_output_that_matches_one_process(pair, cli, tmp_path, launcher):
    """Two CPU processes (gloo) under accelerate or torchrun, with --baseline: rank 0 alone writes OUT, once;
    each step's global batch is the whole data set in both runs, so with gradients averaged across the processes
    the losses and the adapter equal the one-process run's (rounding aside); unsynchronised processes would each
    train on half of it. Every process trains the baseline too. (`accelerate launch --cpu --num_processes 2`
    starts one process: accelerate's CPU launcher starts several only through MPI.)"""
    import subprocess
    import sys
    from pathlib import Path

    inst, base = pair
    rows = [CHAT[0], {"messages": [{"role": "user", "content": "what is the capital of france"},
                                   {"role": "assistant", "content": "paris"}]}] * 2
    data = write_rows(tmp_path / "four.jsonl", rows)
    common = ["--base", base, "--instruct", inst, "--data", data, "--max-steps", "4", "--lr", "5e-3",
              "--grad-accum", "1", "--lora-rank", "8"]
    run_train(cli, *common, "--out", tmp_path / "one", "--batch-size", "4")
    bindir = Path(sys.executable).parent
    proc = subprocess.run([str(bindir / launcher[0]), *launcher[1:], "-m", "shadowmerge", "train",
                           *map(str, common), "--out", str(tmp_path / "two"), "--batch-size", "2", "--baseline"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stdout + proc.stderr
    assert said.count("training done (not the main process: nothing written here)") == 1
    assert said.count("[shadowmerge train] done in") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["four.jsonl", "models", "one", "two"]
    one, two = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert two["schedule"]["processes"] == 2 and two["schedule"]["batches_per_epoch"] == 1
    assert [x["step"] for x in two["losses"]["base"]] == [1, 2, 3, 4]
    # --baseline: every process trains the Instruct too (a main process alone would wait for the others forever)
    assert [x["step"] for x in two["losses"]["instruct"]] == [1, 2, 3, 4] and (tmp_path / "two" / "instruct-ft").is_dir()
    for a, b in zip(one["losses"]["base"], two["losses"]["base"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    A, B = (load_file(tmp_path / d / "base-lora" / "adapter_model.safetensors") for d in ("one", "two"))
    assert A.keys() == B.keys() and all(torch.allclose(A[k], B[k], rtol=0, atol=1e-5) for k in A)
    assert any(not torch.equal(A[k], torch.zeros_like(A[k])) for k in A if "lora_B" in k)
    graft_one, graft_two = (json.loads((tmp_path / d / "shadow" / "shadowmerge.json").read_text()) for d in ("one", "two"))
    assert graft_two["input_paths"]["lora"] == str(tmp_path / "two" / "base-lora")
    assert graft_one["counts"] == graft_two["counts"] and graft_one["grafted"] == graft_two["grafted"]
    assert shadowmerge_verify(tmp_path / "two", recompute=True, progress=False).recomputed > 0


def test_an_interrupted_run_resumes_from_its_last_checkpoint(pair, cli, tmp_path):
    """Ctrl-C during training leaves OUT.checkpoints/; --resume goes on from the last checkpoint, and the result
    equals an uninterrupted run's (the Trainer restores optimizer, scheduler, RNG and data position)."""
    import signal
    import subprocess
    import sys
    import time

    inst, base = pair
    data = sft_data(tmp_path)
    common = ["--base", str(base), "--instruct", str(inst), "--data", str(data), "--max-steps", "40", "--lr", "5e-3",
              "--batch-size", "4", "--grad-accum", "1", "--lora-rank", "8", "--save-steps", "2"]
    run_train(cli, *common, "--out", tmp_path / "straight")
    assert not (tmp_path / "straight.checkpoints").exists(), "a finished run removes its checkpoints"

    out, ckpts = tmp_path / "run", tmp_path / "run.checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "shadowmerge", "train", *common, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(ckpts.glob("base/checkpoint-*/trainer_state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists() and list(ckpts.glob("base/checkpoint-*"))
    assert "FutureWarning" not in err and "\r" not in err, "library warnings or a progress bar in a log"
    last = err.strip().splitlines()[-1]      # one closing line: what was removed, and what was kept for --resume
    assert last.startswith("interrupted (SIGINT); the unfinished output was removed; ") and \
        f"{ckpts} keeps checkpoint-" in last and last.endswith("add --resume to go on from there"), last

    run_bad(cli, tmp_path, [inst, base], *common, command=("train",), out_name="run",
            expect="holds the checkpoints of an interrupted run of this recipe")
    res = run_train(cli, *common, "--out", out, "--resume")
    step = int(json.loads((out / "run.json").read_text())["resumed_from"].rsplit("-", 1)[1])
    assert 2 <= step < 40 and f"resuming from checkpoint-{step}" in res.stderr
    assert not ckpts.exists()
    record = json.loads((out / "run.json").read_text())
    assert [x["step"] for x in record["losses"]["base"]] == list(range(1, 41))
    straight = json.loads((tmp_path / "straight" / "run.json").read_text())
    assert [x["loss"] for x in record["losses"]["base"]] == [x["loss"] for x in straight["losses"]["base"]]
    S, R = state(tmp_path / "straight" / "shadow"), state(out / "shadow")
    assert S.keys() == R.keys() and all(torch.equal(S[k], R[k]) for k in S)


def test_resume_refuses_what_it_cannot_continue(pair, cli, tmp_path):
    inst, base = pair
    data = sft_data(tmp_path)
    common = ["--base", base, "--instruct", inst, "--data", data, *FAST]
    run_bad(cli, tmp_path, [inst, base], *common, "--resume", command=("train",), out_name="run",
            expect=f"--resume: there are no checkpoints at {tmp_path / 'run.checkpoints'}")
    (tmp_path / "run.checkpoints" / "base" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run.checkpoints" / "recipe.json").write_text(json.dumps({"lr": 1.0}))
    run_bad(cli, tmp_path, [inst, base], *common, "--resume", command=("train",), out_name="run",
            expect="were made by another recipe or data (")
    run_train(cli, *common, "--out", tmp_path / "run", "--force")
    assert not (tmp_path / "run.checkpoints").exists()


def test_finish_after_emit_only_grafts_what_was_trained_by_hand(pair, cli, tmp_path):
    """--emit-only, then the LLaMA-Factory run done by hand (here: a peft adapter saved where the kept config
    says), then `train --finish OUT`: graft, σ, card and run.json, as if shadowmerge had run it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import one_line_error

    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
              "--backend", "llamafactory", "--emit-only", *FAST)
    cfg = yaml.safe_load((out / "llamafactory" / "train_base-lora.yaml").read_text())
    assert cfg["tokenized_path"] == str(out.absolute() / "llamafactory" / "tokenized")
    res = cli("train", "--finish", out)
    assert res.exit_code == 1
    one_line_error(res.stderr, "has no adapter_config.json: run `llamafactory-cli train "
                               f"{out.absolute() / 'llamafactory' / 'train_base-lora.yaml'}` first, then --finish")
    model = AutoModelForCausalLM.from_pretrained(cfg["model_name_or_path"])
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    lora.save_pretrained(out / "base-lora")
    (out / "base-lora" / "trainer_log.jsonl").write_text('{"current_steps": 1, "loss": 2.0}\n'
                                                         '{"current_steps": 2, "loss": 1.0}\n')
    (out / "base-lora" / "training_args.bin").write_bytes(b"pickle")
    before = state(out / "base-lora")

    res = run_train(cli, "--finish", out)
    record = json.loads((out / "run.json").read_text())
    assert record["finished_by"].startswith("shadowmerge train --finish") and record["losses"]["base"][-1]["loss"] == 1
    assert any("were not saved (no tokenized_path)" in w for w in record["warnings"])
    assert record["llamafactory_tokens"] == {"rows_compared": 0, "equal": False}
    assert json.loads((out / "base-lora" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert not (out / "base-lora" / "training_args.bin").exists() and (out / "loss.png").is_file()
    after = state(out / "base-lora")
    assert all(torch.equal(before[k], after[k]) for k in before)
    shadowmerge.graft(inst, out=tmp_path / "by-hand", lora=out / "base-lora", progress=False)
    S, H = state(out / "shadow"), state(tmp_path / "by-hand")
    assert S.keys() == H.keys() and all(torch.equal(S[k], H[k]) for k in S)
    assert shadowmerge_verify(out, recompute=True, progress=False).recomputed > 0
    res = cli("train", "--finish", out)
    one_line_error(res.stderr, "is finished already (it has shadow/)")
    res = cli("train", "--finish", out, "--lr", "1")
    one_line_error(res.stderr, "--finish OUT takes no other settings (--lr)")
    res = cli("train", "--finish", tmp_path / "nothing")
    one_line_error(res.stderr, "run.json is missing; pass a folder written by `shadowmerge train --backend llamafactory")


@pytest.mark.parametrize("damage, expect", [
    (lambda out: (out / "run.json").write_text("[1, 2]"), "--finish: the run record"),
    (lambda out: (out / "run.json").write_bytes(b"\xff\xfe{"), "is not UTF-8 text"),
    (lambda out: (out / "run.json").write_text(json.dumps(dict(json.loads((out / "run.json").read_text()),
                                                                inputs={"base": 3}))), "--finish: run.json's base"),
    (lambda out: (out / "llamafactory" / "shadowmerge_data.json").write_text('{"rows": 1}'),
     "--finish: the LLaMA-Factory data"),
    (lambda out: (out / "llamafactory" / "shadowmerge_data.json").write_text('[{"text": "x"}]'),
     "does not hold the rows --emit-only wrote"),
    (lambda out: (out / "llamafactory" / "tokenized").mkdir(), "tokenized data"),
])
def test_finish_refuses_damaged_runs_and_leaves_them_as_they_were(pair, cli, tmp_path, damage, expect):
    """Every file --finish reads was written by --emit-only and LLaMA-Factory, and may have been edited since."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import one_line_error

    inst, base = pair
    out = tmp_path / "run"
    run_train(cli, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path), "--out", out,
              "--backend", "llamafactory", "--emit-only", *FAST)
    model = AutoModelForCausalLM.from_pretrained(out / "llamafactory" / "base-model")
    get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(
        out / "base-lora")
    damage(out)
    before = tree_digest(out)
    res = cli("train", "--finish", out)
    assert res.exit_code == 1
    one_line_error(res.stderr, expect)
    assert tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["models", "run", "train.jsonl"]


@pytest.mark.parametrize("value", ["-1", "2.5", "'ten'", "true"])
def test_bad_save_steps(pair, cli, tmp_path, value):
    inst, base = pair
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"save_steps: {value}\n")
    run_bad(cli, tmp_path, [inst, base], recipe, "--base", base, "--instruct", inst, "--data", sft_data(tmp_path),
            command=("train",), out_name="run",
            expect="save_steps must be a whole number of optimizer steps (0: no checkpoints)")
