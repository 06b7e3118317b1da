"""Contrastive representation distillation: the loss and the memory banks against a float64
reference written from the authors' code, its gradients against finite differences, the
negatives, and CRD carried through ``distill_step`` / ``distill_train_step``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

from qjax import distill
from qjax.distill.crd import class_negatives, crd_init, crd_loss, uniform_negatives

from . import reference as ref

B, DIM, K = 6, 16, 9


def _problem(n, seed=0):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(B, DIM)).astype(np.float32))
    t = jnp.asarray(rng.normal(size=(B, DIM)).astype(np.float32))
    index = jnp.asarray(rng.choice(n, B, replace=False).astype(np.int32))
    return s, t, index, crd_init(jax.random.key(seed), n, DIM)


def _reference(s, t, index, state, key, n, **kw):
    rows = np.concatenate([np.asarray(index)[:, None], np.asarray(uniform_negatives(key, index, n, K))], 1)
    return ref.crd(s, t, index, rows, state.student_memory, state.teacher_memory,
                   float(state.z_student), float(state.z_teacher), n, **kw)  # fmt: skip


@pytest.mark.parametrize("n", [40, 3000], ids=["every-score", "gathered-rows"])
def test_two_steps_match_the_float64_reference(n):
    s, t, index, state = _problem(n)
    step = jax.jit(lambda s, t, i, st, k: crd_loss(s, t, i, st, k, num_negatives=K, temperature=0.1))
    for it in range(2):  # the first sets Z, the second keeps it
        key = jax.random.key(10 + it)
        want, mem_s, mem_t, z_s, z_t = _reference(s, t, index, state, key, n, tau=0.1)
        loss, state = step(s, t, index, state, key)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(state.student_memory), mem_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.teacher_memory), mem_t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([float(state.z_student), float(state.z_teacher)], [z_s, z_t], rtol=1e-5)
        s, t = t * 0.7 + 0.1, s  # another batch of the same examples
    # rows of other examples are untouched
    others = np.setdiff1d(np.arange(n), np.asarray(index))
    fresh = crd_init(jax.random.key(0), n, DIM)
    np.testing.assert_array_equal(state.student_memory[others], fresh.student_memory[others])


def test_gradients_match_finite_differences_and_skip_the_banks():
    n = 30
    s, t, index, state = _problem(n, seed=1)
    state = state._replace(z_student=jnp.float32(2e3), z_teacher=jnp.float32(3e3))  # Z fixed
    key = jax.random.key(5)
    rows = np.concatenate([np.asarray(index)[:, None], np.asarray(uniform_negatives(key, index, n, K))], 1)
    mem_s, mem_t = state.student_memory, state.teacher_memory

    def f64_loss(s_, t_):
        return ref.crd(s_, t_, index, rows, mem_s, mem_t, 2e3, 3e3, n)[0]

    g_s, g_t, g_state = jax.grad(
        lambda a, b, c: crd_loss(a, b, index, c, key, num_negatives=K)[0], (0, 1, 2)
    )(s, t, state)
    h = 1e-5
    for i, j in [(0, 0), (2, 5), (5, 15)]:
        e = np.zeros((B, DIM))
        e[i, j] = h
        num_s = (f64_loss(np.asarray(s) + e, t) - f64_loss(np.asarray(s) - e, t)) / (2 * h)
        num_t = (f64_loss(s, np.asarray(t) + e) - f64_loss(s, np.asarray(t) - e)) / (2 * h)
        np.testing.assert_allclose(float(g_s[i, j]), num_s, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(float(g_t[i, j]), num_t, rtol=2e-3, atol=2e-4)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_state))


@settings(max_examples=examples(25), deadline=None)
@given(st.integers(2, 50), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_negatives_never_draw_the_positive(n, b, seed):
    rng = np.random.default_rng(seed)
    index = jnp.asarray(rng.integers(0, n, b), jnp.int32)
    neg = np.asarray(_draw(jax.random.key(seed), index, n))
    assert neg.shape == (b, 64) and neg.min() >= 0 and neg.max() < n
    assert not np.any(neg == np.asarray(index)[:, None])


_draw = jax.jit(lambda key, index, n: uniform_negatives(key, index, n, 64))  # n traced: few compiles


def test_negatives_are_uniform_over_the_other_examples():
    index = jnp.asarray([3], jnp.int32)
    counts = np.bincount(
        np.asarray(uniform_negatives(jax.random.key(0), index, 8, 70000)).ravel(), minlength=8
    )
    assert counts[3] == 0
    np.testing.assert_allclose(counts[np.arange(8) != 3] / 70000, 1 / 7, atol=0.01)


@settings(max_examples=examples(20), deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=40), st.integers(0, 2**31 - 1))
def test_class_negatives_never_draw_the_rows_class(labels, seed):
    labels = np.asarray(labels, np.int32)
    if len(set(labels.tolist())) < 2:
        labels[0] = (labels[0] + 1) % 5  # at least two classes
    index = np.random.default_rng(seed).integers(0, len(labels), 6).astype(np.int32)
    neg = np.asarray(_by_class(jax.random.key(seed), index, labels))
    assert neg.shape == (6, 32) and neg.min() >= 0 and neg.max() < len(labels)
    assert not np.any(labels[neg] == labels[index][:, None])


_by_class = jax.jit(lambda key, index, labels: class_negatives(key, index, labels, 32))


def test_class_negatives_are_uniform_over_the_other_classes():
    labels = np.asarray([0, 1, 1, 2, 0, 2, 2, 1, 0, 2], np.int32)
    drawn = class_negatives(jax.random.key(1), jnp.asarray([1]), labels, 60000)
    counts = np.bincount(np.asarray(drawn).ravel(), minlength=10)
    other = labels != 1
    assert counts[~other].sum() == 0
    np.testing.assert_allclose(counts[other] / 60000, 1 / other.sum(), atol=0.01)


def test_explicit_negatives_match_the_reference_without_a_key():
    n = 40
    s, t, index, state = _problem(n, seed=3)
    labels = np.arange(n) % 4
    neg = class_negatives(jax.random.key(2), index, labels, K)
    loss, new = crd_loss(s, t, index, state, None, negatives=neg)
    rows = np.concatenate([np.asarray(index)[:, None], np.asarray(neg)], 1)
    want = ref.crd(s, t, index, rows, state.student_memory, state.teacher_memory, -1.0, -1.0, n)
    np.testing.assert_allclose(float(loss), want[0], rtol=2e-5)
    np.testing.assert_allclose(np.asarray(new.student_memory), want[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"negatives must be \[batch=6, K\]"):
        crd_loss(s, t, index, state, None, negatives=neg[:2])
    with pytest.raises(ValueError, match=r"negatives \(dataset indices\) must lie in \[0, 40\)"):
        crd_loss(s, t, index, state, None, negatives=neg.at[0, 0].set(n))


def test_a_traced_bad_index_gives_nan_gradients_and_keeps_the_state():
    s, t, index, state = _problem(30, seed=4)
    bad = index.at[0].set(35)
    f = jax.jit(jax.value_and_grad(lambda e, i: crd_loss(e, t, i, state, jax.random.key(0))[0]))
    value, grad = f(s, bad)
    assert np.isnan(float(value)) and np.all(np.isnan(np.asarray(grad)))
    _, new = jax.jit(lambda i: crd_loss(s, t, i, state, jax.random.key(0)))(bad)
    for a, b in zip(new, state):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_refused_by_name():
    s, t, index, state = _problem(20)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="PRNG key"):
        crd_loss(s, t, index, state, None)
    with pytest.raises(ValueError, match=r"teacher_embed must be \[batch, 16\]"):
        crd_loss(s, t[:, :8], index, state, key)
    with pytest.raises(ValueError, match="share the batch size"):
        crd_loss(s, t, index[:3], state, key)
    with pytest.raises(ValueError, match=r"index \(dataset indices\) must lie in \[0, 20\), got \[20\]"):
        crd_loss(s, t, index.at[0].set(20), state, key)
    with pytest.raises(ValueError, match="momentum"):
        crd_loss(s, t, index, state, key, momentum=1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        crd_loss(s, t, index, state, key, temperature=0.0)
    with pytest.raises(ValueError, match="num_examples >= 2"):
        crd_init(key, 1, 8)
    traced = jax.jit(lambda i: crd_loss(s, t, i, state, key)[0])(index.at[0].set(-1))
    assert np.isnan(float(traced))  # cannot raise under jit: NaN, never a wrong number
    with pytest.raises(ValueError, match="labels must be \\[N\\]"):
        class_negatives(key, index, np.zeros((4, 2), np.int32), 3)


class Net(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.hidden, name="body")(x))
        return nn.Dense(5, name="head")(h)


N_DATA = 48
X = jax.random.normal(jax.random.key(0), (N_DATA, 12))
Y = jax.random.randint(jax.random.key(1), (N_DATA,), 0, 5)
TEACHER, STUDENT = Net(32), Net(8)
T_VARS, S_VARS = TEACHER.init(jax.random.key(2), X), STUDENT.init(jax.random.key(3), X)
FEAT = "params/head/kernel"  # the penultimate features: the head's input


def crd_kd(student, teacher, batch, adapters, crd_state, key):
    s = distill.apply_adapter(adapters["embed_s"], student.features[FEAT]["input"])
    t = distill.apply_adapter(adapters["embed_t"], teacher.features[FEAT]["input"])
    value, crd_state = distill.crd_loss(s, t, batch["index"], crd_state, key, num_negatives=16)
    kd = distill.kd_loss(student.logits, teacher.logits, batch["y"], 4.0, 0.9)
    return kd + 0.8 * value, {"crd": value}, crd_state


def _adapters():
    return {
        "embed_s": distill.init_adapter(jax.random.key(4), 8, DIM),
        "embed_t": distill.init_adapter(jax.random.key(5), 32, DIM),
    }


def _ds(**kw):
    return distill.distill_step(
        STUDENT.apply, TEACHER.apply, crd_kd, optax.adam(1e-2), student_patterns=[FEAT],
        teacher_patterns=[FEAT], stateful_loss=True, **kw,
    )  # fmt: skip


def test_distill_step_carries_the_banks_and_trains_both_heads():
    ds = _ds()
    state = ds.init(S_VARS, _adapters(), loss_state=crd_init(jax.random.key(6), N_DATA, DIM))
    first = None
    for it in range(40):
        idx = jnp.asarray(np.random.default_rng(it).choice(N_DATA, 16, replace=False), jnp.int32)
        before = state.loss_state
        state, metrics = ds.step(state, T_VARS, {"x": X[idx], "y": Y[idx], "index": idx}, jax.random.key(it))
        first = metrics if first is None else first
        moved = np.any(np.asarray(state.loss_state.student_memory != before.student_memory), axis=1)
        np.testing.assert_array_equal(np.flatnonzero(moved), np.sort(np.asarray(idx)))
    assert float(metrics["crd"]) < float(first["crd"])
    assert float(state.loss_state.z_student) > 0 and float(state.loss_state.z_teacher) > 0
    for name, new in state.params["adapters"].items():  # both embedding heads trained
        assert not np.allclose(new["kernel"], _adapters()[name]["kernel"])
    # the loss draws its negatives with the step key folded with a constant of its own
    idx = jnp.arange(16, dtype=jnp.int32)
    batch = {"x": X[idx], "y": Y[idx], "index": idx}
    _, metrics = ds.loss(state.params, T_VARS, batch, jax.random.key(0), loss_state=state.loss_state)
    assert set(metrics) == {"loss", "crd", "loss_state"}
    adapters, feats = state.params["adapters"], lambda m, v: distill.capture(m.apply, [FEAT])(v, X[idx])[1]
    s = distill.apply_adapter(adapters["embed_s"], feats(STUDENT, state.params["student"])[FEAT]["input"])
    t = distill.apply_adapter(adapters["embed_t"], feats(TEACHER, T_VARS)[FEAT]["input"])
    key = jax.random.fold_in(jax.random.key(0), distill.train._LOSS_KEY)
    want, _ = distill.crd_loss(s, t, idx, state.loss_state, key, num_negatives=16)
    np.testing.assert_allclose(float(metrics["crd"]), float(want), rtol=1e-5)


def test_distill_step_refuses_a_missing_or_unexpected_loss_state():
    ds = _ds()
    with pytest.raises(ValueError, match="stateful_loss=True, loss_state missing"):
        ds.init(S_VARS, _adapters())
    plain = distill.distill_step(STUDENT.apply, TEACHER.apply, distill.kd_objective(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="stateful_loss=False, loss_state given"):
        plain.init(S_VARS, loss_state=crd_init(jax.random.key(0), N_DATA, DIM))
    two = distill.distill_step(
        STUDENT.apply, TEACHER.apply, lambda s, t, b, a, st, k: (0.0, {}), optax.sgd(0.1), stateful_loss=True
    )
    state = two.init(S_VARS, loss_state=crd_init(jax.random.key(0), N_DATA, DIM))
    none = distill.distill_step(
        STUDENT.apply,
        TEACHER.apply,
        lambda s, t, b, a, st, k: (0.0, {}, None),
        optax.sgd(0.1),
        stateful_loss=True,
    )
    with pytest.raises(ValueError, match="returned None as the new loss state"):
        none.step(state, T_VARS, {"x": X, "y": Y})
    with pytest.raises(
        ValueError, match=r"must return \(loss, metrics, new_loss_state\), got tuple of length 2"
    ):
        two.step(state, T_VARS, {"x": X, "y": Y})
    with pytest.raises(ValueError, match="pass the loss state"):
        ds.loss(state.params, T_VARS, {"x": X, "y": Y, "index": jnp.arange(N_DATA)}, jax.random.key(0))
