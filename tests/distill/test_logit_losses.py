"""Logit losses (KD, DKD, DIST, top-k cache) against float64 references; gradients;
the T² scaling; numerical stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples
from jax.test_util import check_grads

from qjax import distill
from qjax.distill.soft_targets import kl_tempered

from . import reference as ref

B, C = 16, 10


def _logits(seed, scale=3.0, shape=(B, C)):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32)


def _labels(seed, shape=(B,)):
    return np.random.default_rng(seed + 100).integers(0, C, size=shape).astype(np.int32)


# -- kd_loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("soft", ["kl", "ce"])
@pytest.mark.parametrize("t,alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3)])
def test_kd_matches_float64_reference(soft, t, alpha):
    zs, zt, y = _logits(0), _logits(1), _labels(0)
    got = distill.kd_loss(zs, zt, y, t, alpha, soft=soft, reduction="none")
    np.testing.assert_allclose(got, ref.kd(zs, zt, y, t, alpha, soft=soft), rtol=2e-5, atol=1e-5)
    mean = distill.kd_loss(zs, zt, y, t, alpha, soft=soft)
    np.testing.assert_allclose(mean, ref.kd(zs, zt, y, t, alpha, soft=soft).mean(), rtol=2e-5)


@settings(max_examples=examples(30))
@given(
    scale=st.sampled_from([1.0, 30.0, 1e3, 1e4]),
    t=st.sampled_from([0.5, 1.0, 4.0, 100.0, 1e3]),
    eps=st.sampled_from([0.0, 0.1]),
    standardize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kd_stable_for_large_logits_and_temperatures(scale, t, eps, standardize, seed):
    zs, zt, y = _logits(seed, scale), _logits(seed + 1, scale), _labels(seed)
    got = np.asarray(
        distill.kd_loss(zs, zt, y, t, 0.7, label_smoothing=eps, standardize=standardize, reduction="none")
    )
    want = ref.kd(zs, zt, y, t, 0.7, eps=eps, standardize=standardize)
    assert np.all(np.isfinite(got))
    # float32 inputs: ~1e-4 of the largest term even where the KL cancels (high T)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    g = jax.grad(lambda z: distill.kd_loss(z, zt, y, t, 0.7, label_smoothing=eps))(zs)
    assert np.all(np.isfinite(np.asarray(g)))


def test_kl_and_ce_forms_differ_by_teacher_entropy_and_share_gradients():
    zs, zt, y = _logits(2), _logits(3), _labels(2)
    t = 3.0
    kl = distill.soft_target_loss(zs, zt, t, soft="kl", reduction="none")
    ce = distill.soft_target_loss(zs, zt, t, soft="ce", reduction="none")
    q = jax.nn.softmax(zt / t)
    entropy = -jnp.sum(q * jnp.log(q), -1)
    np.testing.assert_allclose(ce - kl, t * t * entropy, rtol=1e-5, atol=1e-5)
    gk = jax.grad(lambda z: distill.kd_loss(z, zt, y, t, 0.5, soft="kl"))(zs)
    gc = jax.grad(lambda z: distill.kd_loss(z, zt, y, t, 0.5, soft="ce"))(zs)
    np.testing.assert_allclose(gk, gc, rtol=1e-5, atol=1e-7)


def test_label_smoothing_and_soft_labels():
    zs, zt, y = _logits(4), _logits(5), _labels(4)
    got = distill.kd_loss(zs, zt, y, 2.0, 0.4, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(got, ref.kd(zs, zt, y, 2.0, 0.4, eps=0.1), rtol=2e-5, atol=1e-5)
    soft_y = jax.nn.softmax(_logits(6))
    got = distill.kd_loss(zs, zt, soft_y, 2.0, 0.4, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(got, ref.kd(zs, zt, soft_y, 2.0, 0.4, eps=0.1), rtol=2e-5, atol=1e-5)
    # optax agrees on the smoothed hard term (alpha = 0)
    import optax

    hard = distill.kd_loss(zs, zt, y, 2.0, 0.0, label_smoothing=0.1, reduction="none")
    smooth = optax.smooth_labels(jax.nn.one_hot(y, C), 0.1)
    np.testing.assert_allclose(hard, optax.softmax_cross_entropy(zs, smooth), rtol=1e-5)


def test_kd_without_labels_and_reductions():
    zs, zt = _logits(7), _logits(8)
    np.testing.assert_allclose(
        distill.kd_loss(zs, zt, None, 4.0, 1.0), distill.soft_target_loss(zs, zt, 4.0), rtol=1e-6
    )
    with pytest.raises(ValueError, match="alpha=1"):
        distill.kd_loss(zs, zt, None, 4.0, 0.5)
    per = distill.kd_loss(zs, zt, _labels(8), reduction="none")
    assert per.shape == (B,)
    np.testing.assert_allclose(distill.kd_loss(zs, zt, _labels(8), reduction="sum"), per.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        distill.kd_loss(zs, zt, _labels(8), reduction="avg")
    # extra leading axes (e.g. [batch, sequence, vocab]) are example axes
    z3s, z3t, y3 = _logits(9, shape=(2, 3, C)), _logits(10, shape=(2, 3, C)), _labels(9, (2, 3))
    np.testing.assert_allclose(
        distill.kd_loss(z3s, z3t, y3, reduction="none"), ref.kd(z3s, z3t, y3, 4.0, 0.9), rtol=2e-5, atol=1e-5
    )


def _f64(*arrays):
    return tuple(jnp.asarray(a, jnp.float64) for a in arrays)


@pytest.mark.parametrize("soft,t,order", [("kl", 3.0, 2), ("kl", 30.0, 1), ("ce", 1.0, 1)])
def test_kd_gradients(soft, t, order):
    zs, zt, y = _logits(11, 1.0), _logits(12, 1.0), _labels(11)
    with jax.enable_x64(True):
        f = jax.jit(lambda zs, zt: distill.kd_loss(zs, zt, y, t, 0.6, soft=soft, label_smoothing=0.05))
        check_grads(f, _f64(zs, zt), order=order, modes=["rev"])


def test_kd_gradient_matches_closed_form():
    """d/dz_s of α·T²·KL = α·T·(p − q) (per example, mean over the batch)."""
    zs, zt, y = _logits(13), _logits(14), _labels(13)
    t = 5.0
    g = jax.grad(lambda z: distill.kd_loss(z, zt, y, t, 1.0))(zs)
    p, q = jax.nn.softmax(zs / t), jax.nn.softmax(zt / t)
    np.testing.assert_allclose(g, t * (p - q) / B, rtol=1e-4, atol=1e-7)


def test_t_squared_scaling_makes_gradient_magnitude_temperature_independent():
    """At high T the soft-term gradient times T² tends to (z_s − z_t)/(C·B) for zero-mean
    logits (Hinton et al. §2.1), so its size does not depend on T."""
    zs, zt = _logits(15, 1.0), _logits(16, 1.0)
    zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
    grads = {}
    for t in (20.0, 50.0, 200.0):
        grads[t] = np.asarray(jax.grad(lambda z, t=t: distill.soft_target_loss(z, zt, t))(zs), np.float64)
    limit = (zs - zt) / (C * B)
    norms = {t: np.linalg.norm(g) for t, g in grads.items()}
    assert abs(norms[50.0] / norms[200.0] - 1) < 0.02
    assert abs(norms[20.0] / norms[200.0] - 1) < 0.05
    np.testing.assert_allclose(grads[200.0], limit, rtol=0, atol=5e-3 * np.abs(limit).max())
    # without the T² factor the gradient would shrink like 1/T²
    raw = np.linalg.norm(jax.grad(lambda z: distill.soft_target_loss(z, zt, 200.0) / 200.0**2)(zs))
    assert raw < norms[200.0] / 1e4


def test_standardize_matches_reference_and_is_shift_scale_invariant():
    zs, zt, y = _logits(17), _logits(18), _labels(17)
    np.testing.assert_allclose(distill.standardize_logits(zs), ref.standardize_ref(zs), rtol=1e-5, atol=1e-6)
    base = distill.kd_loss(zs, zt, y, 2.0, 1.0, standardize=True)
    moved = distill.kd_loss(3.0 * zs + 7.0, 0.5 * zt - 2.0, y, 2.0, 1.0, standardize=True)
    np.testing.assert_allclose(base, moved, rtol=1e-4)


def _masked(z, fill, cols=(3, 7)):
    """``z`` with two extra classes at ``cols`` that both sides mask with ``fill``."""
    z = np.insert(z, [c - i for i, c in enumerate(cols)], 0.0, axis=-1)
    z[..., list(cols)] = fill
    return z.astype(np.float32)


@pytest.mark.parametrize("fill", [-1e9, -np.inf])
@pytest.mark.parametrize("soft", ["kl", "ce"])
def test_kd_ignores_masked_classes(fill, soft, t=4.0):
    """Classes masked with a huge negative logit or -inf on both sides (padded vocab,
    invalid actions) have probability 0: the loss and the gradient on the other classes
    are those of the problem without them (a mean-centred KL lost every digit to a -1e9
    entry, and -inf gave NaN)."""
    zs, zt, y = _logits(40), _logits(41), _labels(40)
    y_m = np.where(y >= 3, y + 1, y)
    y_m = np.where(y_m >= 7, y_m + 1, y_m)  # the same classes in the widened layout
    cols = [c for c in range(C + 2) if c not in (3, 7)]
    for fn, want in (
        (lambda a, b: distill.soft_target_loss(a, b, t, soft=soft), ref.kd(zs, zt, y, t, 1.0, soft=soft)),
        (lambda a, b: distill.kd_loss(a, b, y_m, t, 0.7, soft=soft), ref.kd(zs, zt, y, t, 0.7, soft=soft)),
    ):
        val, g = jax.jit(jax.value_and_grad(fn))(_masked(zs, fill), _masked(zt, fill))
        np.testing.assert_allclose(val, want.mean(), rtol=2e-5, atol=1e-6)
        g = np.asarray(g)
        assert np.all(np.isfinite(g)) and np.all(g[:, [3, 7]] == 0)
    # the gradient on the live classes is the unmasked problem's
    g_m = jax.jit(jax.grad(lambda a: distill.kd_loss(a, _masked(zt, fill), y_m, t, 0.7, soft=soft)))(
        _masked(zs, fill)
    )
    g_u = jax.jit(jax.grad(lambda a: distill.kd_loss(a, zt, y, t, 0.7, soft=soft)))(zs)
    np.testing.assert_allclose(np.asarray(g_m)[:, cols], g_u, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fill", [-1e9, -np.inf])
def test_dkd_ignores_masked_classes(fill):
    zs, zt, y = _logits(42), _logits(43), _labels(42)
    y_m = np.where(y >= 3, y + 1, y)
    y_m = np.where(y_m >= 7, y_m + 1, y_m)
    val, g = jax.jit(jax.value_and_grad(lambda a: distill.dkd_loss(a, _masked(zt, fill), y_m, 4.0)))(
        _masked(zs, fill)
    )
    np.testing.assert_allclose(val, ref.dkd(zs, zt, y, 4.0, 1.0, 8.0).mean(), rtol=1e-4, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(g)))


def test_kl_tempered_rows_masked_entirely_and_student_missing_teacher_mass():
    """A row the teacher masks entirely contributes 0; a class the teacher gives mass and
    the student masks with -inf makes the KL +inf (it is)."""
    a = jnp.array([[-jnp.inf, -jnp.inf], [0.0, 1.0], [0.0, 1.0]])
    b = jnp.array([[0.0, 1.0], [0.0, -jnp.inf], [-jnp.inf, -jnp.inf]])
    np.testing.assert_array_equal(kl_tempered(a, b), [0.0, np.inf, np.inf])


def _fd_grad(f, x, h=1e-6):
    """Central finite differences of a float64 numpy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_gradients_where_the_largest_logit_difference_is_exactly_one(t):
    """max|z_t/T − z_s/T| == 1 exactly (a zero-initialised student head, a teacher on a
    coarse grid) is where kl_tempered switches formulas: KD's gradient is T·(p − q) and
    DKD's matches float64 finite differences there (a clip at ±1 halved it)."""
    zs = np.zeros((2, 4))
    zt = np.array([[t, 0.0, 0.0, 0.0], [0.0, t, 0.0, 0.0]])
    y = np.array([0, 0])
    p, q = ref.softmax(zs / t, axis=-1), ref.softmax(zt / t, axis=-1)
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):
            z0, z1 = zs.astype(dtype), zt.astype(dtype)
            g = jax.jit(jax.grad(lambda z, z1=z1: distill.kd_loss(z, z1, None, t, 1.0, reduction="sum")))(z0)
            np.testing.assert_allclose(g, t * (p - q), rtol=1e-5, atol=1e-7)
            dkd = lambda z, z1=z1: distill.dkd_loss(z, z1, y, t, 1.0, 8.0, reduction="sum")
            g = jax.jit(jax.grad(dkd))(z0)
            want = _fd_grad(lambda z: ref.dkd(z, zt, y, t, 1.0, 8.0).sum(), zs)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, -2.0, np.float32(0.0), jnp.float32(-1.0), float("nan")])
def test_non_positive_temperatures_are_refused(t):
    zs, zt, y = _logits(30), _logits(31), _labels(30)
    for loss in (
        lambda: distill.kd_loss(zs, zt, y, t, 0.5),
        lambda: distill.dkd_loss(zs, zt, y, t),
        lambda: distill.dist_loss(zs, zt, t),
        lambda: distill.topk_teacher(zt, 3, t),
    ):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            loss()
    # a traced temperature is not checked (nor refused)
    assert np.isfinite(jax.jit(lambda t: distill.kd_loss(zs, zt, y, t, 0.5))(2.0))


def test_out_of_range_labels_are_refused_or_nan_when_traced():
    """-100 (PyTorch's ignore index) is not a class: a concrete label out of range raises,
    a traced one makes its example NaN (it took the KD hard term / DKD silently)."""
    zs, zt = _logits(32), _logits(33)
    y = _labels(32)
    y[3] = -100
    for loss in (
        lambda y: distill.kd_loss(zs, zt, y, 2.0, 0.5, reduction="none"),
        lambda y: distill.kd_loss(zs, zt, y, 2.0, 0.5, label_smoothing=0.1, reduction="none"),
        lambda y: distill.dkd_loss(zs, zt, y, 2.0, reduction="none"),
    ):
        with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\), got \[-100\]"):
            loss(y)
        with pytest.raises(ValueError, match="got \\[10\\]"):
            loss(np.where(np.arange(B) == 3, C, y))
        per = np.asarray(jax.jit(loss)(y))
        assert np.isnan(per[3]) and np.isfinite(np.delete(per, 3)).all()


# -- DKD -------------------------------------------------------------------------------


@pytest.mark.parametrize("t,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0), (10.0, 1.0, 0.0)])
def test_dkd_matches_reference(t, alpha, beta):
    zs, zt, y = _logits(20), _logits(21), _labels(20)
    got = distill.dkd_loss(zs, zt, y, t, alpha, beta, reduction="none")
    np.testing.assert_allclose(got, ref.dkd(zs, zt, y, t, alpha, beta), rtol=1e-4, atol=1e-5)


def test_dkd_decomposes_classical_kd():
    """KD = TCKD + (1 − q_t)·NCKD per example (Zhao et al., Eq. 7)."""
    zs, zt, y = _logits(22), _logits(23), _labels(22)
    t = 2.0
    tckd = distill.dkd_loss(zs, zt, y, t, 1.0, 0.0, reduction="none")
    nckd = distill.dkd_loss(zs, zt, y, t, 0.0, 1.0, reduction="none")
    qt = jnp.take_along_axis(jax.nn.softmax(zt / t), y[:, None], 1)[:, 0]
    kd = distill.soft_target_loss(zs, zt, t, reduction="none")
    np.testing.assert_allclose(kd, tckd + (1 - qt) * nckd, rtol=1e-4, atol=1e-5)


def test_dkd_finite_and_differentiable_for_extreme_logits():
    zs, zt, y = _logits(24, 1e4), _logits(25, 1e4), _labels(24)
    zt[np.arange(B), y] = 1e5  # a certain teacher: q_t == 1 in float32
    val, g = jax.value_and_grad(lambda a, b: distill.dkd_loss(a, b, y, 4.0), argnums=(0, 1))(zs, zt)
    assert np.isfinite(val) and all(np.all(np.isfinite(np.asarray(x))) for x in g)
    with jax.enable_x64(True):
        f = jax.jit(lambda a, b: distill.dkd_loss(a, b, y, 3.0))
        check_grads(f, _f64(_logits(26, 1.0), _logits(27, 1.0)), 1, ["rev"])


# -- DIST ------------------------------------------------------------------------------


@pytest.mark.parametrize("t,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_matches_reference(t, beta, gamma):
    zs, zt = _logits(30), _logits(31)
    np.testing.assert_allclose(
        distill.dist_loss(zs, zt, t, beta, gamma), ref.dist(zs, zt, t, beta, gamma), rtol=1e-4, atol=1e-6
    )


def test_dist_is_zero_for_identical_and_gradients_check():
    z = _logits(32)
    assert abs(float(distill.dist_loss(z, z))) < 1e-5
    with jax.enable_x64(True):
        f = jax.jit(lambda a, b: distill.dist_loss(a, b, 2.0))
        check_grads(f, _f64(_logits(33, 1.0), _logits(34, 1.0)), 1, ["rev"])


# -- top-k cache -----------------------------------------------------------------------


def test_topk_cache_full_k_is_exact_and_partial_k_is_a_distribution():
    zs, zt, y = _logits(40), _logits(41), _labels(40)
    t = 3.0
    full = distill.topk_teacher(zt, C, t)
    np.testing.assert_allclose(
        distill.kd_loss(zs, full, y, t, 0.8), distill.kd_loss(zs, zt, y, t, 0.8), rtol=1e-5
    )
    for loss in (
        lambda teacher: distill.dkd_loss(zs, teacher, y, t),
        lambda teacher: distill.dist_loss(zs, teacher, t),
    ):
        np.testing.assert_allclose(loss(full), loss(zt), rtol=1e-4, atol=1e-6)
    part = distill.topk_teacher(zt, 3, t)
    dense = np.asarray(distill.dense_log_probs(part), np.float64)
    np.testing.assert_allclose(np.exp(dense).sum(-1), 1.0, rtol=1e-5)
    q = jax.nn.log_softmax(zt / t)
    top = np.argsort(-np.asarray(q), axis=-1)[:, :3]
    np.testing.assert_allclose(np.take_along_axis(dense, top, 1), np.take_along_axis(q, top, 1), rtol=1e-5)
    # rest mass spread evenly: equal log-probs off the top 3
    rest = np.sort(dense, axis=-1)[:, : C - 3]
    np.testing.assert_allclose(rest, rest[:, :1].repeat(C - 3, 1), rtol=1e-5)


def test_topk_cache_checks_temperature_and_indexes():
    zt = _logits(42)
    cache = distill.topk_teacher(zt, 4, 2.0, standardize=True)
    with pytest.raises(ValueError, match="temperature"):
        distill.kd_loss(_logits(43), cache, _labels(43), 4.0, 0.9, standardize=True)
    with pytest.raises(ValueError, match="standardized"):
        distill.kd_loss(_logits(43), cache, _labels(43), 2.0, 0.9)
    sub = cache[np.array([1, 3])]
    assert sub.log_probs.shape == (2, 4) and sub.indices.dtype == jnp.int32 and sub.num_classes == C
    with pytest.raises(ValueError, match="k="):
        distill.topk_teacher(zt, C + 1, 1.0)


@pytest.mark.parametrize("t", [np.float64(4.0), np.float32(4.0), jnp.float32(4.0), jnp.array(4.0)])
def test_topk_cache_checks_any_concrete_temperature(t):
    """A cache built at T=2 is refused at T=4 given as a numpy or jax scalar (only Python
    numbers were compared), and accepted at T=2 in any of those types."""
    zs, zt = _logits(44), _logits(45)
    cache = distill.topk_teacher(zt, 4, 2.0)
    with pytest.raises(ValueError, match=r"temperature 2\.0"):
        distill.kd_loss(zs, cache, None, t, 1.0)
    with pytest.raises(ValueError, match=r"temperature 2\.0"):
        distill.dist_loss(zs, cache, t)
    same = type(t)(2.0) if not isinstance(t, jax.Array) else t / 2
    np.testing.assert_allclose(
        distill.kd_loss(zs, cache, None, same, 1.0), distill.kd_loss(zs, cache, None, 2.0, 1.0), rtol=1e-6
    )
