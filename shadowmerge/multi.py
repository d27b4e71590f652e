"""MultiDelta: several updates of one Base grafted onto its Instruct at once, combined as `--combine` says.

Each update k is a full fine-tune of the Base (Δ_k = T_k − B, the Base read once for all) or a PEFT adapter trained
on it (Δ_k its product, as lora.LoraDelta computes it), weighted by w_k (`--weights`, default 1 each). The delta the
engine adds (out = I + α·Δ, float32, cast once) is, in float32, left to right over the updates:

- `sum`: Δ = Σ_k w_k·Δ_k.
- `ties` (TIES-Merging, as mergekit's generalized task arithmetic does it, applied to the deltas and added to the
  Instruct): each Δ_k trimmed to its k = max(1, int(density·numel)) elements of largest magnitude (select.top_k:
  exact, in bounded memory; at ties at the threshold, the lower flat indices survive); d_k = w_k·trim(Δ_k); the sign
  per element is that of Σ_k d_k (≥ 0: +); Δ = Σ_k d_k·[sign(d_k) = sign] / Σ_k w_k·[sign(d_k) = sign] (a divisor
  of 0 taken as 1: the disjoint mean).
- `dare_ties` / `dare_linear`: each element of each Δ_k kept with probability `density` and divided by it where kept
  (the expectation is Δ_k), then `dare_ties` elects signs and sums the agreeing d_k (no division: mergekit's
  default for dare_ties), `dare_linear` sums them. The draw is a counter-based hash of (--seed, update, tensor name,
  flat index): the same on every device, thread count and piece size, and recorded (seed) so that
  `verify --recompute` draws it again. mergekit 0.1 rescales DARE's survivors to the update's l1 norm instead of
  by 1/density (a whole-tensor ratio); shadowmerge keeps the paper's 1/density.

Written here: mergekit's implementation needs every update's whole tensor in memory (and its top-k is unstable at
ties); this is the same arithmetic over pieces, with the per-tensor thresholds found first (select.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .chunks import SUM_CHUNK_ELEMENTS, ranges
from .deltas import FullDelta
from .errors import ShadowMergeError
from .select import Cut, top_k
from .sources import register
from .tensors import Buffers, widen
from .formats.safetensors import itemsize

COMBINE = ("sum", "ties", "dare_ties", "dare_linear")
TIE_RULE = ("exactly k = max(1, int(density x numel)) elements of largest |delta| survive; of those equal to the "
            "k-th largest, the lowest flat indices")
_MASK31 = (1 << 31) - 1


@dataclass(frozen=True)
class MultiEntry:
    name: str
    parts: tuple                 # per update: its source's entry, or None (the update does not change this tensor)
    shape: tuple

    @property
    def tile(self):
        tiles = [getattr(e, "tile", None) for e in self.parts if e is not None]
        tiles = [t for t in tiles if t]
        return min(tiles) if tiles else None


def updates_of(spec) -> list[tuple[str, str]]:
    """("tuned" | "lora", ref) of each update a spec names: the --tuned ones in order, then the --lora ones."""
    def listed(v):
        return [] if v is None else [v] if isinstance(v, str) else list(v)
    return [("tuned", r) for r in listed(spec.tuned)] + [("lora", r) for r in listed(spec.lora)]


def weights_of(spec, count: int) -> list[float]:
    """--weights as numbers, one per update (default: 1 each)."""
    if spec.weights is None:
        return [1.0] * count
    text = str(spec.weights)
    try:
        values = [float(w) for w in text.split(",")]
    except ValueError:
        values = None
    if values is None or not all(math.isfinite(w) for w in values):
        raise ShadowMergeError(f"--weights {text[:80]!r}: write one finite number per update, separated by commas, "
                               f"e.g. --weights {','.join(['1'] * count)}")
    if len(values) != count:
        raise ShadowMergeError(f"--weights gives {len(values)} weight(s) for {count} update(s) (the --tuned models in "
                               f"order, then the --lora adapters); pass {count}, e.g. --weights "
                               f"{','.join(['1'] * count)}")
    return values


@register
class MultiDelta:
    """Several updates of the Base, combined (see the module's docstring)."""

    kind = "multi"
    mismatch_hint = "every update must be of this Instruct's Base: pass fine-tunes and adapters of the same Base"

    @classmethod
    def wanted(cls, spec) -> bool:
        return len(updates_of(spec)) > 1 or spec.combine != "sum" or spec.weights is not None or \
            spec.density is not None

    @classmethod
    def open(cls, spec, instruct: Checkpoint, opened: list) -> "MultiDelta":
        from .lora.adapter import Adapter
        from .lora.source import LoraDelta

        updates = updates_of(spec)
        weights = weights_of(spec, len(updates))
        combine = spec.combine
        if combine not in COMBINE:
            raise ShadowMergeError(f"--combine {combine!r}: use one of {', '.join(COMBINE)}")
        density = spec.density
        if combine == "sum":
            if density is not None:
                raise ShadowMergeError("--density goes with --combine ties, dare_ties or dare_linear; leave it out "
                                       "for sum")
        elif density is None or not (0 < density <= 1):
            raise ShadowMergeError(f"--combine {combine} needs --density in (0, 1] (the share of each update kept), "
                                   f"not {density}; pass e.g. --density 0.5")
        if any(kind == "tuned" for kind, _ in updates) and spec.base is None:
            raise ShadowMergeError("full fine-tunes among the updates need --base (the model they were tuned from); "
                                   "pass it")
        base = None
        if spec.base is not None:
            base = Checkpoint.open(spec.base, "base", spec.allow_pickle, spec.stream)
            opened.append(base)
        parts, n_tuned, n_lora = [], 0, 0
        for kind, ref in updates:
            if kind == "tuned":
                n_tuned += 1
                t = Checkpoint.open(ref, "tuned" if n_tuned == 1 else f"tuned {n_tuned}", spec.allow_pickle,
                                    spec.stream)
                opened.append(t)
                parts.append(FullDelta(base, t))
            else:
                n_lora += 1
                a = Adapter.open(ref, spec.allow_pickle, spec.stream)
                if n_lora > 1:
                    a.label = f"adapter {n_lora}"
                opened.append(a)
                a.refuse_own_base(instruct, hint="grafting there is a plain merge, not Shadow-FT: pass the Instruct "
                                                 "sibling of that Base")
                parts.append(LoraDelta(a, base, instruct))
        return cls(parts, updates, weights, combine, density, spec.seed, base)

    def __init__(self, parts, updates, weights, combine, density, seed, base):
        self.parts, self.updates, self.weights = parts, updates, weights
        self.combine, self.density, self.seed, self.base = combine, density, seed, base
        self.strict = any(p.strict for p in parts)
        self.checkpoints = tuple(c for p in parts for c in p.checkpoints)
        self.warnings = [w for p in parts for w in p.warnings]
        self.formula = (f"out = float32(I) + alpha * {combine}_k(w_k * delta_k) over {len(parts)} updates, cast once "
                        f"(docs/graft.md#several-updates)")
        self._cuts: dict[tuple[str, int], Cut] = {}       # (tensor, update) -> its TIES cut (reader thread only)
        self._raw = Buffers(torch.device("cpu"))             # the threshold passes' buffers (reader thread only)
        self._work = Buffers(torch.device("cpu"), torch.float32)

    # --- what it is ---------------------------------------------------------------------------------------
    def describe(self) -> dict:
        out = {} if self.base is None else {"base": self.base.ref}
        out["updates"] = [{"kind": kind, "ref": ref, "weight": w}
                          for (kind, ref), w in zip(self.updates, self.weights)]
        return out

    def record(self) -> dict:
        return {"combine": {"method": self.combine, "weights": self.weights, "density": self.density,
                            "seed": self.seed, **({"tie_rule": TIE_RULE} if self.combine == "ties" else {})},
                "updates": [{"kind": kind, "ref": ref, **p.record()}
                            for (kind, ref), p in zip(self.updates, self.parts)]}

    def card_inputs(self) -> dict:
        out = {}
        for k, ((kind, ref), w) in enumerate(zip(self.updates, self.weights), 1):
            what = "fine-tune of the Base" if kind == "tuned" else "LoRA adapter (trained on the Base)"
            out[f"update {k}: {what}, weight {w:g}"] = ref
        return out

    def names(self) -> set[str]:
        return set().union(*(p.names() for p in self.parts))

    def entry(self, name: str) -> MultiEntry | None:
        found = tuple(p.entry(name) for p in self.parts)
        shapes = {tuple(e.shape) for e in found if e is not None}
        if not shapes:
            return None
        if len(shapes) > 1:
            raise ShadowMergeError(f"the updates disagree on the shape of {name} ({', '.join(map(str, shapes))}); "
                                   f"{self.mismatch_hint}")
        return MultiEntry(name, found, shapes.pop())

    def absent(self, name: str) -> str | None:
        for p in self.parts:
            why = p.absent(name) if hasattr(p, "absent") else None
            if why:
                return why
        return None

    def rows(self, entry: MultiEntry) -> int:
        return entry.shape[0] if entry.shape else 1

    # --- reader thread ------------------------------------------------------------------------------------
    def read(self, entry: MultiEntry, e0: int, e1: int, buffers) -> tuple:
        base_raw, payloads = None, []
        for k, (p, e) in enumerate(zip(self.parts, entry.parts)):
            if e is None:
                payloads.append(None)
            elif isinstance(p, FullDelta):
                if base_raw is None:
                    base_raw = p.base.read_piece(e.base, e0, e1, buffers("base", (e1 - e0) * itemsize(e.base.dtype)))
                payloads.append(p.tuned.read_piece(e.tuned, e0, e1,
                                                   buffers(f"{k}:tuned", (e1 - e0) * itemsize(e.tuned.dtype))))
            else:
                payloads.append(p.read(e, e0, e1, _Prefixed(buffers, f"{k}:")))
        cuts = [self._cut(entry, k) if self.combine == "ties" and e is not None else None
                for k, e in enumerate(entry.parts)]
        return base_raw, payloads, cuts, e0

    def _cut(self, entry: MultiEntry, k: int) -> Cut:
        """The TIES cut of update k over this tensor (found once, in passes over it: select.top_k)."""
        got = self._cuts.get((entry.name, k))
        if got is None:
            numel = math.prod(entry.shape) if entry.shape else 1
            e = entry.parts[k]
            row = numel // entry.shape[0] if entry.shape and entry.shape[0] else max(numel, 1)
            spans = list(ranges(0, numel, row, SUM_CHUNK_ELEMENTS, getattr(e, "tile", None)))

            def pieces():
                for a, b in spans:
                    yield a, self._one(entry, k, a, b)

            got = self._cuts[(entry.name, k)] = top_k(pieces, numel, max(1, int(self.density * numel)))
        return got

    def _one(self, entry: MultiEntry, k: int, e0: int, e1: int) -> torch.Tensor:
        """Δ_k of elements [e0, e1), on this machine's CPU (the threshold passes)."""
        p, e = self.parts[k], entry.parts[k]
        work = self._work

        def to_float(raw, dtype, key):
            if hasattr(raw, "decode"):
                return raw.decode(work(key, raw.numel))
            n = raw.numel() // itemsize(dtype)
            return raw.view(torch.float32) if dtype == torch.float32 else widen(raw, dtype, work(key, n))

        payload = p.read(e, e0, e1, self._raw)
        return p.delta_into(e, payload, torch.empty(e1 - e0, dtype=torch.float32), to_float)

    # --- compute threads ----------------------------------------------------------------------------------
    def delta_into(self, entry: MultiEntry, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        base_raw, payloads, cuts, e0 = payload
        terms = []                   # (w_k, the update's piece after trimming / dropping)
        for k, (p, e, raw) in enumerate(zip(self.parts, entry.parts, payloads)):
            if e is None:
                continue
            d = torch.empty_like(out)
            if isinstance(p, FullDelta):
                d = p.delta_into(e, (raw, base_raw), d, _PrefixedFloat(to_float, f"{k}:"))
            else:
                d = p.delta_into(e, raw, d, _PrefixedFloat(to_float, f"{k}:"))
            terms.append((self.weights[k], sparsified(d, self.combine, self.density, self.seed, k, entry.name, e0,
                                                      cuts[k])))
        return out.copy_(combined(terms, self.combine))


def sparsified(d: torch.Tensor, method: str, density, seed: int, k: int, name: str, e0: int, cut) -> torch.Tensor:
    """Update k's piece (flat elements [e0, e0 + n) of tensor `name`) as the method uses it: trimmed by its TIES cut,
    or dropped and rescaled by DARE, or as it is."""
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    if method == "ties":
        return torch.where(cut.mask(d, e0), d, zero)
    if method.startswith("dare"):
        return torch.where(dare_keep(seed, k, name, e0, d.numel(), density, d.device), d / density, zero)
    return d


def combined(terms: list, method: str) -> torch.Tensor:
    """The combined delta of (w_k, sparsified Δ_k) in float32, left to right over the updates (module docstring)."""
    if method in ("sum", "dare_linear"):
        acc = None
        for w, d in terms:
            wd = d * w
            acc = wd if acc is None else acc.add_(wd)
        return acc
    weighted = [(w, d * w) for w, d in terms]
    total = weighted[0][1].clone()
    for _, wd in weighted[1:]:
        total.add_(wd)
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed, divisor = None, None
    for w, wd in weighted:
        m = (torch.sign(wd) == sign).to(total.dtype)
        part, weight = wd * m, m * w
        mixed = part if mixed is None else mixed.add_(part)
        divisor = weight if divisor is None else divisor.add_(weight)
    if method == "ties":
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


class _Prefixed:
    """A Buffers whose keys carry a prefix (each update's buffers apart)."""

    def __init__(self, buffers, prefix: str):
        self.buffers, self.prefix = buffers, prefix
        self.pin = getattr(buffers, "pin", False)

    def __call__(self, key: str, n: int):
        return self.buffers(self.prefix + key, n)


class _PrefixedFloat:
    def __init__(self, to_float, prefix: str):
        self.to_float, self.prefix = to_float, prefix

    def __call__(self, raw, dtype, key: str):
        return self.to_float(raw, dtype, self.prefix + key)


def _key(seed: int, k: int, name: str) -> int:
    """A 31-bit key for one update of one tensor under a seed (sha256: the same in every process)."""
    digest = hashlib.sha256(f"{seed}\0{k}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & _MASK31


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash (xor-shift-multiply rounds; products stay below 2^63, so int64 arithmetic is exact on
    every device)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK31
    return x ^ (x >> 16)


def dare_keep(seed: int, k: int, name: str, e0: int, n: int, density: float, device) -> torch.Tensor:
    """Which of the flat elements [e0, e0 + n) of update k of a tensor DARE keeps: hash(seed, k, name, index) below
    density · 2^31 — a function of the index alone, so any cut into pieces, on any device, draws the same."""
    at = torch.arange(e0, e0 + n, dtype=torch.int64, device=device)
    key = _key(seed, k, name)
    x = _mix((at & _MASK31) ^ key)
    x = _mix(x ^ ((at >> 31) & _MASK31) ^ (key >> 7))
    return x < int(density * (1 << 31))
