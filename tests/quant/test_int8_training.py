"""int8 training: the forward and both backward matmuls are integer matmuls whose
results equal the same products of fake-quantized operands."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qjax
from qjax.quant.int8_training import int8_dot_general

S8 = qjax.QuantSpec(qjax.int8)
TOK = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
STOCH = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")

CASES = [
    ((16, 32), (32, 8), (((1,), (0,)), ((), ()))),  # x @ w
    ((8, 32), (16, 8), (((0,), (1,)), ((), ()))),  # contracting dims not last
    ((2, 5, 4, 6), (2, 6, 4, 3), (((3,), (1,)), ((0, 2), (0, 2)))),  # batch dims
]


def _fq_tokens(x, contracting, fmt=qjax.int8):
    axes = tuple(d for d in range(x.ndim) if d not in contracting)
    return qjax.fake_quant(x, qjax.QuantSpec(fmt, channel_axes=axes))


@pytest.mark.parametrize("ls,rs,dn", CASES)
def test_forward_and_backward_equal_fake_quant_reference(ls, rs, dn):
    a = jax.random.normal(jax.random.key(0), ls)
    b = jax.random.normal(jax.random.key(1), rs)
    c = jax.random.normal(jax.random.key(2), jax.eval_shape(lambda: jax.lax.dot_general(a, b, dn)).shape)
    (lc, rc), (lb, rb) = dn
    y, vjp = jax.vjp(lambda a, b: int8_dot_general(a, b, dn, lhs_spec=TOK, rhs_spec=TOK, grad_spec=TOK), a, b)
    # forward: per-token (non-contracting) scales on both operands
    y_ref = jax.lax.dot_general(_fq_tokens(a, lc), _fq_tokens(b, rc), dn)
    np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-5)
    da, db = vjp(c)
    # backward: each matmul re-quantizes its operands along the axes free in *that* matmul
    _, vjp_a = jax.vjp(lambda a: jax.lax.dot_general(a, b, dn), a)
    _, vjp_b = jax.vjp(lambda b: jax.lax.dot_general(a, b, dn), b)
    ref_a = vjp_a(c)[0]
    ref_b = vjp_b(c)[0]
    assert da.shape == a.shape and db.shape == b.shape
    # integer backward is close to the float gradient (int8 error level) ...
    assert float(jnp.linalg.norm(da - ref_a) / jnp.linalg.norm(ref_a)) < 0.03
    assert float(jnp.linalg.norm(db - ref_b) / jnp.linalg.norm(ref_b)) < 0.03
    # ... and exactly the product of the quantized operands it claims to use
    out_free_b = [
        d for d in range(c.ndim) if d >= len(lb) + sum(1 for d2 in range(a.ndim) if d2 not in lc + lb)
    ]
    cq_for_a = _fq_tokens(c, tuple(out_free_b))
    bq_for_a = _fq_tokens(b, tuple(d for d in range(b.ndim) if d not in rc and d not in rb))
    _, vjp_q = jax.vjp(lambda a: jax.lax.dot_general(a, bq_for_a, dn), a)
    np.testing.assert_allclose(da, vjp_q(cq_for_a)[0], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "spec,grad_spec",
    [
        (TOK, STOCH),
        # the fp8 recipe: e4m3 operands, e5m2 gradients rounded stochastically
        (
            qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=qjax.PER_TOKEN),
            qjax.QuantSpec(qjax.fp8_e5m2, channel_axes=qjax.PER_TOKEN, rounding="stochastic"),
        ),
    ],
    ids=["int8", "fp8"],
)
def test_stochastic_gradient_is_unbiased(spec, grad_spec):
    a = jax.random.normal(jax.random.key(0), (8, 16))
    b = jax.random.normal(jax.random.key(1), (16, 4))
    c = jax.random.normal(jax.random.key(2), (8, 4))

    def grad(key):
        f = lambda a: int8_dot_general(
            a, b, (((1,), (0,)), ((), ())), lhs_spec=spec, rhs_spec=spec, grad_spec=grad_spec, key=key
        )
        return jax.vjp(f, a)[1](c)[0]

    grads = jax.vmap(grad)(jax.random.split(jax.random.key(5), 400))
    # in c @ b.T, b's axis 1 is contracted: one scale per row of b
    bq = _fq_tokens(b, (1,), spec.format)
    exact = c @ bq.T  # E[stochastic_round(c)] = c
    spread = grads.std(0)
    assert float(spread.max()) > 0  # the rounding is really stochastic
    np.testing.assert_array_less(jnp.abs(grads.mean(0) - exact), 5 * spread / 20 + 1e-6)
    with pytest.raises(ValueError, match="PRNG key"):
        jax.grad(
            lambda a: int8_dot_general(
                a, b, (((1,), (0,)), ((), ())), lhs_spec=spec, rhs_spec=spec, grad_spec=grad_spec
            ).sum()
        )(a)


def test_fake_quantized_with_grad_rule_trains():
    policy = qjax.Policy([qjax.Rule(".*", weight=S8, act=S8, grad=STOCH)])
    k1, k2 = jax.random.split(jax.random.key(0))
    w_true = jax.random.normal(k1, (16, 4))
    x = jax.random.normal(k2, (128, 16))
    y = x @ w_true
    f = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match=r"leaf 'w' .*rounds stochastically: pass key="):
        jax.grad(lambda p: jnp.sum(qjax.fake_quantized(f, policy)(p, x)))({"w": w_true})
    qjax.fake_quantized(f, policy)({"w": w_true}, x)  # a forward call needs no key
    opt = optax.adam(5e-2)

    @jax.jit
    def step(p, s, key):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean((qjax.fake_quantized(f, policy, key=key)(p, x) - y) ** 2)
        )(p)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s, loss

    p = {"w": jnp.zeros((16, 4))}
    s = opt.init(p)
    losses = []
    for i in range(200):
        p, s, loss = step(p, s, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.02 * losses[0]


def test_grad_rule_needs_weight_and_act():
    with pytest.raises(ValueError, match="needs weight= and act="):
        qjax.Rule("w", weight=S8, grad=STOCH)


# -- the forward pass is the served op; the backward honours the grad spec ------------------------

INT4_G4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=4, group_axis=0)
WEIGHT_SPECS = {
    "int4_grouped": INT4_G4,
    "int8_per_tensor": S8,
    "int8_per_channel": qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
}


def _data(seed=0, m=6, k=8, n=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


@pytest.mark.parametrize("act", [TOK, S8], ids=["act_per_token", "act_per_tensor"])
@pytest.mark.parametrize("wname", list(WEIGHT_SPECS))
def test_forward_equals_the_served_output(wname, act):
    x, w = _data()
    f = lambda p, x: x @ p["w"]
    serve = qjax.Policy([qjax.Rule("w", weight=WEIGHT_SPECS[wname], act=act)])
    train = qjax.Policy([qjax.Rule("w", weight=WEIGHT_SPECS[wname], act=act, grad=TOK)])
    served = qjax.quantized(f, serve, backend="xla")(qjax.quantize_params({"w": w}, serve), x)
    for integer_forward in (True, False):
        got = qjax.fake_quantized(f, train, integer_forward=integer_forward)({"w": w}, x)
        np.testing.assert_allclose(got, served, rtol=1e-6, atol=1e-6 * float(jnp.abs(served).max()))


def _q64(x, axes, bits=8):
    """float64 values of symmetric absmax quantization with one float32 scale per index of
    ``axes`` (round half to even, as qjax)."""
    qmax = 2 ** (bits - 1) - 1
    red = tuple(d for d in range(x.ndim) if d not in axes)
    scale = (np.abs(x).max(axis=red, keepdims=True) / np.float32(qmax)).astype(np.float32).astype(np.float64)
    return np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale


@pytest.mark.parametrize("gname", ["per_token", "per_tensor"])
def test_grouped_int4_gradients_equal_a_float64_reference(gname):
    x, w = _data(1)
    rng = np.random.default_rng(2)
    c = rng.standard_normal((6, 4)).astype(np.float32)
    gspec = TOK if gname == "per_token" else S8
    policy = qjax.Policy([qjax.Rule("w", weight=INT4_G4, act=TOK, grad=gspec)])
    fn = qjax.fake_quantized(lambda p, x: x @ p["w"], policy)
    y, vjp = jax.vjp(lambda p, x: fn(p, x), {"w": jnp.asarray(w)}, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(c))
    x64, w64, c64 = (a.astype(np.float64) for a in (x, w, c))
    # forward: x per token (int8), w in groups of 4 rows per output channel (int4)
    w_groups = _q64(w64.reshape(2, 4, 4), (0, 2), 4).reshape(8, 4)
    np.testing.assert_allclose(y, _q64(x64, (0,), 8) @ w_groups, rtol=1e-5, atol=1e-5)
    # dx = c @ w.T: c per row (or per tensor), w re-quantized (int4) with one scale per row
    c_dx = _q64(c64, (0,), 8) if gname == "per_token" else _q64(c64, (), 8)
    np.testing.assert_allclose(dx, c_dx @ _q64(w64, (0,), 4).T, rtol=1e-5, atol=1e-5)
    # dw = x.T @ c: x re-quantized with one scale per column, c per column (or per tensor)
    c_dw = _q64(c64, (1,), 8) if gname == "per_token" else _q64(c64, (), 8)
    np.testing.assert_allclose(dp["w"], _q64(x64, (1,), 8).T @ c_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "grad",
    [
        qjax.QuantSpec(qjax.int8, channel_axes=(), group_size=2, group_axis=0),
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
    ],
    ids=["group_size", "channel_axes"],
)
def test_unsupported_grad_granularity_is_refused_naming_the_leaf(grad):
    x, w = _data()
    f = lambda p, x: x @ p["layer"]["w"]
    policy = qjax.Policy([qjax.Rule("layer/w", weight=S8, act=TOK, grad=grad)])
    with pytest.raises(ValueError, match=r"leaf 'layer/w' \(rule 'layer/w'\).*PER_TOKEN"):
        jax.grad(lambda p: qjax.fake_quantized(f, policy)(p, x).sum())({"layer": {"w": w}})
    with pytest.raises(ValueError, match="grad_spec has"):
        int8_dot_general(x, w, (((1,), (0,)), ((), ())), lhs_spec=TOK, rhs_spec=TOK, grad_spec=grad)
    lsq = qjax.Policy([qjax.Rule("layer/w", weight=S8.replace(ste="lsq"), act=TOK, grad=TOK)])
    with pytest.raises(ValueError, match=r"leaf 'layer/w'.*does not learn scales"):
        qjax.fake_quantized(f, lsq)({"layer": {"w": w}}, x)
