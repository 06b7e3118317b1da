"""input_statistics: layer inputs by weight path, mapped to the weight's contracted axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qjax.graph.statistics import gram, input_statistics

RNG = np.random.default_rng(0)


def arr(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def sq(rows):
    return jnp.sum(rows**2, axis=0)


def test_dense_sum_of_squares_over_batches_and_reads():
    params = {"w": arr(5, 3)}

    def f(p, x):
        return (x @ p["w"]).sum() + (jnp.flip(x, 0) @ p["w"]).sum()  # read twice

    batches = [arr(4, 5), arr(2, 5)]
    s = input_statistics(f, params, batches, sq)["w"]
    xs = np.concatenate(batches)
    np.testing.assert_allclose(s.value, 2 * (xs**2).sum(0), rtol=1e-5)
    assert s.rows == 12 and s.weight_axes == (0,) and s.weight_shape == (5, 3)


def test_transposed_and_multi_axis_contractions_map_to_leaf_axes():
    params = {"t": arr(3, 5), "g": arr(2, 4, 6)}

    def f(p, x, y):
        a = x @ p["t"].T  # weight used transposed: contracted leaf axis 1
        b = jnp.einsum("bhd,hdn->bn", y, p["g"])  # DenseGeneral-style: axes (0, 1)
        return a.sum() + b.sum()

    x, y = arr(7, 5), arr(7, 2, 4)
    s = input_statistics(f, params, [(x, y)], gram)
    assert s["t"].weight_axes == (1,)
    np.testing.assert_allclose(s["t"].value, x.T @ x, rtol=1e-5)
    assert s["g"].weight_axes == (0, 1)
    y2 = y.reshape(7, 8)
    np.testing.assert_allclose(s["g"].value, y2.T @ y2, rtol=1e-5)


def test_conv_features_and_stacked_scan_layers():
    params = {"k": arr(3, 3, 2, 4), "stack": arr(3, 4, 4)}

    def f(p, x):
        y = lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = y.reshape(-1, 4)
        h, _ = lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
        return h

    x = arr(2, 5, 5, 2)
    s = input_statistics(f, params, [x], sq)
    np.testing.assert_allclose(s["k"].value, (x.reshape(-1, 2) ** 2).sum(0), rtol=1e-5)
    assert s["k"].weight_axes == (2,)
    assert s["stack"].value.shape == (3, 4)  # one statistic per stacked layer
    assert s["stack"].weight_axes == (1,)
    # The first layer's input is the conv output.
    y = np.asarray(f({"k": params["k"], "stack": np.zeros((0, 4, 4), np.float32)}, x))
    np.testing.assert_allclose(s["stack"].value[0], (y**2).sum(0), rtol=1e-4)


def test_patterns_and_errors():
    params = {"a": arr(4, 4), "b": arr(4, 4)}

    def f(p, x):
        return x @ p["a"] @ p["b"]

    got = input_statistics(f, params, [arr(3, 4)], sq, patterns=r"b")
    assert set(got) == {"b"}
    with pytest.raises(ValueError, match="matched no"):
        input_statistics(f, params, [arr(3, 4)], sq, patterns=["a", "nope"])
    with pytest.raises(ValueError, match="at least one batch"):
        input_statistics(f, params, [], sq)

    def reshaped(p, x):
        return x @ p["a"].reshape(2, 8)[:, :4].reshape(2, 4).T

    with pytest.raises(ValueError, match=r"'a'.*reshape|'a'.*slice"):
        input_statistics(reshaped, params, [arr(3, 4)], sq)


def test_under_jit_model_and_linen():
    import flax.linen as nn

    model = nn.Dense(3)
    x = arr(6, 5)
    v = model.init(jax.random.key(0), x)
    s = input_statistics(jax.jit(model.apply), v, [x], sq)
    np.testing.assert_allclose(s["params/kernel"].value, (x**2).sum(0), rtol=1e-5)


def test_a_weight_every_scan_iteration_reads_pools_its_reads():
    """A scan that reuses one weight (fori_loop with static bounds, a scan closing over
    it) is one op read several times: its statistics are combined over the iterations as
    the unrolled loop's reads are (they were stacked per iteration, and GPTQ / AWQ /
    SmoothQuant / Wanda then refused the weight)."""
    from qjax.prune.activations import activation_norms

    k = jax.random.split(jax.random.key(2), 3)
    p = {"w": jax.random.normal(k[0], (6, 6)) / 2, "u": jax.random.normal(k[1], (6, 3))}
    batches = [(jax.random.normal(k[2], (5, 6)),), (jnp.ones((5, 6)),)]

    def looped(p, x):
        return lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), x) @ p["u"]

    def unrolled(p, x):
        for _ in range(3):
            x = jnp.tanh(x @ p["w"])
        return x @ p["u"]

    for combine in (jnp.add, jnp.maximum):
        got = input_statistics(looped, p, batches, gram, combine=combine)
        want = input_statistics(unrolled, p, batches, gram, combine=combine)
        for path in want:
            assert got[path].rows == want[path].rows and np.shape(got[path].value) == (6, 6)
            np.testing.assert_allclose(got[path].value, want[path].value, rtol=1e-5, atol=1e-6)
    got, want = activation_norms(looped, p, batches), activation_norms(unrolled, p, batches)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5)
