"""`shadow_graft`: the Shadow-FT graft as a mergekit merge method, registered on import.

    import shadowmerge.mergekit      # registers merge_method: shadow_graft (twice is harmless)

mergekit 0.1.5 has no plugin discovery, so stock `mergekit-yaml` cannot see this method; use
`shadowmerge mergekit CONFIG OUT` (see mergekit_run.py) or register it in your own process with
this import. The arithmetic is shadowmerge's: float32, `I + alpha * (T - B)` in the same order as
`shadowmerge graft`, cast once to the dtype mergekit hands the inputs in. Several models with role tuned (each with
its `weight`) are combined as `combine` says (sum, ties, dare_ties, dare_linear, with `density` and `seed`), by the
same functions as `shadowmerge graft --tuned ... --tuned ...` (multi.py): the same output, bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup, merge_method

NAME = "shadow_graft"
ROLES = ("instruct", "tuned")


@merge_method(name=NAME, pretty_name="Shadow-FT graft", reference_url="https://arxiv.org/abs/2505.12716",
              contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=None))
def shadow_graft(group: TensorGroup, role: PerNonBase[Literal["instruct", "tuned"]], weight: PerNonBase[float] = 1.0,
                 alpha: float = 1.0, combine: Literal["sum", "ties", "dare_ties", "dare_linear"] = "sum",
                 density: float = 1.0, seed: int = 0) -> torch.Tensor:
    """out = I + alpha * (T - B): I has role instruct, T role tuned, B is base_model; several T combined."""
    instruct = [e.tensor for e in group.non_base if role[e.id] == "instruct"]
    tuned = [(weight[e.id], e.tensor) for e in group.non_base if role[e.id] == "tuned"]
    if len(instruct) != 1 or not tuned:
        given = ", ".join(f"{e.id}: {role[e.id]}" for e in group.non_base)
        raise ValueError(f"shadow_graft needs one model with role instruct and one or more with role tuned; got "
                         f"{given}")
    inst, base = instruct[0], group.base.tensor
    if len(tuned) == 1 and combine == "sum" and tuned[0][0] == 1.0:
        delta = torch.sub(tuned[0][1].float(), base.float())
    else:
        delta = _combined(tuned, base, group.metadata.name or "", combine, density, seed)
    if alpha != 1.0:
        delta.mul_(alpha)
    out = delta.add_(inst.float())      # == I + alpha * (T - B), as shadowmerge's engine computes it
    out = out if inst.dtype == torch.float32 else out.to(inst.dtype)
    if not bool(torch.isfinite(out).all()):                  # as graft refuses them (its --allow-nonfinite aside)
        from .errors import ShadowMergeError
        raise ShadowMergeError(f"the result for {group.metadata.name or 'a tensor'} has NaN/Inf values; check the "
                               f"weights and alpha in the config, and the models' own weights")
    return out


def _combined(tuned: list, base: torch.Tensor, name: str, combine: str, density: float, seed: int) -> torch.Tensor:
    """Several updates of one whole tensor, as `graft` combines them piece by piece (multi.py's own functions)."""
    from types import SimpleNamespace

    from .multi import Scratch, combine_into, shaped_
    from .select import top_k

    b = base.float().reshape(-1)
    how = SimpleNamespace(combine=combine, density=density, seed=seed, weights=[float(w) for w, _ in tuned])
    work = Scratch(b.device, torch.float32)

    def term(k: int, into: torch.Tensor) -> torch.Tensor:
        d = torch.sub(tuned[k][1].float().reshape(-1), b, out=into)
        cut = None
        if combine == "ties":
            cut = top_k(lambda: iter([(0, d)]), d.numel(), max(1, int(density * d.numel())))
        return shaped_(d, how, k, name, 0, cut, work)

    out = torch.empty_like(b)
    return combine_into(out, list(range(len(tuned))), term, combine, how.weights, work).reshape(base.shape)


def register() -> None:
    """Add shadow_graft to mergekit's registry, unless it is there already."""
    if not any(m.spec.name == NAME for m in merge_methods.registered_methods()):
        merge_methods.register(shadow_graft)


register()
