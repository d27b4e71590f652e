"""Paired statistics: two models answered the same items, so they are compared item by item.

- The difference of two scores: a paired bootstrap over items (10,000 resamples, a fixed seed, so a
  report is the same run to run), its 95 % percentile interval.
- Binary metrics (every item scored 0 or 1: acc, exact_match, ...): McNemar's exact test on the items
  where the two models disagree (a two-sided binomial test of wins against losses).
- Held-out loss, a ratio (Σ NLL / Σ tokens): rows are resampled whole (a row's tokens are not
  independent), and the ratio is recomputed per resample.

A difference is called a win or a loss only when the interval excludes 0 and, for binary metrics,
McNemar's p < 0.05 as well; otherwise it is "within noise". Written here because no library in the
stack does paired comparisons of evaluation items (lm_eval reports each model's own stderr only);
numpy does the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
_CHUNK = 1 << 22            # elements of one resample batch (n items x k resamples): memory stays ~32 MB


def _resampled_means(values: list[np.ndarray]) -> list[np.ndarray]:
    """For each array of per-item values: its mean in each of RESAMPLES paired resamples of the items (the same
    resampled items for every array)."""
    n = len(values[0])
    rng = np.random.default_rng(SEED)
    out: list[list[np.ndarray]] = [[] for _ in values]
    per = max(1, _CHUNK // max(n, 1))
    left = RESAMPLES
    while left:
        k = min(per, left)
        picks = rng.integers(0, n, size=(k, n))             # k resamples of n items, with replacement
        for j, v in enumerate(values):
            out[j].append(v[picks].mean(axis=1))
        left -= k
    return [np.concatenate(o) for o in out]


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(lo), float(hi)


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test: P(a split of the discordant items at least this uneven | no difference)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    log_half = n * math.log(0.5)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
               for i in range(k + 1))
    return min(1.0, 2.0 * tail)


@dataclass
class Paired:
    delta: float                     # model − reference (a score, or NLL per token)
    ci95: tuple[float, float]
    wins: int                        # items where the model is better than the reference
    losses: int
    ties: int
    test: str
    p: float | None                  # McNemar's p for binary metrics, else None
    verdict: str                     # "better", "worse" or "within noise"

    def as_dict(self) -> dict:
        return {"delta": self.delta, "ci95": list(self.ci95), "wins": self.wins, "losses": self.losses,
                "ties": self.ties, "test": self.test, "p": self.p, "verdict": self.verdict}


def _verdict(ci: tuple[float, float], higher_is_better: bool, p: float | None) -> str:
    if ci[0] <= 0 <= ci[1] or (p is not None and p >= 1 - LEVEL):
        return "within noise"
    up = ci[0] > 0
    return "better" if up == higher_is_better else "worse"


def compare_items(model: list[float], reference: list[float], higher_is_better: bool = True) -> Paired:
    """Paired comparison of per-item scores (same items, same order)."""
    m, r = np.asarray(model, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    diff = m - r
    delta = float(m.mean() - r.mean())
    better = diff > 0 if higher_is_better else diff < 0
    worse = diff < 0 if higher_is_better else diff > 0
    wins, losses = int(better.sum()), int(worse.sum())
    ci = _interval(_resampled_means([diff])[0])
    binary = bool(np.isin(m, (0.0, 1.0)).all() and np.isin(r, (0.0, 1.0)).all())
    p = mcnemar_p(wins, losses) if binary else None
    test = (f"paired bootstrap over {len(m)} items ({RESAMPLES} resamples, seed {SEED}) for the interval; "
            f"McNemar exact test on the {wins + losses} items where the models disagree (p = {p:.3g})"
            if binary else f"paired bootstrap over {len(m)} items ({RESAMPLES} resamples, seed {SEED})")
    return Paired(delta, ci, wins, losses, len(m) - wins - losses, test, p, _verdict(ci, higher_is_better, p))


def compare_losses(model: tuple[list[float], list[int]], reference: tuple[list[float], list[int]]) -> Paired:
    """Paired comparison of held-out NLL per token: (per-row NLL sums, per-row token counts) of each model."""
    (m_nll, m_tok), (r_nll, r_tok) = model, reference
    m_nll, r_nll = np.asarray(m_nll, dtype=np.float64), np.asarray(r_nll, dtype=np.float64)
    m_tok, r_tok = np.asarray(m_tok, dtype=np.float64), np.asarray(r_tok, dtype=np.float64)
    delta = float(m_nll.sum() / m_tok.sum() - r_nll.sum() / r_tok.sum())
    # resample rows once, the same rows for both models
    stacked = _resampled_means([m_nll, r_nll, m_tok, r_tok])
    ci = _interval(stacked[0] / stacked[2] - stacked[1] / stacked[3])
    per_m, per_r = m_nll / np.maximum(m_tok, 1), r_nll / np.maximum(r_tok, 1)
    wins, losses = int((per_m < per_r).sum()), int((per_m > per_r).sum())
    test = f"paired bootstrap over {len(m_nll)} rows ({RESAMPLES} resamples, seed {SEED}), rows resampled whole"
    return Paired(delta, ci, wins, losses, len(m_nll) - wins - losses, test, None, _verdict(ci, False, None))


def loss_interval(nll: list[float], tokens: list[int]) -> tuple[float, float]:
    """95 % interval of one model's NLL per token, rows resampled whole."""
    sums = _resampled_means([np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)])
    return _interval(sums[0] / sums[1])
