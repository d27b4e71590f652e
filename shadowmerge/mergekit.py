"""`shadow_graft`: the Shadow-FT graft as a mergekit merge method, registered on import.

    import shadowmerge.mergekit      # registers merge_method: shadow_graft (twice is harmless)

mergekit 0.1.5 has no plugin discovery, so stock `mergekit-yaml` cannot see this method; use
`shadowmerge mergekit CONFIG OUT` (see mergekit_run.py) or register it in your own process with
this import. The arithmetic is shadowmerge's: float32, `I + alpha * (T - B)` in the same order as
`shadowmerge graft`, cast once to the dtype mergekit hands the inputs in.
"""

from __future__ import annotations

from typing import Literal

import torch
from mergekit import merge_methods
from mergekit.merge_methods import BasePolicy, InputContract, PerNonBase, TensorGroup, merge_method

NAME = "shadow_graft"
ROLES = ("instruct", "tuned")


@merge_method(name=NAME, pretty_name="Shadow-FT graft", reference_url="https://arxiv.org/abs/2505.12716",
              contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2))
def shadow_graft(group: TensorGroup, role: PerNonBase[Literal["instruct", "tuned"]],
                 alpha: float = 1.0) -> torch.Tensor:
    """out = I + alpha * (T - B): I has role instruct, T role tuned, B is base_model."""
    by_role = {role[e.id]: e.tensor for e in group.non_base}
    if sorted(by_role) != sorted(ROLES):
        given = ", ".join(f"{e.id}: {role[e.id]}" for e in group.non_base)
        raise ValueError(f"shadow_graft needs one model with role instruct and one with role tuned; got {given}")
    inst, tuned, base = by_role["instruct"], by_role["tuned"], group.base.tensor
    delta = torch.sub(tuned.float(), base.float())
    if alpha != 1.0:
        delta.mul_(alpha)
    out = delta.add_(inst.float())      # == I + alpha * (T - B), as shadowmerge's engine computes it
    return out if inst.dtype == torch.float32 else out.to(inst.dtype)


def register() -> None:
    """Add shadow_graft to mergekit's registry, unless it is there already."""
    if not any(m.spec.name == NAME for m in merge_methods.registered_methods()):
        merge_methods.register(shadow_graft)


register()
