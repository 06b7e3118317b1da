"""Straight-through pruning: masked forward, identity (dense) gradient, SR-STE, sparsify(ste=True)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qjax.numerics.formats import int8
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec
from qjax.prune.pruners import Magnitude
from qjax.prune.schedules import periodic
from qjax.prune.sparsify import get_masks, sparsify
from qjax.prune.sparsity import NM
from qjax.prune.ste import apply_masks_ste, masked_ste


def loss(v, x):
    return jnp.sum(jnp.tanh(x @ v["w"] + v["b"]) ** 2) + jnp.sum(v["w"] ** 3)


def setup():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w": jax.random.normal(k[0], (5, 4), jnp.float64),
        "b": jax.random.normal(k[1], (4,), jnp.float64),
    }
    masks = {"w": jax.random.bernoulli(k[2], 0.5, (5, 4)), "b": None}
    x = jax.random.normal(jax.random.PRNGKey(3), (6, 5), jnp.float64)
    return params, masks, x


def test_forward_is_masked_and_gradient_is_the_dense_gradient():
    with jax.enable_x64(True):
        params, masks, x = setup()
        v = {"w": jnp.where(masks["w"], params["w"], 0.0), "b": params["b"]}
        out = apply_masks_ste(params, masks)
        np.testing.assert_array_equal(out["w"], v["w"])
        assert out["b"] is params["b"]
        g_ste = jax.grad(lambda p: loss(apply_masks_ste(p, masks), x))(params)
        # analytic: the gradient wrt the dense params is the gradient of the loss at the masked params
        g_dense = jax.grad(loss)(v, x)
        for k in ("w", "b"):
            np.testing.assert_allclose(g_ste[k], g_dense[k], rtol=1e-12, atol=1e-12)
        # pruned positions get their (non-zero) dense gradient, unlike plain masking
        assert np.all(np.asarray(g_ste["w"])[~np.asarray(masks["w"])] != 0)
        g_plain = jax.grad(lambda p: loss({"w": p["w"] * masks["w"], "b": p["b"]}, x))(params)
        assert np.all(np.asarray(g_plain["w"])[~np.asarray(masks["w"])] == 0)
        # finite differences of the loss at the masked point, every coordinate of w (pruned ones too)
        eps = 1e-6
        for i in range(5):
            for j in range(4):
                e = jnp.zeros((5, 4)).at[i, j].set(eps)
                fd = (loss({"w": v["w"] + e, "b": v["b"]}, x) - loss({"w": v["w"] - e, "b": v["b"]}, x)) / (
                    2 * eps
                )
                assert float(g_ste["w"][i, j]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_sr_ste_decay_and_jit():
    with jax.enable_x64(True):
        params, masks, x = setup()
        lam = 0.3
        g = jax.jit(jax.grad(lambda p: loss(apply_masks_ste(p, masks, sr_decay=lam), x)))(params)
        v = {"w": jnp.where(masks["w"], params["w"], 0.0), "b": params["b"]}
        want = jax.grad(loss)(v, x)["w"] + lam * jnp.where(masks["w"], 0.0, params["w"])
        np.testing.assert_allclose(g["w"], want, rtol=1e-12)
    x = jnp.array([1.0, -2.0])
    m = jnp.array([True, False])
    assert masked_ste(x, m).tolist() == [1.0, 0.0]
    assert jax.grad(lambda x: masked_ste(x, m).sum())(x).tolist() == [1.0, 1.0]
    assert jax.vmap(masked_ste)(jnp.ones((3, 2)), jnp.tile(m, (3, 1))).tolist() == [[1.0, 0.0]] * 3
    assert masked_ste(jnp.ones(2, jnp.bfloat16), m).dtype == jnp.bfloat16


def test_trees_and_errors():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    _, state = nnx.split(model, nnx.Param)
    masks = jax.tree.map(lambda w: jnp.ones(w.shape, bool).at[0].set(False) if w.ndim == 2 else None, state)
    out = apply_masks_ste(state, masks)
    assert isinstance(out, nnx.State)
    assert bool(jnp.all(out["kernel"][...][0] == 0)) and bool(jnp.all(out["kernel"][...][1:] != 0))
    with pytest.raises(TypeError, match="quantized"):
        apply_masks_ste({"w": quantize(jnp.ones((4, 4)), QuantSpec(int8))}, {"w": jnp.ones((4, 4), bool)})
    with pytest.raises(TypeError, match="float"):
        masked_ste(jnp.ones(3, jnp.int32), jnp.ones(3, bool))
    with pytest.raises(ValueError, match="mirror"):
        apply_masks_ste({"w": jnp.ones(2)}, {"v": jnp.ones(2, bool)})
    with pytest.raises(ValueError, match="mirror"):
        apply_masks_ste({"w": jnp.ones(2)}, jnp.ones(2, bool))


def test_sparsify_ste_revives_pruned_weights():
    """Dense weights trained through a masked forward: weights that start small but matter
    grow (their gradient is not masked) and the periodic re-selection brings them back."""
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 4))
    w_star = jnp.array([[0.0, 2.0], [1.5, 0.0], [0.0, -2.0], [-1.0, 0.0]])
    y = x @ w_star
    params = {"w": jnp.array([[0.5, 0.01], [0.01, 0.6], [0.7, 0.02], [0.02, 0.4]])}  # wrong support
    tx = sparsify(optax.adam(0.05), Magnitude(0.5), periodic(20), ste=True)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        g = jax.grad(lambda p: jnp.mean((x @ apply_masks_ste(p, get_masks(state))["w"] - y) ** 2))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    params, state = step(params, state)
    first = get_masks(state)["w"]
    np.testing.assert_array_equal(first, jnp.abs(params["w"]) >= 0.3)  # the wrong support
    for _ in range(200):
        params, state = step(params, state)
    final = get_masks(state)["w"]
    np.testing.assert_array_equal(final, w_star != 0)  # pruned weights came back, wrong ones left
    assert bool(jnp.all(params["w"] != 0))  # params stay dense
    fwd = apply_masks_ste(params, {"w": final})["w"]
    np.testing.assert_allclose(fwd, w_star, atol=0.1)


def test_masks_from_the_current_params_inside_the_loss():
    # the module docstring's recipe for jaxpruner's SteMixin behaviour: the forward reads the
    # masks of the params it is given, the gradient is the straight-through one
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    pruner = Magnitude(0.5, sparsity_type=NM(2, 4))

    def loss(p):
        masks = pruner.masks(jax.lax.stop_gradient(p))
        return jnp.sum((x @ apply_masks_ste(p, masks)["w"]) ** 2)

    value, g = jax.value_and_grad(loss)({"w": jnp.asarray(w)})
    w64, x64 = w.astype(np.float64), x.astype(np.float64)
    keep = np.abs(w64).reshape(2, 4, 4).argsort(1).argsort(1).reshape(8, 4) >= 2  # top 2 of every 4 rows
    y = x64 @ (w64 * keep)
    np.testing.assert_allclose(value, np.sum(y**2), rtol=1e-5)
    np.testing.assert_allclose(g["w"], 2 * x64.T @ y, rtol=1e-5, atol=1e-5)
