"""The statistics of a few-seeds comparison, each from ``scipy.stats`` where it
has one: intervals of a mean (Student t or bootstrap), the difference of two
groups (Welch's t-test, or a permutation test for the interquartile mean),
adjusted p-values, Hedges' g, power and the seeds a difference needs, and the
main effects and interactions of a factorial grid.

Written here, with the reason: Holm's and Bonferroni's adjustments (scipy has
only the false-discovery-rate ones; statsmodels' ``multipletests`` is a large
dependency for a dozen lines), Hedges' g (no scipy function), and the F tests
of a factorial grid (scipy has one-way ANOVA only; the model comparison is a
few least-squares fits in NumPy, the p-value ``scipy.stats.f``).

scipy and NumPy are imported inside the functions: ``bnexp report`` and the
sweep's summary import this module, and scipy.stats costs ~1 s to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations, product
from typing import Any, Sequence

ALPHA, POWER = 0.05, 0.8
BOOTSTRAP_SEED = 0  # a fixed seed: the same runs give the same interval on every report
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_RELIABLE_N = 8  # below this many seeds a bootstrap interval is too narrow (it never leaves the data's range)
MAX_SEEDS = 10_000  # beyond this, "seeds needed" reads "> 10000": the difference is noise for any practical sweep
CORRECTIONS = ("holm", "bonferroni", "none")


def _stats():
    from scipy import stats

    return stats


def _quiet(fn):
    """``fn`` without scipy's warnings about the data a few seeds give: precision loss
    for a group whose seeds agree to within rounding (all at 100% accuracy, say: its
    variance is then 0 to within rounding, which is what the test uses), and
    degenerate data for a bootstrap of three values. The report says what is
    unreliable in its own words."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            warnings.filterwarnings("ignore", category=getattr(_stats(), "DegenerateDataWarning", RuntimeWarning))
            return fn(*args, **kwargs)

    return wrapped


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: Sequence[float]) -> float:
    """The sample standard deviation (ddof=1)."""
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@_quiet
def iqm(xs: Sequence[float]) -> float:
    """The interquartile mean: the mean of the middle half (``scipy.stats.trim_mean``
    cutting 25% at each end; with fewer than 4 values it cuts none and is the mean)."""
    return float(_stats().trim_mean(list(xs), 0.25))


def centre(xs: Sequence[float], aggregate: str) -> float:
    return iqm(xs) if aggregate == "iqm" else mean(xs)


# --------------------------------------------------------------------------- intervals


@_quiet
def t_interval(xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean (n - 1 degrees of freedom); needs two values."""
    ci = _stats().ttest_1samp(list(xs), 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


@_quiet
def bootstrap_interval(samples: Sequence[Sequence[float]], statistic, confidence: float = 0.95,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """A percentile bootstrap interval of ``statistic(*samples)`` (``scipy.stats.bootstrap``,
    each sample resampled on its own, a fixed seed). Percentile, not BCa: BCa's
    acceleration comes from a jackknife, which with 3 seeds has 3 values."""
    import numpy as np

    res = _stats().bootstrap([np.asarray(s, dtype=float) for s in samples], statistic, vectorized=True, paired=False,
                             confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
                             rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _centre_along(aggregate: str):
    import numpy as np

    if aggregate == "iqm":
        return lambda x, axis=-1: _stats().trim_mean(x, 0.25, axis=axis)
    return lambda x, axis=-1: np.mean(x, axis=axis)


def interval(xs: Sequence[float], method: str = "t", aggregate: str = "mean") -> tuple[float, float]:
    """The 95% interval of the group's centre: Student t (the mean) or bootstrap (the mean or the IQM)."""
    if method == "t" and aggregate == "mean":
        return t_interval(xs)
    return bootstrap_interval([xs], _centre_along(aggregate))


# --------------------------------------------------------------------------- two groups


@dataclass
class Comparison:
    """Group a against its baseline group b."""

    diff: float  # centre(a) - centre(b)
    ci95: tuple[float, float]
    p: float
    test: str  # "welch" or "permutation"


@_quiet
def compare(a: Sequence[float], b: Sequence[float], method: str = "t", aggregate: str = "mean") -> Comparison:
    """The difference of the centres with its 95% interval and a two-sided p-value.

    Means: Welch's t-test (``ttest_ind(..., equal_var=False)``: unequal variances, a BN
    and a no-BN group rarely spread alike), its interval or a bootstrap one. The IQM
    has no t-test: a permutation test of the IQM difference (exact: every split of the
    pooled seeds, while there are fewer than 10,000) and a bootstrap interval."""
    stats = _stats()
    f = _centre_along(aggregate)
    diff = float(f(list(a)) - f(list(b)))
    if aggregate == "mean":
        test = stats.ttest_ind(list(a), list(b), equal_var=False)
        p, name = float(test.pvalue), "welch"
        if method == "t":
            ci = test.confidence_interval(0.95)
            return Comparison(diff, (float(ci.low), float(ci.high)), p, name)
    else:
        import numpy as np

        res = stats.permutation_test((np.asarray(a, float), np.asarray(b, float)), lambda x, y, axis: f(x, axis) - f(y, axis),
                                     permutation_type="independent", vectorized=True, n_resamples=9999,
                                     alternative="two-sided", rng=np.random.default_rng(BOOTSTRAP_SEED))
        p, name = float(res.pvalue), "permutation"
    ci = bootstrap_interval([a, b], lambda x, y, axis=-1: f(x, axis) - f(y, axis))
    return Comparison(diff, ci, p, name)


def pooled_sd(a: Sequence[float], b: Sequence[float]) -> float:
    """The pooled standard deviation of two groups (each ddof=1)."""
    na, nb = len(a), len(b)
    return math.sqrt(((na - 1) * sd(a) ** 2 + (nb - 1) * sd(b) ** 2) / (na + nb - 2))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Hedges' g: (mean(a) - mean(b)) / pooled sd, times the exact small-sample
    correction J = Γ(df/2) / (sqrt(df/2) Γ((df-1)/2)), df = na + nb - 2 (Hedges 1981;
    ≈ 1 - 3/(4 df - 1)). None without spread."""
    s = pooled_sd(a, b)
    if s == 0:
        return None
    df = len(a) + len(b) - 2
    j = math.exp(math.lgamma(df / 2) - math.lgamma((df - 1) / 2)) / math.sqrt(df / 2)
    return j * (mean(a) - mean(b)) / s


def adjust(pvalues: Sequence[float], method: str) -> list[float]:
    """Adjusted p-values over one family of comparisons, in the input's order.

    holm: Holm's step-down: with p sorted ascending, p_(i) * (m - i + 1) (i from 1),
    made non-decreasing, capped at 1. bonferroni: p * m, capped at 1. none: p."""
    m = len(pvalues)
    if method == "none" or m == 0:
        return list(pvalues)
    if method == "bonferroni":
        return [min(1.0, p * m) for p in pvalues]
    if method != "holm":
        raise ValueError(f"correction {method!r}; allowed: {', '.join(CORRECTIONS)}")
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


# --------------------------------------------------------------------------- power


@_quiet
def power(n: int, effect: float, sd_: float, alpha: float = ALPHA) -> float:
    """The power of a two-sided two-sample t-test with n seeds per group to detect a
    difference ``effect`` when both groups spread by ``sd_``: the noncentral t
    (``scipy.stats.nct``, df = 2n - 2, noncentrality (effect / sd) sqrt(n / 2))."""
    stats = _stats()
    df, ncp = 2 * n - 2, abs(effect) / sd_ * math.sqrt(n / 2)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def seeds_needed(effect: float, sd_: float, target: float = POWER, alpha: float = ALPHA) -> int | None:
    """The fewest seeds per group (>= 2) whose two-sample t-test reaches ``target`` power
    for ``effect`` at ``alpha``; None when no difference or no spread is given, or
    more than MAX_SEEDS would be needed."""
    if effect == 0 or not sd_ or not math.isfinite(effect / sd_):
        return None
    if power(MAX_SEEDS, effect, sd_, alpha) < target:
        return None
    lo, hi = 1, 2  # power(lo) < target <= power(hi); power grows with n
    while power(hi, effect, sd_, alpha) < target:
        lo, hi = hi, min(2 * hi, MAX_SEEDS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power(mid, effect, sd_, alpha) < target else (lo, mid)
    return hi


# --------------------------------------------------------------------------- factorial grids


@dataclass
class Level:
    value: Any
    mean: float  # the marginal mean: the mean of the cell means at this level
    ci95: tuple[float, float]
    n: int  # runs at this level


@dataclass
class FTest:
    keys: tuple[str, ...]  # one key: its main effect; two: their interaction
    f: float
    df1: int
    df2: int
    p: float


@dataclass
class Factorial:
    keys: list[str]
    levels: dict[str, list[Level]] = field(default_factory=dict)
    main: list[FTest] = field(default_factory=list)
    interactions: list[FTest] = field(default_factory=list)
    df_error: int = 0
    mse: float = 0.0


def _design(rows: list[tuple], keys_levels: list[list[Any]], terms: list[tuple[int, ...]]):
    """The design matrix of an intercept plus ``terms`` (tuples of factor indices), in
    treatment coding: a main effect's columns are its levels but the first, an
    interaction's the products of its factors' columns."""
    import numpy as np

    def dummies(i: int):
        return [[1.0 if r[i] == lv else 0.0 for r in rows] for lv in keys_levels[i][1:]]

    cols = [[1.0] * len(rows)]
    for term in terms:
        parts = [dummies(i) for i in term]
        for combo in product(*parts):
            cols.append(list(np.prod(np.array(combo), axis=0)))
    return np.array(cols).T


def _sse(x, y) -> tuple[float, int]:
    """Residual sum of squares of the least-squares fit, and the rank of ``x``."""
    import numpy as np

    beta, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    return float(resid @ resid), int(rank)


@_quiet
def factorial(cells: dict[tuple, Sequence[float]], keys: list[str]) -> Factorial | None:
    """Main effects and two-way interactions of a full grid: ``cells`` maps each
    combination of the keys' values (every one present) to its runs' values.

    The marginal mean of a level is the mean of its cells' means (each cell counts
    once, however many seeds it has); its 95% interval uses the pooled within-cell
    variance (the full model's mean squared error, df = N - cells). Each F test
    compares nested least-squares fits, with that same error: a key's main effect,
    every main effect against all but that key; an interaction A x B, all main
    effects plus A x B against all main effects. With equal seeds per cell these are
    the textbook ANOVA sums of squares. None when no cell has two runs (no error df)."""
    import numpy as np

    stats = _stats()
    levels = [list(dict.fromkeys(c[i] for c in cells)) for i in range(len(keys))]
    rows = [c for c, vs in cells.items() for _ in vs]
    y = np.array([v for vs in cells.values() for v in vs], dtype=float)
    n_cells = len(cells)
    df_err = len(y) - n_cells
    if df_err <= 0:
        return None
    sse_full = float(sum(sum((v - mean(vs)) ** 2 for v in vs) for vs in cells.values()))
    mse = sse_full / df_err
    out = Factorial(keys=list(keys), df_error=df_err, mse=mse)
    tq = stats.t.ppf(0.975, df_err)
    for i, key in enumerate(keys):
        out.levels[key] = []
        for lv in levels[i]:
            at = [(c, vs) for c, vs in cells.items() if c[i] == lv]
            m = mean([mean(vs) for _, vs in at])
            se = math.sqrt(mse * sum(1 / len(vs) for _, vs in at)) / len(at)
            out.levels[key].append(Level(lv, m, (m - tq * se, m + tq * se), sum(len(vs) for _, vs in at)))
    mains = [(i,) for i in range(len(keys))]

    def test(with_terms, without_terms, names) -> FTest:
        sse1, r1 = _sse(_design(rows, levels, with_terms), y)
        sse0, r0 = _sse(_design(rows, levels, without_terms), y)
        df1 = r1 - r0
        f = max(sse0 - sse1, 0.0) / df1 / mse if mse > 0 else math.inf
        return FTest(names, f, df1, df_err, float(stats.f.sf(f, df1, df_err)) if mse > 0 else 0.0)

    for i in range(len(keys)):
        out.main.append(test(mains, [t for t in mains if t != (i,)], (keys[i],)))
    for i, j in combinations(range(len(keys)), 2):
        out.interactions.append(test([*mains, (i, j)], mains, (keys[i], keys[j])))
    return out
