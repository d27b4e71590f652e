"""Paired statistics: two models answered the same items, so they are compared item by item, and every verdict
says whether there were enough differing items to decide at all.

- Right/wrong metrics (every item scored 0 or 1: acc, exact_match, ...): only the k items where the two models
  disagree carry information (w wins, l losses). The test is McNemar's exact test, the binomial test of
  w ~ Bin(k, 1/2) (scipy's binomial tail). The 95 % interval of Δ = (w − l)/n is the Clopper–Pearson interval
  [θL, θU] of w/k (scipy's beta quantiles) mapped through Δ = (k/n)(2θ − 1): it excludes 0 exactly when the
  test's p < 0.05 (both invert the same binomial tails; tests/test_stats.py checks every split of up to 200
  items).
- Other per-item scores and the held-out loss (a ratio, Σ NLL / Σ tokens, rows kept whole): each row's
  contribution to Δ (its difference, scaled; the delta method's linearisation when the two models count other
  tokens), and the paired t-test on them with its own interval (scipy's ttest_1samp): again the interval
  excludes 0 exactly when p < 0.05. (A bootstrap interval beside a permutation test disagreed on small n: the
  percentile and BCa intervals are too narrow there.)
- One model's own interval: Clopper–Pearson for a right/wrong score, else the t interval (of the rows'
  linearised contributions for the held-out ratio). No bootstrap: on tens of items its intervals are too narrow,
  and BCa's jackknife costs n² (16 s per interval at 50,000 rows).
- Too few to decide: with k differing items even the most lopsided split gives p ≥ 2·0.5^k, so k ≤ 5 can never
  reach p < 0.05; the verdict is then "too few to decide", never "within noise".
- For an undecided difference: roughly how many items would detect it (80 % power at 0.05): Connor's (1987)
  sample size for McNemar's test from the observed discordant rate and Δ, or the normal approximation from the
  per-item differences' spread.
- Several comparisons: Holm's step-down correction of the p-values (written here because scipy offers only
  false-discovery-rate control, `false_discovery_control`, not a familywise one).

Nothing is random: a report is the same run to run and on every machine.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
ALPHA = 0.05                # = 1 - LEVEL
POWER = 0.8

BETTER, WORSE, NOISE, TOO_FEW = "better", "worse", "within noise", "too few to decide"
VERDICTS = (BETTER, WORSE, NOISE, TOO_FEW)


@functools.lru_cache(maxsize=None)
def decidable(k: int) -> bool:
    """Whether k differing items can ever give p < 0.05: the most lopsided split (k to 0) must (k >= 6)."""
    return k > 0 and mcnemar_p(k, 0) < ALPHA


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test: twice the smaller binomial tail of the split of the differing items under
    Bin(k, 1/2) (scipy.special.bdtr), capped at 1, which is what scipy.stats.binomtest(wins, k, 0.5) gives for a
    symmetric null (tests/test_eval.py checks both agree) at a hundredth of its cost."""
    from scipy.special import bdtr

    k = wins + losses
    return 1.0 if k == 0 else min(1.0, 2.0 * float(bdtr(min(wins, losses), k, 0.5)))


def clopper_pearson(x: int, k: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a proportion x/k: quantiles of the beta distribution
    (scipy.special.betaincinv, the inverse of the same incomplete beta function the binomial tails are)."""
    from scipy.special import betaincinv

    a = (1 - level) / 2
    lo = 0.0 if x == 0 else float(betaincinv(x, k - x + 1, a))
    hi = 1.0 if x == k else float(betaincinv(x + 1, k - x, 1 - a))
    return lo, hi


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (familywise error control), in the order given."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Paired:
    delta: float                     # model − reference (a score, or NLL per token)
    ci95: tuple[float, float]
    n: int                           # items (rows) compared
    wins: int                        # items where the model is better than the reference
    losses: int
    ties: int
    test: str                        # the test and the interval, in words
    p: float | None
    verdict: str                     # one of VERDICTS
    needed: int | None = None        # items that would detect a difference of this size (undecided, Δ != 0)

    @property
    def differing(self) -> int:
        return self.wins + self.losses

    def as_dict(self) -> dict:
        return {"delta": self.delta, "ci95": list(self.ci95), "n": self.n, "differing": self.differing,
                "wins": self.wins, "losses": self.losses, "ties": self.ties, "test": self.test, "p": self.p,
                "verdict": self.verdict, "needed": self.needed}


@functools.lru_cache(maxsize=None)
def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def _at_least_decidable(needed: int, k: int, n: int) -> int:
    """No fewer items than would hold 6 differing ones at the observed rate: fewer can never be decided."""
    return max(needed, math.ceil(6 * n / k), n + 1)


def _verdict(k: int, p: float, ci: tuple[float, float], up: bool) -> str:
    """up: the model did better than the reference (in the metric's own direction)."""
    if not decidable(k):
        return TOO_FEW
    if p < ALPHA and not ci[0] <= 0 <= ci[1]:
        return BETTER if up else WORSE
    return NOISE


def _binary(m: np.ndarray, r: np.ndarray, higher: bool) -> Paired:
    n = len(m)
    wins = int(((m > r) if higher else (m < r)).sum())
    losses = int(((m < r) if higher else (m > r)).sum())
    k = wins + losses
    delta = float(m.mean() - r.mean())
    p = mcnemar_p(wins, losses)
    if k:
        lo, hi = (k / n * (2 * t - 1) for t in clopper_pearson(wins, k))      # Δ in the "better" direction
        ci = (lo, hi) if higher else (-hi, -lo)
    else:
        ci = (0.0, 0.0)
    verdict = _verdict(k, p, ci, wins > losses)
    needed = None
    if verdict in (NOISE, TOO_FEW) and wins != losses:
        psi, d = k / n, (wins - losses) / n            # discordant rate and difference (Connor 1987)
        needed = _at_least_decidable(math.ceil(((_z(1 - ALPHA / 2) * math.sqrt(psi) + _z(POWER) *
                                                 math.sqrt(max(psi - d * d, 0.0))) / d) ** 2), k, n)
    test = (f"McNemar's exact test (binomial test of {wins} wins among the {k} of {n} items where the models "
            f"differ); 95 % interval: Clopper–Pearson on that split, scaled to Δ")
    return Paired(delta, ci, n, wins, losses, n - k, test, p, verdict, needed)


def _ratio_comparison(m_num, m_den, r_num, r_den, wins: int, losses: int, higher: bool, unit: str) -> Paired:
    """Δ = Σm_num/Σm_den − Σr_num/Σr_den over paired rows (a mean when the denominators are 1): the paired t-test on
    each row's contribution to Δ, and its own 95 % interval."""
    from scipy.stats import ttest_1samp

    n = len(m_num)
    delta = float(m_num.sum() / m_den.sum() - r_num.sum() / r_den.sum())
    k = wins + losses
    c = contributions(m_num, m_den, r_num, r_den)
    sd = float(c.std(ddof=1)) if n > 1 else 0.0
    if k == 0 or n < 2:
        p, ci = 1.0, (delta, delta)
    elif sd <= 1e-12 * max(abs(delta), 1e-300):     # every row moved by the same amount: the sign test decides
        p, ci = mcnemar_p(wins, losses), (delta, delta)
    else:
        res = ttest_1samp(c, 0.0)
        p = float(res.pvalue)
        interval = res.confidence_interval(LEVEL)
        ci = (float(interval.low), float(interval.high))
    up = (delta > 0) == higher
    verdict = _verdict(k, p, ci, up)
    needed = None
    if verdict in (NOISE, TOO_FEW) and delta != 0 and n > 1:
        needed = _at_least_decidable(math.ceil(((_z(1 - ALPHA / 2) + _z(POWER)) * sd / abs(delta)) ** 2), k, n)
    test = (f"paired t-test on each of the {n} {unit}' contribution to Δ ({k} differ), with its own 95 % interval "
            f"(scipy's ttest_1samp: the interval excludes 0 exactly when p < 0.05)")
    return Paired(delta, ci, n, wins, losses, n - k, test, p, verdict, needed)


def contributions(m_num, m_den, r_num, r_den) -> np.ndarray:
    """Each row's contribution c_i to Δ = Σm_num/Σm_den − Σr_num/Σr_den, with mean(c) = Δ: the scaled difference
    (m_num_i − r_num_i)·n/Σden where both models count the same denominators (the same items, or the same
    tokens), else Δ plus the delta method's linearisation of the two ratios (other tokenizers)."""
    n = len(m_num)
    if np.array_equal(m_den, r_den):
        return (m_num - r_num) * (n / m_den.sum())
    rm, rr = m_num.sum() / m_den.sum(), r_num.sum() / r_den.sum()
    return (rm - rr) + (m_num - rm * m_den) / m_den.mean() - (r_num - rr * r_den) / r_den.mean()


def compare_items(model: list[float], reference: list[float], higher_is_better: bool = True) -> Paired:
    """Paired comparison of per-item scores (same items, same order)."""
    m, r = np.asarray(model, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if len(m) != len(r) or not len(m):
        raise ValueError("compare_items needs two equally long, non-empty lists of per-item scores")
    if np.isin(m, (0.0, 1.0)).all() and np.isin(r, (0.0, 1.0)).all():
        return _binary(m, r, higher_is_better)
    better = (m > r) if higher_is_better else (m < r)
    worse = (m < r) if higher_is_better else (m > r)
    ones = np.ones_like(m)
    return _ratio_comparison(m, ones, r, ones, int(better.sum()), int(worse.sum()), higher_is_better, "items")


def compare_losses(model: tuple[list[float], list[int]], reference: tuple[list[float], list[int]]) -> Paired:
    """Paired comparison of held-out NLL per token: (per-row NLL sums, per-row token counts) of each model."""
    (m_nll, m_tok), (r_nll, r_tok) = model, reference
    m_nll, r_nll = np.asarray(m_nll, dtype=np.float64), np.asarray(r_nll, dtype=np.float64)
    m_tok, r_tok = np.asarray(m_tok, dtype=np.float64), np.asarray(r_tok, dtype=np.float64)
    per_m, per_r = m_nll / np.maximum(m_tok, 1), r_nll / np.maximum(r_tok, 1)
    wins, losses = int((per_m < per_r).sum()), int((per_m > per_r).sum())
    return _ratio_comparison(m_nll, m_tok, r_nll, r_tok, wins, losses, False, "rows, resampled whole")


def score_interval(values: list[float]) -> tuple[float, float]:
    """95 % interval of one model's mean score: Clopper–Pearson for right/wrong items, else the t interval."""
    v = np.asarray(values, dtype=np.float64)
    if np.isin(v, (0.0, 1.0)).all():
        return clopper_pearson(int(v.sum()), len(v))
    return _t_interval(v)


def loss_interval(nll: list[float], tokens: list[int]) -> tuple[float, float]:
    """95 % interval of one model's NLL per token (a ratio of sums over rows kept whole): the t interval of the
    rows' contributions (the delta method's linearisation)."""
    num, den = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    ratio = num.sum() / den.sum()
    return _t_interval(ratio + (num - ratio * den) / den.mean())


def _t_interval(c: np.ndarray) -> tuple[float, float]:
    """The t interval of the mean of c (scipy's ttest_1samp); a point where c has no spread."""
    from scipy.stats import ttest_1samp

    mean = float(c.mean())
    if len(c) < 2 or float(c.std(ddof=1)) <= 1e-12 * max(abs(mean), 1e-300):
        return mean, mean
    interval = ttest_1samp(c, 0.0).confidence_interval(LEVEL)
    return float(interval.low), float(interval.high)
