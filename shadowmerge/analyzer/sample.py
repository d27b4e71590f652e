"""σ from a sample of tensors, with the interval it stands for; and the shadow finder's checks from headers alone.

`--sample N` reads N whole tensors (by range: a Hub id or URL is never downloaded) instead of all of them. They are
drawn from the tensors the official figure averages (model.layers.N.*), stratified by the tensor's place in its
layer (self_attn.q_proj.weight, input_layernorm.weight, ...: σ differs most between them, a layer norm's from a
projection's by far) with each stratum's share in proportion to its count (two at least: N is raised to two a
stratum where it is less), and within a stratum spread over the depth (the stratum's tensors in layer order cut
into equal runs, one drawn from each, seeded). The official figure — the mean of per-tensor σ — is estimated by the
stratified mean Σ_h W_h ȳ_h (W_h: the stratum's share of the tensors), its variance by Σ_h W_h² (1 − n_h/M_h) s_h²/n_h
(finite-population corrected: a stratum sampled whole adds nothing), and the interval is Student's t at the stated level
with Satterthwaite's degrees of freedom (scipy.stats.t): a stratum measured from two draws that dominates the variance
leaves about one degree of freedom and a wide interval, as it should. Treating the depth-spread draw as a simple
random draw within each stratum over-states the variance where σ trends with depth, so the interval errs wide.

The parameter-weighted σ is given over the sample only (labelled so): it is a ratio dominated by the largest
tensors, which a sample of N may miss entirely.

Written here: the stratified estimator is a few lines of textbook survey sampling (Cochran, Sampling Techniques,
ch. 5) over scipy's t quantiles; no library takes per-tensor sums.
"""

from __future__ import annotations

import math
import random

from .aggregate import OFFICIAL, SIGMA_RANGE, layer_of

LEVEL = 0.99
DEFAULT_SAMPLE = 64


def role(name: str) -> str:
    """A tensor's place in its layer (its name without the layer number): the strata a sample is drawn from."""
    return OFFICIAL.sub("model.layers.*.", name, count=1)


def least(names: list[str]) -> int:
    """The fewest draws a sample of these tensors takes: two a stratum (one where a stratum has one), so that each
    stratum's spread is measured (one left out would bias the figure with no sign of it in the interval)."""
    kinds: dict[str, int] = {}
    for name in names:
        kinds[role(name)] = kinds.get(role(name), 0) + 1
    return sum(min(2, m) for m in kinds.values())


def choose(items: list, n: int, seed: int = 0) -> list:
    """n (at least `least`) of the items (name, ...) the official figure averages, stratified by place in the layer and
    spread over depth, seeded; in their original order (the files' order: reads go forward)."""
    official = [it for it in items if OFFICIAL.search(it[0])]
    n = max(n, least([it[0] for it in official]))
    if n >= len(official):
        return official
    strata: dict[str, list] = {}
    for it in official:
        strata.setdefault(role(it[0]), []).append(it)
    share = _allocate({h: len(v) for h, v in strata.items()}, n)
    rng = random.Random(seed)
    chosen = set()
    for h, members in sorted(strata.items()):
        members = sorted(members, key=lambda it: (layer_of(it[0]) or 0, it[0]))
        k = share[h]
        for j in range(k):                     # k equal runs over the depth, one drawn from each
            run = members[j * len(members) // k:(j + 1) * len(members) // k]
            chosen.add(rng.choice(run)[0])
    return [it for it in official if it[0] in chosen]


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """n draws over strata in proportion to their sizes (largest remainders), at least 2 where a stratum has 2
    (n >= least), never more than a stratum has."""
    total = sum(sizes.values())
    floor = {h: min(2, m) for h, m in sizes.items()}
    raw = {h: n * m / total for h, m in sizes.items()}
    out = {h: max(floor[h], min(sizes[h], int(raw[h]))) for h in sizes}
    while sum(out.values()) < n:
        h = max((h for h in sizes if out[h] < sizes[h]), key=lambda h: (raw[h] - out[h], sizes[h], h))
        out[h] += 1
    while sum(out.values()) > n:
        h = max((h for h in sizes if out[h] > floor[h]), key=lambda h: (out[h] - raw[h], h))
        out[h] -= 1
    return out


def estimate(sigmas: dict[str, float], population: list[str], seed: int, level: float = LEVEL) -> dict:
    """The official figure (mean of per-tensor σ over `population`, the model.layers.N.* names) from the σ of the
    sampled tensors, with its interval (see the module's docstring)."""
    from scipy import stats

    sizes: dict[str, int] = {}
    for name in population:
        sizes[role(name)] = sizes.get(role(name), 0) + 1
    drawn: dict[str, list[float]] = {}
    for name, s in sigmas.items():
        drawn.setdefault(role(name), []).append(s)
    big_m, n = len(population), len(sigmas)
    if n == big_m:              # the whole population: the full scan's own figure, summed in its order
        mean = sum(sigmas[name] for name in population) / big_m
    else:
        mean = sum(sizes[h] / big_m * (sum(v) / len(v)) for h, v in drawn.items())
    # each stratum's term of the variance, a_h s_h^2 (finite-population corrected); Satterthwaite's degrees of freedom
    terms = {h: (sizes[h] / big_m) ** 2 * (1 - len(v) / sizes[h]) * _var(v) / len(v)
             for h, v in drawn.items() if len(v) > 1 and len(v) < sizes[h]}
    var = sum(terms.values())
    half = 0.0
    if var > 0:
        df = var ** 2 / sum(t * t / (len(drawn[h]) - 1) for h, t in terms.items())
        half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var)
    return {"value": mean, "low": max(0.0, mean - half), "high": mean + half, "level": level, "tensors": n,
            "of": big_m, "seed": seed}


def _var(values: list[float]) -> float:
    m = sum(values) / len(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - 1)


def interval_note(est: dict) -> str:
    """A verdict's line on a sampled figure: its interval, and whether it decides the range check."""
    lo, hi = SIGMA_RANGE
    text = (f"estimated from {est['tensors']} of {est['of']} tensors (seed {est['seed']}): "
            f"{est['level']:.0%} interval {est['low']:.4f}–{est['high']:.4f}")
    crossed = [b for b in (lo, hi) if est["low"] < b < est["high"]]
    if crossed:
        text += (f", which crosses {crossed[0]}: too close to call from this sample; raise --sample or leave it out "
                 f"for the exact figure")
    return text


# --- the shadow finder ----------------------------------------------------------------------------------------
def compatibility(instruct, candidate) -> tuple[list[str], list[str]]:
    """(reasons the candidate cannot stand in as the Instruct's Base, notes), from their configs and headers: one
    architecture, every tensor's name and shape, one vocabulary (rows that differ only in the vocabulary are a note:
    `graft --vocab common` handles them)."""
    from ..plan import VOCAB_NAME

    reasons, notes = [], []
    if instruct.architecture != candidate.architecture:
        (mt_i, ar_i), (mt_c, ar_c) = instruct.architecture, candidate.architecture
        reasons.append(f"another architecture ({mt_c or '?'} {'/'.join(ar_c) or '?'}, the Instruct is "
                       f"{mt_i or '?'} {'/'.join(ar_i) or '?'})")
    a, b = set(instruct.tensors), set(candidate.tensors)
    tied = {n for n in a ^ b if n.endswith("lm_head.weight")}     # a tied head is stored on one side only
    if (a ^ b) - tied:
        only_c, only_i = sorted(b - a - tied), sorted(a - b - tied)
        example = (only_c or only_i)[0]
        reasons.append(f"{len(only_c)} tensor name(s) only in it and {len(only_i)} only in the Instruct (e.g. "
                       f"{example})")
    shapes, vocab = [], []
    for name in sorted(a & b):
        si, sc = tuple(instruct.tensors[name].shape), tuple(candidate.tensors[name].shape)
        if si != sc:
            same_tail = len(si) == len(sc) and si[1:] == sc[1:]
            (vocab if same_tail and VOCAB_NAME.search(name) else shapes).append(f"{name}: {list(sc)} vs {list(si)}")
    if shapes:
        reasons.append(f"{len(shapes)} tensor(s) of another shape (e.g. {shapes[0]})")
    vi, vc = _vocab_size(instruct.config), _vocab_size(candidate.config)
    if vocab or (vi is not None and vc is not None and vi != vc):
        notes.append(f"another vocabulary size ({vc} vs the Instruct's {vi}" + (f"; {vocab[0]}" if vocab else "")
                     + "): graft with --vocab common")
    return reasons, notes


def _vocab_size(config: dict):
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) else None


def shadow_verdict(sigma: float, est: dict | None) -> str:
    """Where a candidate's σ to the Instruct falls against the range the paper reports Shadow-FT working in."""
    lo, hi = SIGMA_RANGE
    if sigma == 0:
        return "the same weights as the Instruct: not a shadow"
    if sigma < lo:
        what = (f"closer than {lo}: nearly the Instruct itself (a light fine-tune of it, or it of this): tuning it "
                f"would be much like tuning the Instruct")
    elif sigma <= hi:
        what = (f"inside the range where Shadow-FT was shown to work ({lo}–{hi}): a plausible shadow, to be tested "
                f"with `shadowmerge eval` (train --baseline), not a proven Base")
    else:
        what = f"farther than {hi}: an update learned on it is unlikely to carry over"
    if est is not None and any(est["low"] < b < est["high"] for b in (lo, hi)):
        what += " (its interval crosses a bound of the range: raise --sample to decide)"
    return what
