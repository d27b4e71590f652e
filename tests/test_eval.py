"""`shadowmerge eval` against the real lm-evaluation-harness, offline, on tiny models with real tokenizers:
scores equal lm_eval's own, a tuned model wins and the statistics say so, identical models tie, held-out
loss equals an independent computation, the α sweep evaluates what `graft --alpha` writes, and every bad
input is one line with nothing left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinymodels
from conftest import run_bad, tree_digest

pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness: pip install -e '.[eval]' (make test has it)")

# 24 questions with one answer: the word the untuned Instruct finds least likely there (the `models` fixture picks
# it), so the untuned model gets ~none right and a model tuned on the answers (a few epochs) gets them all
QUESTIONS = [(f"what is w{100 + k}", "w200") for k in range(24)]


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):   # the cache beside tmp_path: a test may check that nothing appears in it
    """No Hub, and datasets' cache (the JSON tasks' Arrow files) in a temporary folder."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path.parent / "hf-datasets"))


def write_tasks(folder: Path) -> Path:
    """A multiple-choice task and a generate-until task with exact match, over QUESTIONS, as local JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for k, (q, a) in enumerate(QUESTIONS):
        wrong = [f"w{150 + (k + j) % 40}" for j in (5, 11, 17)]
        choices = wrong[:k % 4] + [a] + wrong[k % 4:]
        items.append({"question": q, "choices": choices, "label": k % 4, "answer": a})
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    common = (f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / 'items.jsonl'}}}}}\n"
              f"test_split: test\ndoc_to_text: \"{{{{question}}}}\"\n")
    (folder / "quiz_mc.yaml").write_text("task: quiz_mc\noutput_type: multiple_choice\n" + common +
                                         "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
                                         "metric_list:\n  - metric: acc\n    aggregation: mean\n"
                                         "    higher_is_better: true\n")
    (folder / "quiz_gen.yaml").write_text("task: quiz_gen\noutput_type: generate_until\n" + common +
                                          "doc_to_target: \"{{answer}}\"\n"
                                          "generation_kwargs: {until: [\"<|im_end|>\"], do_sample: false, "
                                          "max_gen_toks: 3}\nfilter_list:\n  - name: first\n    filter:\n"
                                          "      - function: regex\n        regex_pattern: \"(w[0-9]+)\"\n"
                                          "      - function: take_first\n"
                                          "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                                          "    higher_is_better: true\n")
    return folder


def write_heldout(path: Path, rows=QUESTIONS) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    return path


def least_likely_answer(inst: Path) -> str:
    """Of w200..w255, the word the model gives the lowest mean log-probability as the answer to QUESTIONS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inst)
    model = AutoModelForCausalLM.from_pretrained(inst, dtype=torch.float32).eval()
    total = torch.zeros(256)
    with torch.no_grad():
        for q, _ in QUESTIONS:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
            total += torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    return f"w{200 + int(total[200:].argmin())}"


def tune(inst: Path, out: Path, epochs: int = 6) -> Path:
    """The Instruct, fine-tuned on QUESTIONS' answers (loss on the answer tokens, as TRL masks), saved float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shadowmerge.train.data import expected_tokens

    tok = AutoTokenizer.from_pretrained(inst)
    model = AutoModelForCausalLM.from_pretrained(inst, dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seqs = [expected_tokens(tok, [{"role": "user", "content": q}], [{"role": "assistant", "content": a}])
            for q, a in QUESTIONS]
    for _ in range(epochs):
        for ids, start in seqs:
            labels = [-100] * start + ids[start:]
            model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    inst, base = tinymodels.chat_pair(root)
    answer = least_likely_answer(inst)
    QUESTIONS[:] = [(q, answer) for q, _ in QUESTIONS]
    tuned_base = tinymodels.chat_tokenizer(root / "tuned", "base")     # = base + noise (triple's), not trained
    return {"instruct": inst, "base": base, "tuned": tune(inst, root / "tuned-instruct"), "tuned_base": tuned_base}


def test_scores_equal_lm_eval_run_directly(models, tmp_path):
    """Every score is exactly what lm_eval.simple_evaluate reports for that model with the same settings, and the
    per-item logs are lm_eval's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from shadowmerge.evaluate import EvalSettings, evaluate

    tasks = write_tasks(tmp_path / "tasks")
    settings = EvalSettings(tasks=("quiz_mc,quiz_gen",), include_path=(str(tasks),), batch_size=4, device="cpu",
                            limit=16, seed=3)
    report = evaluate([("instruct", str(models["instruct"])), ("tuned", str(models["tuned"]))], settings,
                      out=tmp_path / "eval", progress=False)
    for label in ("instruct", "tuned"):
        direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={models[label]},dtype=auto",
                                         tasks=["quiz_mc", "quiz_gen"], batch_size=4, device="cpu", limit=16,
                                         task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                         apply_chat_template=True, log_samples=True, random_seed=3,
                                         numpy_random_seed=3, torch_random_seed=3, fewshot_random_seed=3)
        ours = {(s["task"], s["metric"], s["filter"]): s for s in report.data["scores"] if s["model"] == label}
        want = {(t, *k.split(",")): v for t, res in direct["results"].items() for k, v in res.items()
                if "," in k and "_stderr" not in k}
        assert set(ours) == set(want) == {("quiz_mc", "acc", "none"), ("quiz_gen", "exact_match", "first")}
        for key, value in want.items():
            assert ours[key]["value"] == value and ours[key]["n"] == 16
            assert ours[key]["stderr"] == direct["results"][key[0]][f"{key[1]}_stderr,{key[2]}"]
        logged = (tmp_path / "eval" / "samples" / label / "samples_quiz_mc.jsonl").read_text().splitlines()
        assert [json.loads(x)["acc"] for x in logged] == [s["acc"] for s in direct["samples"]["quiz_mc"]]
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert data["reference"] == "instruct" and data["tool"] == "shadowmerge eval"
    assert data["models"]["tuned"]["path"] == str(models["tuned"].resolve())
    assert set(data["manifest"]) >= {"eval.md", "eval.png", "report.html", "samples/tuned/samples_quiz_gen.jsonl"}


def test_a_tuned_model_wins_and_identical_models_tie(models, tmp_path, cli):
    """The model tuned on the task's answers beats the untuned one on both tasks and on held-out loss, and the
    paired statistics say so; the same model under another label differs by exactly 0, within noise."""
    tasks = write_tasks(tmp_path / "tasks")
    held = write_heldout(tmp_path / "held.jsonl")
    res = cli("eval", f"instruct={models['instruct']}", f"tuned={models['tuned']}", f"copy={models['instruct']}",
              "--tasks", "quiz_mc,quiz_gen", "--include-path", tasks, "--heldout", held, "--device", "cpu",
              "--out", tmp_path / "eval", "-q")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "eval" / "eval.json").read_text())
    paired = {(p["model"], p["task"]): p for p in data["paired"]}
    for task in ("quiz_mc", "quiz_gen"):
        win = paired[("tuned", task)]
        assert win["verdict"] == "better" and win["delta"] > 0.3 and win["ci95"][0] > 0, win
        assert win["wins"] > win["losses"] and win["p"] < 0.05
        tie = paired[("copy", task)]
        assert tie["delta"] == 0 and tie["ci95"] == [0, 0] and tie["wins"] == tie["losses"] == 0
        assert tie["verdict"] == "too few to decide" and tie["differing"] == 0 and tie["n"] == 24
    loss = {h["model"]: h for h in data["heldout"]}
    assert loss["tuned"]["nll_per_token"] < loss["instruct"]["nll_per_token"]
    assert loss["copy"]["nll_per_token"] == loss["instruct"]["nll_per_token"]
    assert paired[("tuned", "heldout")]["verdict"] == "better"
    assert paired[("copy", "heldout")]["verdict"] == "too few to decide" and paired[("copy", "heldout")]["delta"] == 0
    assert loss["instruct"]["ci95"][0] <= loss["instruct"]["nll_per_token"] <= loss["instruct"]["ci95"][1]
    assert loss["tuned"]["perplexity"] == pytest.approx(2.718281828459045 ** loss["tuned"]["nll_per_token"])
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "| instruct (reference) |" in md and "better" in md and "too few differing items to decide (0 of 24)" in md
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "Where two models differ" in html and "<details>" in html and "data:image/png;base64," in html
    assert "too few" in res.stdout and "better" in res.stdout and "quiz_mc (acc, n=24)" in res.stdout
    print(res.stdout)
    ok = cli("verify", tmp_path / "eval")
    assert ok.exit_code == 0, ok.output


def test_heldout_loss_equals_an_independent_computation(models, tmp_path):
    """NLL per answer token equals transformers' own loss over the same tokens, with the labels masked by hand
    from the chat template (the prompt rendered with its generation prompt, as TRL does)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shadowmerge.evaluate import EvalSettings, evaluate

    rows = QUESTIONS[:6] + [("who is pip", "pip is the shadowmerge mascot a grey heron")]
    held = write_heldout(tmp_path / "held.jsonl", rows)
    report = evaluate([("instruct", str(models["instruct"])), ("tuned", str(models["tuned"]))],
                      EvalSettings(heldout=str(held), device="cpu", dtype="float32"), out=None, progress=False)
    for label in ("instruct", "tuned"):
        tok = AutoTokenizer.from_pretrained(models[label])
        model = AutoModelForCausalLM.from_pretrained(models[label], dtype=torch.float32).eval()
        total, count = 0.0, 0
        for q, a in rows:
            prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
            ids = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}])[
                "input_ids"]
            assert ids[:len(prompt)] == prompt
            labels = [-100] * len(prompt) + ids[len(prompt):]
            n = len(ids) - len(prompt)
            with torch.no_grad():
                total += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss) * n
            count += n
        got = next(h for h in report.data["heldout"] if h["model"] == label)
        assert got["tokens"] == count
        # both are float32 log-softmax values of the same logits, summed over <= 40 tokens: they agree to a few
        # float32 ulps of each term (transformers' mean, times n, adds one rounding per row)
        assert got["nll_per_token"] == pytest.approx(total / count, rel=2e-6)


def test_the_alpha_sweep_evaluates_what_graft_alpha_writes(models, tmp_path, cli):
    """Each α's model gives the same scores and held-out loss as the model `graft --alpha α` writes, evaluated on its
    own; the best α is reported; no temporary model is left."""
    inst, base, tuned = models["instruct"], models["base"], models["tuned_base"]
    tasks = write_tasks(tmp_path / "tasks")
    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS[:8])
    common = ["--tasks", "quiz_mc", "--include-path", tasks, "--heldout", held, "--device", "cpu", "--limit", "12",
              "-q"]
    res = cli("eval", "--instruct", inst, "--base", base, "--tuned", tuned, "--alpha", "0.5,1", *common,
              "--out", tmp_path / "sweep")
    assert res.exit_code == 0, res.output
    sweep = json.loads((tmp_path / "sweep" / "eval.json").read_text())
    assert list(sweep["models"]) == ["instruct", "alpha=0.5", "alpha=1"]
    assert sweep["best_alpha"]["per_task"]["quiz_mc"]["alpha"] in (0.5, 1.0)
    assert sweep["best_alpha"]["overall"]["alpha"] in (0.5, 1.0)
    best = sweep["best_alpha"]
    assert best["per_task"]["quiz_mc"]["vs_reference"]["n"] == 12 and best["heldout"]["alpha"] in (0.5, 1.0)
    assert any("picked on the same items" in n for n in best["notes"])
    assert "best α by the tasks (mean primary score over tasks)" in res.stdout and "; by held-out loss: " in res.stdout
    assert "## Best α" in (tmp_path / "sweep" / "eval.md").read_text()
    assert not [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith(".")]
    assert not [p for p in tmp_path.iterdir() if "shadowmerge" in p.name]
    for alpha in ("0.5", "1"):
        assert cli("graft", "--instruct", inst, "--base", base, "--tuned", tuned, "--alpha", alpha, "--out",
                   tmp_path / f"g{alpha}", "-q").exit_code == 0
        one = cli("eval", f"instruct={inst}", f"g={tmp_path / f'g{alpha}'}", *common, "--out", tmp_path / f"e{alpha}")
        assert one.exit_code == 0, one.output
        alone = json.loads((tmp_path / f"e{alpha}" / "eval.json").read_text())
        assert [s["value"] for s in alone["scores"] if s["model"] == "g"] == \
            [s["value"] for s in sweep["scores"] if s["model"] == f"alpha={alpha}"]
        assert [h["nll_per_token"] for h in alone["heldout"] if h["model"] == "g"] == \
            [h["nll_per_token"] for h in sweep["heldout"] if h["model"] == f"alpha={alpha}"]


@pytest.fixture
def bad_inputs(models, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    notok = tmp_path / "notok"
    shutil.copytree(models["instruct"], notok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (notok / name).unlink()
    notemplate = tmp_path / "notemplate"
    shutil.copytree(models["instruct"], notemplate)
    cfg = json.loads((notemplate / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (notemplate / "tokenizer_config.json").write_text(json.dumps(cfg))
    (notemplate / "chat_template.jinja").unlink(missing_ok=True)
    badyaml = tmp_path / "badyaml"
    badyaml.mkdir()
    (badyaml / "broken.yaml").write_text("task: broken\n  dataset_path: [json\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n" +
                    json.dumps({"messages": [{"role": "user"}]}) + "\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b"\xff\xfe" + json.dumps({"instruction": "caf\u00e9", "output": "x"}).encode())
    return {"tasks": tasks, "latin1": latin1, "notok": notok, "notemplate": notemplate, "badyaml": badyaml, "held": held, **models}


BAD = [
    (["--tasks", "quiz_mcq", "--include-path", "{tasks}"], "did you mean quiz_mc"),
    (["--tasks", "quiz_mc", "--include-path", "{badyaml}"], "broken.yaml does not parse"),
    (["--tasks", "quiz_mc", "--include-path", "{tasks}/nowhere"], "is not a folder"),
    (["--heldout", "{held}"], "row 2"),
    (["--heldout", "{tasks}/missing.jsonl"], "not found"),
    (["--heldout", "{latin1}"], "not UTF-8 text (byte 0)"),
    (["--heldout", "{tasks}/items.jsonl"], "unknown row format"),
    ([], "nothing to evaluate"),
    pytest.param(["--tasks", "quiz_mc", "--include-path", "{tasks}", "--backend", "vllm"], "needs vLLM",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")),
    (["--tasks", "quiz_mc", "--include-path", "{tasks}", "--limit", "0"], "--limit"),
]


@pytest.mark.parametrize("args, expect", BAD)
def test_bad_settings_are_one_line(bad_inputs, tmp_path, cli, args, expect):
    args = [a.format(**bad_inputs) for a in args]
    run_bad(cli, tmp_path, [bad_inputs["instruct"]], f"a={bad_inputs['instruct']}", f"b={bad_inputs['tuned']}",
            *args, expect=expect, command=("eval",))


@pytest.mark.parametrize("models_given, expect", [
    (["a={instruct}", "a={tuned}"], "given twice"),
    (["a={tmp}/missing", "b={instruct}"], "missing"),
    (["a={instruct}", "b={notok}"], "has no tokenizer"),
    (["a={instruct}", "b={notemplate}"], "has no chat template"),
    (["a={instruct}"], "at least two models"),
    (["bad/label={instruct}", "b={tuned}"], "the label"),
])
def test_bad_models_are_one_line(bad_inputs, tmp_path, cli, models_given, expect):
    given = [m.format(tmp=tmp_path, **bad_inputs) for m in models_given]
    run_bad(cli, tmp_path, [bad_inputs["instruct"]], *given, "--tasks", "quiz_mc", "--include-path",
            bad_inputs["tasks"], expect=expect, command=("eval",))


def test_a_quantized_model_and_an_existing_out_are_refused(bad_inputs, tmp_path, cli):
    quant = tmp_path / "quant"
    shutil.copytree(bad_inputs["instruct"], quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (quant / "config.json").write_text(json.dumps(cfg))
    run_bad(cli, tmp_path, [quant], f"a={bad_inputs['instruct']}", f"q={quant}", "--heldout",
            write_heldout(tmp_path / "h.jsonl", QUESTIONS[:2]), expect="quantized", command=("eval",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    run_bad(cli, tmp_path, [tmp_path / "out"], f"a={bad_inputs['instruct']}", f"b={bad_inputs['tuned']}",
            "--heldout", tmp_path / "h.jsonl", expect="already exists", command=("eval",))


def test_a_builtin_task_without_its_data_offline_fails_at_once(bad_inputs, tmp_path, cli):
    start = time.monotonic()
    err = run_bad(cli, tmp_path, [bad_inputs["instruct"]], f"a={bad_inputs['instruct']}", f"b={bad_inputs['tuned']}",
                  "--tasks", "arc_easy", expect="not available offline", command=("eval",))
    assert "--include-path" in err
    assert time.monotonic() - start < 60      # indexing lm_eval's own tasks (~10 s), then no retries


def test_without_lm_eval_tasks_say_what_to_install(bad_inputs, tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    run_bad(cli, tmp_path, [bad_inputs["instruct"]], f"a={bad_inputs['instruct']}", f"b={bad_inputs['tuned']}",
            "--tasks", "quiz_mc", "--include-path", bad_inputs["tasks"], expect="pip install 'shadowmerge[eval]'",
            command=("eval",))


def test_sigterm_mid_run_leaves_nothing(models, tmp_path):
    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS * 200)
    before = tree_digest(models["instruct"])
    cmd = [str(Path(sys.executable).parent / "shadowmerge"), "eval", f"a={models['instruct']}",
           f"b={models['tuned']}", "--heldout", str(held), "--device", "cpu", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for line in proc.stderr:
        if "model 1/2" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(60) == 128 + signal.SIGTERM, rest
    assert "interrupted (SIGTERM)" in rest and "Traceback" not in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held.jsonl"]
    assert tree_digest(models["instruct"]) == before


def test_train_with_eval_puts_the_table_into_run_json_and_the_card(tmp_path, cli):
    """train --eval: the Instruct, shadow/ and instruct-ft/ evaluated at the end; the table is in run.json, the card
    and the printed summary; OUT/eval/ has the report and the run verifies."""
    inst, base = tinymodels.chat_pair(tmp_path / "models")
    tasks = write_tasks(tmp_path / "tasks")
    data = write_heldout(tmp_path / "train.jsonl", QUESTIONS[:8])
    res = cli("train", "--base", base, "--instruct", inst, "--data", data, "--out", tmp_path / "run", "--baseline",
              "--max-steps", "4", "--lr", "5e-3", "--batch-size", "4", "--grad-accum", "1", "--lora-rank", "4",
              "--eval", "quiz_mc", "--eval-include-path", tasks, "--eval-heldout", data)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["eval"]["reference"] == "instruct"
    assert {s["model"] for s in record["eval"]["scores"]} == {"instruct", "shadow", "instruct-ft"}
    assert {(p["model"], p["against"]) for p in record["eval"]["paired"]} == {
        ("shadow", "instruct-ft"), ("shadow", "instruct"), ("instruct-ft", "instruct")}
    assert {h["model"] for h in record["eval"]["heldout"]} == {"instruct", "shadow", "instruct-ft"}
    # the paper's comparison is the headline: shadow against instruct-ft, in run.json, the card and the summary
    assert record["eval"]["compare"] == [["shadow", "instruct-ft"]]
    assert {(p["task"], p["model"], p["against"]) for p in record["eval"]["headline"]} == {
        ("quiz_mc", "shadow", "instruct-ft"), ("heldout", "shadow", "instruct-ft")}
    assert all(p["n"] > 0 and "differing" in p and p["verdict"] for p in record["eval"]["headline"])
    card = (tmp_path / "run" / "shadow" / "README.md").read_text()
    assert "## Evaluation" in card and "| instruct (reference) |" in card and "quiz_mc (acc, n=24)" in card
    assert "| task | instruct | instruct-ft | shadow | Δ(shadow − instruct-ft) |" in card
    assert card.index("Δ(shadow − instruct-ft)") < card.index("| instruct (reference) |")
    assert "instruct (reference)" in res.stdout and "held-out NLL/token" in res.stdout
    tail = res.stdout[res.stdout.index("shadow against instruct-ft (Δ = first − second):"):]
    assert "Δ(shadow − instruct-ft)" in tail and "shadow vs instruct-ft on quiz_mc (acc)" in tail
    assert tail.index("shadow vs instruct-ft") < tail.index("wrote ")
    evaluated = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert evaluated["models"]["shadow"]["path"] == str((tmp_path / "run" / "shadow").absolute())
    assert cli("verify", tmp_path / "run").exit_code == 0
    # a bad task is refused before any training
    bad = cli("train", "--base", base, "--instruct", inst, "--data", data, "--out", tmp_path / "run2",
              "--max-steps", "1", "--eval", "quiz_mcq", "--eval-include-path", tasks)
    assert bad.exit_code == 1 and "did you mean quiz_mc" in bad.stderr and not (tmp_path / "run2").exists()


def test_a_hub_id_is_resolved_header_first_and_its_commit_recorded(models, tmp_path):
    """A model given as a Hub id (a local Hub-compatible server): checked from its headers and side files, its
    weights downloaded when its turn comes, its commit in eval.json, and its loss that of the same local folder."""
    from hubserver import FakeHub

    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS[:6])
    with FakeHub() as hub:
        sha = hub.add("org/chat-inst", models["instruct"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
        res = subprocess.run([sys.executable, "-m", "shadowmerge", "eval", "hub=org/chat-inst",
                              f"local={models['instruct']}", "--heldout", str(held), "--device", "cpu", "--out",
                              str(tmp_path / "out"), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert data["models"]["hub"]["commit"] == sha and data["models"]["hub"]["repo"] == "org/chat-inst"
    assert data["models"]["local"]["commit"] is None
    loss = {h["model"]: h["nll_per_token"] for h in data["heldout"]}
    assert loss["hub"] == loss["local"]


def test_an_alpha_sweep_with_exchanged_inputs_is_refused_before_any_evaluation(models, tmp_path, cli):
    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS[:2])
    run_bad(cli, tmp_path, [models["instruct"], models["tuned_base"]], "--instruct", models["tuned_base"],
            "--base", models["base"], "--tuned", models["instruct"], "--alpha", "0.5,1", "--heldout", held,
            expect="look exchanged", command=("eval",))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run there with: pytest -m gpu)")
@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vllm"))])
def test_on_a_gpu_the_comparison_is_the_cpu_one(models, tmp_path, cli, backend):
    tasks = write_tasks(tmp_path / "tasks")
    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS[:8])
    data = {}
    for device in ("cpu", "cuda"):
        if device == "cpu" and backend == "vllm":
            continue
        res = cli("eval", f"instruct={models['instruct']}", f"tuned={models['tuned']}", "--tasks", "quiz_mc",
                  "--include-path", tasks, "--heldout", held, "--device", device, "--backend",
                  backend if device == "cuda" else "hf", "--dtype", "float32", "--out", tmp_path / device, "-q")
        assert res.exit_code == 0, res.output
        data[device] = json.loads((tmp_path / device / "eval.json").read_text())
    gpu = data["cuda"]
    assert {(s["model"], s["value"]) for s in gpu["scores"]} == {("instruct", 0.0), ("tuned", 1.0)}
    if "cpu" in data:
        for a, b in zip(data["cpu"]["heldout"], gpu["heldout"]):
            assert b["nll_per_token"] == pytest.approx(a["nll_per_token"], rel=1e-4)


def test_a_model_lm_eval_cannot_load_is_one_line(models, tmp_path, cli):
    """A config that does not match its weights: lm_eval's (transformers') failure becomes one line naming the model
    and the step; nothing is left."""
    broken = tmp_path / "broken"
    shutil.copytree(models["instruct"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 999
    (broken / "config.json").write_text(json.dumps(cfg))
    run_bad(cli, tmp_path, [broken], f"a={models['instruct']}", f"b={broken}", "--tasks", "quiz_mc",
            "--include-path", write_tasks(tmp_path.parent / f"{tmp_path.name}-tasks"), "--device", "cpu",
            expect="model b: loading it failed", command=("eval",))


def test_force_replaces_an_earlier_evaluation(models, tmp_path, cli):
    held = write_heldout(tmp_path / "held.jsonl", QUESTIONS[:2])
    args = [f"a={models['instruct']}", f"b={models['tuned']}", "--heldout", held, "--device", "cpu", "-q", "--out",
            tmp_path / "out"]
    assert cli("eval", *args).exit_code == 0
    again = cli("eval", *args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert cli("eval", *args, "--force").exit_code == 0
    assert cli("verify", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize("value, expect", [
    ({"tasks": "x", "bogus": 1}, "unknown setting(s) bogus"),
    (5, "task names"),
    ({"tasks": "x", "limit": "many"}, "`eval: limit:` has the wrong type"),
    ({"tasks": 3}, "`eval: tasks:` is task names"),
])
def test_a_recipes_eval_key_is_checked(tmp_path, value, expect):
    import yaml

    from shadowmerge.errors import ShadowMergeError
    from shadowmerge.train.recipe import load

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": "b", "instruct": "i", "data": "d", "out": "o", "eval": value}))
    with pytest.raises(ShadowMergeError, match=re.escape(expect)):
        load(recipe, {})
    assert load(None, {"base": "b", "instruct": "i", "data": "d", "out": "o", "eval": "t1,t2",
                       "eval_heldout": "h.jsonl", "eval_include_path": ("tasks",)}).eval == \
        {"tasks": "t1,t2", "heldout": "h.jsonl", "include_path": ["tasks"]}


def chromium():
    """selenium's Chrome driver on Debian's Chromium, headless and offline (every host name resolves to nothing);
    skipped with the reason where they are not installed (.ci/run installs them)."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver) or importlib.util.find_spec("selenium") is None:
        pytest.skip("needs Chromium, ChromeDriver and selenium: apt-get install chromium chromium-driver, "
                    "pip install selenium (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1400,1000"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_html_shows_the_evidence_in_a_real_browser(models, tmp_path, cli):
    """report.html for a named pair: the headline table, the main table with n and verdicts, the figure, and for items
    where the two differ the full prompt (collapsed, not cut), each model's raw generation beside the answer it was
    scored on, and the gold answer. In headless Chromium, offline: it loads with no console error and no request
    for anything outside the page, the tables and the figure are visible, and a prompt opens."""
    from selenium.webdriver.common.by import By

    tasks = write_tasks(tmp_path / "tasks")
    res = cli("eval", f"instruct={models['instruct']}", f"tuned={models['tuned']}", "--compare", "tuned:instruct",
              "--tasks", "quiz_mc,quiz_gen", "--include-path", tasks, "--device", "cpu", "--limit", "8",
              "--out", tmp_path / "eval", "-q")
    assert res.exit_code == 0, res.output
    page = (tmp_path / "eval" / "report.html").read_text()
    samples = [json.loads(line) for line in
               (tmp_path / "eval" / "samples" / "instruct" / "samples_quiz_gen.jsonl").read_text().splitlines()]
    first = samples[0]
    prompt = first["arguments"]["gen_args_0"]["arg_0"] if isinstance(first["arguments"], dict) else \
        first["arguments"][0][0]
    import html as htmllib

    assert htmllib.escape(prompt) in page                    # the whole prompt, chat template and all
    raw = first["resps"][0][0]
    assert raw.strip() and htmllib.escape(raw) in page and first["filtered_resps"][0] != raw
    assert f"<td>{QUESTIONS[0][1]}</td>" in page              # the gold answer
    assert "(8 items differ; 8 shown)" in page and "n=8" in page

    driver = chromium()
    try:
        driver.get((tmp_path / "eval" / "report.html").as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith("data:") for name in loaded), loaded
        figure = driver.find_element(By.ID, "figure")
        assert figure.is_displayed() and figure.size["width"] > 300
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", figure) > 300
        for cls, rows in (("headline", 3), ("main", 3)):
            table = driver.find_element(By.CSS_SELECTOR, f"table.{cls}")
            assert table.is_displayed() and len(table.find_elements(By.TAG_NAME, "tr")) == rows
        main = driver.find_element(By.CSS_SELECTOR, "table.main").text
        assert "n=8" in main and "better" in main and "8 of 8 differ" in main
        full = driver.find_element(By.CSS_SELECTOR, "table.items pre")
        assert not full.is_displayed()
        driver.find_element(By.CSS_SELECTOR, "table.items summary").click()
        assert full.is_displayed() and "<|im_start|>" in full.text
    finally:
        driver.quit()


@pytest.mark.parametrize("compare, expect", [
    ("b:nobody", "no model is labelled 'nobody'; name two of the labels a, b, e.g. --compare b:a"),
    ("a:a", "compares a model with itself"),
    ("a", "is not a pair: write two of the model labels (a, b) as A:B"),
    ("a:b:c", "is not a pair: write two of the model labels (a, b) as A:B"),
])
def test_a_bad_compare_is_one_line_and_its_advice_works(models, tmp_path, cli, compare, expect):
    held = write_heldout(tmp_path.parent / f"{tmp_path.name}-held.jsonl", QUESTIONS[:6])
    args = [f"a={models['instruct']}", f"b={models['tuned']}", "--heldout", held, "--device", "cpu"]
    err = run_bad(cli, tmp_path, [models["instruct"]], *args, "--compare", compare, expect=expect, command=("eval",))
    if "e.g. --compare" in err:
        advised = err.rsplit("e.g. --compare ", 1)[1].strip()
        ok = cli("eval", *args, "--compare", advised, "--out", tmp_path / "out", "-q")
        assert ok.exit_code == 0, ok.output
        data = json.loads((tmp_path / "out" / "eval.json").read_text())
        assert data["compare"] == [["b", "a"]] and data["paired"][0]["headline"]


def test_a_recipes_compare_names_the_runs_own_models(tmp_path):
    from shadowmerge.errors import ShadowMergeError
    from shadowmerge.train.prepare import _eval_prepare
    from shadowmerge.train.recipe import load

    tasks = write_tasks(tmp_path / "tasks")
    recipe = load(None, {"base": "b", "instruct": "i", "data": "d", "out": "o", "eval": "quiz_mc",
                         "eval_include_path": (str(tasks),)})
    assert _eval_prepare(recipe, True, True).settings.compare == ("shadow:instruct-ft",)
    assert _eval_prepare(recipe, True, False).settings.compare == ()
    recipe.eval["compare"] = ["shadow:ft"]
    with pytest.raises(ShadowMergeError, match="no model is labelled 'ft'; name two of the labels instruct, "
                                               "instruct-ft, shadow"):
        _eval_prepare(recipe, True, True)
    recipe.eval["compare"] = ["instruct-ft:instruct"]
    assert _eval_prepare(recipe, True, True).settings.compare == ("shadow:instruct-ft", "instruct-ft:instruct")


def test_records_name_local_inputs_by_absolute_paths(models, tmp_path, cli, monkeypatch):
    """Relative paths on the command line are absolute in every record (eval.json, run.json and its recipe), so a
    record means the same from any working directory; train --eval-limit reaches the evaluation."""
    from adapters import make_adapter

    make_adapter(models["base"], tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    shutil.copytree(models["instruct"], tmp_path / "inst")
    shutil.copytree(models["base"], tmp_path / "base")
    write_heldout(tmp_path / "held.jsonl", QUESTIONS[:4])
    write_tasks(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    res = cli("eval", "--instruct", "inst", "--lora", "lora", "--heldout", "held.jsonl", "--device", "cpu", "--out",
              "e", "-q")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert list(data["models"]) == ["instruct", "alpha=1"]            # without --alpha: the graft itself
    assert data["models"]["alpha=1"]["lora"] == str(tmp_path / "lora")
    assert data["models"]["alpha=1"]["instruct"] == str(tmp_path / "inst")
    assert data["settings"]["heldout"] == str(tmp_path / "held.jsonl")
    run = cli("train", "--base", "base", "--instruct", "inst", "--data", "held.jsonl", "--out", "run", "--max-steps",
              "1", "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "2", "--eval", "quiz_mc",
              "--eval-include-path", "tasks", "--eval-heldout", "held.jsonl", "--eval-limit", "3", "-q")
    assert run.exit_code == 0, run.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["inputs"]["data"]["ref"] == str(tmp_path / "held.jsonl")
    assert record["recipe"]["eval"]["heldout"] == str(tmp_path / "held.jsonl")
    assert record["recipe"]["eval"]["include_path"] == [str(tmp_path / "tasks")]
    assert record["recipe"]["eval"]["limit"] == 3
    assert {s["n"] for s in record["eval"]["scores"]} == {3}
