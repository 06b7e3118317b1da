"""Formats from calibration statistics: integer bits from the observed range, fraction
bits from the width."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import fixed as qf


def test_integer_bits_cover_the_range():
    assert qf.integer_bits(1.0) == 2  # strictly above: [-2, 2) holds 1.0
    assert qf.integer_bits(1.0, signed=False) == 1
    assert qf.integer_bits(0.99) == 1
    assert qf.integer_bits(1.01) == 2
    assert qf.integer_bits(0.3) == 0  # [-0.5, 0.5)
    assert qf.integer_bits(3.5, signed=False) == 2
    assert qf.integer_bits(1e-3) == -8  # 2^-10 < 1e-3 <= 2^-9
    for amax in (0.001, 0.7, 5.3, 1000.0):
        f = qf.format_for_range(amax, 10)
        assert f.max_value + f.lsb > amax >= (f.max_value + f.lsb) / 2
    assert qf.format_for_range(5.3, 8) == qf.Format(8, 4, rounding="RND_CONV", overflow="SAT")
    with pytest.raises(ValueError, match="finite non-negative"):
        qf.integer_bits(float("nan"))


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def test_collect_ranges_and_calibrated_inference():
    k = jax.random.split(jax.random.key(0), 4)
    p = {
        "w1": jax.random.normal(k[0], (8, 16)) * 0.5,
        "b1": jax.random.normal(k[1], (16,)) * 0.1,
        "w2": jax.random.normal(k[2], (16, 4)) * 0.5,
        "b2": jnp.zeros(4),
    }
    batches = [jax.random.normal(jax.random.fold_in(k[3], i), (32, 8)) for i in range(3)]
    ranges = qf.collect_ranges(_mlp, p, batches)
    assert set(ranges) == {"w1", "w2"}
    xs = jnp.concatenate(batches)
    h = jax.nn.relu(xs @ p["w1"] + p["b1"])
    np.testing.assert_allclose(ranges["w1"].input, np.abs(xs).max(), rtol=1e-6)
    np.testing.assert_allclose(ranges["w1"].output, np.abs(xs @ p["w1"]).max(), rtol=1e-5)
    np.testing.assert_allclose(ranges["w2"].weight, np.abs(p["w2"]).max(), rtol=1e-6)
    np.testing.assert_allclose(ranges["w2"].input, h.max(), rtol=1e-5)
    assert ranges["w1"].input_min < 0 <= ranges["w2"].input_min

    # 12-bit operands keep the accumulator (12 + 12 + 4 bits) in int32; 16-bit outputs
    rules = qf.calibrate_formats(ranges, 16, weight_width=12, input_width=12, params=p, leaf_patterns=[r"b."])
    by_path = dict(rules)
    lf = by_path["w1"]
    assert lf.input == qf.format_for_range(float(np.abs(xs).max()), 12)
    assert lf.output == qf.format_for_range(float(np.abs(xs @ p["w1"]).max()), 16)
    assert not by_path["w2"].input.signed  # ReLU output: unsigned
    assert by_path["b1"] == qf.format_for_range(float(np.abs(p["b1"]).max()), 16)
    y = jax.jit(qf.fixed_point(_mlp, rules))(p, xs)
    assert np.abs(np.asarray(y) - np.asarray(_mlp(p, xs))).max() < 2e-2
    rules8 = qf.calibrate_formats(ranges, 8)
    y8 = jax.jit(qf.fixed_point(_mlp, rules8))(p, xs)
    err8 = np.abs(np.asarray(y8) - np.asarray(_mlp(p, xs))).max()
    assert 2e-2 < err8 < 1.0  # fewer bits, larger but bounded error
    with pytest.raises(ValueError, match="needs params"):
        qf.calibrate_formats(ranges, 8, leaf_patterns=[r"b."])
    with pytest.raises(ValueError, match="at least one batch"):
        qf.collect_ranges(_mlp, p, [])


def test_zero_range_gets_the_unit_range_and_runs():
    # integer_bits(0) was -126: an all-zero (zero-initialised) layer got Format(8, -118)
    # and fixed_point failed on a 132-fraction-bit accumulator
    assert qf.integer_bits(0.0) == 1 and qf.integer_bits(0.0, signed=False) == 0
    assert qf.format_for_range(0.0, 8) == qf.format_for_range(0.99, 8)  # [-1, 1)
    k = jax.random.split(jax.random.key(0), 3)
    p = {"w1": jax.random.normal(k[0], (4, 8)), "b1": jnp.zeros(8)}
    p |= {"w2": jnp.zeros((8, 3)), "b2": jnp.zeros(3)}  # a zero-initialised head
    x = jax.random.normal(k[1], (16, 4))
    ranges = qf.collect_ranges(_mlp, p, [x])
    assert ranges["w2"].weight == ranges["w2"].output == 0.0
    rules = qf.calibrate_formats(ranges, 8)
    assert dict(rules)["w2"].weight.integer == 1
    y = jax.jit(qf.fixed_point(_mlp, rules))(p, x)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((16, 3)))  # the float model's output, exactly


def test_nan_ranges_are_errors_naming_leaf_and_role():
    p = {"enc": {"w": jnp.ones((4, 3))}, "dec": {"w": jnp.ones((3, 2))}}
    f = lambda p, x: (x @ p["enc"]["w"]) @ p["dec"]["w"]
    x = jnp.ones((2, 4))
    # collect_ranges stored NaN silently; now it names every leaf, the roles and the batch
    with pytest.raises(ValueError, match=r"batch 1 .*'dec/w' \(input, output\), 'enc/w' \(input, output\)"):
        qf.collect_ranges(f, p, [x, x.at[0, 0].set(jnp.nan)])
    bad = {"enc/w": qf.OpRange(1.0, float("nan"), 1.0, 0.0)}
    with pytest.raises(ValueError, match=r"leaf 'enc/w', input range: .*never ran"):
        qf.calibrate_formats(bad, 8)
    # an op in a cond branch that one batch does not take: NaN there means "not executed",
    # and the ranges come from the batch that took it (np.maximum made them NaN)
    g = lambda p, x: jax.lax.cond(x.sum() > 0, lambda: x @ p["enc"]["w"], lambda: 2 * x[:, :3])
    r = qf.collect_ranges(g, p, [-x, 3 * x])
    assert (r["enc/w"].input, r["enc/w"].output, r["enc/w"].weight) == (3.0, 12.0, 1.0)


def test_collect_grad_ranges_matches_manual_gradients():
    k = jax.random.split(jax.random.key(1), 4)
    p = {
        "w1": jax.random.normal(k[0], (8, 16)) * 0.5,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k[1], (16, 4)) * 0.5,
        "b2": jnp.zeros(4),
    }
    x = jax.random.normal(k[2], (32, 8))
    y = jax.random.randint(k[3], (32,), 0, 4)

    def xent(logits, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    got = qf.collect_grad_ranges(_mlp, p, [(x, y)], xent)
    pre = x @ p["w1"] + p["b1"]
    g_logits = jax.grad(lambda lg: xent(lg, y))(_mlp(p, x))
    g_pre = (g_logits @ p["w2"].T) * (pre > 0)
    np.testing.assert_allclose(got["w2"], np.abs(g_logits).max(), rtol=1e-5)
    np.testing.assert_allclose(got["w1"], np.abs(g_pre).max(), rtol=1e-5)
    rules = dict(qf.calibrate_formats(qf.collect_ranges(_mlp, p, [x]), 8, grad_ranges=got, grad_width=10))
    g = rules["w1"].grad
    assert g.rounding == "STOCHASTIC" and g.width == 10
    assert g.max_value + g.lsb > got["w1"] >= (g.max_value + g.lsb) / 2
