"""From per-tensor sums to the analyzer's numbers: tensor kinds, aggregations and the graft verdict.

Two model-level figures, always named apart:
- official: the unweighted mean of per-tensor sigma over tensors whose name matches
  `model\\.layers\\.(\\d+)\\.` (re.search), as the official Shadow-FT script computes it;
- weighted: sum |A - B| / (sum |A| + sum |B|) over every compared tensor, i.e. weighted by size.
Per layer, per module type and per tower (language / vision) are weighted the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .stats import Sums

OFFICIAL = re.compile(r"model\.layers\.(\d+)\.")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_VISION = re.compile(r"vision|visual|image|multi_modal_projector|mm_projector|patch_embed")
MODULES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "router", "experts.gate", "experts.up",
           "experts.gate_up", "experts.down", "experts.bias", "experts.other", "norms", "embed", "lm_head", "other")
# First match wins: fused and expert tensors before the plain projections whose names they contain.
_KINDS = [
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out|output)\.")),
    ("embed", re.compile(r"embed_tokens|word_embeddings|(^|\.)wte\.|(^|\.)wpe\.|embed_in|embed_positions")),
    ("norms", re.compile(r"norm|(^|\.)ln_\w*\.|layernorm")),
    # MoE: routed experts, fused ([E, ...] tensors: gate_up_proj, down_proj, *_bias) or one by one (experts.N.*)
    ("experts.bias", re.compile(r"\.experts\.(\d+\.)?\w*_bias$|\.experts\.\d+\.\w+\.bias$")),
    ("experts.gate_up", re.compile(r"\.experts\.(\d+\.)?gate_up_proj")),
    ("experts.gate", re.compile(r"\.experts\.\d+\.(gate_proj|w1)\.")),
    ("experts.up", re.compile(r"\.experts\.\d+\.(up_proj|w3)\.")),
    ("experts.down", re.compile(r"\.experts\.(\d+\.)?(down_proj|w2)(\.|$)")),
    ("experts.other", re.compile(r"\.experts\.")),
    ("router", re.compile(r"(^|\.)(router|gate)\.(weight|bias|e_score_correction_bias)$|shared_expert_gate\.")),
    ("qkv", re.compile(r"(qkv_proj|query_key_value|c_attn|Wqkv|(^|\.)qkv)\.")),
    ("q", re.compile(r"(q_proj|query|(^|\.)wq)\.")),
    ("k", re.compile(r"(k_proj|(^|\.)key|(^|\.)wk)\.")),
    ("v", re.compile(r"(v_proj|value|(^|\.)wv)\.")),
    ("o", re.compile(r"(o_proj|out_proj|attn\.c_proj|attention\.dense|(^|\.)wo)\.")),
    ("gate_up", re.compile(r"gate_up_proj\.")),
    ("gate", re.compile(r"(gate_proj|(^|\.)w1)\.")),
    ("up", re.compile(r"(up_proj|c_fc|(^|\.)w3|dense_h_to_4h)\.")),
    ("down", re.compile(r"(down_proj|mlp\.c_proj|(^|\.)w2|dense_4h_to_h)\.")),
]
# The range of sigma(Base, Instruct) over which Shadow-FT was shown to work (paper and official README).
SIGMA_RANGE = (0.003, 0.06)


def module_of(name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def tower_of(name: str) -> str:
    return "vision" if _VISION.search(name) else "language"


@dataclass
class TensorRow:
    name: str
    shape: tuple[int, ...]
    sums: Sums

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    @property
    def module(self) -> str:
        return module_of(self.name)

    @property
    def tower(self) -> str:
        return tower_of(self.name)


@dataclass
class PairResult:
    """Everything the analyzer knows about one (Base, Instruct[, Tuned]) pair."""

    name: str
    base: str
    instruct: str
    tuned: str | None
    rows: list[TensorRow]
    only_in_base: list[str] = field(default_factory=list)
    only_in_instruct: list[str] = field(default_factory=list)
    shape_differs: list[str] = field(default_factory=list)
    not_in_tuned: list[str] = field(default_factory=list)     # compared tensors the tuned model lacks or reshapes
    not_floating: list[str] = field(default_factory=list)     # integer tensors (buffers, quantized weights)
    hub: dict = field(default_factory=dict)                   # Hub inputs: id, revision, commit sha by role
    sampled: dict | None = None      # with --sample: the official figure's estimate and interval (sample.estimate)

    @property
    def official(self) -> float | None:
        """Unweighted mean of per-tensor sigma over `model.layers.N.` tensors (the official script's figure); from a
        sample, its stratified estimate."""
        if self.sampled is not None:
            return self.sampled["value"]
        sig = [r.sums.sigma for r in self.rows if OFFICIAL.search(r.name)]
        return sum(sig) / len(sig) if sig else None

    @property
    def official_count(self) -> int:
        return sum(1 for r in self.rows if OFFICIAL.search(r.name))

    def total(self, rows=None) -> Sums:
        out = Sums()
        for r in self.rows if rows is None else rows:
            out = out + r.sums
        return out

    @property
    def weighted(self) -> float:
        return self.total().sigma

    def by(self, key) -> dict:
        """Sums grouped by key(row) (None keys left out), in sorted key order."""
        groups: dict = {}
        for r in self.rows:
            k = key(r)
            if k is not None:
                groups[k] = groups.get(k, Sums()) + r.sums
        return dict(sorted(groups.items(), key=lambda kv: (str(type(kv[0])), kv[0])))

    def per_layer(self, tower: str = "language") -> dict[int, Sums]:
        return self.by(lambda r: r.layer if r.tower == tower else None)

    def per_module(self) -> dict[str, Sums]:
        """Sums per module type; the vision tower's types are their own rows ("vision q", ...), never mixed in."""
        found = self.by(lambda r: r.module if r.tower == "language" else f"{r.tower} {r.module}")
        return {k: found[k] for k in (*MODULES, *(f"vision {m}" for m in MODULES)) if k in found}

    def layer_module(self, tower: str = "language") -> dict[tuple[int, str], Sums]:
        return self.by(lambda r: (r.layer, r.module) if r.tower == tower and r.layer is not None else None)

    def towers(self) -> dict[str, Sums]:
        return self.by(lambda r: r.tower)

    def verdict(self) -> dict:
        """A short verdict on grafting this pair, with the reasons (and the numbers behind them)."""
        sigma = self.official if self.official is not None else self.weighted
        lo, hi = SIGMA_RANGE
        reasons, level = [], "ok"
        if sigma > hi:
            level = "risky"
            reasons.append(f"sigma(Base, Instruct) = {sigma:.4f} is above the range where Shadow-FT was shown to "
                           f"work ({lo}-{hi}): the Instruct is far from the Base, so a Base update may not carry over")
        elif sigma < lo:
            reasons.append(f"sigma(Base, Instruct) = {sigma:.4f} is below {lo}: the two are nearly identical, "
                           f"so the graft is safe but tuning the Instruct directly would differ little")
        else:
            reasons.append(f"sigma(Base, Instruct) = {sigma:.4f} is inside the range where Shadow-FT was shown "
                           f"to work ({lo}-{hi})")
        if self.tuned is not None:
            layers = self.per_layer()
            total = self.total()
            size, cos = total.update_rel, total.update_cos
            against = [k for k, s in layers.items() if s.update_cos < -0.3]
            reasons.append(f"the update is {size:.2e} of the Base's weights (||T - B|| / ||B||), "
                           f"{size / total.rel_l2 if total.rel_l2 else float('inf'):.2f}x the Base-Instruct "
                           f"distance")
            if size > 2 * total.rel_l2 and total.rel_l2 > 0:
                level = "caution" if level == "ok" else level
                reasons.append("the update is larger than the gap between Base and Instruct: the graft moves "
                               "the Instruct further than instruction tuning did")
            if against:
                level = "caution" if level == "ok" else level
                reasons.append(f"in {len(against)} layer(s) ({_ranges(against)}) the update points against "
                               f"instruction tuning (cos(T - B, I - B) < -0.3): it may undo it there")
            else:
                reasons.append(f"cos(T - B, I - B) = {cos:+.3f} overall; no layer below -0.3, so the update does "
                               f"not undo instruction tuning")
        if self.sampled is not None:
            from .sample import interval_note

            reasons.append(interval_note(self.sampled))
        if self.only_in_base or self.only_in_instruct or self.shape_differs or self.not_in_tuned:
            level = "caution" if level == "ok" else level
            reasons.append(f"{len(self.only_in_base) + len(self.only_in_instruct)} tensor name(s) and "
                           f"{len(self.shape_differs)} shape(s) differ"
                           + (f", {len(self.not_in_tuned)} tensor(s) missing or reshaped in the tuned model"
                              if self.not_in_tuned else "") + ": only the common tensors were compared")
        return {"level": level, "sigma": sigma, "reasons": reasons,
                "line": f"{level.upper()}: " + "; ".join(reasons)}


def _ranges(values: list[int]) -> str:
    out, start, prev = [], None, None
    for v in sorted(values):
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)
