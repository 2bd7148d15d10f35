"""Interval estimates and paired comparisons for forgetlab's evaluation numbers.

Every accuracy is reported with a 95% interval; before/after and method-vs-method comparisons are paired on
per-item records. Runtime dependencies: numpy and the standard library only. The Student t quantile is computed
here exactly (inverse of the regularized incomplete beta function), so non-integer df (Welch) need no table.
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # standard normal 0.975 quantile


# ---------------------------------------------------------------- t distribution (exact, no scipy)
def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction, evaluated with the modified Lentz
    algorithm (Press et al., Numerical Recipes, 3rd ed., sec. 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0  # the fraction is 1/(1 + d1/(1 + d2/(1 + ...))); f − 1 strips the leading 1
    for i in range(20000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: float) -> float:
    """Student t CDF: for t >= 0, F(t) = 1 − ½·I_{df/(df+t²)}(df/2, ½) (Abramowitz & Stegun 26.7.1, 26.5.27);
    for df > 1e7 the standard normal CDF is used (quantile error < 1e-6; lgamma loses precision beyond)."""
    if df > 1e7:
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student t quantile for any real df > 0: invert t_cdf by bisection to ~1e-12 (exact, not tabulated)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 2.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- single-sample intervals
def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927). n == 0 -> (nan, nan).

    centre = (k + z²/2) / (n + z²),  half-width = z·sqrt(k(n−k)/n + z²/4) / (n + z²); clipped to [0, 1].
    """
    if n == 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def mean_interval(xs, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): Student-t interval of the mean of a few numbers (e.g. one metric over seeds).

    mean ± t_{(1+confidence)/2, n−1} · s/√n, s the sample SD (ddof=1); t from t_quantile (exact inverse of the
    regularized incomplete beta, see above). One value -> (x, nan, nan); no values -> ValueError.
    """
    x = np.asarray(xs, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value")
    m = float(x.mean())
    if x.size == 1:
        return (m, math.nan, math.nan)
    half = t_quantile((1 + confidence) / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return (m, m - half, m + half)


def welch_interval(a, b, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean(b) − mean(a), lo, hi): Welch's unequal-variance t interval (Welch 1947).

    se² = s_a²/n_a + s_b²/n_b;  df = se⁴ / [(s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)] (Welch–Satterthwaite,
    non-integer; exact t quantile). Fewer than 2 values in a group -> (diff, nan, nan); se == 0 -> (diff, diff, diff).
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("welch_interval needs values in both groups")
    diff = float(b.mean() - a.mean())
    if a.size < 2 or b.size < 2:
        return (diff, math.nan, math.nan)
    va, vb = float(a.var(ddof=1)) / a.size, float(b.var(ddof=1)) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        return (diff, diff, diff)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile((1 + confidence) / 2, df) * se
    return (diff, diff - half, diff + half)


# ---------------------------------------------------------------- paired comparisons
def paired_bootstrap(before, after, weights=None, n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """(delta, lo, hi) for Σw·after/Σw − Σw·before/Σw over the same items, paired (Efron & Tibshirani 1993).

    Resample item indices with replacement (the same indices for before and after), recompute the weighted
    difference on each resample, and take the (1−confidence)/2 and (1+confidence)/2 percentiles. weights: e.g.
    token counts for a token-weighted NLL (default: all 1). delta is the plain (weighted) difference on the data.
    Deterministic in seed. Raises ValueError if the lengths differ or there are no items.
    """
    x, y = np.asarray(before, dtype=float).ravel(), np.asarray(after, dtype=float).ravel()
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=float).ravel()
    if not (x.size == y.size == w.size):
        raise ValueError(f"lengths differ: before={x.size}, after={y.size}, weights={w.size}")
    if x.size == 0:
        raise ValueError("paired_bootstrap needs at least one item")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    d = y - x  # Σw·y/Σw − Σw·x/Σw == Σw·(y − x)/Σw
    wd = w * d
    delta = float(wd.sum() / w.sum())
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // x.size)  # keep each index matrix to ~4M entries
    stats = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - start), x.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats.append(wd[idx].sum(axis=1) / w[idx].sum(axis=1))
    boots = np.concatenate(stats)
    boots = boots[np.isfinite(boots)]  # a resample drawing only zero-weight items has no value
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (delta, float(lo), float(hi))


def spearman(x, y) -> float:
    """Spearman's rank correlation ρ: Pearson's correlation of the ranks (ties share their mean rank); nan when
    either side is constant or there are fewer than 2 pairs."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: their mean rank
            r[v == value] = r[v == value].mean()
        return r
    if len(x) != len(y):
        raise ValueError(f"lengths differ: {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def clustered_rank_correlation(clusters: list, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Spearman's ρ over every (x, y) pair of `clusters` (lists of pairs: e.g. the stages of one run), with a
    bootstrap interval that resamples whole clusters with replacement: pairs of one cluster share its model, so
    they are not independent draws. {"rho", "ci" ([lo, hi]; None with fewer than 3 clusters), "n_pairs",
    "n_clusters"}. Deterministic in seed."""
    clusters = [list(c) for c in clusters if len(c)]
    pairs = [p for c in clusters for p in c]
    rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    ci = None
    if len(clusters) >= 3:
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(n_boot):
            draw = [p for i in rng.integers(0, len(clusters), len(clusters)) for p in clusters[i]]
            boots.append(spearman([p[0] for p in draw], [p[1] for p in draw]))
        boots = np.asarray(boots)
        boots = boots[np.isfinite(boots)]  # a resample whose values are all tied has no ρ
        if boots.size:
            ci = [float(q) for q in np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])]
    return dict(rho=rho, ci=ci, n_pairs=len(pairs), n_clusters=len(clusters))


def rank_intervals(groups: dict, weights=None, higher_is_better: bool = True, n_boot: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> dict:
    """Each group's rank among `groups`, with a bootstrap interval: who is first, and how sure that is.

    groups: {name: runs × items array}, every group on the same items in the same column order (e.g. each method's
    seeds × its per-item scores). A group's value is the (weights-weighted) mean over items of the mean over its
    runs; rank 1 is the best value (the highest with higher_is_better). Each resample draws the items with
    replacement, the same draw for every group (they are paired on items), and, independently per group, its runs
    with replacement; the groups are ranked on the resample, ties sharing their mean rank. The interval is the
    (1−confidence)/2 and (1+confidence)/2 percentiles of a group's resampled ranks: two groups whose intervals
    overlap are not ordered by the data. It holds both the sampling of the items and the run-to-run variation.
    {name: {"value", "rank", "rank_ci": [lo, hi], "runs"}}. Deterministic in seed."""
    names = list(groups)
    arrays = [np.asarray(groups[n], dtype=float) for n in names]
    if not arrays or any(a.ndim != 2 or a.shape[0] == 0 for a in arrays):
        raise ValueError("every group needs a runs × items array with at least one run")
    n_items = arrays[0].shape[1]
    if n_items == 0 or any(a.shape[1] != n_items for a in arrays):
        raise ValueError(f"the groups must score the same items: {[a.shape[1] for a in arrays]}")
    w = np.ones(n_items) if weights is None else np.asarray(weights, dtype=float).ravel()
    if w.size != n_items or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be one non-negative value per item, with a positive sum")
    sign = 1.0 if higher_is_better else -1.0

    def ranks(values: np.ndarray) -> np.ndarray:  # (..., groups) -> rank 1 = best, ties their mean rank
        order = -sign * values
        less = (order[..., :, None] > order[..., None, :]).sum(axis=-1)  # groups strictly better
        equal = (order[..., :, None] == order[..., None, :]).sum(axis=-1)
        return less + (equal + 1) / 2

    values = np.array([(a.mean(axis=0) * w).sum() / w.sum() for a in arrays])
    rng = np.random.default_rng(seed)
    items = rng.integers(0, n_items, size=(n_boot, n_items))
    wb = w[items]  # (n_boot, items)
    boot = np.empty((n_boot, len(names)))
    for g, a in enumerate(arrays):
        runs = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))
        per_item = a[runs].mean(axis=1)  # (n_boot, items): the drawn runs' mean of every item
        boot[:, g] = (np.take_along_axis(per_item, items, axis=1) * wb).sum(axis=1) / wb.sum(axis=1)
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    rank_ci = np.quantile(ranks(boot), q, axis=0, method="inverted_cdf").T
    return {n: dict(value=float(v), rank=float(r), rank_ci=[float(lo), float(hi)], runs=a.shape[0])
            for n, v, r, (lo, hi), a in zip(names, values, ranks(values), rank_ci, arrays)}


def _paired_counts(before, after) -> tuple[int, int, int, int]:
    """(both right, right→wrong, wrong→right, both wrong) for paired binary outcomes."""
    if len(before) != len(after):
        raise ValueError(f"lengths differ: before={len(before)}, after={len(after)}")
    pairs = [(bool(u), bool(v)) for u, v in zip(before, after)]
    return (pairs.count((True, True)), pairs.count((True, False)),
            pairs.count((False, True)), pairs.count((False, False)))


def mcnemar(before: list[bool], after: list[bool]) -> dict:
    """Exact McNemar test for paired binary outcomes (McNemar 1947; exact form as in Fagerland et al. 2013).

    b = items right before and wrong after, c = wrong before and right after, m = b + c;
    p = min(1, 2·P(X ≤ min(b, c))), X ~ Binomial(m, ½), computed with exact integer arithmetic; m == 0 -> p = 1.
    Returns dict(b=b, c=c, n=number of paired items (all of them, not only the discordant m), p=p).
    """
    _, b, c, _ = _paired_counts(before, after)
    m = b + c
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m)
    return dict(b=b, c=c, n=len(before), p=p)


def paired_accuracy_difference(before: list[bool], after: list[bool], z: float = Z95) -> tuple[float, float, float]:
    """(delta, lo, hi) for acc(after) − acc(before) on the same items: Newcombe (1998) method 10.

    With e = both right, f = right before only, g = right after only, h = both wrong (n items):
    p1 = (e+g)/n (after), p2 = (e+f)/n (before), θ = p1 − p2 = (g−f)/n; (l1,u1), (l2,u2) the Wilson intervals
    of p1 and p2; φ = (e·h − f·g)/√((e+f)(g+h)(e+g)(f+h)), taken as 0 when that product is 0. Then
        lo = θ − √((p1−l1)² − 2φ(p1−l1)(u2−p2) + (u2−p2)²)
        hi = θ + √((u1−p1)² − 2φ(u1−p1)(p2−l2) + (p2−l2)²)
    (method 10 uses φ uncorrected; method 11 would apply a continuity correction). Empty input -> ValueError.
    Caveat: with no discordant items (f = g = 0) φ = 1 and the interval shrinks to ±|(p−l) − (u−p)| around 0,
    i.e. exactly [0, 0] when p = ½; verdict() then still reads "no detectable change".
    """
    e, f, g, h = _paired_counts(before, after)
    n = e + f + g + h
    if n == 0:
        raise ValueError("paired_accuracy_difference needs at least one item")
    p1, p2 = (e + g) / n, (e + f) / n
    l1, u1 = wilson_interval(e + g, n, z)
    l2, u2 = wilson_interval(e + f, n, z)
    denom = (e + f) * (g + h) * (e + g) * (f + h)
    phi = (e * h - f * g) / math.sqrt(denom) if denom > 0 else 0.0
    theta = p1 - p2
    lo = theta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = theta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return (theta, max(-1.0, lo), min(1.0, hi))


# ---------------------------------------------------------------- reading intervals
def verdict(lo: float, hi: float, higher_is_better: bool) -> str:
    """From the interval of the difference after − before: "improved", "forgot" or "no detectable change"
    (the interval includes 0, or a bound is nan)."""
    if math.isnan(lo) or math.isnan(hi) or lo <= 0.0 <= hi:
        return "no detectable change"
    went_up = lo > 0.0
    return "improved" if went_up == higher_is_better else "forgot"


def at_chance(lo: float, hi: float, chance: float | None) -> bool:
    """True when chance is given and lo <= chance <= hi (nan bounds -> False)."""
    return chance is not None and lo <= chance <= hi


def format_interval(value, lo, hi, digits: int = 3) -> str:
    """"0.412 [0.371, 0.455]"; nan bounds -> just the value."""
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
