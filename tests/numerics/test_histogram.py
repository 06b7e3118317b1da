"""Streamed histograms (``qjax.numerics.histogram``): binning against numpy, exact pooling
across batches whatever their order, and ranges against the exact pooled statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax
from qjax.numerics import histogram as hist

BINS = 64


def _host(h):
    return {k: np.asarray(v) for k, v in h.items()}


def test_histogram_bins_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 13)) * 3
    x[0, 0], x[1, 1] = 0.0, -0.0
    h = _host(hist.histogram(jnp.asarray(x), jnp.float32(0), BINS))
    m = np.abs(x).max()
    assert h["r"] == 2.0 ** (math.floor(math.log2(m)) + 1) and h["r"] > m
    width = h["r"] / BINS
    for sign, part in (("pos", x[x >= 0]), ("neg", -x[x < 0])):
        want = np.bincount(np.minimum((part / width).astype(int), BINS - 1), minlength=BINS)
        np.testing.assert_array_equal(h[sign], want)
    assert h["max_pos"] == np.float32(x.max()) and h["max_neg"] == np.float32(-x.min())
    assert h["bad"] == 0.0
    # a larger previous range is kept; NaN / inf are flagged, not binned
    assert _host(hist.histogram(jnp.asarray(x), jnp.float32(1024.0), BINS))["r"] == 1024.0
    x[2, 2] = np.nan
    h = _host(hist.histogram(jnp.asarray(x), jnp.float32(0), BINS))
    assert h["bad"] == 1.0 and h["pos"].sum() + h["neg"].sum() == x.size


@settings(max_examples=examples(12), deadline=None)
@given(  # a few batch sizes: each new shape compiles (the suite's time)
    st.lists(st.tuples(st.integers(-20, 20), st.sampled_from([1, 8, 40])), min_size=1, max_size=5),
    st.integers(0, 2**31 - 1),
)
def test_pooling_is_exact_in_any_order(batches, seed):
    """Batches of very different magnitudes pooled one by one equal one histogram of all
    their values at the final range (ranges grow by powers of two; bins merge exactly)."""
    rng = np.random.default_rng(seed)
    xs = [(rng.normal(size=n) * 2.0**e).astype(np.float32) for e, n in batches]
    pooled = hist.Pooled.empty(BINS)
    histogram = jax.jit(hist.histogram, static_argnums=2)  # one compile per shape
    for x in xs:
        pooled.add(_host(histogram(jnp.asarray(x), jnp.float32(pooled.r), BINS)))
    whole = _host(histogram(jnp.asarray(np.concatenate(xs)), jnp.float32(pooled.r), BINS))
    assert whole["r"] == pooled.r
    np.testing.assert_array_equal(pooled.pos, whole["pos"])
    np.testing.assert_array_equal(pooled.neg, whole["neg"])


def _pool(xs, bins=2048):
    pooled = hist.Pooled.empty(bins)
    for x in xs:
        pooled.add(_host(hist.histogram(jnp.asarray(x), jnp.float32(pooled.r), bins)))
    return pooled


@pytest.mark.parametrize("p", [90.0, 99.0, 99.99, 100.0])
def test_percentile_within_one_bin_of_numpy(p):
    """Within one bin of the empirical (inverted-CDF) percentile of all values pooled."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_t(3, size=5000).astype(np.float32) * s for s in (1.0, 0.5, 4.0)]
    pooled = _pool(xs)
    allx = np.concatenate(xs).astype(np.float64)
    width = pooled.r / 2048
    lo, hi = hist.percentile_range(pooled, p, symmetric=True)
    assert lo == -hi and abs(hi - np.percentile(np.abs(allx), p, method="inverted_cdf")) <= width
    lo, hi = hist.percentile_range(pooled, p, symmetric=False)
    assert abs(lo - np.percentile(allx, 100 - p, method="inverted_cdf")) <= width
    assert abs(hi - np.percentile(allx, p, method="inverted_cdf")) <= width


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_range_is_near_optimal_on_the_data(symmetric):
    """The clip found on the histogram's bin centres costs, on the real values, within 1%
    of the best clip ``qjax.calib.mse`` finds on them directly."""
    rng = np.random.default_rng(2)
    xs = [rng.laplace(size=4000).astype(np.float32) + (0.0 if symmetric else 1.0) for _ in range(3)]
    pooled = _pool(xs)
    allx = jnp.asarray(np.concatenate(xs))
    fmt = qjax.int4 if symmetric else qjax.uint4
    cal = qjax.calib.mse()
    lo, hi = hist.mse_range(pooled, fmt, symmetric, cal.num_candidates, cal.min_ratio, cal.norm)
    ref_lo, ref_hi = cal(allx, (0,), fmt, symmetric)

    def cost(lo, hi):
        s, zp = qjax.numerics.scaling.scale_from_range(jnp.float32(lo), jnp.float32(hi), fmt, symmetric)
        q = qjax.numerics.scaling.dequantize_values(
            qjax.numerics.scaling.quantize_values(allx, s, zp, fmt), s, zp, jnp.float32, fmt
        )
        return float(jnp.sum((allx - q) ** 2))

    assert cost(lo, hi) <= 1.01 * cost(float(ref_lo[0]), float(ref_hi[0]))
    assert hi < max(float(allx.max()), -float(allx.min()))  # it clipped


@pytest.mark.parametrize("c", [1e-25, 1.0, 1e18, 1e20])
def test_mse_range_is_invariant_to_the_data_magnitude(c):
    # the pooled squared errors under/overflowed float32 far from 1: the full range was kept
    base = np.random.default_rng(0).standard_t(2, size=4096)
    pooled = _pool([(base * c).astype(np.float32)])
    cal = qjax.calib.mse()
    _, hi = hist.mse_range(pooled, qjax.int4, True, cal.num_candidates, cal.min_ratio, cal.norm)
    ratio = hi / (np.abs(base).max() * c)

    def err64(r):  # float64 reference on the values, at scale 1
        s = np.abs(base).max() * r / 7
        return np.sum((base - np.clip(np.round(base / s), -8, 7) * s) ** 2)

    assert ratio < 0.95
    assert err64(ratio) <= 1.01 * min(err64(r) for r in np.linspace(cal.min_ratio, 1.0, cal.num_candidates))


def test_bad_and_empty_pools():
    pooled = _pool([np.array([1.0, np.nan], np.float32)], bins=BINS)
    assert all(math.isnan(v) for v in hist.percentile_range(pooled, 99.0, True))
    assert all(math.isnan(v) for v in hist.mse_range(pooled, qjax.int8, True, 8, 0.5, 2.0))
    empty = hist.Pooled.empty(BINS)
    assert hist.percentile_range(empty, 99.0, True) == (0.0, 0.0)
    # a histogram of NaNs (an untaken cond branch) is skipped
    nan = {
        k: np.full(np.shape(v), np.nan, np.float32)
        for k, v in _host(hist.histogram(jnp.ones(3), 0.0, BINS)).items()
    }
    empty.add(nan)
    assert empty.r == 0.0 and empty.total == 0.0


@pytest.mark.parametrize("first", [None, 1.0])
def test_magnitudes_from_2_to_the_127_are_refused_clearly(first):
    # the power-of-two range 2**128 of a finite float32 >= 2**127 overflows to inf: it used
    # to crash with "cannot convert float NaN / infinity to integer"
    x = np.ones(16, np.float32)
    x[3] = np.float32(2e38)
    assert float(np.abs(x.astype(np.float64)).max()) >= 2.0**127  # float64 reference
    pooled = hist.Pooled.empty(BINS)
    if first is not None:
        pooled.add(_host(hist.histogram(jnp.full(4, first), jnp.float32(0), BINS)))
    h = _host(hist.histogram(jnp.asarray(x), jnp.float32(pooled.r), BINS))
    with pytest.raises(ValueError, match=r"cannot bin magnitudes >= 2\*\*127 .*max \|x\| = 2e\+38"):
        pooled.add(h)
    # the top binade [2**126, 2**127) still bins exactly (range 2**127), as numpy does
    below = np.float32(np.nextafter(np.float32(2.0**127), np.float32(0)))
    v = np.array([below, -1.5 * 2.0**126, 2.0**126, 1.0], np.float32)
    h = _host(hist.histogram(jnp.asarray(v), jnp.float32(0), BINS))
    assert float(h["r"]) == 2.0**127
    a = np.abs(v.astype(np.float64))
    want = np.histogram(a[v >= 0], bins=BINS, range=(0, 2.0**127))[0]
    np.testing.assert_array_equal(h["pos"], want)
    np.testing.assert_array_equal(h["neg"], np.histogram(a[v < 0], bins=BINS, range=(0, 2.0**127))[0])
