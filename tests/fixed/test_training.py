"""Fixed-point training: STE forward/backward, quantized gradients, fixed-point weight
updates, and convergence on a small problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax import fixed as qf

RC = dict(rounding="RND_CONV", overflow="SAT")


def test_fake_fixed_forward_and_clipped_ste():
    f = qf.Format(8, 2, **RC)  # range [-2, 2)
    x = jnp.asarray([0.3, 5.0, -3.0, 1.99, -2.0])
    y, vjp = jax.vjp(lambda v: qf.fake_fixed(v, f), x)
    np.testing.assert_array_equal(y, qf.from_float(x, f).to_float())
    np.testing.assert_array_equal(vjp(jnp.ones(5))[0], [1, 0, 0, 1, 1])
    plain = jax.grad(lambda v: qf.fake_fixed(v, f, ste="plain").sum())(x)
    np.testing.assert_array_equal(plain, np.ones(5))
    with pytest.raises(ValueError, match="unknown ste"):
        qf.fake_fixed(x, f, ste="lsq")


def test_quantize_grad_rounds_the_backward_pass_unbiasedly():
    g_fmt = qf.Format(8, -2, rounding="STOCHASTIC", overflow="SAT")  # step 2^-10
    x = jnp.ones((20_000,))
    g = jax.grad(lambda v: (qf.quantize_grad(v, g_fmt, key=jax.random.key(0)) * 3.3e-4).sum())(x)
    g = np.asarray(g, np.float64)
    assert np.all(np.isin(g * 2**10, [0.0, 1.0]))  # on the grid: 3.3e-4 is between 0 and 1 LSB
    assert abs(g.mean() - 3.3e-4) < 5 * np.sqrt(0.34 * 0.66 / 20_000) * 2**-10
    y = qf.quantize_grad(x, g_fmt, key=jax.random.key(0))
    np.testing.assert_array_equal(y, x)  # identity forward
    with pytest.raises(ValueError, match="pass key="):
        qf.quantize_grad(x, g_fmt)


LF = qf.LayerFormats(
    weight=qf.Format(8, 1, **RC),
    input=qf.Format(8, 3, **RC),
    output=qf.Format(12, 4, **RC),
    grad=qf.Format(12, -2, rounding="STOCHASTIC", overflow="SAT"),
)


def _net(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def test_fake_fixed_forward_equals_integer_inference():
    k = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(k[0], (6, 8)) * 0.4,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k[1], (8, 3)) * 0.4,
        "b2": jnp.zeros(3),
    }
    x = jax.random.normal(k[2], (16, 6))
    rules = [(r"w.", LF)]
    fake = jax.jit(qf.fake_fixed_point(_net, rules, key=jax.random.key(1)))(p, x)
    real = jax.jit(qf.fixed_point(_net, rules))(p, x)
    np.testing.assert_array_equal(fake, real)  # 8x8-bit products, <= 22-bit sums: exact in float32


def test_fake_fixed_forward_rounds_format_leaves_like_inference():
    """``Format`` rules (biases) round their leaves in ``fake_fixed_point`` as in
    ``fixed_point`` (before, only the LayerFormats ops were rounded: QAT trained against a
    float bias the deployed model does not have); the gradient passes straight through."""
    k = jax.random.split(jax.random.key(4), 5)
    p = {
        "w1": jax.random.normal(k[0], (6, 8)) * 0.4,
        "b1": jax.random.normal(k[1], (8,)) * 0.3,
        "w2": jax.random.normal(k[2], (8, 3)) * 0.4,
        "b2": jax.random.normal(k[3], (3,)) * 0.3,
    }
    x = jax.random.normal(k[4], (16, 6))
    rules = [(r"w.", LF), (r"b.", qf.Format(6, 2, rounding="RND_CONV", overflow="SAT"))]
    fake = jax.jit(qf.fake_fixed_point(_net, rules, key=jax.random.key(1)))(p, x)
    real = jax.jit(qf.fixed_point(_net, rules))(p, x)
    np.testing.assert_array_equal(fake, real)
    no_bias_rule = jax.jit(qf.fake_fixed_point(_net, rules[:1], key=jax.random.key(1)))(p, x)
    assert not np.array_equal(no_bias_rule, real)
    g = jax.jit(jax.grad(lambda p: jnp.sum(qf.fake_fixed_point(_net, rules, key=jax.random.key(1))(p, x))))(p)
    assert np.all(np.isfinite(np.asarray(g["b2"]))) and np.any(np.asarray(g["b2"]) != 0)


def test_bfloat16_models_run_small_formats_exactly():
    """bfloat16 carries integers of up to 8 bits exactly: a bf16 model runs with formats
    that fit (equal to the float32 model), and a wider carried format is refused with the
    right limit; fixed_updates keeps bf16 params on a 6-bit grid."""
    import flax.linen as nn

    small = qf.Format(4, 2, rounding="RND_CONV", overflow="SAT")
    lf = qf.LayerFormats(qf.Format(4, 1, rounding="RND_CONV", overflow="SAT"), small, small)
    x = jax.random.normal(jax.random.key(0), (2, 8))
    m32, m16 = nn.Dense(4), nn.Dense(4, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    v = m32.init(jax.random.key(1), x)
    v16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
    want = qf.fixed_point(m32.apply, [(".*kernel", lf)])(v, x)
    got = qf.fixed_point(m16.apply, [(".*kernel", lf)])(v16, x.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    wide = qf.LayerFormats(lf.weight, lf.input, None)  # keeps the 11-bit accumulator
    with pytest.raises(ValueError, match="holds at most 8 bits exactly"):
        qf.fixed_point(m16.apply, [(".*kernel", wide)])(v16, x.astype(jnp.bfloat16))
    fmt = qf.Format(6, 2, rounding="STOCHASTIC", overflow="SAT")
    tx = qf.fixed_updates(optax.sgd(0.1), [("w", fmt)], jax.random.key(0))
    p = {"w": jnp.ones((64,), jnp.bfloat16)}
    u, _ = tx.update({"w": jnp.full((64,), 0.37, jnp.bfloat16)}, tx.init(p), p)
    w = np.asarray(optax.apply_updates(p, u)["w"], np.float64)
    np.testing.assert_array_equal(w / fmt.lsb, np.round(w / fmt.lsb))


def test_backward_matmuls_see_fixed_point_operands():
    w = jax.random.normal(jax.random.key(0), (5, 4)) * 0.3
    x = jax.random.normal(jax.random.key(1), (7, 5))
    c = jax.random.normal(jax.random.key(2), (7, 4)) * 1e-3
    f = qf.fake_fixed_point(lambda p, x: x @ p["w"], [("w", LF)], key=jax.random.key(3))
    gw = jax.jit(jax.grad(lambda p: jnp.sum(f(p, x) * c)))({"w": w})["w"]
    # dW = x_q^T · SR(c): the products of an input LSB (2^-5) and a gradient LSB (2^-14)
    units = np.asarray(gw, np.float64) / (LF.input.lsb * LF.grad.lsb)
    np.testing.assert_array_equal(units, np.round(units))
    xq = np.asarray(qf.from_float(x, LF.input).to_float(), np.float64)
    np.testing.assert_allclose(gw, xq.T @ np.asarray(c, np.float64), atol=7 * LF.grad.lsb * np.abs(xq).max())


def test_fixed_updates_keep_params_on_the_accumulator_grid_and_are_unbiased():
    acc = qf.Format(16, 2, rounding="STOCHASTIC", overflow="SAT")  # step 2^-14
    tx = qf.fixed_updates(optax.sgd(1.0), [("w", acc)], jax.random.key(0))
    p = {"w": jnp.zeros((4000,)), "b": jnp.zeros((2,))}
    state = tx.init(p)
    grads = {"w": jnp.full((4000,), -0.3 * acc.lsb), "b": jnp.full((2,), 0.123)}
    step = jax.jit(lambda p, s: tx.update(grads, s, p))
    for _ in range(10):
        u, state = step(p, state)
        p = optax.apply_updates(p, u)
    w = np.asarray(p["w"], np.float64)
    np.testing.assert_array_equal(w / acc.lsb, np.round(w / acc.lsb))
    assert abs(w.mean() / acc.lsb - 3.0) < 0.1  # ten updates of 0.3 LSB: 3 LSB on average
    np.testing.assert_allclose(p["b"], -1.23, rtol=1e-6)  # unmatched leaves: plain updates
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state)
    wide = qf.fixed_updates(optax.sgd(1.0), [("w", qf.Format(24, 2))], jax.random.key(0))
    with pytest.raises(ValueError, match="at most 23 bits"):
        wide.update(grads, wide.init(p), p)


def test_fixed_point_training_converges():
    """Two-moons-like data, an MLP trained with fake-fixed forward, stochastically rounded
    gradients and fixed-point weight updates."""
    rng = np.random.default_rng(0)
    n = 256
    t = rng.uniform(0, np.pi, n)
    lab = rng.integers(0, 2, n)
    xs = np.stack([np.cos(t) + lab, np.sin(t) * (1 - 2 * lab) + 0.5 * lab], 1) + rng.normal(0, 0.1, (n, 2))
    x, y = jnp.asarray(xs - xs.mean(0), jnp.float32), jnp.asarray(lab)
    k = jax.random.split(jax.random.key(0), 2)
    p = {
        "w1": jax.random.normal(k[0], (2, 32)) * 0.7,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k[1], (32, 2)) * 0.3,
        "b2": jnp.zeros(2),
    }
    rules = [(r"w.", LF)]
    acc = [
        (r"w.", qf.Format(16, 2, rounding="STOCHASTIC", overflow="SAT")),
        (r"b.", qf.Format(16, 4, rounding="STOCHASTIC", overflow="SAT")),
    ]
    tx = qf.fixed_updates(optax.adam(0.02), acc, jax.random.key(1))
    state = tx.init(p)

    def loss(p, key):
        logits = qf.fake_fixed_point(_net, rules, key=key)(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, state, key):
        value, g = jax.value_and_grad(loss)(p, key)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, value

    losses = []
    for i in range(100):
        p, state, l_ = step(p, state, jax.random.key(100 + i))
        losses.append(float(l_))
    acc_ = float((jax.jit(qf.fixed_point(_net, rules))(p, x).argmax(-1) == y).mean())
    assert losses[-1] < 0.5 * losses[0] and acc_ > 0.95, (losses[0], losses[-1], acc_)
