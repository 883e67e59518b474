"""Which differences between two methods are real: bootstrap confidence intervals over seeds (scipy), paired by seed
where both methods ran the same seeds, the probability of improvement (as rliable defines it: P(X > Y) + P(X = Y) / 2
over pairs of runs), and the binomial standard error of one run's accuracy.

A part of a finding is "yes" or "no" only when the interval excludes the claim's threshold in that direction, and
"inconclusive" otherwise (`Comparison.verdict`). The interval covers what varies from seed to seed (training and
sampling noise); every method is evaluated on the same held-out problems, whose own finite-sample error is reported
per run beside it (`accuracy_se`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

# two-sided confidence of every interval
CONFIDENCE = 0.95
# bootstrap resamples; the generator is seeded, so the same runs always give the same interval
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
VERDICTS = ("yes", "no", "inconclusive")


@dataclass(frozen=True)
class Comparison:
    """mean(a) - mean(b) with its bootstrap confidence interval [low, high] (nan when a side has < 2 runs)."""

    diff: float
    low: float
    high: float
    # resampled as pairs of runs of the same seed (else each side on its own)
    paired: bool
    n_a: int
    n_b: int
    # P(a run of a > a run of b) + P(equal) / 2, over all pairs of runs
    p_improve: float

    def verdict(self, threshold: float = 0.0, greater: bool = True) -> str:
        """Is a - b above `threshold` (below it when `greater` is False)? 'yes' when the whole interval lies on the
        claim's side, 'no' when it lies on the other side, else 'inconclusive' (also when there is no interval)."""
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "inconclusive"
        above, below = self.low > threshold, self.high < threshold
        if above or below:
            return "yes" if above == greater else "no"
        return "inconclusive"

    def short(self, digits: int = 1) -> str:
        """'+1.7 [-2.1, +5.3]' (a table cell); '–' without runs on both sides."""
        return interval_text(self.diff, self.low, self.high, digits) if math.isfinite(self.diff) else "–"

    def text(self, unit: str = "", digits: int = 1) -> str:
        """'+1.7 [-2.1, +5.3] points (95% CI, paired by seed, n=3; P(improve) 0.67)'."""
        unit = f" {unit}" if unit else ""
        n = f"n={self.n_a}" if self.paired else f"n={self.n_a} vs {self.n_b}"
        design = "paired by seed" if self.paired else "unpaired"
        ci = interval_text(self.diff, self.low, self.high, digits, "no interval")
        return (f"{ci}{unit} ({100 * CONFIDENCE:g}% CI, {design}, {n}; "
                f"P(improve) {self.p_improve:.2f})")


def interval_text(diff: float, low: float, high: float, digits: int = 1, missing: str = "–") -> str:
    """'+1.7 [-2.1, +5.3]'; '+1.7 [missing]' when there is no interval."""
    ci = f"{low:+.{digits}f}, {high:+.{digits}f}" if math.isfinite(low) else missing
    return f"{diff:+.{digits}f} [{ci}]"


def _finite(values: Mapping[object, float]) -> dict[object, float]:
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def compare(a: Mapping[object, float], b: Mapping[object, float]) -> Comparison:
    """a - b from per-run values keyed by seed. When both sides ran the same seeds (at least two), the interval
    resamples the per-seed differences (paired); otherwise each side is resampled on its own. Percentile intervals:
    BCa needs more runs than a sweep of a few seeds has."""
    a, b = _finite(a), _finite(b)
    if not a or not b:
        return Comparison(math.nan, math.nan, math.nan, False, len(a), len(b), math.nan)
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    diff = float(xa.mean() - xb.mean())
    p_improve = float(stats.mannwhitneyu(xa, xb).statistic) / (len(xa) * len(xb))
    paired = set(a) == set(b) and len(a) >= 2
    low = high = math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    options = dict(confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile", rng=rng)
    if paired:
        seeds = sorted(a, key=str)
        d = np.array([a[s] - b[s] for s in seeds])
        if np.ptp(d) == 0:  # every seed differs by the same amount: the interval is that point
            low = high = float(d[0])
        else:
            ci = stats.bootstrap((d,), np.mean, **options).confidence_interval
            low, high = float(ci.low), float(ci.high)
    elif len(xa) >= 2 and len(xb) >= 2:
        if np.ptp(xa) == 0 and np.ptp(xb) == 0:
            low = high = diff
        else:
            def mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
                return np.mean(x, axis=axis) - np.mean(y, axis=axis)

            ci = stats.bootstrap((xa, xb), mean_diff, paired=False, vectorized=True, **options).confidence_interval
            low, high = float(ci.low), float(ci.high)
    return Comparison(diff, low, high, paired, len(a), len(b), p_improve)


def rate_verdict(k_a: int, n_a: int, k_b: int, n_b: int) -> tuple[str, float]:
    """Does event rate a (k_a of n_a runs) exceed rate b? One-sided Fisher exact tests at 1 - CONFIDENCE: 'yes' when
    a's is significantly higher, 'no' when significantly lower, else 'inconclusive'; with the p-value of 'higher'."""
    if not n_a or not n_b:
        return "inconclusive", math.nan
    table = [[k_a, n_a - k_a], [k_b, n_b - k_b]]
    higher = float(stats.fisher_exact(table, alternative="greater").pvalue)
    lower = float(stats.fisher_exact(table, alternative="less").pvalue)
    alpha = round(1 - CONFIDENCE, 10)  # 0.05, not 0.050000000000000044 (an exact p of 1/20 is not below it)
    return ("yes" if higher < alpha else "no" if lower < alpha else "inconclusive"), higher


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy `p` (a fraction) measured on n independent problems."""
    if n <= 0 or not math.isfinite(p):
        return math.nan
    return math.sqrt(p * (1 - p) / n)


def combine(parts: Mapping[str, str]) -> str:
    """The finding's verdict from its parts: 'yes' (every part yes), 'no' (every part no), 'inconclusive' (every part
    inconclusive), else 'partly'."""
    values = set(parts.values())
    if len(values) == 1:
        return values.pop()
    return "partly"
