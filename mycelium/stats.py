"""Statistics for honest reporting: every number leaves with its count and an interval.

- `wilson_interval(successes, n, confidence)` — a proportion's Wilson score interval
  (scipy's `binomtest(...).proportion_ci(method="wilson")`).
- `mean_interval(values, confidence)` — mean with a Student-t interval, and n.
- `bootstrap_interval(data, statistic, resamples, confidence, seed)` — percentile bootstrap
  of any statistic over units (one array, or several arrays resampled together, e.g. per-problem
  true positives and counts for a micro-averaged F1, or a paired difference of two systems).
- `pearson_with_interval(x, y, confidence)` — Pearson r with its Fisher-z interval (scipy).
- `spearman(x, y, confidence)` — Spearman rho with a Fisher-z interval (Bonett & Wright variance).
- `partial_correlation(x, y, control, confidence)` — Pearson correlation of x and y after
  removing what a linear fit on the control variable(s) explains.

Conventions: NaN values are dropped (pairwise for correlations) and `n` counts what was used;
where an interval cannot exist (too few values) its ends are NaN rather than an exception, so a
report can print "n=1, no interval" instead of crashing. Results are NamedTuples, so they unpack
like plain tuples and also read by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats


class Interval(NamedTuple):
    low: float
    high: float


class MeanInterval(NamedTuple):
    mean: float
    low: float
    high: float
    n: int


class BootstrapResult(NamedTuple):
    estimate: float
    low: float
    high: float
    n: int


class Correlation(NamedTuple):
    estimate: float
    low: float
    high: float
    n: int
    p_value: float


NAN = float("nan")


def _finite(values) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[np.isfinite(array)]


def _finite_pairs(*arrays) -> list[np.ndarray]:
    columns = [np.asarray(a, dtype=float).ravel() for a in arrays]
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"arrays must have the same length (got {sorted(lengths)})")
    keep = np.ones(len(columns[0]), dtype=bool)
    for column in columns:
        keep &= np.isfinite(column)
    return [c[keep] for c in columns]


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (got {confidence})")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for successes/n; (nan, nan) when n is 0."""
    _check_confidence(confidence)
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n (got {successes}/{n})")
    if n == 0:
        return Interval(NAN, NAN)
    ci = scipy_stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(float(ci.low), float(ci.high))


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanInterval:
    """Mean with a Student-t interval. One value: the mean with a NaN interval; none: all NaN."""
    _check_confidence(confidence)
    data = _finite(values)
    n = len(data)
    if n == 0:
        return MeanInterval(NAN, NAN, NAN, 0)
    mean = float(data.mean())
    if n == 1:
        return MeanInterval(mean, NAN, NAN, 1)
    sem = float(scipy_stats.sem(data))
    if sem == 0.0:
        return MeanInterval(mean, mean, mean, n)
    low, high = scipy_stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
    return MeanInterval(mean, float(low), float(high), n)


def bootstrap_interval(
    data: np.ndarray | Sequence[float] | Sequence[np.ndarray],
    statistic: Callable[..., float] | None = None,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap over units.

    `data` is one array of values (statistic(values) -> float, default the mean), or a
    tuple/list of equally long arrays that are resampled together, row by row
    (statistic(a, b, ...) -> float) — the paired case. The estimate is the statistic on the
    full data; n is the number of units. Fewer than two units: NaN interval.

    Percentile rather than BCa because the statistics here (micro F1 over a handful of
    problems, differences that are often exactly 0) make BCa's jackknife degenerate.
    scipy.stats.bootstrap is used for the resampling itself.
    """
    _check_confidence(confidence)
    if isinstance(data, (tuple, list)) and len(data) > 0 and np.ndim(data[0]) == 1:
        arrays = [np.asarray(a, dtype=float) for a in data]
    else:
        arrays = [np.asarray(data, dtype=float).ravel()]
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"paired arrays must have the same length (got {sorted(lengths)})")
    n = lengths.pop()
    func = statistic if statistic is not None else (lambda values: float(np.mean(values)))
    if n == 0:
        return BootstrapResult(NAN, NAN, NAN, 0)
    estimate = float(func(*arrays))
    if n < 2:
        return BootstrapResult(estimate, NAN, NAN, n)
    result = scipy_stats.bootstrap(
        tuple(arrays),
        func,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        paired=True,
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return BootstrapResult(estimate, low, high, n)


def _fisher_interval(r: float, n: int, confidence: float, standard_error: float) -> Interval:
    if not math.isfinite(r) or not math.isfinite(standard_error):
        return Interval(NAN, NAN)
    if abs(r) >= 1.0:
        return Interval(r, r)
    z = math.atanh(r)
    half_width = scipy_stats.norm.ppf(0.5 + confidence / 2.0) * standard_error
    return Interval(math.tanh(z - half_width), math.tanh(z + half_width))


def _is_constant(values: np.ndarray) -> bool:
    return len(values) == 0 or bool(np.all(values == values[0]))


def pearson_with_interval(x, y, confidence: float = 0.95) -> Correlation:
    """Pearson r, its Fisher-z interval and two-sided p-value (scipy). Needs n >= 4 for an interval."""
    _check_confidence(confidence)
    xs, ys = _finite_pairs(x, y)
    n = len(xs)
    if n < 3 or _is_constant(xs) or _is_constant(ys):
        return Correlation(NAN, NAN, NAN, n, NAN)
    result = scipy_stats.pearsonr(xs, ys)
    r = float(result.statistic)
    if n < 4:
        return Correlation(r, NAN, NAN, n, float(result.pvalue))
    ci = result.confidence_interval(confidence_level=confidence)
    return Correlation(r, float(ci.low), float(ci.high), n, float(result.pvalue))


def spearman(x, y, confidence: float = 0.95) -> Correlation:
    """Spearman rho with a Fisher-z interval using the Bonett & Wright (2000) variance
    (1 + rho²/2)/(n - 3). Written here because scipy's spearmanr gives no interval."""
    _check_confidence(confidence)
    xs, ys = _finite_pairs(x, y)
    n = len(xs)
    if n < 3 or _is_constant(xs) or _is_constant(ys):
        return Correlation(NAN, NAN, NAN, n, NAN)
    result = scipy_stats.spearmanr(xs, ys)
    rho = float(result.statistic)
    if n < 4:
        return Correlation(rho, NAN, NAN, n, float(result.pvalue))
    standard_error = math.sqrt((1.0 + rho * rho / 2.0) / (n - 3))
    low, high = _fisher_interval(rho, n, confidence, standard_error)
    return Correlation(rho, low, high, n, float(result.pvalue))


def partial_correlation(x, y, control, confidence: float = 0.95) -> Correlation:
    """Pearson correlation of x and y with the linear effect of `control` removed from both.

    `control` is one array or a 2-D array of k control columns (n × k). Computed as the
    correlation of least-squares residuals (numpy); the interval is Fisher z with standard error
    1/sqrt(n - 3 - k) and the p-value a t test with n - 2 - k degrees of freedom — the standard
    formulas, written here because neither scipy nor numpy offers a partial correlation.
    """
    _check_confidence(confidence)
    controls = np.asarray(control, dtype=float)
    if controls.ndim == 1:
        controls = controls[:, None]
    columns = _finite_pairs(x, y, *[controls[:, j] for j in range(controls.shape[1])])
    xs, ys, controls = columns[0], columns[1], np.column_stack(columns[2:])
    n, k = len(xs), controls.shape[1]
    degrees = n - 2 - k
    if degrees < 1:
        return Correlation(NAN, NAN, NAN, n, NAN)
    design = np.column_stack([np.ones(n), controls])
    residual_x = xs - design @ np.linalg.lstsq(design, xs, rcond=None)[0]
    residual_y = ys - design @ np.linalg.lstsq(design, ys, rcond=None)[0]
    # Residuals that are numerically zero mean the control explains x (or y) entirely.
    scale_x, scale_y = np.linalg.norm(residual_x), np.linalg.norm(residual_y)
    if scale_x <= 1e-12 * max(1.0, np.linalg.norm(xs)) or scale_y <= 1e-12 * max(1.0, np.linalg.norm(ys)):
        return Correlation(NAN, NAN, NAN, n, NAN)
    r = float(np.clip(residual_x @ residual_y / (scale_x * scale_y), -1.0, 1.0))
    if abs(r) >= 1.0:
        p_value = 0.0
    else:
        t_stat = r * math.sqrt(degrees / (1.0 - r * r))
        p_value = float(2.0 * scipy_stats.t.sf(abs(t_stat), degrees))
    if n - 3 - k < 1:
        return Correlation(r, NAN, NAN, n, p_value)
    low, high = _fisher_interval(r, n, confidence, 1.0 / math.sqrt(n - 3 - k))
    return Correlation(r, low, high, n, p_value)


def rate_with_interval(successes: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """A success rate as the reports store it: count, n, rate and its Wilson interval."""
    interval = wilson_interval(successes, n, confidence)
    return {"count": successes, "n": n, "rate": successes / n if n else float("nan"), "low": interval.low, "high": interval.high}
