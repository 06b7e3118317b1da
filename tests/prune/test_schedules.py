"""Pruning schedules: closed-form values (float64 reference), update steps, jit, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.prune.schedules import one_shot, periodic, polynomial


def zhu_gupta(t, s_f, t0, end, power=3.0, s_i=0.0):
    """Float64 reference of Zhu & Gupta's schedule (clamped outside [t0, end])."""
    frac = min(max((t - t0) / (end - t0), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - frac) ** power


@given(
    t=st.integers(0, 20_000),
    s_f=st.floats(0.0, 1.0),
    s_i=st.floats(0.0, 0.5),
    t0=st.integers(0, 5000),
    span=st.integers(1, 10_000),
    every=st.integers(1, 500),
    power=st.sampled_from([1.0, 2.0, 3.0, 4.5]),
)
def test_polynomial_matches_closed_form(t, s_f, s_i, t0, span, every, power):
    s = polynomial(s_f, t0, t0 + span, every, power, initial=s_i)
    assert float(s(t)) == pytest.approx(zhu_gupta(t, s_f, t0, t0 + span, power, s_i), abs=2e-6)
    # update steps: t0 + k*every up to end, and end itself
    expect_update = t0 <= t <= t0 + span and ((t - t0) % every == 0 or t == t0 + span)
    assert bool(s.is_update(t)) == expect_update
    assert (t in s.update_steps(t + 1)) == expect_update
    # effective: value at the last update step <= t, 0 before the first
    if t < t0:
        last = None
    elif t >= t0 + span:
        last = t0 + span
    else:
        last = t0 + (t - t0) // every * every
    ref = 0.0 if last is None else zhu_gupta(last, s_f, t0, t0 + span, power, s_i)
    assert float(s.effective(t)) == pytest.approx(ref, abs=2e-6)


def test_polynomial_paper_values_and_update_steps():
    s = polynomial(0.9, begin=100, end=1100, every=100)
    assert s.update_steps(1300) == list(range(100, 1101, 100))
    assert float(s(100)) == 0.0
    assert float(s(1100)) == pytest.approx(0.9)
    assert float(s(600)) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert float(s(5000)) == pytest.approx(0.9)
    # end not a multiple of every: end is an update step, so the target is reached
    s2 = polynomial(0.5, 0, 25, 10)
    assert s2.update_steps(40) == [0, 10, 20, 25]
    assert float(s2.effective(39)) == pytest.approx(0.5)
    # sparsity is monotone non-decreasing
    vals = np.asarray(jax.jit(jax.vmap(s))(jnp.arange(1500)))
    assert np.all(np.diff(vals) >= -1e-7)


def test_one_shot_and_periodic():
    s = one_shot(5, target=0.75)
    assert s.update_steps(20) == [5]
    assert [float(s(t)) for t in (0, 4, 5, 100)] == [0.0, 0.0, 0.75, 0.75]
    assert [float(s.effective(t)) for t in (4, 5, 6)] == [0.0, 0.75, 0.75]
    p = periodic(4, start=3, end=15, target=0.5)
    assert p.update_steps(30) == [3, 7, 11, 15]
    assert p.last_step == 15 and s.last_step == 5
    assert periodic(2).with_target(0.3).update_steps(7) == [0, 2, 4, 6]
    flags = jax.jit(jax.vmap(p.is_update))(jnp.arange(30))
    assert np.flatnonzero(np.asarray(flags)).tolist() == [3, 7, 11, 15]
    assert periodic(2).last_step is None
    assert float(periodic(2, start=4, target=0.3)(3)) == 0.0


def test_jit_and_scan_with_traced_step():
    s = polynomial(0.8, 10, 110, 10)
    f = jax.jit(lambda t: (s(t), s.is_update(t), s.effective(t)))
    for t in (0, 10, 15, 60, 110, 200):
        v, u, e = f(jnp.int32(t))
        # XLA may contract the final multiply-add into an FMA under jit: equal up to one ulp
        assert float(v) == pytest.approx(float(s(t)), abs=1e-7)
        assert float(e) == pytest.approx(float(s.effective(t)), abs=1e-7)
        assert bool(u) == bool(s.is_update(t))

    def body(c, t):
        return c + s.is_update(t).astype(jnp.int32), s(t)

    n, vals = jax.lax.scan(body, 0, jnp.arange(200))
    assert int(n) == 11 and vals.shape == (200,)


def test_usable_as_optax_schedule():
    # a schedule is a step -> scalar function, like optax schedules: inject it as a hyperparameter
    s = polynomial(0.5, 0, 10, 1)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=s)
    state = tx.init(jnp.zeros(3))
    for _ in range(4):
        _, state = tx.update(jnp.ones(3), state)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(zhu_gupta(3, 0.5, 0, 10), abs=1e-6)


def test_targetless_schedules_raise_clearly():
    for s in (one_shot(3), periodic(5)):
        with pytest.raises(ValueError, match="no target sparsity"):
            s(4)
        with pytest.raises(ValueError, match="no target sparsity"):
            s.effective(4)
        assert bool(s.is_update(s.last_step or 0))  # update timing needs no target


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: polynomial(0.5, 10, 10, 1), "`end`"),
        (lambda: polynomial(0.5, 10, 5, 1), "`end`"),
        (lambda: polynomial(0.5, 0, 10, 0), "`every`"),
        (lambda: polynomial(1.5, 0, 10, 1), "`target`"),
        (lambda: polynomial(-0.1, 0, 10, 1), "`target`"),
        (lambda: polynomial(math.nan, 0, 10, 1), "`target`"),
        (lambda: polynomial(0.5, 0, 10, 1, initial=2.0), "`initial`"),
        (lambda: polynomial(0.5, -1, 10, 1), "`begin`"),
        (lambda: polynomial(0.5, 0, 10, 1, power=0), "`power`"),
        (lambda: periodic(0), "`every`"),
        (lambda: periodic(-3), "`every`"),
        (lambda: periodic(2, start=5, end=5), "`end`"),
        (lambda: periodic(2, start=-1), "`start`"),
        (lambda: periodic(2, target=1.01), "`target`"),
        (lambda: one_shot(-1), "`step`"),
        (lambda: one_shot(0, target=-0.5), "`target`"),
        (lambda: periodic(3).with_target(7.0), "`target`"),
    ],
)
def test_validation_names_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_non_integer_steps_rejected():
    with pytest.raises(TypeError, match="`every`"):
        periodic(2.5)
    with pytest.raises(TypeError, match="`begin`"):
        polynomial(0.5, 0.5, 10, 1)
