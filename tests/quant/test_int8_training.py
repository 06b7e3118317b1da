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
NEAREST = qjax.QuantSpec(qjax.int8)
STOCH = qjax.QuantSpec(qjax.int8, rounding="stochastic")

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
    y, vjp = jax.vjp(
        lambda a, b: int8_dot_general(a, b, dn, lhs_spec=S8, rhs_spec=S8, grad_spec=NEAREST), a, b
    )
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
        (S8, STOCH),
        # the fp8 recipe: e4m3 operands, e5m2 gradients rounded stochastically
        (qjax.QuantSpec(qjax.fp8_e4m3), qjax.QuantSpec(qjax.fp8_e5m2, rounding="stochastic")),
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
    with pytest.raises(ValueError, match="pass key="):
        jax.grad(lambda p: jnp.sum(qjax.fake_quantized(f, policy)(p, x)))({"w": w_true})
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
