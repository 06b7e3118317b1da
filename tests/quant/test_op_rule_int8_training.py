"""``OpRule(grad=...)``: int8 training of a matmul between two activations (attention's
scores), against float64 references of the forward and both integer backward matmuls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_int8_training import _q64  # float64 reference quantizer

import qjax

TOK = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
S8 = qjax.QuantSpec(qjax.int8)
RNG = np.random.default_rng(0)


def scores(p, q, k):
    with jax.named_scope("scores"):
        return jnp.einsum("qd,kd->qk", q, k)


def _data():
    q, k, c = (RNG.standard_normal(s).astype(np.float32) for s in ((5, 8), (7, 8), (5, 7)))
    return q, k, c


@pytest.mark.parametrize("gname", ["per_token", "per_tensor"])
def test_both_backward_matmuls_are_integer_products_of_the_requantized_operands(gname):
    q, k, c = _data()
    grad = TOK if gname == "per_token" else S8
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=grad)])
    fn = qjax.fake_quantized(scores, policy)
    y, vjp = jax.vjp(lambda q, k: fn({}, q, k), jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(c))
    q64, k64, c64 = (a.astype(np.float64) for a in (q, k, c))
    # forward: each operand per token (its rows), as without grad=
    np.testing.assert_allclose(y, _q64(q64, (0,)) @ _q64(k64, (0,)).T, rtol=1e-5, atol=1e-5)
    plain = qjax.fake_quantized(scores, qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK)]))
    np.testing.assert_array_equal(y, plain({}, q, k))
    # dq = c @ k: c per row (or tensor), k re-quantized with one scale per column (d)
    c_dq = _q64(c64, (0,)) if gname == "per_token" else _q64(c64, ())
    np.testing.assert_allclose(dq, c_dq @ _q64(k64, (1,)), rtol=1e-5, atol=1e-5)
    # dk = c.T @ q: c per column (or tensor), q re-quantized per column (d)
    c_dk = _q64(c64, (1,)) if gname == "per_token" else _q64(c64, ())
    np.testing.assert_allclose(dk, c_dk.T @ _q64(q64, (1,)), rtol=1e-5, atol=1e-5)


def test_batched_attention_einsum_trains_and_is_close_to_the_float_gradient():
    """Heads and batch as dot_general batch dims (``"bqhd,bkhd->bhqk"``), inside jit."""
    q, k = (jnp.asarray(RNG.standard_normal((2, 6, 3, 8)), jnp.float32) for _ in range(2))

    def f(p, q, k):
        with jax.named_scope("attn"):
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k)
        return jnp.sum(jax.nn.softmax(s, -1) ** 2)

    policy = qjax.Policy([qjax.OpRule("attn/.*", lhs=TOK, rhs=TOK, grad=TOK)])
    got = jax.jit(jax.grad(lambda q, k: qjax.fake_quantized(f, policy)({}, q, k), argnums=(0, 1)))(q, k)
    want = jax.grad(lambda q, k: f({}, q, k), argnums=(0, 1))(q, k)
    for g, w in zip(got, want):
        assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g)))
        assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 0.05


def test_a_static_operand_gets_its_clip_mask_before_the_integer_backward():
    q, k, c = _data()
    stats_policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=S8, rhs=S8)])
    stats = qjax.calibrate(scores, stats_policy, {}, [(0.5 * q, k)])  # q's range too narrow: clips
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=S8, rhs=S8, grad=TOK)])
    fn = qjax.fake_quantized(scores, policy, act_stats=stats)
    _, vjp = jax.vjp(lambda q, k: fn({}, q, k), jnp.asarray(q), jnp.asarray(k))
    dq, _ = vjp(jnp.asarray(c))
    (lhs_key,) = [key for key in stats if key.endswith(":lhs")]
    hi = float(stats[lhs_key].hi)
    clipped = np.abs(q) > hi * (1 + 1 / 254)  # beyond the last code's rounding interval
    assert clipped.any() and (~clipped).any()
    np.testing.assert_array_equal(np.asarray(dq)[clipped], 0.0)
    inside = _q64(c.astype(np.float64), (0,)) @ _q64(k.astype(np.float64), (1,))
    np.testing.assert_allclose(
        np.asarray(dq)[~clipped & (np.abs(q) < hi)], inside[~clipped & (np.abs(q) < hi)], rtol=1e-5, atol=1e-5
    )


def test_bad_op_rules_are_refused_by_name():
    with pytest.raises(ValueError, match=r"OpRule 'scores/\.\*': grad= .* needs lhs= and rhs="):
        qjax.OpRule("scores/.*", lhs=TOK, grad=TOK)
    with pytest.raises(ValueError, match=r"OpRule 'scores/\.\*': grad has channel_axes=\(-1,\)"):
        qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))
    with pytest.raises(TypeError, match=r"grad must be a qjax\.QuantSpec"):
        qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad="int8")
    stoch = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=stoch)])
    q, k, _ = _data()
    no_key = qjax.fake_quantized(scores, policy)
    no_key({}, q, k)  # a forward call needs no key (evaluation, checks against serving)
    with pytest.raises(ValueError, match=r"scores.*rounds stochastically: pass key="):
        jax.grad(lambda q: jnp.sum(no_key({}, q, k)))(jnp.asarray(q))
    key_fn = qjax.fake_quantized(scores, policy, key=jax.random.key(0))
    assert bool(jnp.isfinite(jax.grad(lambda q: jnp.sum(key_fn({}, q, k)))(jnp.asarray(q))).all())


def test_the_rule_round_trips_through_json_and_serving_ignores_grad():
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=TOK)])
    assert qjax.Policy.from_json(policy.to_json()) == policy
    q, k, _ = _data()
    served = qjax.quantized(scores, policy)({}, q, k)
    plain = qjax.quantized(scores, qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK)]))({}, q, k)
    np.testing.assert_array_equal(served, plain)


def test_int8_step_takes_a_policy_whose_only_grad_is_on_an_op_rule():
    import optax

    from qjax import parallel as qp
    from qjax.parallel import presets

    params = {"w": jnp.asarray(RNG.standard_normal((8, 8)), jnp.float32)}

    def f(p, x):
        h = x @ p["w"]
        return scores(p, h, h)

    objective = lambda out, b: jnp.mean(out**2)
    tx = optax.sgd(0.1)
    mesh = qp.make_mesh(8, 1, 1)
    sh = qp.train_state_shardings(params, tx, presets.data_parallel(), mesh)
    batch = {"x": jnp.asarray(RNG.standard_normal((8, 8)), jnp.float32)}
    bsh = qp.batch_shardings(mesh, batch)
    ops_only = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=TOK)])
    step = qp.int8_step(f, ops_only, objective, tx, sh, bsh, donate=False)
    state, metrics = step(qp.init_train_state(params, tx, sh), batch)
    assert bool(jnp.isfinite(metrics["loss"])) and float(jnp.abs(state.params["w"] - params["w"]).max()) > 0
    with pytest.raises(ValueError, match="no rule of the policy has grad="):
        qp.int8_step(f, qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK)]), objective, tx, sh, bsh)


def test_review_findings_stochastic_static_specs_keys_unsigned_grads_and_dynamic_clipping():
    q, k, c = _data()
    key = jax.random.key(0)
    # a static operand spec that rounds stochastically: its clip mask is that of nearest
    ss = qjax.QuantSpec(qjax.int8, rounding="stochastic")
    stats = qjax.calibrate(scores, qjax.Policy([qjax.OpRule("scores/.*", lhs=ss, rhs=ss)]), {}, [(q, k)])
    policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=ss, rhs=ss, grad=TOK)])
    fn = qjax.fake_quantized(scores, policy, act_stats=stats, key=key)
    assert bool(jnp.isfinite(jax.grad(lambda q: jnp.sum(fn({}, q, k) * c))(jnp.asarray(q))).all())
    # two matched ops under one name stack draw different stochastic rounding
    stoch = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
    twice = lambda p, q, k: scores(p, q, k) + scores(p, q, k)
    pol = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=stoch)])
    g2 = jax.grad(lambda q: jnp.sum(qjax.fake_quantized(twice, pol, key=key)({}, q, k) * c))(jnp.asarray(q))
    g1 = jax.grad(lambda q: jnp.sum(qjax.fake_quantized(scores, pol, key=key)({}, q, k) * c))(jnp.asarray(q))
    assert not np.array_equal(np.asarray(g2), 2 * np.asarray(g1))
    # an unsigned symmetric gradient format would clamp negative gradients to 0
    with pytest.raises(ValueError, match="unsigned format"):
        qjax.OpRule(
            "scores/.*", lhs=TOK, rhs=TOK, grad=qjax.QuantSpec(qjax.uint8, channel_axes=qjax.PER_TOKEN)
        )
    # a clipping calibrator's dynamic range keeps its clip mask under the integer backward
    clip = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, calibration=qjax.calib.percentile(90))
    masks = []
    for grad in (None, TOK):
        pol = qjax.Policy([qjax.OpRule("scores/.*", lhs=clip, rhs=TOK, grad=grad)])
        dq = jax.grad(lambda q, pol=pol: jnp.sum(qjax.fake_quantized(scores, pol)({}, q, k) * c))(
            jnp.asarray(q)
        )
        masks.append(np.asarray(dq) == 0)
    assert masks[0].any() and np.array_equal(masks[0], masks[1])


@pytest.mark.parametrize("loop", ["scan", "while_loop"])
def test_the_iterations_of_a_loop_draw_their_own_rounding(loop):
    """The walker folds the iteration into the transform's key: two iterations of the same
    op on the same values (an ``nn.scan`` stack's layers) round differently."""
    q, k, c = _data()
    stoch = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")
    pol = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=stoch)])
    if loop == "scan":
        twice = lambda p, q, k: jax.lax.fori_loop(
            0, 2, lambda i, acc: acc + scores(p, q, k), jnp.zeros((5, 7))
        )
    else:
        twice = lambda p, q, k, n=2: jax.lax.while_loop(
            lambda s: s[0] < n, lambda s: (s[0] + 1, s[1] + scores(p, q, k)), (0, jnp.zeros((5, 7)))
        )[1]
    key = jax.random.key(3)
    # the forward: a stochastically rounded operand
    fwd = qjax.Policy([qjax.OpRule("scores/.*", lhs=stoch, rhs=TOK)])
    y2 = qjax.fake_quantized(twice, fwd, key=key)({}, q, k)
    y1 = qjax.fake_quantized(scores, fwd, key=key)({}, q, k)
    assert not np.allclose(np.asarray(y2), 2 * np.asarray(y1))
    if loop == "scan":  # the integer backward's gradient rounding (a while_loop has no VJP)
        g2 = jax.grad(lambda q: jnp.sum(qjax.fake_quantized(twice, pol, key=key)({}, q, k) * c))(
            jnp.asarray(q)
        )
        g1 = jax.grad(lambda q: jnp.sum(qjax.fake_quantized(scores, pol, key=key)({}, q, k) * c))(
            jnp.asarray(q)
        )
        assert not np.allclose(np.asarray(g2), 2 * np.asarray(g1))
    # and the forward's stochastic rounding of a scanned weight differs per layer too
    w = jnp.asarray(RNG.standard_normal((8, 8)), jnp.float32)
    stack = {"w": jnp.stack([w, w])}
    wpol = qjax.Policy(
        [qjax.Rule("w", weight=qjax.QuantSpec(qjax.int4, channel_axes=(0, -1), rounding="stochastic"))]
    )
    layers = lambda p, x: jax.lax.scan(lambda h, w: (h, x @ w), x, p["w"])[1]
    ys = qjax.fake_quantized(layers, wpol, key=key)(stack, jnp.asarray(q))
    assert not np.array_equal(np.asarray(ys[0]), np.asarray(ys[1]))


def test_a_gradient_format_per_backward_matmul():
    # (dlhs, drhs) = (int8 per token, None): dq as full int8 training gives it, dk the
    # straight-through float cotangent of the fake-quantized op
    q, k, c = (jnp.asarray(a) for a in _data())

    def grads(grad):
        policy = qjax.Policy([qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=grad)])
        return jax.vjp(lambda q, k: qjax.fake_quantized(scores, policy)({}, q, k), q, k)[1](c)

    (dq8, dk8), (dq_ste, dk_ste) = grads(TOK), grads(None)
    dq, dk = grads((TOK, None))
    np.testing.assert_array_equal(dq, dq8)
    np.testing.assert_allclose(dk, dk_ste, rtol=1e-6, atol=1e-6)
    dq, dk = grads([None, TOK])  # a list is read as the pair
    np.testing.assert_allclose(dq, dq_ste, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dk, dk8)
    rule = qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=(TOK, None))
    assert qjax.Policy.from_json(qjax.Policy([rule]).to_json()).op_rules == (rule,)
    with pytest.raises(TypeError, match="at most one None"):
        qjax.OpRule("scores/.*", lhs=TOK, rhs=TOK, grad=(None, None))
