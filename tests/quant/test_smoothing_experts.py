"""AWQ and SmoothQuant of mixture-of-experts weights: one factor on K shared by every
expert (a ``lax.ragged_dot``'s ``(G, K, N)`` experts, or experts read per expert by a
``dot_general`` with batch dimensions), folded into the norm that feeds them where it
can be, AWQ's search weighing each expert's error by its own tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.graph.fold import fold_groups
from qjax.quant.awq import awq, awq_factors
from qjax.quant.smoothing import smooth, with_input_scales
from qjax.quant.smoothquant import smoothquant, smoothquant_factors

G, K, N, M = 4, 32, 16, 64
INT4 = qjax.QuantSpec(qjax.int4, channel_axes=(0, -1))  # per expert and output column
SIZES = jnp.array([10, 30, 0, 24], jnp.int32)  # one expert gets no tokens


def _ragged(p, x, sizes):
    h = x * p["norm"]
    return jax.lax.ragged_dot(h, p["experts"], sizes) + h @ p["shared"]


def _einsum(p, x):
    # dispatched tokens per expert (E, C, D), each expert reading its own
    return jnp.einsum("ecd,edf->ecf", x * p["norm"], p["experts"])


@pytest.fixture(scope="module")
def moe():
    rng = np.random.default_rng(0)
    params = {
        "norm": jnp.asarray(rng.uniform(0.5, 2, K), jnp.float32),
        "experts": jnp.asarray(rng.normal(size=(G, K, N)) * 0.1, jnp.float32),
        "shared": jnp.asarray(rng.normal(size=(K, N)) * 0.1, jnp.float32),
    }
    outliers = np.exp(rng.normal(size=K))  # channel magnitudes AWQ and SmoothQuant act on
    x = jnp.asarray(rng.normal(size=(M, K)) * outliers, jnp.float32)
    return params, x


def _mse(a, b):
    return float(np.mean(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, -1)))


def test_ragged_experts_and_a_shared_expert_fold_into_their_norm(moe):
    params, x = moe
    (group,) = [g for g in fold_groups(_ragged, params, x, SIZES) if "experts" in g.paths]
    assert group.foldable and set(group.paths) == {"experts", "shared"}
    assert group.producer == "mul by 'norm'"
    s = jnp.asarray(np.random.default_rng(1).uniform(0.25, 4, K), jnp.float32)
    smoothed, runtime = smooth(_ragged, params, {group.paths: s}, x, SIZES)
    assert runtime == {}
    np.testing.assert_allclose(smoothed["norm"], params["norm"] / s, rtol=1e-6)
    np.testing.assert_allclose(smoothed["experts"], params["experts"] * s[None, :, None], rtol=1e-6)
    np.testing.assert_allclose(_ragged(smoothed, x, SIZES), _ragged(params, x, SIZES), rtol=1e-4, atol=1e-5)


def test_awq_search_error_is_the_served_output_error_of_the_experts(moe):
    params, x = moe
    policy = qjax.Policy([qjax.Rule("experts", weight=INT4)])
    f = lambda p, x, s: jax.lax.ragged_dot(x * p["norm"], p["experts"], s)
    _, searches, _ = awq_factors(f, params, [(x, SIZES)], policy)
    (search,) = searches.values()
    qparams, runtime = awq(f, params, [(x, SIZES)], policy)
    assert runtime == {}  # folded into the norm
    y = f(params, x, SIZES)
    served = qjax.quantized(f, policy)(qparams, x, SIZES)
    rtn = qjax.quantized(f, policy)(qjax.quantize_params(params, policy), x, SIZES)
    # the search's quadratic form is the mean squared output error over every token
    best = int(np.argmin(search.errors))
    assert search.alpha > 0
    np.testing.assert_allclose(search.errors[best], _mse(served, y), rtol=1e-3)
    np.testing.assert_allclose(search.errors[0], _mse(rtn, y), rtol=1e-3)
    assert _mse(served, y) < 0.9 * _mse(rtn, y)


def test_awq_of_experts_read_per_expert_by_an_einsum(moe):
    params, _ = moe
    x = jnp.asarray(np.random.default_rng(2).normal(size=(G, 8, K)) * np.linspace(0.1, 5, K), jnp.float32)
    policy = qjax.Policy([qjax.Rule("experts", weight=INT4)])
    p = {k: params[k] for k in ("norm", "experts")}
    _, searches, _ = awq_factors(_einsum, p, [(x,)], policy)
    (search,) = searches.values()
    qparams, runtime = awq(_einsum, p, [(x,)], policy)
    assert set(runtime) == {"experts"}  # batch dimensions: divided at run time
    y = _einsum(p, x)
    served = qjax.quantized(with_input_scales(_einsum, runtime), policy)(qparams, x)
    per_token = lambda a: _mse(a.reshape(-1, N), y.reshape(-1, N))
    np.testing.assert_allclose(search.errors[int(np.argmin(search.errors))], per_token(served), rtol=1e-3)
    rtn = qjax.quantized(_einsum, policy)(qjax.quantize_params(p, policy), x)
    np.testing.assert_allclose(search.errors[0], per_token(rtn), rtol=1e-3)


def test_smoothquant_factor_of_experts_is_shared_over_experts(moe):
    params, x = moe
    alpha = 0.5
    factors = smoothquant_factors(_ragged, params, [(x, SIZES)], alpha=alpha)
    (key,) = factors
    assert set(key) == {"experts", "shared"}
    h = np.asarray(x, np.float64) * np.asarray(params["norm"], np.float64)
    act = np.abs(h).max(0)
    w = np.maximum(
        np.abs(np.asarray(params["experts"])).max(axis=(0, 2)), np.abs(np.asarray(params["shared"])).max(1)
    )
    np.testing.assert_allclose(factors[key], act**alpha / w ** (1 - alpha), rtol=1e-5)
    smoothed, runtime = smoothquant(_ragged, params, [(x, SIZES)], alpha=alpha)
    assert runtime == {}
    np.testing.assert_allclose(_ragged(smoothed, x, SIZES), _ragged(params, x, SIZES), rtol=1e-4, atol=1e-5)


def test_runtime_factors_divide_a_ragged_dots_rows(moe):
    params, x = moe
    f = lambda p, x, s: jax.lax.ragged_dot(jnp.tanh(x), p["experts"], s)  # nothing to fold into
    (group,) = fold_groups(f, params, x, SIZES)
    assert not group.foldable
    s = jnp.asarray(np.random.default_rng(3).uniform(0.5, 2, K), jnp.float32)
    smoothed, runtime = smooth(f, params, {"experts": s}, x, SIZES)
    assert set(runtime) == {"experts"}
    np.testing.assert_allclose(
        with_input_scales(f, runtime)(smoothed, x, SIZES), f(params, x, SIZES), rtol=1e-4, atol=1e-5
    )


def test_smoothquant_weight_maxima_follow_each_weights_own_layout():
    # a PyTorch-layout (N, K) weight read as x @ w.T beside a (K, N) one, after one norm: the
    # weight maximum of input channel k is over each weight's own rows/columns (square
    # weights, so a shared axis would have passed silently)
    rng = np.random.default_rng(4)
    p = {
        "norm": jnp.ones(K),
        "a": jnp.asarray(rng.normal(size=(K, K)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(K, K)) * np.linspace(0.1, 3, K), jnp.float32),
    }

    def f(p, x):
        h = x * p["norm"]
        return jnp.tanh(h @ p["a"]) + jnp.tanh(h @ p["b"].T)

    x = jnp.asarray(rng.normal(size=(16, K)), jnp.float32)
    (factor,) = smoothquant_factors(f, p, [(x,)], alpha=0.5).values()
    w = np.maximum(np.abs(np.asarray(p["a"])).max(1), np.abs(np.asarray(p["b"])).max(0))
    np.testing.assert_allclose(factor, np.abs(np.asarray(x)).max(0) ** 0.5 / w**0.5, rtol=1e-5)


def test_awq_clip_leaves_experts_read_per_head_alone():
    # a 2-D weight (K, E) read per head by batch dimensions has one Gram matrix per head:
    # clipping (per column of a K-grouped 2-D weight) would read them as one
    rng = np.random.default_rng(5)
    p = {"norm": jnp.ones(32), "w": jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)}
    f = lambda p, x: jnp.einsum("bhd,dh->bh", x * p["norm"], p["w"])
    x = jnp.asarray(rng.normal(size=(8, 4, 32)), jnp.float32)
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=8, group_axis=0)
    policy = qjax.Policy([qjax.Rule("w", weight=spec)])
    clipped, _ = awq(f, p, [(x,)], policy, clip=True)
    plain, _ = awq(f, p, [(x,)], policy)
    np.testing.assert_array_equal(qjax.dequantize(clipped["w"]), qjax.dequantize(plain["w"]))
