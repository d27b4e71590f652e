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


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in units of the last place between two tensors of one float dtype."""
    bits = {2: torch.int16, 4: torch.int32}[a.element_size()]

    def ordered(x):
        i = x.contiguous().view(bits).long()
        return torch.where(i < 0, -(i & (2 ** (8 * x.element_size() - 1) - 1)), i)
    return (ordered(a) - ordered(b)).abs()


def assert_close_to_merge(got: torch.Tensor, want: torch.Tensor, device: str, name: str,
                          order_differs: bool = False, norm_terms: int = 0) -> None:
    """Within 1 ulp of peft's merge in the output dtype, where B @ A is summed in peft's order. Where it is not
    (a float32 result made on a GPU; pieces smaller than a matrix on the CPU; a reference that rounds
    W_B + dW on its own; DoRA norms), see assert_within_float32_terms."""
    if not (order_differs or norm_terms or (device != "cpu" and got.dtype == torch.float32)):
        assert ulp_distance(got, want) <= 1, name
        return
    assert_within_float32_terms(got, want, name, norm_terms)


def assert_within_float32_terms(got: torch.Tensor, want: torch.Tensor, name: str, norm_terms: int = 0) -> None:
    """Each element within 1 ulp of the output dtype, or within the float32 error of the terms that made it.

    Two float32 computations of the same expression in another order (a rank-r product summed by another
    kernel: AVX2, AVX-512, AMX and GPUs order and fuse differently; a reference that rounds W_B + dW before
    subtracting W_B) differ per element by a few roundings of their largest terms: at most r + 4 units of
    float32 eps/2 of a term, and every term (I, W_B, dW, their sums) is at most the size of the tensor's
    largest value (Shadow-FT's update is small against the weights). 64 eps of the largest value covers
    rank 64 with room. Where the result nearly cancels (I + dW ~ 0) that is many ulps of the small result,
    so ulps alone cannot be the criterion; TF32 products would be ~4000 eps off, so this still catches them.

    DoRA divides by a norm over `norm_terms` squares: peft sums them in float32 (relative error up to
    n/2 * eps/2 in any order, n/4 eps after the square root), shadowmerge in float64 (correctly rounded), so
    the factor, and the merged weight it scales, may differ by n/4 + 1 eps more of its size."""
    if not got.numel():
        return
    eps = torch.finfo(torch.float32).eps
    bound = (64 + (norm_terms / 4 + 1 if norm_terms else 0)) * eps * float(want.float().abs().max())
    err = (got.float() - want.float()).abs()
    bad = (ulps(got, want) > 1) & (err > bound)
    assert not bool(bad.any()), (name, float(err[bad].max()), bound)
