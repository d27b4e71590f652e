"""Exact top-k by magnitude over a tensor too large to hold: a radix select over float32 bit patterns, in passes.

TIES keeps, of each update Δ, the k = max(1, int(density · numel)) elements of largest |Δ| (mergekit's
`sparsify.magnitude`, with its k). mergekit sorts the whole tensor (an unstable argsort: which of several equal
magnitudes at the threshold survive differs between runs and devices). Here the tensor is never held: the
magnitudes' float32 bit patterns (for |x| ≥ 0 their order as integers is their order as numbers) are counted
into a 65,536-bin histogram of their high 16 bits (pass 1), then of the low 16 bits of those in the threshold's
bin (pass 2): that gives the exact k-th largest magnitude T, the count g of magnitudes above it and e equal to it.
Exactly k survive: every magnitude above T, and of those equal to T the k − g of lowest flat index (pass 3, only
when some equal ones must be dropped, finds the flat index where they stop). So away from ties at the threshold
the kept set is mergekit's, and at ties the rule is documented and the same on every device, thread count and
piece size. Memory: one piece of the tensor and the histograms.

Written here: torch.kthvalue/topk need the whole tensor in memory; no library selects over a stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BINS = 1 << 16


@dataclass(frozen=True)
class Cut:
    """Which elements survive: |x| bits > key, or == key with flat index < index (all of them: index = numel)."""

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


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|x| as float32 bit patterns, int32 (non-negative: ordered as the magnitudes are; NaN above +inf)."""
    return values.float().abs().contiguous().view(torch.int32)


def top_k(pieces, numel: int, k: int) -> Cut:
    """The cut keeping exactly the k largest magnitudes of a tensor given as `pieces()`: a callable returning an
    iterator of (e0, float32 values of elements [e0, e0 + n)) in any order, called once per pass."""
    if k >= numel:
        return Cut(-1, numel, numel)
    high = torch.zeros(BINS, dtype=torch.int64)
    for _, v in pieces():
        high += torch.bincount((magnitude_bits(v) >> 16).cpu(), minlength=BINS)
    above, b = _bin_of(high, k)
    low = torch.zeros(BINS, dtype=torch.int64)
    for _, v in pieces():
        bits = magnitude_bits(v).cpu()
        low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=BINS)
    more, c = _bin_of(low, k - above)
    key, greater, equal = (b << 16) | c, above + more, int(low[c])
    need = k - greater                     # of the `equal` magnitudes equal to key, the first `need` survive
    if need == equal:
        return Cut(key, numel, k)
    found = sorted(((e0, int((magnitude_bits(v) == key).sum())) for e0, v in pieces()), key=lambda p: p[0])
    seen = 0
    for e0, count in found:
        if seen + count >= need:
            for e0b, v in pieces():        # the piece where the need-th equal one is
                if e0b == e0:
                    at = torch.nonzero(magnitude_bits(v).cpu() == key).flatten()
                    return Cut(key, e0 + int(at[need - seen - 1]) + 1, k)
        seen += count
    raise AssertionError("the counts of two passes disagree")


def _bin_of(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """(count above the bin, the bin) where the k-th largest falls, counting from the top bin down."""
    from_top = torch.cumsum(hist.flip(0), 0)
    j = int(torch.searchsorted(from_top, torch.tensor(k, dtype=torch.int64)))
    b = BINS - 1 - j
    return int(from_top[j - 1]) if j else 0, b
