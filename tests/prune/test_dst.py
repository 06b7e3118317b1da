"""Dynamic sparse training (SET, RigL): exact drop/regrow, counts, zero-init regrowth, and the
optimizer-state reset at exactly the changed positions for several optax optimizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax.prune.dst import SET, RigL, drop_and_grow
from qjax.prune.schedules import periodic
from qjax.prune.sparsify import get_masks, get_sparsify_state, sparsify
from qjax.prune.sparsity import NM, target_count

SHAPES = {"l1": (12, 10), "l2": (10, 7)}


def make_params(seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "l1": {"kernel": jax.random.normal(keys[0], SHAPES["l1"]), "bias": jnp.zeros(10)},
        "l2": {"kernel": jax.random.normal(keys[1], SHAPES["l2"]), "bias": jax.random.normal(keys[2], (7,))},
    }


def fake_grads(params, i):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(100), i), len(leaves))
    return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def reference_drop_grow(mask, drop, grow, fraction):
    """NumPy reference: k = floor(f * active); drop k lowest active (ties: lower index),
    grow k highest among inactive-after-drop (ties: lower index)."""
    m = mask.reshape(-1).copy()
    k = math.floor(np.float32(fraction) * np.float32(m.sum()))
    active = np.flatnonzero(m)
    order = sorted(active, key=lambda i: (drop.reshape(-1)[i], i))
    m[order[:k]] = False
    inactive = np.flatnonzero(~m)
    order = sorted(inactive, key=lambda i: (-grow.reshape(-1)[i], i))
    m[order[:k]] = True
    return m.reshape(mask.shape), k


def test_drop_and_grow_matches_reference_and_keeps_counts():
    f = jax.jit(drop_and_grow)
    rng = np.random.default_rng(0)
    for trial in range(40):
        mask = rng.random((9, 7)) < rng.uniform(0.05, 0.95)
        drop = np.round(rng.normal(size=(9, 7)), 1).astype(np.float32)  # rounding makes ties
        grow = np.round(rng.normal(size=(9, 7)), 1).astype(np.float32)
        frac = rng.choice([0.0, 0.1, 0.3, 0.5, 1.0, rng.random()])
        got = np.asarray(f(jnp.asarray(mask), jnp.asarray(drop), jnp.asarray(grow), frac))
        want, _ = reference_drop_grow(mask, drop, grow, frac)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
        assert got.sum() == mask.sum()


def test_drop_and_grow_doc_example_and_edge_cases():
    drop_and_grow_ = jax.jit(drop_and_grow)
    m = jnp.array([True, True, False, False])
    out = drop_and_grow_(m, jnp.array([1.0, 2.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 5.0, 1.0]), 0.5)
    assert out.tolist() == [False, True, True, False]
    # all active or none active: nothing can move
    full = jnp.ones(5, bool)
    assert drop_and_grow_(full, jnp.arange(5.0), jnp.arange(5.0), 0.5).tolist() == [True] * 5
    assert drop_and_grow_(~full, jnp.arange(5.0), jnp.arange(5.0), 0.5).tolist() == [False] * 5
    # NaN grow scores are regrown last
    out = drop_and_grow_(jnp.array([True, False, False]), jnp.zeros(3), jnp.array([0.0, jnp.nan, -1.0]), 1.0)
    assert out.tolist() == [True, False, False]  # the just dropped weight (score 0) beats -1 and NaN


def test_rigl_cosine_drop_fraction():
    r = RigL(drop_fraction=0.3, end=1000)
    for t in (0, 1, 250, 500, 999, 1000):
        want = 0.3 / 2 * (1 + math.cos(math.pi * t / 1000))
        assert float(r.fraction_at(t)) == pytest.approx(want, abs=1e-6)
    assert float(r.fraction_at(1001)) == 0.0
    assert float(SET(drop_fraction=0.2).fraction_at(12345)) == pytest.approx(0.2)
    assert float(RigL(drop_fraction=0.3).fraction_at(10**6)) == pytest.approx(0.3)  # no end: constant
    # sparsify binds the end from the schedule
    assert RigL().with_schedule(periodic(10, start=10, end=500)).end == 500
    assert RigL(end=7).with_schedule(periodic(10, start=10, end=500)).end == 7


def test_initial_masks_are_random_and_exact():
    params = make_params()
    for pr in (SET(0.8), RigL(0.6, distribution="erk"), RigL(0.5, scope="global")):
        m = pr.init_masks(params, key=jax.random.PRNGKey(1))
        assert m["l1"]["bias"] is None
        zeros = sum(int((~m[k]["kernel"]).sum()) for k in SHAPES)
        assert zeros == target_count(pr.sparsity, 120 + 70)
        if pr.distribution == "uniform" and pr.scope == "layer":
            for k, shape in SHAPES.items():
                assert int((~m[k]["kernel"]).sum()) == target_count(pr.sparsity, math.prod(shape))
        m2 = pr.init_masks(params, key=jax.random.PRNGKey(2))
        assert not bool(jnp.array_equal(m["l1"]["kernel"], m2["l1"]["kernel"]))


OPTIMIZERS = {
    "adam": lambda: optax.adam(0.05),
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "lion": lambda: optax.lion(0.01),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)),
    "inject": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
    "adafactor_factored": lambda: optax.adafactor(0.05, min_dim_size_to_factor=4),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_dst_counts_zero_regrowth_and_state_reset(opt):
    inner = OPTIMIZERS[opt]()
    pruner = RigL(0.7, drop_fraction=0.5) if opt != "lion" else SET(0.7, drop_fraction=0.5)
    sched = periodic(2, start=2, end=7)
    tx = sparsify(inner, pruner, sched, key=5)
    params = make_params()
    state = tx.init(params)
    m0 = get_masks(state)
    counts = {k: int(m0[k]["kernel"].sum()) for k in SHAPES}
    n_changed = 0
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)  # eager: 9 s for adafactor
    for t in range(9):
        g = fake_grads(params, t)
        before = get_sparsify_state(state)
        u, state = update(g, state, params)
        new_params = optax.apply_updates(params, u)
        after = get_sparsify_state(state)
        old_m, new_m = before.masks, after.masks
        # reference inner step: grads masked with the new masks, no reset
        masked_g = jax.tree.map(
            lambda m, x: x if m is None else jnp.where(m, x, 0.0), new_m, g, is_leaf=lambda x: x is None
        )
        _, ref_inner = inner_update(masked_g, before.inner_state, params)
        changed = {SHAPES[k]: np.asarray(old_m[k]["kernel"] != new_m[k]["kernel"]) for k in SHAPES}
        for k in SHAPES:
            om, nm = np.asarray(old_m[k]["kernel"]), np.asarray(new_m[k]["kernel"])
            w = np.asarray(new_params[k]["kernel"])
            assert nm.sum() == counts[k], f"step {t}: active count of {k} changed"
            assert np.all(w[~nm] == 0.0)
            assert np.all(w[nm & ~om] == 0.0), "regrown weights must start at zero"
            if not bool(sched.is_update(t)):
                np.testing.assert_array_equal(om, nm)
            n_changed += int((om != nm).sum())
        for ref, got in zip(jax.tree.leaves(ref_inner), jax.tree.leaves(after.inner_state)):
            ref, got = np.asarray(ref), np.asarray(got)
            c = changed.get(ref.shape)
            if c is None or not bool(sched.is_update(t)):
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
            else:  # params-shaped leaf: zero exactly at changed positions, untouched elsewhere
                assert np.all(got[c] == 0), f"{opt}: state not reset at changed positions"
                np.testing.assert_allclose(got[~c], ref[~c], rtol=1e-6, atol=1e-7)
        params = new_params
    assert n_changed > 0  # the masks did move
    assert int(get_sparsify_state(state).pruner_state) == 9


def test_rigl_regrows_by_gradient_and_set_at_random():
    params = make_params()
    m = RigL(0.7).init_masks(params, key=jax.random.PRNGKey(0))
    g = fake_grads(params, 0)
    new = RigL(0.7, drop_fraction=0.3).masks(params, grads=g, state=jnp.int32(1), masks=m)
    for k in SHAPES:
        ref, _ = reference_drop_grow(
            np.asarray(m[k]["kernel"]),
            np.abs(np.asarray(params[k]["kernel"])),
            np.abs(np.asarray(g[k]["kernel"])),
            0.3,
        )
        np.testing.assert_array_equal(new[k]["kernel"], ref)
    a = SET(0.7).masks(params, key=jax.random.PRNGKey(1), state=jnp.int32(1), masks=m)
    b = SET(0.7).masks(params, key=jax.random.PRNGKey(2), state=jnp.int32(1), masks=m)
    assert not bool(jnp.array_equal(a["l1"]["kernel"], b["l1"]["kernel"]))
    assert int(a["l1"]["kernel"].sum()) == int(m["l1"]["kernel"].sum())


def test_rigl_jit_under_sparsify_end_to_end():
    """RigL in a jitted lax.scan: counts fixed, loss goes down, updates stop at T_end."""
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 12))
    y = jnp.tanh(x @ jax.random.normal(jax.random.PRNGKey(1), (12, 7)))

    def loss_fn(p):
        h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return jnp.mean((h @ p["l2"]["kernel"] + p["l2"]["bias"] - y) ** 2)

    sched = periodic(10, start=10, end=100)
    tx = sparsify(optax.adam(0.02), RigL(0.6, drop_fraction=0.3), sched)
    params = make_params()
    state = tx.init(params)

    def body(c, _):
        p, s = c
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), (loss, get_masks(s))

    (params, state), (losses, masks) = jax.jit(lambda c: jax.lax.scan(body, c, None, length=150))(
        (params, state)
    )
    for k in SHAPES:
        mk = np.asarray(masks[k]["kernel"]).reshape(150, -1)
        assert np.all(mk.sum(1) == mk[0].sum())
        moved = np.flatnonzero(np.any(mk[1:] != mk[:-1], axis=1)) + 1
        assert set(moved) <= set(range(10, 101, 10))
        assert np.all(np.asarray(params[k]["kernel"])[~mk[-1].reshape(SHAPES[k])] == 0)
    assert float(losses[-1]) < 0.5 * float(losses[0])


def test_errors():
    with pytest.raises(ValueError, match="Unstructured"):
        RigL(sparsity_type=NM(2, 4))
    with pytest.raises(ValueError, match="drop_fraction"):
        SET(drop_fraction=1.5)
    with pytest.raises(ValueError, match="decay"):
        RigL(decay="linear")
    params = make_params()
    m = RigL(0.5).init_masks(params, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="gradients"):
        RigL(0.5).masks(params, masks=m)
