"""fake_quant: forward is bit-for-bit dequantize(quantize(x)); backward rules (plain,
clipped, LSQ) against analytic numpy formulas; lsq_init_scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax.numerics import QuantSpec, dequantize, fake_quant, lsq_init_scale, quantize

from .reference import F32

RNG = np.random.default_rng(7)
SHAPE = (8, 6)

FQ_SPECS = [
    QuantSpec(qjax.int8),
    QuantSpec(qjax.int4, channel_axes=(-1,)),
    QuantSpec(qjax.uint8, symmetric=False, channel_axes=(0,)),
    QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=4),
    QuantSpec(qjax.int8, calibration=qjax.calib.percentile(95.0)),
    QuantSpec(qjax.int3, calibration=qjax.calib.mse(8)),
    QuantSpec(qjax.int8.with_narrow(), calibration=qjax.calib.fixed(-1.0, 1.0)),
    QuantSpec(qjax.int2, symmetric=False, calibration=qjax.calib.fixed(-0.5, 2.0), ste="plain"),
    QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,)),
    QuantSpec(qjax.fp8_e5m2),
    QuantSpec(qjax.int16, channel_axes=(0,)),
    QuantSpec(qjax.int4, rounding="stochastic"),
    QuantSpec(qjax.fp8_e4m3, rounding="stochastic", channel_axes=(-1,)),
]


def _both(x, spec, key=None):
    return dequantize(quantize(x, spec, key=key)), fake_quant(x, spec, key=key)


_both_jit = jax.jit(_both, static_argnums=1)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


@pytest.mark.parametrize(
    "spec", FQ_SPECS, ids=lambda s: f"{s.format.name}-{s.calibration.name}-{s.channel_axes}"
)
def test_forward_equals_dequantize_quantize_bit_for_bit(spec):
    x = (RNG.standard_t(4, size=SHAPE) * 0.7).astype(np.float32)
    key = jax.random.key(3)
    a, b = _both(x, spec, key)
    np.testing.assert_array_equal(_bits(a), _bits(b))
    # inside one jit, too, and the same bits as eagerly
    c, d = _both_jit(x, spec, key)
    np.testing.assert_array_equal(_bits(c), _bits(d))
    np.testing.assert_array_equal(_bits(a), _bits(c))
    assert b.shape == x.shape and b.dtype == x.dtype


@given(
    spec=st.sampled_from(FQ_SPECS),
    data=st.lists(st.floats(-8, 8, width=32), min_size=48, max_size=48),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_equality_property(spec, data, seed):
    x = np.asarray(data, np.float32).reshape(SHAPE)
    a, b = _both(x, spec, jax.random.key(seed))
    np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_equality_low_precision(dtype):
    spec = FQ_SPECS[1]
    x = jnp.asarray(RNG.standard_normal(SHAPE), dtype)
    a, b = _both(x, spec)
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(_bits(a), _bits(b))
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, spec).astype(jnp.float32)))(x)
    assert g.dtype == dtype


def test_stochastic_needs_key_and_same_key_same_rounding():
    spec = QuantSpec(qjax.int4, rounding="stochastic")
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    with pytest.raises(ValueError, match="key"):
        fake_quant(x, spec)
    a = fake_quant(x, spec, key=jax.random.key(1))
    b = fake_quant(x, spec, key=jax.random.key(1))
    c = fake_quant(x, spec, key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


# --------------------------------------------------------------------------------
# backward


def _vjp(x, spec, w, **kw):
    return jax.grad(lambda x: jnp.sum(jnp.asarray(w) * fake_quant(x, spec, **kw)))(jnp.asarray(x))


def test_plain_ste_is_identity_even_when_clipping():
    spec = QuantSpec(qjax.int4, calibration=qjax.calib.fixed(-1.0, 1.0), ste="plain")
    x = np.linspace(-3, 3, 48, dtype=np.float32).reshape(SHAPE)
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_vjp(x, spec, w)), w)


@pytest.mark.parametrize("sym", [True, False])
def test_clipped_ste_zero_outside_range(sym):
    fmt = qjax.int8 if sym else qjax.uint8
    lo, hi = (-1.0, 1.0) if sym else (-0.5, 1.5)
    spec = QuantSpec(fmt, calibration=qjax.calib.fixed(lo, hi), symmetric=sym, ste="clipped")
    x = np.linspace(-3, 3, 48, dtype=np.float32).reshape(SHAPE)
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    g = np.asarray(_vjp(x, spec, w))
    # x strictly inside the representable range gets the cotangent, outside gets 0
    inside = (x > lo * 1.01) & (x < hi * 0.99)
    outside = (x < lo * 1.01) | (x > hi * 1.01)
    assert inside.any() and outside.any()
    np.testing.assert_array_equal(g[inside], w[inside])
    np.testing.assert_array_equal(g[outside], 0)
    # reference: the element is kept iff its unclipped code lies in [qmin, qmax]
    if sym:
        s = F32(1.0) * F32(1 / 127)
        code = np.rint(x * (F32(1) / s))
    else:
        s = F32(2.0) * F32(1 / 255)
        zp = np.rint(F32(0) - F32(-0.5) * (F32(1) / s))
        code = np.rint(x * (F32(1) / s)) + zp
    keep = (code >= fmt.qmin) & (code <= fmt.qmax)
    np.testing.assert_array_equal(g, np.where(keep, w, 0))


@pytest.mark.parametrize("spec", FQ_SPECS[:4] + FQ_SPECS[8:10], ids=lambda s: s.format.name)
def test_clipped_ste_passes_every_element_when_nothing_is_clipped(spec):
    """With absmax/minmax calibration nothing is clipped, so the clipped STE must pass the
    cotangent to every element, including each group's extremes (which can land a float
    ulp, or half a step for a rounded zero point, past qmin/qmax before rounding)."""
    spec = spec.replace(ste="clipped")
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    xs = RNG.standard_normal((32, *SHAPE)).astype(np.float32)
    grad = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(w * fake_quant(x, spec)))))
    np.testing.assert_array_equal(np.asarray(grad(xs)), np.broadcast_to(w, xs.shape))


def test_clipped_ste_absmax_extreme_past_qmax_by_an_ulp():
    # a = 1.0035018: s = a * (1/127) and a * (1/s) == 127.00001 in float32, yet a rounds
    # to code 127 without clipping, so it must keep its gradient
    a = np.float32(1.0035018)
    s = a * np.float32(1 / 127)
    assert a * (np.float32(1) / s) > 127
    x = np.array([a, 0.5, -0.25], np.float32)
    spec = QuantSpec(qjax.int8, ste="clipped")
    assert np.asarray(quantize(x, spec).values).tolist()[0] == 127
    np.testing.assert_array_equal(np.asarray(_vjp(x, spec, np.ones(3, np.float32))), 1.0)


@pytest.mark.parametrize("ste", ["plain", "clipped"])
def test_given_scale_is_constant_for_plain_and_clipped(ste):
    spec = QuantSpec(qjax.int8, channel_axes=(-1,), ste=ste)
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    s = jnp.full((1, 6), 0.01, jnp.float32)
    gs = jax.grad(lambda s: jnp.sum(fake_quant(x, spec, scale=s) ** 2))(s)
    np.testing.assert_array_equal(np.asarray(gs), 0)


def _lsq_reference(x, s, w, qmin, qmax, reduce_axes, n):
    """Esser et al. 2020, eqs. (3)-(5), in numpy float32: dv/dx = 1 inside [qmin, qmax]
    (clipped STE) and dv_hat/ds = -v + round(v) inside, qmin / qmax outside; the scale
    gradient is multiplied by g = 1 / sqrt(N * qmax)."""
    v = x * (F32(1) / s)
    q = np.clip(np.rint(v), qmin, qmax)
    gx = np.where((v >= qmin) & (v <= qmax), w, 0)
    ds = np.where(v < qmin, qmin, np.where(v > qmax, qmax, q - v))
    gs = np.sum(w * ds, axis=reduce_axes, keepdims=True) / np.sqrt(n * qmax)
    return gx.astype(np.float32), gs.astype(np.float32)


LSQ_CASES = [
    # fmt, channel_axes, group_axis, group_size, scale shape, reduce axes of x, N
    (qjax.int8, (-1,), None, None, (1, 6), (0,), 8),
    (qjax.int4, (), None, None, (1, 1), (0, 1), 48),
    (qjax.int4, (0,), 1, 3, (8, 2), None, 3),
    (qjax.int2, (), 0, 4, (2, 1), None, 24),
]


@pytest.mark.parametrize("fmt,axes,gaxis,gsize,sshape,red,n", LSQ_CASES)
def test_lsq_gradients_match_analytic_formula(fmt, axes, gaxis, gsize, sshape, red, n):
    spec = QuantSpec(fmt, channel_axes=axes, group_axis=gaxis, group_size=gsize, ste="lsq")
    x = (RNG.standard_normal(SHAPE) * 2).astype(np.float32)
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    # a scale small enough that some elements clip, large enough that most don't
    s = np.asarray(lsq_init_scale(x, spec)) * F32(0.3)
    assert s.shape == sshape
    assert spec.layout(SHAPE).group_count == n

    def loss(x, s):
        return jnp.sum(w * fake_quant(x, spec, scale=s))

    gx, gs = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(s))
    # the reference, group by group: expand the scale to x's shape
    if gaxis is None:
        s_full = np.broadcast_to(s, SHAPE)
        rgx, rgs = _lsq_reference(x, s_full, w, fmt.qmin, fmt.qmax, red, n)
        rgs = rgs.reshape(sshape)
    else:
        s_full = np.repeat(s, gsize, axis=gaxis)
        rgx, _ = _lsq_reference(x, s_full, w, fmt.qmin, fmt.qmax, (), n)
        v = x * (F32(1) / s_full)
        q = np.clip(np.rint(v), fmt.qmin, fmt.qmax)
        ds = np.where(v < fmt.qmin, fmt.qmin, np.where(v > fmt.qmax, fmt.qmax, q - v)) * w
        newshape = list(SHAPE)
        newshape[gaxis : gaxis + 1] = [SHAPE[gaxis] // gsize, gsize]
        sum_axes = tuple(i for i in range(3) if i != gaxis and not (i == 0 and axes == (0,)))
        rgs = (np.sum(ds.reshape(newshape), axis=sum_axes) / np.sqrt(n * fmt.qmax)).reshape(sshape)
    clipped = np.mean(rgx == 0)
    assert 0 < clipped < 1 or fmt.bits > 4  # both branches of the formula are exercised
    np.testing.assert_array_equal(np.asarray(gx), rgx)
    np.testing.assert_allclose(np.asarray(gs), rgs, rtol=2e-5, atol=1e-6 * np.abs(rgs).max())


def test_lsq_scale_gradient_equals_finite_difference_when_all_clip():
    """Where every element saturates the forward is s * clip-code, linear in s, so the
    true derivative exists and equals LSQ's (qmin / qmax) term: grad / gscale == FD."""
    spec = QuantSpec(qjax.int4, channel_axes=(-1,), ste="lsq")
    x = np.where(RNG.random(SHAPE) < 0.5, -1.0, 1.0).astype(np.float32) * (3 + RNG.random(SHAPE)).astype(
        np.float32
    )
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    s = np.full((1, 6), 0.1, np.float32)  # |x / s| >= 30 > 8: all clip
    f = lambda s: jnp.sum(w * fake_quant(x, spec, scale=s))
    gs = np.asarray(jax.grad(f)(jnp.asarray(s)))
    gscale = 1 / np.sqrt(8 * 7)
    for j in range(6):
        hi, lo = s.copy(), s.copy()
        hi[0, j] += 0.01
        lo[0, j] -= 0.01
        fd = (float(f(hi)) - float(f(lo))) / float(hi[0, j] - lo[0, j])
        np.testing.assert_allclose(gs[0, j] / gscale, fd, rtol=1e-4)


def test_lsq_scalar_scale_broadcast_gets_summed_gradient():
    spec = QuantSpec(qjax.int8, channel_axes=(-1,), ste="lsq")
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    w = RNG.standard_normal(SHAPE).astype(np.float32)
    per_ch = jax.grad(lambda s: jnp.sum(w * fake_quant(x, spec, scale=s)))(
        jnp.full((1, 6), 0.02, jnp.float32)
    )
    scalar = jax.grad(lambda s: jnp.sum(w * fake_quant(x, spec, scale=s)))(jnp.float32(0.02))
    np.testing.assert_allclose(float(scalar), float(jnp.sum(per_ch)), rtol=1e-5)


def test_lsq_without_scale_is_an_error():
    with pytest.raises(ValueError, match=r"lsq.*scale"):
        fake_quant(np.ones(SHAPE, np.float32), QuantSpec(qjax.int8, ste="lsq"))


@pytest.mark.parametrize(
    "fmt,axes,gaxis,gsize",
    [
        (qjax.int8, (), None, None),
        (qjax.int4, (-1,), None, None),
        (qjax.int4, (-1,), 0, 2),
        (qjax.int2, (0, 1), None, None),
    ],
)
def test_lsq_init_scale_formula(fmt, axes, gaxis, gsize):
    spec = QuantSpec(fmt, channel_axes=axes, group_axis=gaxis, group_size=gsize, ste="lsq")
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    s = np.asarray(lsq_init_scale(x, spec))
    a = np.abs(x.astype(np.float64))
    if gaxis is not None:
        a = a.reshape(SHAPE[0] // gsize, gsize, SHAPE[1])
        want = 2 * a.mean(axis=1) / np.sqrt(fmt.qmax)
    else:
        red = tuple(i for i in range(2) if i - 2 not in axes and i not in axes)
        want = 2 * a.mean(axis=red, keepdims=True) / np.sqrt(fmt.qmax)
    assert s.shape == spec.layout(SHAPE).scale_shape
    np.testing.assert_allclose(s, want.reshape(s.shape), rtol=1e-6)


def test_lsq_init_scale_zero_group_and_short_group():
    spec = QuantSpec(qjax.int4, group_axis=0, group_size=4, pad_groups=True, ste="lsq")
    x = np.array([0, 0, 0, 0, 1, -2, 3, -4, 5, 6], np.float32)
    s = np.asarray(lsq_init_scale(x, spec))
    # zero group -> 1; the short last group [5, 6] averages its own two elements
    np.testing.assert_allclose(s, [1.0, 2 * 2.5 / np.sqrt(7), 2 * 5.5 / np.sqrt(7)], rtol=1e-6)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        lsq_init_scale(np.ones(4, np.int32), spec)
    # a group of ~1e-38: its scale floors at the smallest normal, not 1 (that made it all zeros)
    tiny = np.finfo(np.float32).tiny
    s = np.asarray(lsq_init_scale(np.array([2 * tiny, -2 * tiny, 0, 0, 1, 1, 1, 1], np.float32), spec))
    assert s[0] == tiny and s[1] == pytest.approx(2 / np.sqrt(7), rel=1e-6)


def test_fake_quant_grad_under_jit_and_vmap():
    spec = QuantSpec(qjax.int4, channel_axes=(-1,), ste="clipped")
    xs = RNG.standard_normal((3, *SHAPE)).astype(np.float32)
    f = jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(fake_quant(x, spec) * x))))
    got = np.asarray(f(xs))
    for i in range(3):
        # d/dx sum(fq(x) * x) = fq(x) + x * ste'(x) = fq(x) + x (nothing clips with absmax)
        want = np.asarray(fake_quant(xs[i], spec)) + xs[i]
        np.testing.assert_allclose(got[i], want, rtol=1e-6)


def test_fake_quant_nan_group_is_nan_other_groups_unaffected():
    spec = QuantSpec(qjax.int8, channel_axes=(-1,))
    x = RNG.standard_normal(SHAPE).astype(np.float32)
    ref = np.asarray(fake_quant(x, spec))
    x[2, 3] = np.nan
    y = np.asarray(fake_quant(x, spec))
    assert np.isnan(y[:, 3]).all()
    np.testing.assert_array_equal(np.delete(y, 3, axis=1), np.delete(ref, 3, axis=1))


def test_fake_quant_bad_input():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        fake_quant(np.ones(4, np.int8), QuantSpec(qjax.int8))
    with pytest.raises(TypeError, match="spec"):
        fake_quant(np.ones(4, np.float32), qjax.int8)


def test_clipped_ste_skips_the_mask_only_where_nothing_can_clip():
    from qjax.numerics.fake_quant import never_clips

    base = QuantSpec(qjax.int8, channel_axes=(-1,), ste="clipped")
    assert never_clips(base)
    assert not never_clips(base.replace(calibration=qjax.calib.absmax(half_step=True)))
    assert not never_clips(base.replace(symmetric=False))
    assert not never_clips(base.replace(rounding="stochastic"))
    assert not never_clips(base.replace(calibration=qjax.calib.percentile(99.0)))
    # half_step maps the extreme to qmax + 1/2: round-half-even sends 127.5 to 128, clipped
    x = np.array([[1.0, 0.25, -0.5]], np.float32)
    spec = QuantSpec(qjax.int8, calibration=qjax.calib.absmax(half_step=True), ste="clipped")
    g = np.asarray(_vjp(x, spec, np.ones_like(x)))
    assert g[0, 0] == 0.0 and np.all(g[0, 1:] == 1.0)
