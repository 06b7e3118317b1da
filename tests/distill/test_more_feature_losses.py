"""FSP, NST, CC and VID (torchdistill's feature methods) against float64 references
written from the papers; gradients by finite differences; invariances and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qjax import distill

from . import reference as ref
from .test_feature_losses import _f64, _feat


def test_fsp_matches_the_reference_over_two_sections():
    s_pairs = [
        (_feat(0, (3, 4, 4, 2)), _feat(1, (3, 4, 4, 5))),
        (_feat(2, (3, 2, 2, 5)), _feat(3, (3, 2, 2, 3))),
    ]
    t_pairs = [
        (_feat(4, (3, 4, 4, 2)), _feat(5, (3, 4, 4, 5))),
        (_feat(6, (3, 2, 2, 5)), _feat(7, (3, 2, 2, 3))),
    ]
    got = jax.jit(lambda s, t: distill.fsp_loss(s, t, [1.0, 0.5]))(s_pairs, t_pairs)
    np.testing.assert_allclose(float(got), ref.fsp(s_pairs, t_pairs, [1.0, 0.5]), rtol=1e-5)
    assert float(distill.fsp_loss(t_pairs, t_pairs)) == 0.0
    assert distill.fsp_matrix(*s_pairs[0]).shape == (3, 2, 5)
    with jax.enable_x64(True):
        pair = _f64(_feat(8, (2, 3, 3, 2)), _feat(9, (2, 3, 3, 4)))
        teacher = [_f64(_feat(10, (2, 3, 3, 2)), _feat(11, (2, 3, 3, 4)))]
        check_grads(jax.jit(lambda a, b: distill.fsp_loss([(a, b)], teacher)), pair, 1, ["rev"])


def test_fsp_errors_name_the_problem():
    a, b = _feat(0, (2, 4, 4, 3)), _feat(1, (2, 2, 2, 3))
    with pytest.raises(ValueError, match="share batch and spatial sizes"):
        distill.fsp_matrix(a, b)
    with pytest.raises(ValueError, match=r"pair 0: student FSP matrix \(3, 3\) and teacher's \(3, 5\)"):
        distill.fsp_loss([(a, a)], [(a, _feat(2, (2, 4, 4, 5)))])
    with pytest.raises(ValueError, match="as many student as teacher pairs"):
        distill.fsp_loss([(a, a)], [])
    with pytest.raises(ValueError, match="2 weights for 1 pairs"):
        distill.fsp_loss([(a, a)], [(a, a)], [1.0, 2.0])


@pytest.mark.parametrize("degree, bias", [(2, 0.0), (3, 1.0)])
def test_nst_matches_the_reference_with_different_channel_counts(degree, bias):
    fs, ft = _feat(12, (3, 4, 4, 6)), _feat(13, (3, 4, 4, 9), 3.0)
    got = jax.jit(lambda a, b: distill.nst_loss(a, b, degree=degree, bias=bias))(fs, ft)
    np.testing.assert_allclose(float(got), ref.nst(fs, ft, degree, bias), rtol=1e-5, atol=1e-7)
    # channel patterns are normalised: scaling a channel changes nothing; the same maps give 0
    scale = np.abs(_feat(14, (1, 1, 1, 6))) + 0.1
    scaled = distill.nst_loss(fs * scale, ft, degree=degree, bias=bias)
    np.testing.assert_allclose(float(scaled), float(got), rtol=1e-4)
    assert abs(float(distill.nst_loss(ft, ft))) < 1e-6
    with jax.enable_x64(True):
        check_grads(
            jax.jit(distill.nst_loss), _f64(_feat(15, (2, 3, 3, 4)), _feat(16, (2, 3, 3, 5))), 1, ["rev"]
        )
    with pytest.raises(ValueError, match="batch and spatial sizes must agree"):
        distill.nst_loss(fs, _feat(17, (3, 2, 2, 9)))


def test_nst_of_a_dead_channel_is_finite():
    fs, ft = _feat(18, (2, 3, 3, 4)), _feat(19, (2, 3, 3, 4))
    fs[..., 1] = 0.0  # a channel that never fires: its pattern cannot be normalised
    val, g = jax.jit(jax.value_and_grad(distill.nst_loss))(fs, ft)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kernel, order", [("gaussian", 2), ("gaussian", 4), ("bilinear", 2)])
def test_cc_matches_the_reference(kernel, order):
    fs, ft = _feat(20, (7, 5)), _feat(21, (7, 3, 2), 2.0)
    got = jax.jit(lambda a, b: distill.cc_loss(a, b, kernel=kernel, order=order, gamma=0.3))(fs, ft)
    np.testing.assert_allclose(float(got), ref.cc(fs, ft, 0.3, order, kernel), rtol=1e-5)
    with jax.enable_x64(True):
        a, b = _f64(_feat(22, (5, 4)), _feat(23, (5, 6)))
        check_grads(
            jax.jit(lambda x, y: distill.cc_loss(x, y, kernel=kernel, order=order)), (a, b), 1, ["rev"]
        )


def test_cc_gaussian_expansion_approaches_the_kernel_and_errors():
    f = _feat(24, (6, 8))
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    exact = np.exp(-0.4 * ((fn[:, None] - fn[None]) ** 2).sum(-1))
    approx = np.asarray(distill.correlation_matrix(f, gamma=0.4, order=12))
    np.testing.assert_allclose(approx, exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch sizes differ"):
        distill.cc_loss(_feat(0, (4, 3)), _feat(1, (5, 3)))
    with pytest.raises(ValueError, match="kernel must be 'gaussian' or 'bilinear'"):
        distill.cc_loss(f, f, kernel="rbf")


def test_vid_matches_the_reference_and_learns_the_variance():
    mu, t = _feat(25, (4, 3, 3, 6)), _feat(26, (4, 3, 3, 6))
    alpha = distill.vid_log_scale(6)
    np.testing.assert_allclose(float(jax.nn.softplus(alpha[0]) + 1e-5), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(distill.vid_loss(mu, t, alpha)), ref.vid(mu, t, alpha), rtol=1e-6)
    # the minimiser of the NLL in σ² is the mean squared error per channel
    step = jax.jit(lambda a: a - 0.5 * jax.grad(lambda a: distill.vid_loss(mu, t, a))(a))
    a = alpha
    for _ in range(3000):
        a = step(a)
    mse = np.mean((mu - t) ** 2, axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(jax.nn.softplus(a) + 1e-5), mse, rtol=2e-3)
    with jax.enable_x64(True):
        check_grads(jax.jit(distill.vid_loss), _f64(mu[:2], t[:2], np.asarray(alpha)), 1, ["rev"])
    with pytest.raises(ValueError, match=r"log_scale \(5,\)"):
        distill.vid_loss(mu, t, alpha[:5])
    with pytest.raises(ValueError, match="init_variance must exceed"):
        distill.vid_log_scale(6, 0.0)
    bf = distill.vid_loss(jnp.asarray(mu, jnp.bfloat16), t, alpha)
    assert bf.dtype == jnp.float32


def test_empty_axes_and_large_initial_variances_are_handled():
    with pytest.raises(ValueError, match="non-empty"):
        distill.nst_loss(np.zeros((2, 3, 3, 0), np.float32), _feat(0, (2, 3, 3, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        distill.fsp_matrix(np.zeros((0, 3, 3, 2), np.float32), np.zeros((0, 3, 3, 2), np.float32))
    with pytest.raises(ValueError, match="the student features are empty"):
        distill.cc_loss(np.zeros((4, 0), np.float32), _feat(1, (4, 3)))
    with pytest.raises(ValueError, match="non-empty prediction"):
        distill.vid_loss(np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32), jnp.zeros((0,)))
    alpha = distill.vid_log_scale(3, 100.0)  # softplus⁻¹(100): it overflowed to inf
    np.testing.assert_allclose(np.asarray(jax.nn.softplus(alpha) + 1e-5), 100.0, rtol=1e-6)
