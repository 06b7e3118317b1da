"""SmoothQuant: per-channel maxima, the factor formula, and W8A8 error on outlier channels."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.graph.statistics import input_statistics
from qjax.quant.smoothing import with_input_scales
from qjax.quant.smoothquant import channel_absmax, smoothquant, smoothquant_factors

RNG = np.random.default_rng(0)
K = 32


class LNDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(K, name="fc")(nn.LayerNorm(name="ln")(x))


def outlier_model():
    """LayerNorm whose scale blows up two channels (the LLM activation-outlier pattern)."""
    m = LNDense()
    x = jnp.asarray(RNG.normal(size=(4, 16, K)), jnp.float32)
    v = m.init(jax.random.key(0), x)
    scale = np.ones(K, np.float32)
    scale[[3, 17]] = [60.0, -40.0]
    v["params"]["ln"]["scale"] = jnp.asarray(scale)
    calib = [jnp.asarray(RNG.normal(size=(4, 16, K)), jnp.float32) for _ in range(3)]
    return m, v, calib


def test_input_statistics_combine_maximum():
    params = {"w": jnp.ones((5, 2))}

    def f(p, x):
        return x @ p["w"] + (2 * x) @ p["w"]  # read twice per batch

    batches = [jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32) for _ in range(3)]
    got = input_statistics(f, params, batches, channel_absmax, combine=jnp.maximum)["w"]
    np.testing.assert_allclose(got.value, 2 * np.abs(np.concatenate(batches)).max(0), rtol=1e-6)
    assert got.rows == 18
    summed = input_statistics(f, params, batches, channel_absmax)["w"]  # default: sum
    want = sum(3 * np.abs(b).max(0) for b in batches)
    np.testing.assert_allclose(summed.value, want, rtol=1e-6)


def test_factors_follow_the_formula_and_fold_into_the_norm():
    m, v, calib = outlier_model()
    alpha = 0.6
    factors = smoothquant_factors(m.apply, v, calib, alpha=alpha)
    assert list(factors) == [("params/fc/kernel",)]
    ln = lambda x: nn.LayerNorm().apply({"params": v["params"]["ln"]}, x)
    act = np.max(np.abs(np.concatenate([np.asarray(ln(x)).reshape(-1, K) for x in calib])), 0)
    w = np.abs(np.asarray(v["params"]["fc"]["kernel"])).max(1)
    np.testing.assert_allclose(factors[("params/fc/kernel",)], act**alpha / w ** (1 - alpha), rtol=1e-5)
    smoothed, runtime = smoothquant(m.apply, v, calib, alpha=alpha)
    assert runtime == {}  # folded into the LayerNorm's scale and bias
    s = factors[("params/fc/kernel",)]
    np.testing.assert_allclose(smoothed["params"]["ln"]["scale"], v["params"]["ln"]["scale"] / s, rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_factors(m.apply, v, calib, alpha=1.5)


@pytest.mark.parametrize("act", ["static", "per_token"])
def test_smoothing_reduces_w8a8_error_on_outlier_channels(act):
    m, v, calib = outlier_model()
    x_test = jnp.asarray(RNG.normal(size=(8, 16, K)), jnp.float32)
    act_spec = (
        qjax.QuantSpec(qjax.int8)
        if act == "static"
        else qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
    )
    policy = qjax.Policy(
        [qjax.Rule(r".*/kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=act_spec)]
    )
    want = m.apply(v, x_test)

    def error(f, params):
        stats = qjax.calibrate(f, policy, params, calib) if act == "static" else None
        qp = qjax.quantize_params(params, policy, act_stats=stats)
        return float(jnp.mean((qjax.quantized(f, policy)(qp, x_test) - want) ** 2))

    plain = error(m.apply, v)
    smoothed, runtime = smoothquant(m.apply, v, calib, alpha=0.5)
    smooth_err = error(with_input_scales(m.apply, runtime), smoothed)
    assert smooth_err < 0.3 * plain, (smooth_err, plain)


def test_runtime_factors_for_unfoldable_inputs():
    def f(p, x):
        return jax.nn.gelu(x @ p["a"]) @ p["b"]

    p = {
        "a": jnp.asarray(RNG.normal(size=(8, 8)), jnp.float32),
        "b": jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32),
    }
    xs = [jnp.asarray(RNG.normal(size=(6, 8)), jnp.float32)]
    smoothed, runtime = smoothquant(f, p, xs, alpha=0.5)
    assert set(runtime) == {"a", "b"}
    np.testing.assert_allclose(
        with_input_scales(f, runtime)(smoothed, xs[0]), f(p, xs[0]), rtol=1e-5, atol=1e-5
    )
    smoothed, runtime = smoothquant(f, p, xs, foldable_only=True)
    assert runtime == {} and smoothed is not p
    np.testing.assert_array_equal(smoothed["a"], p["a"])
