"""smooth / with_input_scales: x @ W == (x / s) @ (diag(s) W), folded or at run time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.graph.fold import fold_groups
from qjax.quant.smoothing import smooth, with_input_scales
from qjax.rules import leaves_with_paths

RNG = np.random.default_rng(0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="fc1")(x))
        h = nn.gelu(nn.Dense(16, name="fc2")(h))
        return nn.Dense(8, name="fc3")(h)


class LNDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc")(nn.LayerNorm(name="ln")(x))


class Attention(nn.Module):
    heads: int = 2

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        hd = c // self.heads
        h = nn.LayerNorm(name="ln")(x)
        q = nn.Dense(c, name="q")(h).reshape(b, t, self.heads, hd)
        k = nn.Dense(c, name="k")(h).reshape(b, t, self.heads, hd)
        v = nn.Dense(c, name="v")(h).reshape(b, t, self.heads, hd)
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd), axis=-1)
        return x + nn.Dense(c, name="o")(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, c))


def random_factors(groups, params, lo=0.1, hi=10.0):
    """One factor per foldable group, one per path otherwise."""
    leaves = dict(leaves_with_paths(params))
    out = {}
    for g in groups:
        for key in [g.paths] if g.foldable else [(p,) for p in g.paths]:
            k = leaves[key[0]].shape[0]
            out[key] = RNG.uniform(lo, hi, size=k)
    return out


CASES = [
    (MLP(), (5, 8), {"params/fc2/kernel"}, {"params/fc1/kernel", "params/fc3/kernel"}),
    (LNDense(), (2, 3, 8), {"params/fc/kernel"}, set()),
    (Attention(), (2, 4, 8), {"params/q/kernel", "params/o/kernel"}, set()),
]


@pytest.mark.parametrize("model,shape,folded,runtime", CASES, ids=["mlp", "ln_dense", "attention"])
def test_exact_equivalence_in_float64(model, shape, folded, runtime):
    with jax.enable_x64(True):
        x = jnp.asarray(RNG.normal(size=shape), jnp.float64)
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0), x))
        groups = fold_groups(model.apply, v, x)
        factors = random_factors(groups, v)
        smoothed, rt = smooth(model.apply, v, factors, x, groups=groups)
        assert set(rt) == runtime
        foldable = {p for g in groups if g.foldable for p in g.paths}
        assert folded <= foldable and not (foldable & set(rt))
        want = model.apply(v, x)
        got = with_input_scales(model.apply, rt)(smoothed, x)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)
        # The params really changed (weights scaled, producers divided).
        before, after = dict(leaves_with_paths(v)), dict(leaves_with_paths(smoothed))
        assert all(not np.allclose(before[p], after[p]) for p in folded)


@pytest.mark.parametrize("model,shape,folded,runtime", CASES[1:], ids=["ln_dense", "attention"])
def test_float32_against_float64_reference(model, shape, folded, runtime):
    x = jnp.asarray(RNG.normal(size=shape), jnp.float32)
    v = model.init(jax.random.key(1), x)
    groups = fold_groups(model.apply, v, x)
    smoothed, rt = smooth(model.apply, v, random_factors(groups, v), x, groups=groups)
    got = np.asarray(with_input_scales(model.apply, rt)(smoothed, x), np.float64)
    with jax.enable_x64(True):
        want = np.asarray(
            model.apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), v), jnp.asarray(x, jnp.float64))
        )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fused_qkv_slice_and_transposed_weight():
    c = 8

    def f(p, x):
        qkv = x @ p["qkv"] + p["qkv_b"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        o = jax.nn.softmax(q @ k.T) @ v @ p["o"]
        return o @ p["t"].T  # a weight used transposed: its rows are axis 1

    with jax.enable_x64(True):
        p = {
            "qkv": RNG.normal(size=(c, 3 * c)),
            "qkv_b": RNG.normal(size=(3 * c,)),
            "o": RNG.normal(size=(c, c)),
            "t": RNG.normal(size=(4, c)),
        }
        x = jnp.asarray(RNG.normal(size=(5, c)))
        factors = {("o",): RNG.uniform(0.2, 5, c), "t": RNG.uniform(0.2, 5, c), "qkv": RNG.uniform(0.2, 5, c)}
        smoothed, rt = smooth(f, p, factors, x)
        assert set(rt) == {"qkv"}  # o folds into the v columns of qkv, t into o's columns
        np.testing.assert_allclose(
            smoothed["qkv"][:, : 2 * c] / factors["qkv"][:, None], p["qkv"][:, : 2 * c]
        )
        s_o, s_t = factors[("o",)], factors["t"]
        np.testing.assert_allclose(
            smoothed["qkv"][:, 2 * c :], p["qkv"][:, 2 * c :] * factors["qkv"][:, None] / s_o
        )
        np.testing.assert_allclose(smoothed["o"], p["o"] * s_o[:, None] / s_t[None, :])
        np.testing.assert_allclose(smoothed["t"], p["t"] * s_t[None, :])
        np.testing.assert_allclose(with_input_scales(f, rt)(smoothed, x), f(p, x), rtol=1e-11)


def test_part_of_a_group_goes_to_run_time():
    m = Attention()
    x = jnp.asarray(RNG.normal(size=(2, 4, 8)), jnp.float32)
    v = m.init(jax.random.key(0), x)
    s = RNG.uniform(0.5, 2, 8)
    smoothed, rt = smooth(m.apply, v, {"params/q/kernel": s}, x)
    assert set(rt) == {"params/q/kernel"}
    np.testing.assert_array_equal(smoothed["params"]["ln"]["scale"], v["params"]["ln"]["scale"])
    np.testing.assert_allclose(
        with_input_scales(m.apply, rt)(smoothed, x), m.apply(v, x), rtol=2e-5, atol=2e-5
    )


def test_composes_with_calibrate_quantized_jit_and_grad():
    w = jnp.asarray(RNG.normal(size=(8, 6)), jnp.float32)
    s = jnp.asarray(RNG.uniform(0.2, 5, 8), jnp.float32)
    xs = [jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32) for _ in range(2)]

    def f(p, x):
        return x @ p["w"]

    smoothed, rt = smooth(f, {"w": w}, {"w": s}, xs[0])
    assert set(rt) == {"w"}
    g = with_input_scales(f, rt)
    policy = qjax.Policy(
        [qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), act=qjax.QuantSpec(qjax.int8))]
    )
    stats = qjax.calibrate(g, policy, smoothed, xs)
    qp = qjax.quantize_params(smoothed, policy, act_stats=stats)
    got = jax.jit(qjax.quantized(g, policy))(qp, xs[0])
    # The same as quantizing f on pre-divided inputs.
    stats_ref = qjax.calibrate(f, policy, smoothed, [x / s for x in xs])
    np.testing.assert_array_equal(stats["w"].hi, stats_ref["w"].hi)
    qp_ref = qjax.quantize_params(smoothed, policy, act_stats=stats_ref)
    want = jax.jit(qjax.quantized(f, policy))(qp_ref, xs[0] / s)
    np.testing.assert_array_equal(got, want)
    assert isinstance(qp["w"], qjax.QArray)
    # Float: differentiable, the gradient w.r.t. params is the original model's (chain rule).
    grad = jax.grad(lambda p: jnp.sum(g(p, xs[0]) ** 2))(smoothed)["w"]
    want_grad = jax.grad(lambda p: jnp.sum(f(p, xs[0] / s) ** 2))(smoothed)["w"]
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5)


def test_errors_name_the_path():
    def f(p, x):
        return x @ p["w"]

    p = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"'w'.*shape"):
        smooth(f, p, {"w": np.ones(3)}, x)
    with pytest.raises(ValueError, match=r"'w'.*positive"):
        smooth(f, p, {"w": -np.ones(4)}, x)
    with pytest.raises(ValueError, match=r"'b'.*no matmul"):
        smooth(f, p, {"b": np.ones(3)}, x)
    with pytest.raises(ValueError, match=r"'w'.*twice"):
        smooth(f, p, {"w": np.ones(4), ("w",): np.ones(4)}, x)
    with pytest.raises(ValueError, match=r"'w'.*also read by 'gather'"):
        smooth(lambda p, x: x @ p["w"] + p["w"][jnp.array([0, 1])].sum(), p, {"w": np.ones(4)}, x)
    qp = {"w": qjax.quantize(p["w"], qjax.QuantSpec(qjax.int8)), "b": p["b"]}
    with pytest.raises(ValueError, match=r"'w'.*quantized"):
        smooth(f, qp, {"w": np.ones(4)}, x)
    with pytest.raises(ValueError, match=r"no matmul.*'b'"):
        with_input_scales(f, {"b": np.ones(3)})(p, x)
    with pytest.raises(ValueError, match=r"'w'.*shape"):
        with_input_scales(f, {"w": np.ones(5)})(p, x)

    def scanned(p, x):
        return jax.lax.scan(lambda c, w: (c @ w, None), x, p["w"])[0]

    with pytest.raises(ValueError, match=r"'w'.*scan"):
        with_input_scales(scanned, {"w": np.ones(4)})({"w": jnp.ones((2, 4, 4))}, x)
    assert with_input_scales(f, {}) is f
