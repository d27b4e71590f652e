"""Every error that suggests a flag or a command is tested to work: a rule over the whole package, as
tests/test_next_steps.py rules that every error says what to do.

Each `ShadowMergeError(...)` raised in shadowmerge/ whose next step names a flag (`--force`, `--lora`, ...) or a
command (`shadowmerge graft ...`) is found in the source (ast). It must have a scenario below, keyed by a literal
fragment of its message: the command that meets the error, and the command the advice leads to. The test runs
both through the CLI: the first must fail with that message in one line, the second must get past it (it
succeeds). Messages that cannot be met on this kind of machine (a GPU, the network, a distributed launch,
LLaMA-Factory) are listed in EXEMPT with the reason and where they are tested instead. A new advising error with
neither fails here.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import yaml

import test_next_steps
import tinymodels
from adapters import make_adapter
from conftest import one_line_error

ADVISES = re.compile(r"\b(pass|add|use|with|without|leave out|drop|run|try|raise|lower|set|give)\b[^;]{0,80}?"
                     r"(--[a-z][a-z0-9-]+|`?shadowmerge [a-z]+ )")


def advice_of(message: str) -> str:
    """A message's advice: its last clause (after the last ';'), or, without one, what follows its first ': '."""
    if ";" in message:
        return message.rsplit(";", 1)[-1]
    return message.split(": ", 1)[-1]


def advising() -> list[tuple[str, int, str]]:
    """(file, line, message) of every error whose advice tells to run a flag or a command."""
    return [(str(path), line, text) for path, line, text in test_next_steps.messages()
            if ADVISES.search(advice_of(text))]


@dataclass
class Advice:
    key: str                                   # a literal fragment of the message
    bad: Callable[[SimpleNamespace], list]     # the command that meets the error (CLI arguments)
    good: Callable[[SimpleNamespace], list]    # the command the advice leads to
    setup: Callable[[SimpleNamespace], None] | None = None


def _graft(x, *extra):
    return ["graft", "--instruct", x.i, "--base", x.b, "--tuned", x.t, *extra, "--out", x.out, "-q"]


def _eval(x, *extra):
    return ["eval", *extra, "--device", "cpu", "--out", x.out, "-q"]


def _train(x, *extra, data=None):
    return ["train", "--base", x.chat_b, "--instruct", x.chat_i, "--data", data or x.rows, "--max-steps", "1",
            "--batch-size", "2", "--grad-accum", "1", "--lora-rank", "2", *extra, "--out", x.out, "-q"]


def _verify_input_gone(x):
    moved = x.root / "moved-instruct"
    shutil.copytree(x.i, moved)
    assert _run(x, ["graft", "--instruct", moved, "--base", x.b, "--tuned", x.t, "--out", x.made, "-q"]) == 0
    shutil.rmtree(moved)


def _verify_old_record(x):
    assert _run(x, _graft(x)[:-3] + ["--out", x.made, "-q"]) == 0
    record = json.loads((x.made / "shadowmerge.json").read_text())
    record.pop("input_paths")
    (x.made / "shadowmerge.json").write_text(json.dumps(record))


def _existing_output(x):
    assert _run(x, _graft(x)) == 0


def _own_folder(x):
    x.out.mkdir()
    (x.out / "notes.txt").write_text("mine")


def _run(x, args) -> int:
    return x.cli(*args).exit_code


SCENARIOS = [
    # several updates
    Advice("--weights gives", lambda x: _graft(x, "--tuned", x.t, "--weights", "1,2,3"),
           lambda x: _graft(x, "--tuned", x.t, "--weights", "1,1")),
    Advice("needs --density in (0, 1]", lambda x: _graft(x, "--tuned", x.t, "--combine", "ties"),
           lambda x: _graft(x, "--tuned", x.t, "--combine", "ties", "--density", "0.5")),
    # similarity
    Advice("--sample must be at least 2", lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--sample", "1"],
           lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--sample", "64", "-q"]),
    Advice("--candidates goes with --instruct alone",
           lambda x: ["similarity", "--instruct", x.i, "--base", x.b, "--candidates", x.b, "-q"],
           lambda x: ["similarity", "--instruct", x.i, "--candidates", x.b, "-q"]),
    Advice("or pass --sample N for a quick estimate", lambda x: ["similarity", "--base", x.b, "--instruct", x.i],
           lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--sample", "20", "-q"]),
    Advice("nothing to compare: pass --base and --instruct", lambda x: ["similarity", "--out", x.out, "-q"],
           lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--out", x.out, "-q"]),
    Advice("--base and --instruct go together", lambda x: ["similarity", "--base", x.b, "--out", x.out, "-q"],
           lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--out", x.out, "-q"]),
    Advice("--matrix-size must be at least 2", lambda x: ["similarity", "--base", x.b, "--instruct", x.i,
                                                          "--matrix", x.matrix, "--matrix-size", "1", "--out", x.out],
           lambda x: ["similarity", "--base", x.b, "--instruct", x.i, "--matrix", x.matrix, "--matrix-size", "48",
                      "--out", x.out, "-q"]),
    # inputs
    Advice("this looks like a LoRA adapter", lambda x: ["graft", "--instruct", x.i, "--base", x.b, "--tuned", x.a,
                                                        "--out", x.out, "-q"],
           lambda x: ["graft", "--instruct", x.i, "--lora", x.a, "--out", x.out, "-q"]),
    Advice("this looks like a LoRA adapter", lambda x: _eval(x, f"instruct={x.chat_i}", f"lora={x.chat_a}",
                                                             "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--heldout", x.rows)),
    Advice("only pickle weights ({name}); pass --allow-pickle", lambda x: _graft(x)[:5] + ["--tuned", x.pickled,
                                                                                        "--out", x.out, "-q"],
           lambda x: _graft(x)[:5] + ["--tuned", x.pickled, "--allow-pickle", "--out", x.out, "-q"]),
    Advice("only pickle weights ({PICKLE}); pass --allow-pickle",
           lambda x: ["graft", "--instruct", x.i, "--lora", x.pickled_a, "--out", x.out, "-q"],
           lambda x: ["graft", "--instruct", x.i, "--lora", x.pickled_a, "--allow-pickle", "--out", x.out, "-q"]),
    Advice("asked for, but CUDA is not available here; use --device cpu", lambda x: _graft(x, "--device", "cuda"),
           lambda x: _graft(x, "--device", "cpu")),
    Advice("asked for, but CUDA is not available here; use --device cpu",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)[:-5] +
           ["--device", "cuda", "--out", x.out, "-q"],
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)),
    Advice("has NaN/Inf values; check the inputs (or pass --allow-nonfinite",
           lambda x: _graft(x)[:5] + ["--tuned", x.nan, "--out", x.out, "-q"],
           lambda x: _graft(x)[:5] + ["--tuned", x.nan, "--allow-nonfinite", "--out", x.out, "-q"]),
    Advice("pass --vocab common", lambda x: ["graft", "--instruct", x.wide_i, "--base", x.b, "--tuned", x.t, "--out",
                                             x.out, "-q"],
           lambda x: ["graft", "--instruct", x.wide_i, "--base", x.b, "--tuned", x.t, "--vocab", "common", "--out",
                      x.out, "-q"]),
    Advice("not floating point; exclude it with --exclude",
           lambda x: ["graft", "--instruct", x.float_i, "--base", x.int_b, "--tuned", x.int_t, "--out", x.out, "-q"],
           lambda x: ["graft", "--instruct", x.float_i, "--base", x.int_b, "--tuned", x.int_t, "--exclude",
                      "position_ids", "--out", x.out, "-q"]),
    Advice("a graft needs --base (the model that was tuned)",
           lambda x: ["graft", "--instruct", x.i, "--out", x.out, "-q"],
           lambda x: ["graft", "--instruct", x.i, "--lora", x.a, "--out", x.out, "-q"]),
    Advice("--alpha must be a finite number", lambda x: _graft(x, "--alpha", "nan"),
           lambda x: _graft(x, "--alpha", "1")),
    Advice("pass --base, the model the adapter was trained on",
           lambda x: ["graft", "--instruct", x.i, "--lora", x.dora, "--out", x.out, "-q"],
           lambda x: ["graft", "--instruct", x.i, "--lora", x.dora, "--base", x.b, "--out", x.out, "-q"]),
    Advice("is mergekit's MODEL+LORA syntax", lambda x: ["mergekit", x.plus_config, x.out, "-q"],
           lambda x: ["graft", "--instruct", x.i, "--lora", x.a, "--out", x.out, "-q"]),
    Advice("keep the update with --dtype float32", lambda x: _graft(x)[:5] + ["--tuned", x.tiny_t, "--out", x.out,
                                                                             "-q"],
           lambda x: _graft(x)[:5] + ["--tuned", x.tiny_t, "--dtype", "float32", "--out", x.out, "-q"]),
    # outputs
    Advice("already exists; choose another {flag} or pass --force", _graft, lambda x: _graft(x, "--force"),
           setup=_existing_output),
    Advice("was not written by shadowmerge (it has no shadowmerge record); --force replaces only",
           _graft, lambda x: _graft(x)[:-3] + ["--out", x.root / "elsewhere", "-q"], setup=_own_folder),
    # extract
    Advice("pass the fine-tune of the Base as --tuned", lambda x: ["extract", "--base", x.b, "--tuned", x.b,
                                                                   "--rank", "4", "--out", x.out, "-q"],
           lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--rank", "4", "--out", x.out, "-q"]),
    Advice("give one of --rank R or --energy E", lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--out", x.out],
           lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--energy", "0.99", "--out", x.out, "-q"]),
    Advice("--rank must be at least 1", lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--rank", "0", "--out",
                                                   x.out],
           lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--rank", "64", "--out", x.out, "-q"]),
    Advice("--max-rank must be at least 1", lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--energy", "0.9",
                                                       "--max-rank", "0", "--out", x.out],
           lambda x: ["extract", "--base", x.b, "--tuned", x.t, "--energy", "0.9", "--max-rank", "256", "--out",
                      x.out, "-q"]),
    # verify
    Advice("--sample must be at least 1", lambda x: ["verify", x.made, "--recompute", "--sample", "0"],
           lambda x: ["verify", x.made, "--recompute", "--sample", "20", "-q"], setup=lambda x: _run(
               x, _graft(x)[:-3] + ["--out", x.made, "-q"])),
    Advice("--sample goes with --recompute", lambda x: ["verify", x.made, "--sample", "2"],
           lambda x: ["verify", x.made, "--recompute", "--sample", "2", "-q"], setup=lambda x: _run(
               x, _graft(x)[:-3] + ["--out", x.made, "-q"])),
    Advice("which is not there; run verify where the inputs are, or without --recompute",
           lambda x: ["verify", x.made, "--recompute"], lambda x: ["verify", x.made, "-q"],
           setup=_verify_input_gone),
    Advice("only the sha256 and headers can be checked: run verify without --recompute",
           lambda x: ["verify", x.made, "--recompute"], lambda x: ["verify", x.made, "-q"],
           setup=_verify_old_record),
    Advice("nothing to recompute", lambda x: ["verify", x.made, "--recompute"], lambda x: ["verify", x.made, "-q"],
           setup=lambda x: _run(x, ["similarity", "--base", x.b, "--instruct", x.i, "--out", x.made, "-q"])),
    # eval
    Advice("give numbers separated by commas", lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a,
                                                               "--alpha", "x", "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--alpha", "0.5,0.75,1,1.25", "--heldout",
                           x.rows)),
    Advice("--alpha sweeps I + α·Δ: pass --instruct with --lora", lambda x: _eval(x, "--alpha", "1", "--lora",
                                                                                  x.chat_a, "--heldout", x.rows),
           lambda x: _eval(x, "--alpha", "1", "--instruct", x.chat_i, "--lora", x.chat_a, "--heldout", x.rows)),
    Advice("evaluating the graft I + α·Δ needs --instruct", lambda x: _eval(x, "--lora", x.chat_a, "--heldout",
                                                                           x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--heldout", x.rows)),
    Advice("--alpha needs at least one value", lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a,
                                                               "--alpha", ",", "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--alpha", "0.5,1", "--heldout", x.rows)),
    Advice("--alpha values must be finite numbers, each given once",
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--alpha", "1,1", "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--alpha", "0.5,0.75,1", "--heldout",
                           x.rows)),
    Advice("is not a method; use", lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--combine",
                                                   "sum,average", "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--combine", "sum,ties", "--density", "0.5",
                           "--heldout", x.rows)),
    Advice("names a setting twice", lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--combine",
                                                    "ties,ties", "--density", "0.5", "--heldout", x.rows),
           lambda x: _eval(x, "--instruct", x.chat_i, "--lora", x.chat_a, "--combine", "sum,ties", "--density", "0.5",
                           "--heldout", x.rows)),
    Advice("no models: pass LABEL=PATH_OR_HUB_ID", lambda x: _eval(x, "--heldout", x.rows),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)),
    Advice("nothing to evaluate: pass --tasks", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)),
    Advice("--num-fewshot must be 0 or more", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz",
                                                              "--include-path", x.tasks, "--num-fewshot", "-1"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--num-fewshot", "5", "--limit", "4")),
    Advice("--limit must be a positive number", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks",
                                                                "quiz", "--include-path", x.tasks, "--limit", "0"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--limit", "200")),
    Advice("--heldout-cutoff must be at least 2", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout",
                                                                  x.rows, "--heldout-cutoff", "1"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--heldout-cutoff", "4096")),
    Advice("--batch-size must be at least 1", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz",
                                                              "--include-path", x.tasks, "--batch-size", "0"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--batch-size", "8")),
    Advice("write a task YAML and pass its folder with --include-path",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks)),
    Advice("is not available offline", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "arc_easy"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks)),
    Advice("--backend vllm needs vLLM", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz",
                                                        "--include-path", x.tasks, "--backend", "vllm"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--backend", "hf")),
    Advice("and --apply-chat-template is on; pass --no-apply-chat-template",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.plain}", "--tasks", "quiz", "--include-path", x.tasks),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.plain}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--no-apply-chat-template")),
    Advice("or leave out --heldout and pass --no-apply-chat-template",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.plain}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--heldout", x.rows),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.plain}", "--tasks", "quiz", "--include-path", x.tasks,
                           "--no-apply-chat-template")),
    Advice("both get the label", lambda x: _eval(x, x.same[0], x.same[1], "--heldout", x.rows),
           lambda x: _eval(x, f"shadow-1={x.same[0]}", f"shadow-2={x.same[1]}", "--heldout", x.rows)),
    Advice("is not a pair: write two of the model labels", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}",
                                                                          "--heldout", x.rows, "--compare", "a"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--compare", "b:a")),
    Advice("compares a model with itself", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows,
                                                           "--compare", "a:a"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--compare", "b:a")),
    Advice("no model is labelled", lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows,
                                                   "--compare", "b:c"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--compare", "b:a")),
    Advice("no row has an answer token within the first",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--heldout-cutoff", "2"),
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows, "--heldout-cutoff", "4096")),
    Advice("Apple's MPS is not available here; use --device cpu",
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)[:-5] +
           ["--device", "mps", "--out", x.out, "-q"],
           lambda x: _eval(x, f"a={x.chat_i}", f"b={x.chat_b}", "--heldout", x.rows)),
    # FP8
    Advice("stores FP8 blocks, which mergekit cannot read", lambda x: ["mergekit", x.fp8_config, x.out, "-q"],
           lambda x: ["graft", "--instruct", x.fp8_i, "--base", x.fp8_b, "--tuned", x.fp8_t, "--out", x.out, "-q"]),
    Advice("which transformers cannot decode on a CPU exactly; use the graft's bf16 output",
           lambda x: _eval(x, f"fp8={x.fp8_chat}", f"b={x.made}", "--heldout", x.rows),
           lambda x: _eval(x, f"bf16={x.made}", f"b={x.chat_i}", "--heldout", x.rows),
           setup=lambda x: _run(x, ["graft", "--instruct", x.fp8_chat, "--base", x.fp8_b, "--tuned", x.fp8_t,
                                    "--out", x.made, "-q"])),
    # train
    Advice("training changed nothing the graft carries", lambda x: _train(x, "--lr", "1e-30"),
           lambda x: _train(x, "--lr", "5e-2", "--max-steps", "3")),
    Advice("start without --resume", lambda x: _train(x, "--resume"), lambda x: _train(x)),
    Advice("pass preference data, or use --stage sft", lambda x: _train(x, "--stage", "dpo"), lambda x: _train(x)),
    Advice("preference rows (prompt/chosen/rejected) are for DPO; pass --stage dpo",
           lambda x: _train(x, data=x.pairs), lambda x: _train(x, "--stage", "dpo", data=x.pairs)),
    Advice("the trl backend trains in this process: leave --emit-only out", lambda x: _train(x, "--emit-only"),
           lambda x: _train(x, "--emit-only", "--backend", "llamafactory", "--template", "qwen3")),
]

EXEMPT = {
    "--recompute needs the inputs as they were": "an object-store input changed or gone since the run "
                                                 "(tests/test_stream.py); verify without --recompute is tested as such",
    "the updates share no tensor of the Base's shape": "updates of another model (an architecture check refuses "
                                                       "most first; tests/test_multi.py)",
    "tensor to sample (the official figure": "a model whose layers are not named model.layers.N "
                                             "(tests/test_sampling.py, with the full scan it advises)",
    "loads whole model folders, and this one is read by range": "a streamed input to eval/train/retarget "
                                                                "(tests/test_stream.py, with the folder it advises)",
    "it cannot be streamed: bypass the proxy": "a server that ignores Range (tests/test_stream.py, then without "
                                               "--stream as advised)",
    "no delta source fits these inputs": "a delta-source registry without the built-in sources (the Python API; the "
                                         "CLI says `a graft needs --base ...` first)",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "a CUDA GPU (tests/test_kernels.py, -m gpu)",
    "the Hub repo has only pickle weights": "a Hub repo; tests/test_hub.py runs --allow-pickle against the Hub server",
    "cannot be reached": "the network being down for a Hub id (tests/test_hub.py, offline cases)",
    "an α sweep needs an output folder": "only the Python API can leave out out= (the CLI requires --out)",
    "lm_eval returned no results": "a distributed launch (a non-main process)",
    "lm_eval does not offer it": "an lm_eval without a backend click already offers (--backend is a choice)",
    "it is converted when the model loads": "a model whose loading converts the changed tensor (tests/test_extract.py)",
    "these expert tensors are not a parameter": "a model whose experts are not its parameters (tests/test_extract.py)",
    "expert tensors do not make up its": "a damaged MoE checkpoint (tests/test_extract.py)",
    "shadowmerge merges LoRA adapters only": "a non-LoRA peft adapter (tests/test_lora.py)",
    "which shadowmerge does not merge": "an adapter option shadowmerge refuses (tests/test_lora.py)",
    "LoRA on a convolution": "a convolution LoRA (tests/test_lora.py)",
    "a DoRA update normalises over all": "a DoRA adapter onto a resized Instruct (tests/test_lora.py)",
    "base tensor {name} is {dtype}; exclude it": "an integer tensor targeted by an adapter (tests/test_lora.py)",
    "shadowmerge cannot write that update back exactly": "a converted tensor changed by an adapter "
                                                         "(tests/test_vlm.py)",
    "mergekit's output is not a complete model": "an architecture mergekit guesses wrong (tests/test_mergekit.py)",
    "appeared while this run was writing": "a folder appearing mid-run (tests/test_safety.py)",
    "the instruct ties it to the input embedding": "a tied Instruct with an untied Base (tests/test_graft.py)",
    "--resume works with the trl backend": "LLaMA-Factory (tests/with_llamafactory)",
    "add --resume to go on from there": "a complete checkpoint (tests/test_train.py: Ctrl-C, then --resume)",
    "were made by another recipe or data": "a complete checkpoint (tests/test_train.py)",
    "checkpoints of an interrupted run of another recipe": "a complete checkpoint (tests/test_train.py)",
    "--stage sft only": "a vision-language model (tests/test_vlm.py)",
    "rows with images are trained with the TRL backend only": "a vision-language model (tests/test_vlm.py)",
    "name a LLaMA-Factory template": "LLaMA-Factory (tests/with_llamafactory)",
    "is not a run written by `shadowmerge train --backend llamafactory --emit-only`": "it names what to pass",
    "run `llamafactory-cli train": "LLaMA-Factory (tests/with_llamafactory)",
    "max_steps must be a positive integer": "only a recipe file sets 0 (click refuses it as --max-steps); "
                                            "tests/test_train.py",
}


def test_every_advising_error_has_a_scenario_or_a_reason():
    found = advising()
    assert len(found) > 50, "the scan no longer sees the advising errors"
    keys = {a.key for a in SCENARIOS} | set(EXEMPT)
    missing = [f"{path}:{line}: {text[:160]}" for path, line, text in found if not any(k in text for k in keys)]
    assert not missing, "advice without a scenario (add one to SCENARIOS, or a reason to EXEMPT):\n" + \
        "\n".join(missing)
    every = [text for _, _, text in test_next_steps.messages()]      # (scenarios may cover other advice too)
    unused = sorted(k for k in keys if not any(k in text for text in every))
    assert not unused, f"scenarios or exemptions for messages that no longer exist: {unused}"


# ---- the inputs, once -------------------------------------------------------------------------------------------

def _pickled(folder: Path, into: Path, name: str) -> Path:
    """A copy of folder whose safetensors weights are a pickle file instead."""
    from safetensors.torch import load_file

    shutil.copytree(folder, into, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    weights = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights.update(load_file(f))
    torch.save(weights, into / name)
    return into


def _resave(folder: Path, into: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, into)
    for f in sorted(into.glob("*.safetensors")):
        state = load_file(f)
        change(state)
        save_file(state, f, metadata={"format": "pt"})
    return into


def _with_int(folder: Path, into: Path) -> Path:
    def add(state):
        state["model.position_ids"] = torch.arange(8, dtype=torch.int64)
    return _resave(folder, into, add)


def _tasks(folder: Path) -> Path:
    folder.mkdir(parents=True)
    items = [{"question": f"what is w{100 + k}", "choices": ["w200", "w201", "w202"], "label": k % 3}
             for k in range(8)]
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "quiz.yaml").write_text(
        f"task: quiz\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {folder / 'items.jsonl'}}}}}\n"
        f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
        f"doc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("advice")
    i, b, t = tinymodels.triple(root / "triple", "llama")
    chat_i, chat_b = tinymodels.chat_pair(root / "pair")
    x = SimpleNamespace(i=i, b=b, t=t, chat_i=chat_i, chat_b=chat_b)
    x.a = make_adapter(b, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    x.chat_a = make_adapter(chat_b, root / "chat-adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    x.dora = make_adapter(b, root / "dora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    x.pickled = _pickled(t, root / "pickled", "pytorch_model.bin")
    x.pickled_a = _pickled(x.a, root / "pickled-adapter", "adapter_model.bin")
    x.nan = _resave(t, root / "nan", lambda s: s["model.layers.0.self_attn.q_proj.weight"].__setitem__(
        (0, 0), float("nan")))
    def tiny(state):          # float32, the final norm (all near 1) moved by 2^-12: a sixteenth of a bf16 ulp there
        for k in state:
            state[k] = state[k].float()
        state["model.norm.weight"].add_(2 ** -12)
    x.tiny_t = _resave(b, root / "tiny", tiny)
    wide = tinymodels.triple(root / "wide", "llama", vocab_size=300)
    x.wide_i = wide[0]
    x.int_b, x.int_t = (_with_int(p, root / f"int-{p.name}") for p in (b, t))
    x.float_i = _resave(i, root / "float-instruct", lambda s: s.__setitem__("model.position_ids", torch.zeros(8)))
    x.matrix = "model.layers.0.mlp.up_proj.weight"
    x.plain = root / "plain"
    shutil.copytree(chat_i, x.plain)
    cfg = json.loads((x.plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (x.plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    (x.plain / "chat_template.jinja").unlink(missing_ok=True)
    x.same = []
    for where in ("full", "lora"):
        shutil.copytree(chat_i, root / where / "shadow")
        x.same.append(root / where / "shadow")
    x.rows = root / "rows.jsonl"
    x.rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is w{100 + k}"},
                                                       {"role": "assistant", "content": f"w{200 + k}"}]}) + "\n"
                              for k in range(4)))
    x.pairs = root / "pairs.jsonl"
    x.pairs.write_text("".join(json.dumps({"prompt": f"what is w{100 + k}", "chosen": f"w{200 + k}",
                                           "rejected": f"w{150 + k}"}) + "\n" for k in range(4)))
    x.tasks = _tasks(root / "tasks")
    import fp8models

    x.fp8_i, x.fp8_b = fp8models.pair(root / "fp8")
    x.fp8_t = fp8models.tuned_from(x.fp8_b, root / "fp8" / "tuned")
    x.fp8_chat = root / "fp8" / "chat-instruct"
    shutil.copytree(x.fp8_i, x.fp8_chat)
    tinymodels.chat_tokenizer(x.fp8_chat, "instruct")
    x.fp8_config = root / "fp8.yml"
    x.fp8_config.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(x.fp8_b),
                                            "dtype": "bfloat16",
                                            "models": [{"model": str(x.fp8_i), "parameters": {"role": "instruct"}},
                                                       {"model": str(x.fp8_t), "parameters": {"role": "tuned"}}]}))
    x.plus_config = root / "plus.yml"
    x.plus_config.write_text(yaml.safe_dump({"merge_method": "shadow_graft", "base_model": str(b), "dtype": "bfloat16",
                                             "models": [{"model": str(i), "parameters": {"role": "instruct"}},
                                                        {"model": f"{b}+{x.a}", "parameters": {"role": "tuned"}}]}))
    return x


@pytest.fixture
def ns(inputs, tmp_path, cli, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return SimpleNamespace(**vars(inputs), root=tmp_path, out=tmp_path / "out", made=tmp_path / "made", cli=cli)


def _id(a: Advice) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", a.key)[:50]


@pytest.mark.parametrize("advice", SCENARIOS, ids=[f"{k}-{_id(a)}" for k, a in enumerate(SCENARIOS)])
def test_the_advice_of_an_error_works(advice, ns):
    if "CUDA is not available" in advice.key and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "MPS is not available" in advice.key and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if "needs vLLM" in advice.key and __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    if advice.setup is not None:
        advice.setup(ns)
    bad = ns.cli(*advice.bad(ns))
    assert bad.exit_code == 1, bad.output
    line = one_line_error(bad.stderr, "")
    fixed = re.escape(advice.key).replace(r"\{", "{").replace(r"\}", "}")
    assert re.search(re.sub(r"\{[^}]*\}", ".*", fixed), line), line
    good = ns.cli(*advice.good(ns))
    assert good.exit_code == 0, f"the advice of\n  {line}\ndid not work:\n{good.output}"


def test_every_command_has_quiet():
    import click

    from shadowmerge.cli import main

    def leaves(group, prefix=""):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from leaves(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    found = dict(leaves(main))
    assert {"graft", "train", "mergekit", "eval", "extract", "similarity", "verify", "lora retarget"} <= set(found)
    without = [name for name, command in found.items()
               if not any({"-q", "--quiet"} <= set(p.opts) for p in command.params)]
    assert not without, f"commands without -q/--quiet: {without}"
