"""Tests for stats.py against published or hand-computed values (the arithmetic is written out below).

scipy is not a dependency; where it happens to be installed, it is used as an extra oracle for t quantiles.
"""
import math

import numpy as np
import pytest

import stats
from stats import (Z95, at_chance, format_interval, mcnemar, mean_interval, paired_accuracy_difference,
                   paired_bootstrap, t_cdf, t_quantile, verdict, welch_interval, wilson_interval)

Z2 = Z95 * Z95  # 3.841458820694124


# ---------------------------------------------------------------- Wilson
def test_wilson_published_example():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", 81/263 -> 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-5)
    assert hi == pytest.approx(0.3662, abs=5e-5)


def test_wilson_edges():
    # k = 0: centre = (z²/2)/(n+z²), half = z·(z/2)/(n+z²) -> (0, z²/(n+z²)) = (0, 3.8415/13.8415 = 0.27753)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z2 / (10 + Z2)))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    # k = n: mirror image -> (n/(n+z²), 1) = (0.72247, 1)
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z2)), 1.0)
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- t quantile and t intervals
@pytest.mark.parametrize("p,df,table", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
    (0.975, 10, 2.228), (0.975, 20, 2.086), (0.975, 30, 2.042), (0.975, 100, 1.984),
    (0.95, 10, 1.812), (0.995, 5, 4.032), (0.995, 30, 2.750),
])
def test_t_quantile_table(p, df, table):
    # standard printed t table values (3 decimals)
    assert t_quantile(p, df) == pytest.approx(table, abs=6e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.999])
def test_t_quantile_closed_forms(p):
    # df = 1 is the Cauchy: t = tan(π(p − ½)); df = 2: t = (2p − 1)/√(2p(1 − p))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(1 - p, 2) == pytest.approx(-t_quantile(p, 2), rel=1e-12)
    assert t_quantile(p, math.inf) == pytest.approx(t_quantile(p, 1e12), rel=1e-6)


@pytest.mark.parametrize("df", [0.7, 2.5, 4.075472, 13.3])
def test_t_cdf_non_integer_df_against_numerical_integration(df):
    # independent oracle: Simpson's rule on the t density from 0 to q must give p − ½
    q = t_quantile(0.975, df)
    x = np.linspace(0.0, q, 20001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0]
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    assert area == pytest.approx(0.475, abs=1e-8)
    assert t_quantile(0.975, math.floor(df) + 1) < q < t_quantile(0.975, max(math.floor(df), 0.5))


def test_t_quantile_against_scipy_if_installed():
    sp = pytest.importorskip("scipy.stats")
    for df in [1, 1.5, 2, 3, 4.07, 7, 12.5, 30, 57.3, 200]:
        for p in [0.9, 0.95, 0.975, 0.995]:
            assert t_quantile(p, df) == pytest.approx(sp.t.ppf(p, df), abs=1e-3)


def test_mean_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half = t_{.975,2}·s/√3 = 4.303/1.7321 = 2.484 -> (2, −0.484, 4.484)
    m, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0
    assert lo == pytest.approx(-0.484, abs=1e-3) and hi == pytest.approx(4.484, abs=1e-3)
    m, lo, hi = mean_interval([0.7])
    assert m == 0.7 and math.isnan(lo) and math.isnan(hi)
    assert mean_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        mean_interval([])


def test_welch_by_hand():
    # a = [1,2,3], b = [4,5,6]: diff 3; s² = 1 each, se² = 1/3 + 1/3 = 2/3, se = 0.81650;
    # df = (2/3)² / ((1/3)²/2 + (1/3)²/2) = 4; t_{.975,4} = 2.7764 -> half = 2.2670 -> (3, 0.7330, 5.2670)
    d, lo, hi = welch_interval([1, 2, 3], [4, 5, 6])
    assert d == 3.0
    assert lo == pytest.approx(0.7330, abs=1e-3) and hi == pytest.approx(5.2670, abs=1e-3)
    # unequal: a = [1,2,3] (s²/n = 1/3), b = [2,4,6,8] (s² = 20/3, s²/n = 5/3): diff 3, se = √2,
    # df = 4 / ((1/3)²/2 + (5/3)²/3) = 4/0.981481 = 4.0755, between df 4 and 5: t in (2.5706, 2.7764)
    d, lo, hi = welch_interval([1, 2, 3], [2, 4, 6, 8])
    assert d == 3.0
    half = hi - d
    assert 2.5706 * math.sqrt(2) < half < 2.7764 * math.sqrt(2)
    assert half == pytest.approx(t_quantile(0.975, 4 / (1 / 18 + 25 / 27)) * math.sqrt(2), rel=1e-12)
    assert lo == pytest.approx(2 * d - hi)
    d, lo, hi = welch_interval([1.0], [2.0, 3.0])
    assert d == 1.5 and math.isnan(lo) and math.isnan(hi)


# ---------------------------------------------------------------- McNemar
def test_mcnemar_exact():
    # b = 1 (right -> wrong), c = 9 (wrong -> right), plus 5 concordant items
    before = [True] * 1 + [False] * 9 + [True] * 3 + [False] * 2
    after = [False] * 1 + [True] * 9 + [True] * 3 + [False] * 2
    r = mcnemar(before, after)
    # p = 2·P(X ≤ 1), X ~ Bin(10, ½) = 2·(1 + 10)/1024 = 0.021484375
    assert r == dict(b=1, c=9, n=15, p=0.021484375)
    assert mcnemar(after, before)["p"] == 0.021484375
    assert mcnemar([True, False], [True, False])["p"] == 1.0  # no discordant pairs
    assert mcnemar([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)["p"] == 1.0  # b = c: capped at 1
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


# ---------------------------------------------------------------- Newcombe method 10
def _table(e, f, g, h):
    """before/after lists with e both right, f right->wrong, g wrong->right, h both wrong."""
    before = [True] * e + [True] * f + [False] * g + [False] * h
    after = [True] * e + [False] * f + [True] * g + [False] * h
    return before, after


def test_newcombe_method10_step_by_step():
    # I could not recall the numbers of Newcombe (1998) table II with certainty, so the expected values are
    # worked by hand from the method-10 formula. e=40, f=10, g=3, h=47, n=100, z² = 3.841459:
    #   p1 (after) = 43/100, p2 (before) = 50/100, θ = −0.07
    #   Wilson 43/100: centre 44.920730/103.841459 = 0.432589, half 1.959964·√(24.51+0.960365)/103.841459
    #                  = 0.095257 -> (0.337332, 0.527846)
    #   Wilson 50/100: centre 0.5, half 1.959964·√(25.960365)/103.841459 = 0.096168 -> (0.403832, 0.596168)
    #   φ = (40·47 − 10·3)/√(50·50·43·57) = 1850/2475.38 = 0.747361
    #   δ² = 0.092668² − 2φ·0.092668·0.096168 + 0.096168² = 0.0045154, δ = 0.067197 -> lo = −0.137197
    #   ε² = 0.097846² − 2φ·0.097846·0.096168 + 0.096168² = 0.0047573, ε = 0.068973 -> hi = −0.001027
    d, lo, hi = paired_accuracy_difference(*_table(40, 10, 3, 47))
    assert d == pytest.approx(-0.07)
    assert lo == pytest.approx(-0.137197, abs=2e-5)
    assert hi == pytest.approx(-0.001027, abs=2e-5)
    # the interval just excludes 0, while the (conservative) exact McNemar test does not reject at 5%:
    # b = 10, c = 3, p = 2·P(X ≤ 3), X ~ Bin(13, ½) = 2·(1 + 13 + 78 + 286)/8192 = 0.0923. Near the boundary
    # the two can disagree; this pins both values so the discrepancy stays documented.
    assert mcnemar(*_table(40, 10, 3, 47))["p"] == pytest.approx(2 * (1 + 13 + 78 + 286) / 8192)


def test_newcombe_symmetry_and_phi_zero():
    b, a = _table(40, 10, 3, 47)
    d1, lo1, hi1 = paired_accuracy_difference(b, a)
    d2, lo2, hi2 = paired_accuracy_difference(a, b)  # swapping before/after negates the interval
    assert (d2, lo2, hi2) == pytest.approx((-d1, -hi1, -lo1))
    # all items right before (a margin is 0 -> φ = 0): square-and-add of the two Wilson intervals
    b, a = _table(8, 2, 0, 0)
    d, lo, hi = paired_accuracy_difference(b, a)
    l1, u1 = wilson_interval(8, 10)
    l2, u2 = wilson_interval(10, 10)
    assert d == pytest.approx(-0.2)
    assert lo == pytest.approx(-0.2 - math.hypot(0.8 - l1, u2 - 1.0))
    assert hi == pytest.approx(-0.2 + math.hypot(u1 - 0.8, 1.0 - l2))
    # no discordant items: φ = 1 and p1 = p2, so δ = ε = |(p − l) − (u − p)|, the asymmetry of the Wilson
    # interval: zero at p = ½ (degenerate [0, 0]), small otherwise. verdict still reads "no detectable change".
    d, lo, hi = paired_accuracy_difference(*_table(5, 0, 0, 5))
    assert (d, lo, hi) == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert verdict(lo, hi, True) == "no detectable change"
    d, lo, hi = paired_accuracy_difference(*_table(8, 0, 0, 2))
    l, u = wilson_interval(8, 10)
    assert d == 0.0 and lo == pytest.approx(-abs((0.8 - l) - (u - 0.8))) and hi == pytest.approx(-lo)
    with pytest.raises(ValueError):
        paired_accuracy_difference([], [])


# ---------------------------------------------------------------- paired bootstrap
def _synthetic(n, seed=1):
    rng = np.random.default_rng(seed)
    before = rng.random(n) < 0.7
    flip_down = rng.random(n) < 0.15  # right -> wrong
    flip_up = rng.random(n) < 0.05  # wrong -> right
    after = np.where(before, ~flip_down, flip_up)
    # true difference: 0.7·(−0.15) + 0.3·0.05 = −0.09
    return before.astype(float), after.astype(float)


def test_bootstrap_point_contains_truth_and_deterministic():
    before, after = _synthetic(2000)
    d, lo, hi = paired_bootstrap(before, after, seed=3)
    assert d == pytest.approx(after.mean() - before.mean(), abs=1e-12)
    assert lo < d < hi and lo < -0.09 < hi
    assert paired_bootstrap(before, after, seed=3) == (d, lo, hi)
    assert paired_bootstrap(before, after, seed=4) != (d, lo, hi)
    # for binary items the percentile interval should be close to Newcombe's method 10
    _, nlo, nhi = paired_accuracy_difference(before.astype(bool), after.astype(bool))
    assert lo == pytest.approx(nlo, abs=0.006) and hi == pytest.approx(nhi, abs=0.006)


def test_bootstrap_shrinks_with_more_items():
    widths = []
    for n in (200, 5000):
        _, lo, hi = paired_bootstrap(*_synthetic(n), n_boot=1000)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3  # ~ 1/√25 = 1/5 expected


def test_bootstrap_weighted():
    # token-weighted: after = (3·1 + 3·3)/4 = 3, before = (1·1 + 2·3)/4 = 1.75 -> 1.25
    d, lo, hi = paired_bootstrap([1.0, 2.0], [3.0, 3.0], weights=[1, 3])
    assert d == pytest.approx(1.25)
    assert 1.0 <= lo <= hi <= 2.0  # resample values lie between the per-item differences 1 and 2
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=300), rng.normal(0.2, size=300), rng.integers(1, 50, size=300)
    d, _, _ = paired_bootstrap(x, y, weights=w, n_boot=200)
    assert d == pytest.approx((w * y).sum() / w.sum() - (w * x).sum() / w.sum())


def test_bootstrap_chunked_and_errors():
    before, after = _synthetic(9000)  # 4M // 9000 = 466 rows per chunk: several chunks, last one partial
    d, lo, hi = paired_bootstrap(before, after, n_boot=1000)
    assert lo < d < hi and hi - lo < 0.03
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0], weights=[1.0, 2.0])


# ---------------------------------------------------------------- verdicts and formatting
@pytest.mark.parametrize("lo,hi,hib,expected", [
    (0.01, 0.05, True, "improved"), (0.01, 0.05, False, "forgot"),
    (-0.05, -0.01, True, "forgot"), (-0.05, -0.01, False, "improved"),
    (-0.02, 0.03, True, "no detectable change"), (-0.02, 0.03, False, "no detectable change"),
    (0.0, 0.03, True, "no detectable change"), (-0.03, 0.0, True, "no detectable change"),
    (math.nan, math.nan, True, "no detectable change"), (math.nan, 0.5, False, "no detectable change"),
])
def test_verdict(lo, hi, hib, expected):
    assert verdict(lo, hi, hib) == expected


@pytest.mark.parametrize("lo,hi,chance,expected", [
    (0.20, 0.30, 0.25, True), (0.26, 0.30, 0.25, False), (0.20, 0.24, 0.25, False),
    (0.25, 0.30, 0.25, True), (0.20, 0.25, 0.25, True), (0.20, 0.30, None, False),
    (math.nan, math.nan, 0.25, False),
])
def test_at_chance(lo, hi, chance, expected):
    assert at_chance(lo, hi, chance) is expected


def test_format_interval():
    assert format_interval(0.41234, 0.37111, 0.45499) == "0.412 [0.371, 0.455]"
    assert format_interval(0.5, math.nan, math.nan) == "0.500"
    assert format_interval(1.23456, 1.0, 1.5, digits=2) == "1.23 [1.00, 1.50]"


def test_module_constant():
    assert stats.Z95 == pytest.approx(t_quantile(0.975, math.inf), abs=1e-9)
    assert t_cdf(0.0, 3.0) == 0.5


def test_spearman_of_tied_values_matches_the_hand_computed_value():
    # ranks of x: 0, 1.5, 1.5, 3; of y: 0, 1, 2, 3 -> centred products 4.5 over sqrt(4.5 x 5)
    assert stats.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert stats.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_the_clustered_correlation_resamples_whole_clusters():
    # a perfect monotone relation inside every cluster gives rho 1 on every resample
    clusters = [[(i + k, 2 * (i + k)) for k in range(3)] for i in range(0, 40, 10)]
    r = stats.clustered_rank_correlation(clusters, n_boot=200)
    assert r["rho"] == pytest.approx(1.0) and r["ci"] == pytest.approx([1.0, 1.0])
    assert (r["n_pairs"], r["n_clusters"]) == (12, 4)
    assert stats.clustered_rank_correlation(clusters[:2])["ci"] is None  # two runs: no interval


def test_rank_intervals_order_well_separated_groups_exactly_and_leave_equal_ones_unordered():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.01, size=(3, 40))  # noqa: E731
    groups = {"low": 0.1 + noise(), "high": 0.9 + noise(), "mid-a": 0.5 + noise(), "mid-b": 0.5 + noise()}
    r = stats.rank_intervals(groups, n_boot=500)
    assert (r["high"]["rank"], r["high"]["rank_ci"]) == (1.0, [1.0, 1.0])
    assert (r["low"]["rank"], r["low"]["rank_ci"]) == (4.0, [4.0, 4.0])
    assert r["mid-a"]["rank_ci"] == r["mid-b"]["rank_ci"] == [2.0, 3.0]  # the data cannot order them
    lower = stats.rank_intervals(groups, higher_is_better=False, n_boot=500)
    assert lower["low"]["rank"] == 1.0 and lower["high"]["rank"] == 4.0
    assert r["mid-a"]["value"] == pytest.approx(groups["mid-a"].mean())
    assert stats.rank_intervals(groups, n_boot=500) == r  # deterministic in the seed


def test_rank_intervals_weight_items_and_share_tied_ranks():
    # a is better on the heavy item, b on the light one: the weights decide
    groups = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}
    r = stats.rank_intervals(groups, weights=[3, 1], n_boot=200)
    assert r["a"]["value"] == pytest.approx(0.75) and r["a"]["rank"] == 1.0
    tied = stats.rank_intervals({"x": np.ones((2, 3)), "y": np.ones((2, 3))}, n_boot=50)
    assert tied["x"]["rank"] == tied["y"]["rank"] == 1.5
    with pytest.raises(ValueError, match="same items"):
        stats.rank_intervals({"x": np.ones((2, 3)), "y": np.ones((2, 4))})
