"""Real PEFT adapters for the tests, and the references a LoRA graft is checked against.

Adapters are made by peft itself (get_peft_model on the Base, then every LoRA parameter moved
off its initial value so no update is zero) and saved with save_pretrained.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_dir: Path, folder: Path, seed: int = 3, save_embedding_layers=False, auto=None,
                 **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = (auto or AutoModelForCausalLM).from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif p.requires_grad:                 # modules_to_save / bias: trained full copies
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    peft_model.save_pretrained(folder, save_embedding_layers=save_embedding_layers)
    return Path(folder)


def peft_merged(model_dir: Path, adapter: Path, auto=None) -> dict[str, torch.Tensor]:
    """peft's own merge: PeftModel.from_pretrained(model in float32, adapter).merge_and_unload()."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = (auto or AutoModelForCausalLM).from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def shadow_reference(instruct: dict, base: dict, merged_base: dict, dtype) -> dict[str, torch.Tensor]:
    """The Shadow-FT graft by its definition: I + (peft's merge into the Base - Base), float32, cast once."""
    out = {}
    for k, v in instruct.items():
        d = merged_base[k] - base[k].float() if k in base else 0
        out[k] = (v.float() + d).to(dtype)
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units of the last place between two tensors of one float dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]

    def ordered(x):
        i = x.contiguous().view(bits).long()
        return torch.where(i < 0, -(i & (2 ** (8 * x.element_size() - 1) - 1)), i)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def assert_close_to_merge(got: torch.Tensor, want: torch.Tensor, device: str, name: str) -> None:
    """Within 1 ulp of peft's merge in the output dtype; for a float32 result made on a GPU, within 64 eps of the
    tensor's largest value instead. The GPU adds B @ A's rank terms in another order than peft's CPU kernel, and
    where I + dW nearly cancels, one rounding of a term is thousands of ulps of the small result (the same
    happens on the CPU with a float64 product). TF32 products would be ~4000 eps off, so this still catches them."""
    if device != "cpu" and got.dtype == torch.float32:
        err = float((got - want).abs().max()) if got.numel() else 0.0
        assert err <= 64 * torch.finfo(torch.float32).eps * float(want.abs().max()), (name, err)
    else:
        assert ulp_distance(got, want) <= 1, name
