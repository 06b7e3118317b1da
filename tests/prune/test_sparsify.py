"""sparsify: exact zeros, mask timing and counts, gradient masking, jit, trees, chains, STE, e2e."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qjax.prune.masks import apply_masks
from qjax.prune.pruners import Magnitude, Movement, Random, Saliency, Wanda
from qjax.prune.schedules import one_shot, periodic, polynomial
from qjax.prune.sparsify import (
    SparsifyState,
    dense_masks,
    get_masks,
    get_sparsify_state,
    reset_opt_state,
    sparsify,
)
from qjax.prune.sparsity import NM, target_count


def make_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "l1": {"kernel": jax.random.normal(k1, (12, 10)), "bias": jnp.zeros(10)},
        "l2": {"kernel": jax.random.normal(k2, (10, 7)), "bias": jax.random.normal(k3, (7,))},
    }


def fake_grads(params, i):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(100), i), len(leaves))
    return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def run(tx, params, steps, jit=False, grads_fn=fake_grads):
    """``steps`` updates; returns final params, final state and the stacked (numpy) trace of
    (params, state) after every step. Jitted runs are one ``lax.scan``; eager runs are the
    default (cheaper than compiling for these small trees; sparsify takes Python branches
    when the update flag is concrete)."""

    def body(carry, i):
        p, s = carry
        u, s = tx.update(grads_fn(p, i), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), (p, s)

    carry = (params, tx.init(params))
    if jit:
        carry, trace = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))(carry)
    else:
        outs = []
        for i in range(steps):
            carry, out = body(carry, jnp.int32(i))
            outs.append(out)
        trace = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return carry[0], carry[1], jax.device_get(trace)


def kernels(tree):
    return {k: tree[k]["kernel"] for k in ("l1", "l2")}


def test_exact_zeros_and_counts_follow_the_schedule_with_adam():
    sched = polynomial(0.8, begin=2, end=22, every=4)
    tx = sparsify(optax.adam(0.05), Magnitude(0.8), sched)
    params, _, (ps, sts) = run(tx, make_params(), 30)
    masks = get_masks(sts)
    assert masks["l1"]["bias"] is None and masks["l2"]["bias"] is None
    for name in ("l1", "l2"):
        w, m = ps[name]["kernel"], masks[name]["kernel"]
        n = w[0].size
        assert np.all(w[~m] == 0.0), f"pruned weights of {name} not exactly zero"
        want = np.array([int(target_count(sched.effective(t), n)) for t in range(30)])
        np.testing.assert_array_equal((~m).reshape(30, -1).sum(1), want)
        np.testing.assert_array_equal((w == 0).reshape(30, -1).sum(1), want)  # kept ones moved off 0
        changed = np.any((m[1:] != m[:-1]).reshape(29, -1), axis=1)
        updates = np.array([bool(sched.is_update(t)) for t in range(1, 30)])
        assert not np.any(changed & ~updates), "masks changed at a non-update step"
    np.testing.assert_array_equal(get_sparsify_state(sts).step, np.arange(1, 31))
    assert bool(jnp.all(params["l1"]["bias"] != 0.0))  # biases are never pruned and keep training
    # gradients of pruned weights are masked and their moments reset: Adam's moments stay 0
    adam = get_sparsify_state(sts).inner_state[0]
    for name in ("l1", "l2"):
        m = masks[name]["kernel"]
        assert np.all(adam.mu[name]["kernel"][~m] == 0)
        assert np.all(adam.nu[name]["kernel"][~m] == 0)
        assert np.all(adam.nu[name]["kernel"][m] > 0)


def test_kept_weights_get_the_inner_update_of_masked_grads():
    params = make_params()
    tx = sparsify(optax.adam(0.1), Magnitude(0.5), one_shot(0))
    ref = optax.adam(0.1)
    st, rst = tx.init(params), ref.init(params)
    for i in range(4):
        g = fake_grads(params, i)
        u, st = tx.update(g, st, params)
        masks = get_masks(st)
        ru, rst = ref.update(apply_masks(g, masks), rst, params)
        for name in ("l1", "l2"):
            m = masks[name]["kernel"]
            np.testing.assert_array_equal(u[name]["kernel"][m], ru[name]["kernel"][m])
            np.testing.assert_array_equal(u[name]["kernel"][~m], -params[name]["kernel"][~m])
            np.testing.assert_array_equal(u[name]["bias"], ru[name]["bias"])
        params = optax.apply_updates(params, u)


def test_jit_matches_eager():
    sched = polynomial(0.7, 1, 5, 2)
    for pruner in (Movement(0.7),):  # a pruner with state and gradients
        tx = sparsify(optax.adam(0.05), pruner, sched, key=3)
        pj, sj, _ = run(tx, make_params(), 6, jit=True)
        pe, se, _ = run(tx, make_params(), 6, jit=False)
        for a, b in zip(jax.tree.leaves(get_masks(sj)), jax.tree.leaves(get_masks(se))):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(jax.tree.leaves(pj), jax.tree.leaves(pe)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(a == 0, b == 0)


def test_grad_pruner_sees_dense_grads_and_random_pruner_uses_the_key():
    # Saliency |w*g|: the pruner gets the dense gradient, not the masked one
    params = make_params()
    tx = sparsify(optax.sgd(0.0), Saliency(0.5), one_shot(0))
    g = fake_grads(params, 0)
    _, st = tx.update(g, tx.init(params), params)
    want = Saliency(0.5).masks(params, 0.5, grads=g)
    for a, b in zip(jax.tree.leaves(get_masks(st)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # different keys -> different random masks, same counts
    m = [
        get_masks(run(sparsify(optax.sgd(0.1), Random(0.5), one_shot(0), key=k), params, 1, jit=False)[1])
        for k in (0, 1)
    ]
    assert not bool(jnp.array_equal(m[0]["l1"]["kernel"], m[1]["l1"]["kernel"]))
    assert int(m[0]["l1"]["kernel"].sum()) == int(m[1]["l1"]["kernel"].sum()) == 60


def test_targetless_schedule_takes_the_pruner_sparsity():
    tx = sparsify(optax.sgd(0.1), Magnitude(0.25), periodic(5))
    _, st, _ = run(tx, make_params(), 1, jit=False)
    assert int((~get_masks(st)["l1"]["kernel"]).sum()) == 30
    # a schedule's own target wins over the pruner's
    tx = sparsify(optax.sgd(0.1), Magnitude(0.25), one_shot(0, target=0.5))
    _, st, _ = run(tx, make_params(), 1, jit=False)
    assert int((~get_masks(st)["l1"]["kernel"]).sum()) == 60


def test_wanda_state_nm_type_and_dense_masks():
    params = make_params()
    # Wanda gets its activation norms as the initial pruner state
    norms = {"l1/kernel": jnp.linspace(0.0, 2.0, 12)[:, None], "l2/kernel": jnp.ones((10, 1))}
    tx = sparsify(optax.adam(0.1), Wanda(0.5), one_shot(0), pruner_state=norms)
    p, st, _ = run(tx, params, 2)
    want = Wanda(0.5).masks(params, act_norms=norms)
    for a, b in zip(jax.tree.leaves(get_masks(st)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    # N:M masks (fixed density) through sparsify: exactly 2 of every 4 along the input axis
    tx = sparsify(
        optax.sgd(0.1), Magnitude(sparsity_type=NM(2, 4), rules=((r"l2/kernel", None),)), one_shot(1)
    )
    p, st, _ = run(tx, params, 3)
    m = get_masks(st)
    assert m["l2"]["kernel"] is None
    np.testing.assert_array_equal(m["l1"]["kernel"].reshape(3, 4, 10).sum(1), 2)
    assert int((p["l1"]["kernel"] == 0).sum()) == 60
    d = dense_masks(Magnitude(), params)
    assert d["l1"]["bias"] is None and bool(jnp.all(d["l1"]["kernel"])) and d["l1"]["kernel"].dtype == bool


def test_errors():
    tx = sparsify(optax.adam(1e-3), Magnitude(0.5), one_shot(0))
    params = make_params()
    st = tx.init(params)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(params, st)
    with pytest.raises(TypeError, match="schedule"):
        sparsify(optax.adam(1e-3), Magnitude(0.5), 0.5)
    with pytest.raises(TypeError, match="pruner"):
        sparsify(optax.adam(1e-3), "magnitude", one_shot(0))
    with pytest.raises(ValueError, match="no sparsify states"):
        get_masks(optax.adam(1e-3).init(params))


def test_linen_variables():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(7, name="Dense_1")(nn.relu(nn.Dense(10, name="Dense_0")(x)))

    variables = MLP().init(jax.random.PRNGKey(0), jnp.ones((1, 12)))
    tx = sparsify(optax.adam(0.01), Magnitude(0.75, rules=((r"params/Dense_1/kernel", 0.5),)), one_shot(1))
    v, st, _ = run(tx, variables, 4)
    masks = get_masks(st)
    assert masks["params"]["Dense_0"]["bias"] is None
    assert int((v["params"]["Dense_0"]["kernel"] == 0).sum()) == 90
    assert int((v["params"]["Dense_1"]["kernel"] == 0).sum()) == 35
    assert MLP().apply(v, jnp.ones((2, 12))).shape == (2, 7)


def test_nnx_state():
    model = nnx.Sequential(nnx.Linear(12, 10, rngs=nnx.Rngs(0)), nnx.Linear(10, 7, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = sparsify(optax.adam(0.01), Magnitude(0.5), polynomial(0.5, 0, 4, 2))
    state = tx.init(params)
    x = jnp.ones((2, 12))
    grad_fn = jax.jit(jax.grad(lambda p: (nnx.merge(graphdef, p)(x) ** 2).sum()))
    for _ in range(6):
        u, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, u)
    assert isinstance(params, nnx.State)
    masks = get_masks(state)
    kernels_ = [w for w in jax.tree.leaves(params) if w.ndim == 2]
    mask_leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    assert len(mask_leaves) == 2
    for w, m in zip(kernels_, mask_leaves):
        assert int((w == 0).sum()) == w.size // 2 and bool(jnp.all(w[~m] == 0))
    # the same under jit
    step = jax.jit(tx.update)
    u, state = step(grad_fn(params), state, params)
    params = optax.apply_updates(params, u)
    assert all(int((w == 0).sum()) == w.size // 2 for w in jax.tree.leaves(params) if w.ndim == 2)
    nnx.update(model, params)
    assert model(x).shape == (2, 7)


def test_inside_chain_multisteps_and_inject_hyperparams():
    params = make_params()
    variants = {
        "chain_after": optax.chain(
            optax.clip_by_global_norm(1.0), sparsify(optax.adam(0.05), Magnitude(0.5), one_shot(0))
        ),
        "inject": optax.inject_hyperparams(
            lambda learning_rate: sparsify(
                optax.adam(learning_rate), Magnitude(0.5), polynomial(0.5, 0, 2, 1)
            )
        )(learning_rate=0.05),
        "multisteps": optax.MultiSteps(
            sparsify(optax.adam(0.05), Magnitude(0.5), one_shot(1)), every_k_schedule=2
        ),
    }
    for name, tx in variants.items():
        p, st, _ = run(tx, params, 6, jit=name == "multisteps")  # MultiSteps' own cond retraces eagerly
        masks = get_masks(st)
        assert isinstance(get_sparsify_state(st), SparsifyState)
        for k in ("l1", "l2"):
            m = masks[k]["kernel"]
            assert int((~m).sum()) == m.size // 2, name
            assert bool(jnp.all(p[k]["kernel"][~m] == 0)), name
            assert bool(jnp.all(p[k]["kernel"][m] != 0)), name
        if name == "multisteps":
            assert int(get_sparsify_state(st).step) == 3


def test_reset_opt_state_generic():
    """Zeroes params-shaped state entries at the positions, for any optax state, leaves the rest."""
    params = make_params()
    pos = jax.tree.map(
        lambda x: (jnp.arange(x.size).reshape(x.shape) % 3 == 0) if x.ndim == 2 else None, params
    )
    labels = {"l1": {"kernel": "a", "bias": "b"}, "l2": {"kernel": "a", "bias": "b"}}
    cases = {  # optimizer -> number of params-shaped kernel leaves in its state
        "adam": (optax.adam(0.1), 4),
        "chain_sgd_momentum": (optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9)), 2),
        "lion": (optax.lion(0.1), 2),
        "adafactor_unfactored": (optax.adafactor(0.1), 2),
        "adafactor_factored": (optax.adafactor(0.1, min_dim_size_to_factor=4), 0),  # v_row/v_col left alone
        "inject": (optax.inject_hyperparams(optax.adam)(learning_rate=0.1), 4),
        "masked": (optax.masked(optax.adam(0.1), jax.tree.map(lambda x: x.ndim == 2, params)), 4),
        "multi_transform": (
            optax.multi_transform({"a": optax.adam(0.1), "b": optax.sgd(0.1, 0.9)}, labels),
            4,
        ),
    }
    for name, (tx, expected) in cases.items():
        st = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, tx.init(params))
        for with_tx in (tx, None):  # optax's placeholder mapping and the structure walk agree
            out = reset_opt_state(st, pos, params, with_tx)
            n_reset = 0
            for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(out)):
                if a.shape in ((12, 10), (10, 7)):
                    m = jnp.arange(a.size).reshape(a.shape) % 3 == 0
                    assert bool(jnp.all(b[m] == 0)) and bool(jnp.all(b[~m] == a[~m])), name
                    n_reset += 1
                else:
                    np.testing.assert_array_equal(a, b, err_msg=name)
            assert n_reset == expected, (name, with_tx is None)


def test_ste_mode_keeps_params_dense_and_updates_masks():
    sched = polynomial(0.5, 0, 6, 2)
    tx = sparsify(optax.sgd(0.1), Magnitude(0.5), sched, ste=True)
    p0 = make_params()
    g = fake_grads(p0, 0)
    p, st, _ = run(tx, p0, 8, grads_fn=lambda p, i: g)
    for name in ("l1", "l2"):  # plain SGD on the dense params
        np.testing.assert_allclose(p[name]["kernel"], p0[name]["kernel"] - 0.8 * g[name]["kernel"], rtol=1e-5)
    m = get_masks(st)["l1"]["kernel"]
    assert int((~m).sum()) == 60
    assert bool(jnp.all(p["l1"]["kernel"][~m] != 0))


def test_end_to_end_mlp_gradual_magnitude():
    x = jax.random.normal(jax.random.PRNGKey(0), (256, 8))
    w_true = jax.random.normal(jax.random.PRNGKey(1), (8, 1))
    y = jnp.sin(x @ w_true) + 0.1 * x[:, :1]

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "l1": {"kernel": jax.random.normal(k1, (8, 64)) * 0.3, "bias": jnp.zeros(64)},
            "l2": {"kernel": jax.random.normal(k2, (64, 1)) * 0.1, "bias": jnp.zeros(1)},
        }

    def loss_fn(p):
        h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

    tx = sparsify(optax.adam(0.02), Magnitude(0.8), polynomial(0.8, begin=50, end=250, every=25))
    params = init(jax.random.PRNGKey(2))
    state = tx.init(params)

    @jax.jit
    def train(params, state):
        def body(c, _):
            p, s = c
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        return jax.lax.scan(body, (params, state), None, length=400)

    (params, state), losses = train(params, state)
    masks = get_masks(state)
    for name in ("l1", "l2"):
        w, m = params[name]["kernel"], masks[name]["kernel"]
        assert int((w == 0).sum()) == int(target_count(0.8, w.size))
        assert bool(jnp.all(w[~m] == 0))
    assert float(losses[-1]) < 0.5 * float(losses[0])
    assert float(loss_fn(params)) < 0.5 * float(losses[0])
