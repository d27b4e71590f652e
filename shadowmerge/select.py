"""Exact top-k by magnitude over a tensor too large to hold: a select over float32 bit patterns, in passes.

TIES keeps, of each update Δ, the k = max(1, int(density · numel)) elements of largest |Δ| (mergekit's
`sparsify.magnitude`, with its k). mergekit sorts the whole tensor (an unstable argsort: which of several equal
magnitudes at the threshold survive differs between runs and devices). Here the tensor is never held: the
magnitudes' float32 bit patterns (for |x| ≥ 0 their order as integers is their order as numbers) are counted, in
passes over its pieces, until the k-th largest magnitude T is known exactly, with the count g of magnitudes above it
and e equal to it. Exactly k survive: every magnitude above T, and of those equal to T the k − g of lowest flat
index. So away from ties at the threshold the kept set is mergekit's, and at ties the rule is documented and the
same on every device, thread count and piece size.

A pass counts, in one histogram, the low 16 bits of the patterns in one bin (65,536 high-16-bit values: 128 bins per
power of two) and the high 16 bits of all others. Pass 1 takes for that bin a guess: the first piece's own k-th largest, in proportion (exact for a tensor
of one piece; usually right otherwise, the piece being a large sample). If the k-th largest falls in that bin, T is
known after one pass; otherwise a second pass counts the low bits of the bin it falls in. When some magnitudes equal
to T must be dropped, the flat index where the survivors equal to T stop is found: when T is its bin's first
pattern (deltas of bf16 weights have few significant bits, so it usually is), pass 1 counted those per piece and only
that piece is read again; otherwise the pieces are walked in order until the (k − g)-th is found. Several updates of
one tensor are selected together (`top_k_many`), so that each pass reads the Base once for all of them. Memory: one
piece and 98,304 int64 counts per update.

Written here: torch.kthvalue/topk need the whole tensor in memory; no library selects over a stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 1 << 16
HALF = 1 << 15                 # high 16 bits of a non-negative int32: below this
_M31 = (1 << 31) - 1


@dataclass(frozen=True)
class Cut:
    """Which elements survive: |x| bits > key, or == key with flat index < index (all of them: key −1)."""

    key: int
    index: int
    kept: int

    def mask(self, values: torch.Tensor, e0: int) -> torch.Tensor:
        """Whether each element of values (flat elements [e0, e0 + n) of the tensor) survives."""
        bits = magnitude_bits(values)
        keep = bits > self.key
        if self.index > e0:
            at = torch.arange(e0, e0 + values.numel(), device=values.device)
            keep |= (bits == self.key) & (at < self.index)
        return keep

    def apply_(self, values: torch.Tensor, e0: int, work: torch.Tensor) -> torch.Tensor:
        """values (float32, flat elements [e0, e0 + n)) with the dropped ones set to +0.0, in place, as
        torch.where(mask, values, 0) would: an int32 mask ((key − |x| bits) >> 31 is −1 where |x| bits > key; the
        two are below 2^31, so the difference cannot overflow) and-ed into the bit patterns. `work`: int32, n."""
        if self.key < 0:
            return values
        bits = values.view(torch.int32)
        torch.bitwise_and(bits, _M31, out=work)
        work.neg_()
        upto = min(max(self.index - e0, 0), values.numel())         # before it, those equal to key survive too
        if upto:
            work[:upto].add_(self.key - 1)
        if upto < values.numel():
            work[upto:].add_(self.key)
        bits.bitwise_and_(work.bitwise_right_shift_(31))
        return values


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|x| as float32 bit patterns, int32 (non-negative: ordered as the magnitudes are; NaN above +inf)."""
    return values.float().abs().contiguous().view(torch.int32)


def top_k(pieces, numel: int, k: int) -> Cut:
    """The cut keeping exactly the k largest magnitudes of a tensor given as `pieces()`: a callable returning an
    iterator of (e0, float32 values of elements [e0, e0 + n)) in flat order, called once per pass."""
    def many(which, start=0):
        for e0, v in pieces():
            if e0 >= start:
                yield e0, [v.float().clone()]
    return top_k_many(many, numel, [k])[0]


class _Select:
    """One update's selection: fed the pieces of a pass (`feed`), then told the pass ended (`done`: whether the
    threshold is known)."""

    def __init__(self, numel: int, k: int):
        self.numel, self.k = numel, k
        self.bin = None                  # the bin whose low 16 bits the pass counts (pass 1: the guess)
        self.counts = torch.zeros(BINS + HALF, dtype=torch.int64)
        self.round = []                  # per piece of pass 1: (e0, how many patterns are the bin's first)
        self.key = self.greater = self.equal = None
        self.passes = 0

    def feed(self, e0: int, bits: torch.Tensor, work) -> None:
        """One piece (bits: |x| bit patterns, int32, non-negative; work: _Work). Counts, in one histogram, the low
        16 bits of the patterns in self.bin and the high 16 bits of the others: with x = bits ^ (bin << 16), a
        pattern is in the bin exactly when x < 65,536 (then x is its low 16 bits), and otherwise x >> 16 = high ^ bin
        is in [1, 32,767] (a permutation of the other high values): the index min(x, 65,535 + (x >> 16)) is the low
        bits for the first and 65,535 + (high ^ bin) for the others."""
        n = bits.numel()
        x, y = work(n), work.other(n)
        if self.bin is None:             # the threshold's bin were this piece all (exact for a tensor of one piece)
            share = min(n, max(1, round(self.k * n / self.numel)))
            self.bin = _bin_of(torch.bincount(torch.bitwise_right_shift(bits, 16, out=x), minlength=BINS), share)[1]
        torch.bitwise_xor(bits, self.bin << 16, out=x)
        torch.bitwise_right_shift(x, 16, out=y).add_(BINS - 1)
        counts = torch.bincount(torch.minimum(x, y, out=x), minlength=BINS + HALF)
        self.counts += counts
        if self.passes == 0:
            self.round.append((e0, int(counts[0])))

    def done(self) -> bool:
        """The pass ended: whether the threshold is known (else another pass counts the low bits of its bin)."""
        self.passes += 1
        low = self.counts[:BINS]
        high = torch.zeros(BINS, dtype=torch.int64)
        high[torch.arange(1, HALF) ^ self.bin] = self.counts[BINS:BINS + HALF - 1]
        high[self.bin] = low.sum()
        above, b = _bin_of(high, self.k)
        if b != self.bin:                # pass 1's guess missed: count the right bin's low bits
            self.bin, self.round = b, []
            self.counts.zero_()
            return False
        more, c = _bin_of(low, self.k - above)
        self.key, self.greater, self.equal = (b << 16) | c, above + more, int(low[c])
        self.counts = None
        return True

    @property
    def need(self) -> int:
        """How many of the magnitudes equal to the key survive (at least 1)."""
        return self.k - self.greater

    def piece_of_tie(self) -> tuple[int, int] | None:
        """From pass 1's counts, when the key is its bin's first pattern: (e0 of the piece where the need-th
        magnitude equal to the key is, how many come before that piece); None when pass 1 did not count them."""
        if not self.round or self.key & 0xFFFF:
            return None
        seen = 0
        for e0, count in self.round:
            if seen + count >= self.need:
                return e0, seen
            seen += count
        raise AssertionError("the counts of two passes disagree")

    def cut(self, index: int | None = None) -> Cut:
        return Cut(self.key, self.numel if index is None else index, self.k)


def top_k_many(pieces, numel: int, ks: list[int]) -> list[Cut]:
    """The cuts keeping exactly ks[j] of the largest magnitudes of each of several tensors of numel elements
    (the updates of one tensor), given as `pieces(which, start=0)`: a callable returning an iterator of
    (e0, values) over the pieces from the one at flat element `start` on, in flat order, values an iterable of the
    float32 elements [e0, e0 + n) of each tensor j in which, in turn (each may be overwritten, and is not used
    after the next is taken). Called once per pass (and to read a piece again)."""
    cuts: list[Cut | None] = [None] * len(ks)
    sel = {j: _Select(numel, k) for j, k in enumerate(ks) if k < numel}
    for j, k in enumerate(ks):
        if k >= numel:
            cuts[j] = Cut(-1, numel, numel)
    work = _Work()
    pending = sorted(sel)
    while pending:
        for e0, values in pieces(pending):
            for j, v in zip(pending, values):
                sel[j].feed(e0, _bits(v), work)
        pending = [j for j in pending if not sel[j].done()]
    walk = []
    for j, s in sel.items():
        if s.need == s.equal:
            cuts[j] = s.cut()
        elif (at := s.piece_of_tie()) is not None:        # one piece read again
            e0, seen = at
            _, values = next(iter(pieces([j], e0)))
            cuts[j] = _tie_cut(s, e0, seen, _bits(next(iter(values))), work)
        else:
            walk.append(j)
    seen = {j: 0 for j in walk}
    if walk:
        for e0, values in pieces(walk):                   # where the survivors equal to the key stop
            for j, v in zip(walk, values):
                if cuts[j] is not None:
                    continue
                s, bits = sel[j], _bits(v)
                count = int(torch.eq(bits, s.key, out=work.bool(v.numel())).sum())
                if seen[j] + count >= s.need:
                    cuts[j] = _tie_cut(s, e0, seen[j], bits, work)
                seen[j] += count
            if all(cuts[j] is not None for j in walk):
                break
    if any(c is None for c in cuts):
        raise AssertionError("the counts of two passes disagree")
    return cuts


def _tie_cut(s: _Select, e0: int, seen: int, bits: torch.Tensor, work: "_Work") -> Cut:
    """The cut whose last survivor equal to the key is in the piece at e0, after `seen` such ones before it."""
    at = torch.nonzero(torch.eq(bits, s.key, out=work.bool(bits.numel()))).flatten()
    return s.cut(e0 + int(at[s.need - seen - 1]) + 1)


def _bits(values: torch.Tensor) -> torch.Tensor:
    """|values| as float32 bit patterns, int32, in place."""
    return values.abs_().view(torch.int32)


class _Work:
    """The passes' scratch, grown on demand: two int32 buffers and a bool one."""

    def __init__(self):
        self.bufs: dict = {}

    def _get(self, key: str, dtype, n: int) -> torch.Tensor:
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = torch.empty(n, dtype=dtype)
        return buf[:n]

    def __call__(self, n: int) -> torch.Tensor:
        return self._get("a", torch.int32, n)

    def other(self, n: int) -> torch.Tensor:
        return self._get("b", torch.int32, n)

    def bool(self, n: int) -> torch.Tensor:
        return self._get("bool", torch.bool, n)


def _bin_of(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(count above the bin, the bin) where the k-th largest falls, counting from the top bin down."""
    bins = hist.numel()
    from_top = torch.cumsum(hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    b = bins - 1 - j
    return int(from_top[j - 1]) if j else 0, b
