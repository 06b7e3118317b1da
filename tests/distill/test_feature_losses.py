"""Feature losses (FitNets hint, AT, RKD, SP, PKT) against float64 references;
gradients; invariances."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qjax import distill

from . import reference as ref


def _feat(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def _f64(*arrays):
    return tuple(jnp.asarray(a, jnp.float64) for a in arrays)


# -- FitNets hint ------------------------------------------------------------------------


def test_hint_with_adapter_matches_reference_and_trains():
    u, v = _feat(0, (8, 4, 4, 6)), _feat(1, (8, 4, 4, 10))
    adapter = distill.init_adapter(jax.random.key(0), 6, 10)
    assert adapter["kernel"].shape == (6, 10) and adapter["bias"].shape == (10,)
    got = distill.hint_loss(u, v, adapter)
    np.testing.assert_allclose(got, ref.hint(u, v, adapter["kernel"], adapter["bias"]), rtol=1e-5)
    # identity and callable regressors
    np.testing.assert_allclose(distill.hint_loss(v, v), 0.0)
    np.testing.assert_allclose(distill.hint_loss(u, v, lambda x: distill.apply_adapter(adapter, x)), got)
    with pytest.raises(ValueError, match="adapter"):
        distill.hint_loss(u, v)
    # the adapter is learnable: a few gradient steps on it reduce the loss
    loss = lambda a: distill.hint_loss(u, v, a)
    sgd = jax.jit(lambda a: jax.tree.map(lambda p, g: p - 0.1 * g, a, jax.grad(loss)(a)))
    a = adapter
    for _ in range(20):
        a = sgd(a)
    assert float(loss(a)) < 0.9 * float(got)
    with jax.enable_x64(True):
        f = jax.jit(lambda u, k, b: distill.hint_loss(u, v, {"kernel": k, "bias": b}))
        check_grads(f, _f64(u, adapter["kernel"], adapter["bias"]), 2, ["rev"])


# -- attention transfer ----------------------------------------------------------------


@pytest.mark.parametrize("p", [2.0, 1.0, 4.0])
def test_attention_transfer_matches_reference(p):
    fs, ft = _feat(2, (6, 5, 5, 8)), _feat(3, (6, 5, 5, 32), 3.0)
    np.testing.assert_allclose(distill.attention_transfer_loss(fs, ft, p), ref.at(fs, ft, p), rtol=1e-5)


def test_attention_transfer_invariances_and_errors():
    fs, ft = _feat(4, (6, 5, 5, 8)), _feat(5, (6, 5, 5, 16))
    base = distill.attention_transfer_loss(fs, ft)
    # per-example positive scaling and channel permutation do not change the map
    scale = np.abs(_feat(6, (6, 1, 1, 1))) + 0.1
    np.testing.assert_allclose(distill.attention_transfer_loss(fs * scale, ft[..., ::-1]), base, rtol=1e-5)
    # NCHW layout with channel_axis=1
    np.testing.assert_allclose(
        distill.attention_transfer_loss(fs.transpose(0, 3, 1, 2), ft.transpose(0, 3, 1, 2), channel_axis=1),
        base,
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="spatial"):
        distill.attention_transfer_loss(fs, _feat(7, (6, 4, 4, 8)))
    with jax.enable_x64(True):
        f = jax.jit(lambda a: distill.attention_transfer_loss(a, jnp.asarray(ft, jnp.float64)))
        check_grads(f, _f64(fs), 1, ["rev"])


# -- relational ------------------------------------------------------------------------


def test_rkd_matches_reference():
    fs, ft = _feat(10, (7, 12)), _feat(11, (7, 30), 5.0)
    np.testing.assert_allclose(distill.rkd_distance_loss(fs, ft), ref.rkd_distance(fs, ft), rtol=1e-4)
    np.testing.assert_allclose(distill.rkd_angle_loss(fs, ft), ref.rkd_angle(fs, ft), rtol=1e-4)
    np.testing.assert_allclose(
        distill.rkd_loss(fs, ft, 25.0, 50.0),
        25 * ref.rkd_distance(fs, ft) + 50 * ref.rkd_angle(fs, ft),
        rtol=1e-4,
    )
    # large distances reach the linear part of the Huber loss
    far = np.concatenate([fs[:6], fs[6:] + 100.0])
    np.testing.assert_allclose(distill.rkd_distance_loss(far, ft), ref.rkd_distance(far, ft), rtol=1e-4)
    # 4-D feature maps are flattened per example
    fm = _feat(12, (7, 2, 3, 2))
    np.testing.assert_allclose(distill.rkd_distance_loss(fm, ft), ref.rkd_distance(fm, ft), rtol=1e-4)


def test_rkd_authors_weights_convert_by_the_documented_factors():
    """The authors' code averages over all B² / B³ entries; the docstring's conversion holds."""
    b = 6
    fs, ft = _feat(20, (b, 5)), _feat(21, (b, 9), 3.0)
    ld, la = ref.rkd_authors(fs, ft)
    np.testing.assert_allclose(distill.rkd_distance_loss(fs, ft) * (b - 1) / b, ld, rtol=1e-4)
    np.testing.assert_allclose(distill.rkd_angle_loss(fs, ft) * (b - 1) * (b - 2) / b**2, la, rtol=1e-4)


def test_rkd_is_scale_translation_and_rotation_invariant():
    fs, ft = _feat(13, (8, 6)), _feat(14, (8, 9))
    rot = np.linalg.qr(_feat(15, (6, 6)))[0].astype(np.float32)
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss):
        base = float(loss(fs, ft))
        assert base > 1e-3
        np.testing.assert_allclose(loss(7.5 * fs, ft), base, rtol=1e-4)
        np.testing.assert_allclose(loss(fs, 0.01 * ft), base, rtol=1e-4)
        np.testing.assert_allclose(loss(fs @ rot + 3.0, ft), base, rtol=2e-4, atol=1e-6)
        assert float(loss(2.0 * ft, ft)) < 1e-6


def test_rkd_gradients_are_finite_with_duplicate_examples():
    fs = _feat(16, (6, 5))
    fs[3] = fs[1]  # zero distance between two examples
    g = jax.jit(jax.grad(lambda f: distill.rkd_loss(f, _feat(17, (6, 4)))))(fs)
    assert np.all(np.isfinite(np.asarray(g)))
    with jax.enable_x64(True):
        check_grads(jax.jit(distill.rkd_loss), _f64(_feat(18, (5, 4)), _feat(19, (5, 6))), 1, ["rev"])


def test_sp_and_pkt_match_reference():
    fs, ft = _feat(20, (9, 4, 4, 3)), _feat(21, (9, 17), 2.0)
    np.testing.assert_allclose(distill.sp_loss(fs, ft), ref.sp(fs, ft), rtol=1e-4)
    np.testing.assert_allclose(distill.pkt_loss(fs, ft), ref.pkt(fs, ft), rtol=1e-4, atol=1e-8)
    assert float(distill.sp_loss(ft, ft)) < 1e-10 and abs(float(distill.pkt_loss(ft, ft))) < 1e-7
    # SP is invariant to scaling either side; PKT (cosine kernels) to per-example scaling
    np.testing.assert_allclose(distill.sp_loss(3.0 * fs, ft), ref.sp(fs, ft), rtol=1e-4)
    scale = np.abs(_feat(22, (9, 1))) + 0.5
    np.testing.assert_allclose(distill.pkt_loss(fs, ft * scale), ref.pkt(fs, ft), rtol=1e-4, atol=1e-8)
    with jax.enable_x64(True):
        a, b = _f64(_feat(23, (6, 5)), _feat(24, (6, 7)))
        check_grads(jax.jit(distill.sp_loss), (a, b), 1, ["rev"])
        check_grads(jax.jit(distill.pkt_loss), (a, b), 1, ["rev"])


def test_batch_size_errors():
    with pytest.raises(ValueError, match="at least 3"):
        distill.rkd_angle_loss(_feat(0, (2, 4)), _feat(1, (2, 4)))
    with pytest.raises(ValueError, match="batch sizes differ"):
        distill.sp_loss(_feat(0, (4, 4)), _feat(1, (5, 4)))
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss, distill.rkd_loss):
        with pytest.raises(ValueError, match=r"batch sizes differ \(4 vs 5\)"):
            loss(_feat(0, (4, 4)), _feat(1, (5, 4)))


def test_rkd_exact_for_features_with_a_large_common_offset():
    """Distances and angles from the Gram matrix of batch-centred features: a shared offset
    of 1000 (float32) leaves the losses and gradients as they are (the uncentred Gram
    matrix cancelled: 20% off)."""
    fs, ft = _feat(30, (8, 6)), _feat(31, (8, 5))
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss):
        vg = jax.jit(jax.value_and_grad(loss))
        want, g_want = vg(fs, ft)
        got, g_got = vg(fs + 1000.0, ft - 1000.0)
        np.testing.assert_allclose(got, want, rtol=1e-4)
        np.testing.assert_allclose(g_got, g_want, rtol=2e-3, atol=1e-5 * float(np.abs(g_want).max()))


def test_zero_feature_rows_give_finite_gradients():
    """An all-zero example (padding, a dead post-ReLU layer) has a zero norm: attention
    transfer, SP and PKT give finite gradients there (the norm's gradient was NaN, and SP's
    spread to the whole batch), and the loss equals the float64 reference."""
    fs, ft = np.maximum(_feat(32, (4, 3, 3, 2)), 0), _feat(33, (4, 3, 3, 2))
    fs[0] = 0.0
    for loss, want in (
        (distill.attention_transfer_loss, ref.at(fs, ft)),
        (distill.sp_loss, ref.sp(fs, ft)),
        (distill.pkt_loss, ref.pkt(fs, ft)),
    ):
        val, g = jax.jit(jax.value_and_grad(loss))(fs, ft)
        assert np.all(np.isfinite(np.asarray(g))), loss.__name__
        np.testing.assert_allclose(val, want, rtol=1e-4, atol=1e-7)


def test_nan_features_reach_the_relational_losses():
    """A NaN activation makes RKD (distance, angle, either side) and the pairwise
    distances NaN, as the other feature losses (they were finite, with NaN gradients);
    duplicate examples still give finite losses and gradients."""
    fs, ft = _feat(34, (5, 6)), _feat(35, (5, 4))
    bad = fs.copy()
    bad[0, 3] = np.nan
    for loss in (distill.rkd_distance_loss, distill.rkd_angle_loss, distill.rkd_loss, distill.sp_loss):
        name, loss = loss.__name__, jax.jit(loss)
        assert np.isnan(loss(bad, ft)) and np.isnan(loss(ft, bad)), name
        assert np.isnan(loss(np.full_like(fs, np.nan), ft)), name
    d = np.asarray(jax.jit(distill.pairwise_distances)(bad))
    assert np.isnan(d[~np.eye(5, dtype=bool)]).all()  # features are batch-centred: NaN spreads
    dup = fs.copy()
    dup[2] = dup[4]
    val, g = jax.jit(jax.value_and_grad(distill.rkd_loss))(dup, ft)
    assert np.isfinite(val) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(distill.rkd_distance_loss(dup, ft), ref.rkd_distance(dup, ft), rtol=1e-4)
