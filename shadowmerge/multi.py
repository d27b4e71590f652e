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

How it runs: the engine's reader reads, per piece, the Base once and every update's bytes; a compute thread widens
the Base once, computes each update's term in its own reusable buffers and combines them in place (combine_into),
so a piece allocates nothing. The engine's pieces shrink with the number of updates (_piece_elements) so that its
buffers never hold more than a one-update graft's. TIES' thresholds are found in passes over each tensor
(find_cuts, select.top_k_many: all the updates of a tensor in the same passes), run ahead of the reader on threads
of their own (_Ahead) for the next tensors while the engine grafts the current one.

Written here: mergekit's implementation needs every update's whole tensor in memory (and its top-k is unstable at
ties); this is the same arithmetic over pieces, with the per-tensor thresholds found first (select.py).
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .chunks import CHUNK_ELEMENTS, ranges
from .deltas import FullDelta
from .errors import ShadowMergeError
from .select import top_k_many
from .sources import register
from .tensors import Buffers, widen
from .formats.safetensors import itemsize

COMBINE = ("sum", "ties", "dare_ties", "dare_linear")
TIE_RULE = ("exactly k = max(1, int(density x numel)) elements of largest |delta| survive; of those equal to the "
            "k-th largest, the lowest flat indices")
_MASK31 = (1 << 31) - 1
MAX_UPDATES = 64               # the pieces shrink as updates are added (_piece_elements): a floor keeps them useful
PASS_ELEMENTS = 1 << 21        # the threshold passes' pieces (their own buffers: the Base, one update, its delta)
AHEAD = 4                      # TIES cuts held or being found: the reader's tensor's and those ahead of it
THREADS = 2                    # threads finding them
_HASH_BLOCK = 1 << 18          # DARE's hash works on blocks of this many elements (1 MiB of int32: in cache)


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
        if len(updates) > MAX_UPDATES:
            raise ShadowMergeError(f"{len(updates)} updates (--tuned and --lora together): graft combines at most "
                                   f"{MAX_UPDATES} at once, every one read beside the others piece by piece; pass at "
                                   f"most {MAX_UPDATES}")
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
        self._cuts: dict[str, list] = {}                   # the last tensor's TIES cuts (reader thread only)
        self._ahead: _Ahead | None = None
        self._bufs = _pass_buffers()                         # the threshold passes' buffers (on the reader thread)

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

    # --- how it is cut and read ----------------------------------------------------------------------------
    @property
    def chunk_elements(self) -> int:
        """The engine's piece size: its buffers hold, per piece, every update's raw bytes and (ties, dare_ties) every
        update's float32 delta, so pieces shrink as updates are added, to keep the buffers' total at most the
        one-update graft's (see _piece_elements)."""
        return _piece_elements(len(self.parts), self.combine, any(not isinstance(p, FullDelta) for p in self.parts))

    def upcoming(self, entries: list, stop) -> None:
        """The engine's reader, before its first read: the entries it will graft, in order. With --combine ties the
        threshold passes run ahead on threads of their own (_Ahead: for the next tensors while the engine grafts the
        current one), on local inputs; a streamed input is read in order, so its passes stay on the reader."""
        if self.combine != "ties" or any(getattr(getattr(c, "transport", None), "streams", False)
                                         for c in self.checkpoints):
            return
        self._ahead = _Ahead(self, [e for e in entries if isinstance(e, MultiEntry)], stop)

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
        cuts = self.cuts(entry) if self.combine == "ties" else None
        return base_raw, payloads, cuts, e0

    def cuts(self, entry: MultiEntry) -> list:
        """Each update's TIES cut of this tensor (None where the update does not change it)."""
        if self._ahead is not None:
            return self._ahead.take(entry)
        got = self._cuts.get(entry.name)
        if got is None:
            self._cuts = {entry.name: self.find_cuts(entry)}       # the reader asks for one tensor after another
            got = self._cuts[entry.name]
        return got

    def find_cuts(self, entry: MultiEntry, bufs: tuple | None = None, stop=None) -> list:
        """The TIES cuts of every update of one tensor, found together in passes over it (select.top_k_many): each
        pass reads the Base once for all of them. bufs: the calling thread's (_pass_buffers()); stop: an Event that
        ends the passes (engine.Stopped) between pieces."""
        bufs = bufs or self._bufs
        numel = math.prod(entry.shape) if entry.shape else 1
        present = [k for k, e in enumerate(entry.parts) if e is not None]
        row = numel // entry.shape[0] if entry.shape and entry.shape[0] else max(numel, 1)
        spans = list(ranges(0, numel, row, PASS_ELEMENTS, entry.tile))

        def pieces(which, start=0):
            for a, b in spans:
                if stop is not None and stop.is_set():
                    from .engine import Stopped
                    raise Stopped
                if a >= start:
                    yield a, self._deltas(entry, [present[j] for j in which], a, b, bufs)

        found = top_k_many(pieces, numel, [max(1, int(self.density * numel))] * len(present))
        cuts = [None] * len(self.parts)
        for k, c in zip(present, found):
            cuts[k] = c
        return cuts

    def _deltas(self, entry: MultiEntry, which: list[int], e0: int, e1: int, bufs: tuple):
        """Δ_k of elements [e0, e1) for each update k in which, one after another in one float32 buffer (each valid
        until the next is taken), on this machine's CPU, the Base read and widened once (the threshold passes)."""
        (raw, work), n = bufs, e1 - e0

        def to_float(data, dtype, key):
            if hasattr(data, "decode"):
                return data.decode(work(key, data.numel))
            m = data.numel() // itemsize(dtype)
            return data.view(torch.float32) if dtype == torch.float32 else widen(data, dtype, work(key, m))

        shared, lora = _SharedBase(to_float), _PrefixedFloat(to_float, "lora:")
        base_raw = None
        for k in which:
            p, e = self.parts[k], entry.parts[k]
            if isinstance(p, FullDelta):
                if base_raw is None:
                    base_raw = p.base.read_piece(e.base, e0, e1, raw("base", n * itemsize(e.base.dtype)))
                payload = (p.tuned.read_piece(e.tuned, e0, e1, raw("tuned", n * itemsize(e.tuned.dtype))), base_raw)
                yield _into(p.delta_into(e, payload, work("delta", n), shared), work("delta", n))
            else:
                payload = p.read(e, e0, e1, _Prefixed(raw, "lora:"))
                yield _into(p.delta_into(e, payload, work("delta", n), lora), work("delta", n))

    # --- compute threads ----------------------------------------------------------------------------------
    def delta_into(self, entry: MultiEntry, payload, out: torch.Tensor, to_float) -> torch.Tensor:
        """The combined delta of one piece, in `out`, float32, with the arithmetic of the module's docstring done in
        place in this thread's reusable buffers (the Base widened once for all full fine-tunes)."""
        base_raw, payloads, cuts, e0 = payload
        shared, lora = _SharedBase(to_float), _PrefixedFloat(to_float, "lora:")
        work = _scratch(out.device)

        def term(k: int, into: torch.Tensor) -> torch.Tensor:
            p, e, raw = self.parts[k], entry.parts[k], payloads[k]
            if isinstance(p, FullDelta):
                d = _into(p.delta_into(e, (raw, base_raw), into, shared), into)
            else:
                d = _into(p.delta_into(e, raw, into, lora), into)
            return shaped_(d, self, k, entry.name, e0, cuts[k] if cuts else None, work)

        return combine_into(out, [k for k, e in enumerate(entry.parts) if e is not None], term, self.combine,
                            self.weights, work)


def shaped_(d: torch.Tensor, how, k: int, name: str, e0: int, cut, work: "Scratch") -> torch.Tensor:
    """Update k's piece d (flat elements [e0, e0 + n) of tensor `name`, float32) as the method uses it, in place:
    trimmed by its TIES cut or dropped and rescaled by DARE (the dropped set to +0.0), then times its weight.
    `how`: what has combine, density, seed and weights (a MultiDelta)."""
    method, n = how.combine, d.numel()
    if method == "ties":
        cut.apply_(d, e0, work.int32(n))
    elif method.startswith("dare"):
        d.div_(how.density)
        d.view(torch.int32).bitwise_and_(dare_mask_(how.seed, k, name, e0, how.density, work.int32(n),
                                                    work.int32(min(n, _HASH_BLOCK), "hash")))
    if how.weights[k] != 1.0:          # x · 1 is x, bit for bit
        d.mul_(how.weights[k])
    return d


def combine_into(out: torch.Tensor, present: list[int], term, method: str, weights: list, work: "Scratch"):
    """The combined delta of one piece, in `out` (float32), of the updates k in `present`, term(k, into) putting
    w_k · (update k's piece as the method uses it) in `into`: the module docstring's arithmetic, in place in
    `work`'s reusable buffers. In float32 and in the order of the formula, so the result is bit for bit the formula
    (as mergekit's functions compute it: torch.where(sum >= 0, 1, -1), (sign(t) == it).float(), ...)."""
    n = out.numel()
    if method in ("sum", "dare_linear"):
        term(present[0], out)
        for k in present[1:]:
            out.add_(term(k, work("term", n)))
        return out
    # ties / dare_ties: the sign per element is that of the sum of the terms (≥ 0: +); the terms that agree with it
    # are summed (and, for ties, divided by the sum of their weights, a sum of 0 taken as 1)
    terms = [term(k, work(f"term{j}", n)) for j, k in enumerate(present)]
    sign = work("sign", n)
    if len(terms) > 1:
        torch.add(terms[0], terms[1], out=sign)
    else:
        sign.copy_(terms[0])
    for t in terms[2:]:
        sign.add_(t)
    torch.sign(sign, out=sign).add_(0.5)      # 1, -1, ±0 -> 1.5, -0.5, 0.5 (NaN stays NaN)
    torch.sign(sign, out=sign)                # the elected sign: 1 where the sum is >= 0 (-0 too), else -1
    m, divisor = work("agree", n), work("divisor", n) if method == "ties" else None
    for j, (k, t) in enumerate(zip(present, terms)):
        torch.sign(t, out=m).mul_(sign).add_(1).mul_(0.5).floor_()     # 1 where t has the elected sign, else +0
        if j == 0:
            torch.mul(t, m, out=out)
        else:
            out.add_(t.mul_(m))
        if divisor is not None:
            w = weights[k]
            if j == 0:
                divisor.copy_(m) if w == 1.0 else torch.mul(m, w, out=divisor)
            else:
                divisor.add_(m if w == 1.0 else m.mul_(w))
    if divisor is not None:
        divisor.add_(torch.sign(divisor, out=m).abs_().neg_().add_(1))     # + 1 where it is ±0 (+ +0 elsewhere)
        out.div_(divisor)
    return out


def _into(d: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """A source's delta as the flat float32 buffer it was asked to fill (copied there if it made its own)."""
    if d.data_ptr() == into.data_ptr() and d.is_contiguous():
        return into
    return into.copy_(d.reshape(-1))


def _piece_elements(updates: int, method: str, lora: bool) -> int:
    """Elements per engine piece for several updates: CHUNK_ELEMENTS scaled by the one-update graft's bytes per
    element over these updates' (in multiples of 64 Ki elements, at least one). Per element, taking 2-byte inputs:
    the engine's 6 slots (workers + 3, on a CPU) hold the Instruct, the Base, each update and the output as stored;
    each of its 3 compute workers holds float32 buffers: the Instruct, the Base, an update, the delta, then the
    method's own (a term for sum/dare_linear; for ties/dare_ties every update's term, the sign and the agreement,
    and for ties the divisor), an int32 mask, and a LoRA factor's (or DoRA Base's) buffers when adapters are among
    the updates."""
    one = 6 * 4 * 2 + 3 * 4 * 4                        # the one-update graft: 96 bytes per element
    floats = 4 + (updates + 2 + (method == "ties") if method in ("ties", "dare_ties") else 1) + \
        (method != "sum") + 2 * lora
    bytes_per = 6 * (3 + updates) * 2 + 3 * floats * 4
    step = 1 << 16
    return max(step, CHUNK_ELEMENTS * one // bytes_per // step * step)


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


def _mix_(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer hash of x (int32, values in [0, 2^31)), in place (t: int32 scratch of as many): xor-shift-
    multiply rounds. x · 0x45D9F3B overflows int32, and torch's integer product wraps modulo 2^32 on every device
    (two's complement: the low 32 bits of the exact product), so `& (2^31 − 1)` leaves the exact product modulo
    2^31: the hash is the one an unbounded integer computation gives (tests/test_multi.py checks it against Python's
    integers)."""
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t)).mul_(0x45D9F3B).bitwise_and_(_MASK31)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=t))


def dare_mask_(seed: int, k: int, name: str, e0: int, density: float, out: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """Which of the flat elements [e0, e0 + n) of update k of a tensor DARE keeps, as an int32 mask in `out` (−1:
    kept, 0: dropped; t: int32 scratch of at least min(n, _HASH_BLOCK)): hash(seed, k, name, index) below
    density · 2^31 — a function of the index alone, so any cut into pieces, on any device, draws the same. The hash
    of index i: h = mix(mix((i mod 2^31) ^ key) ^ (i div 2^31) ^ (key >> 7)), key from (seed, k, name); done in
    blocks that stay in cache, in int32 (the low and high parts of an index in turn)."""
    n = out.numel()
    if density >= 1:
        return out.fill_(-1)
    key, limit = _key(seed, k, name), int(density * (1 << 31))
    at = 0
    while at < n:
        i = e0 + at
        size = min(n - at, _HASH_BLOCK, ((i >> 31) + 1 << 31) - i)      # a block stays within one 2^31 run
        x, tt = out[at:at + size], t[:size]
        torch.arange(i & _MASK31, (i & _MASK31) + size, out=x)
        _mix_(x.bitwise_xor_(key), tt)
        _mix_(x.bitwise_xor_(((i >> 31) & _MASK31) ^ (key >> 7)), tt)
        x.sub_(limit).bitwise_right_shift_(31)          # h − limit (no overflow: both in [0, 2^31)) < 0: kept
        at += size
    return out


def dare_keep(seed: int, k: int, name: str, e0: int, n: int, density: float, device) -> torch.Tensor:
    """dare_mask_ as booleans (True: kept)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    return dare_mask_(seed, k, name, e0, density, out, torch.empty(min(n, _HASH_BLOCK), dtype=torch.int32,
                                                                    device=device)) == -1


class _SharedBase:
    """A compute thread's to_float for the full fine-tunes of one piece: the Base (the same raw bytes for all of
    them) widened once."""

    def __init__(self, to_float):
        self.to_float, self.raw, self.value = to_float, None, None

    def __call__(self, raw, dtype, key: str):
        if key != "base":
            return self.to_float(raw, dtype, key)
        if raw is not self.raw:
            self.raw, self.value = raw, self.to_float(raw, dtype, key)
        return self.value


class Scratch(Buffers):
    """A compute thread's own float32 buffers for the terms (and int32 views for the masks)."""

    def int32(self, n: int, key: str = "ints") -> torch.Tensor:
        return self(key, n).view(torch.int32)


_local = threading.local()


def _pass_buffers() -> tuple:
    """A thread's buffers for the threshold passes: raw bytes, and float32."""
    return Buffers(torch.device("cpu")), Buffers(torch.device("cpu"), torch.float32)


def _scratch(device: torch.device) -> Scratch:
    """This thread's buffers on that device (they go with the thread: the engine's compute threads end with the
    run)."""
    mine = getattr(_local, "scratch", None)
    if mine is None:
        mine = _local.scratch = {}
    got = mine.get(device)
    if got is None:
        got = mine[device] = Scratch(device, torch.float32)
    return got


class _Ahead:
    """The TIES threshold passes run ahead of the engine's reader on threads of their own (THREADS, each taking the
    next tensor): the cuts of the next tensors while the engine grafts the current one, at most AHEAD of them held.
    An error there is raised where the reader takes that tensor's cuts."""

    def __init__(self, multi: MultiDelta, entries: list, stop):
        self.multi, self.stop = multi, stop
        self.cond = threading.Condition()
        self.todo = iter(entries)
        self.found: dict[str, list] = {}
        self.busy = 0                    # tensors being worked on
        self.last = None                 # the tensor the reader took last
        self.error: BaseException | None = None
        for i in range(THREADS):
            threading.Thread(target=self._run, daemon=True, name=f"shadowmerge-ties-{i}").start()

    def _run(self) -> None:
        bufs = _pass_buffers()
        try:
            while True:
                with self.cond:
                    while len(self.found) + self.busy >= AHEAD and not self.stop.is_set():
                        self.cond.wait(0.1)
                    entry = next(self.todo, None)
                    if entry is None or self.stop.is_set() or self.error is not None:
                        return
                    self.busy += 1
                try:
                    cuts = self.multi.find_cuts(entry, bufs, self.stop)
                finally:
                    with self.cond:
                        self.busy -= 1
                with self.cond:
                    self.found[entry.name] = cuts
                    self.cond.notify_all()
        except BaseException as exc:         # handed to the reader, which raises it
            with self.cond:
                self.error = self.error or exc
                self.cond.notify_all()

    def take(self, entry: MultiEntry) -> list:
        from .engine import Stopped

        with self.cond:
            while entry.name not in self.found:
                if self.error is not None:
                    raise self.error
                if self.stop.is_set():
                    raise Stopped
                self.cond.wait(0.1)
            if self.last != entry.name:
                self.found.pop(self.last, None)
                self.last = entry.name
                self.cond.notify_all()
            return self.found[entry.name]
