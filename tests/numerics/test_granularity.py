"""Granularity: per-tensor, per-channel over any axes, per-group (with channel axes),
padding of a short last group, and axis errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.numerics import QuantSpec, dequantize, quantize
from qjax.numerics import compute_scale as compute_scale_eager

from .reference import ref_quantize, scale_groups

RNG = np.random.default_rng(1234)
# one compile per (shape, spec) instead of one per primitive
compute_scale = jax.jit(compute_scale_eager, static_argnums=1)


def _x(shape, dist="normal"):
    if dist == "t":
        return RNG.standard_t(3, size=shape).astype(np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


# (shape, channel_axes, group_axis, group_size, expected scale shape)
LAYOUTS = [
    ((3, 5, 7), (), None, None, (1, 1, 1)),
    ((3, 5, 7), (0,), None, None, (3, 1, 1)),
    ((3, 5, 7), (-1,), None, None, (1, 1, 7)),
    ((3, 5, 7), (1,), None, None, (1, 5, 1)),
    ((3, 5, 7), (0, 2), None, None, (3, 1, 7)),
    ((3, 5, 7), (-3, -1), None, None, (3, 1, 7)),
    ((3, 5, 7), (2, 0, 1), None, None, (3, 5, 7)),
    ((8, 6), (), 0, 4, (2, 1)),
    ((8, 6), (), -1, 3, (1, 2)),
    ((8, 6), (-1,), 0, 2, (4, 6)),
    ((8, 6), (0,), 1, 2, (8, 3)),
    ((2, 8, 6), (0,), 1, 4, (2, 2, 1)),
    ((2, 8, 6), (-1,), -2, 4, (1, 2, 6)),
    ((2, 8, 6), (0, 2), 1, 8, (2, 1, 6)),
    ((4, 2, 9), (1,), 2, 3, (1, 2, 3)),
    ((12,), (), 0, 4, (3,)),
    ((12,), (), 0, 12, (1,)),
    ((12,), (), 0, 1, (12,)),
    ((), (), None, None, ()),
    ((1, 1), (0,), 1, 1, (1, 1)),
]


@pytest.mark.parametrize("shape,axes,gaxis,gsize,want", LAYOUTS)
def test_scale_shape_and_values_against_reference(shape, axes, gaxis, gsize, want):
    spec = QuantSpec(qjax.int8, channel_axes=axes, group_axis=gaxis, group_size=gsize)
    assert spec.layout(shape).scale_shape == want
    assert scale_groups(shape, axes, gaxis, gsize)[0] == want
    x = _x(shape)
    codes, ref_s, _, ref_dq = ref_quantize(
        x, -128, 127, channel_axes=axes, group_axis=gaxis, group_size=gsize
    )
    q = quantize(x, spec)
    assert q.scale.shape == want and q.zero_point is None
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    np.testing.assert_array_equal(np.asarray(q.values, np.int64), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_dq)
    # elements per scale (for LSQ's gradient scale)
    assert spec.layout(shape).group_count * int(np.prod(want)) == int(np.prod(shape))


@pytest.mark.parametrize("shape,axes,gaxis,gsize,want", LAYOUTS[1:12:2])
def test_asymmetric_layouts_against_reference(shape, axes, gaxis, gsize, want):
    spec = QuantSpec(qjax.uint4, channel_axes=axes, group_axis=gaxis, group_size=gsize, symmetric=False)
    x = _x(shape) + 0.7
    q = quantize(x, spec)
    codes, ref_s, ref_zp, ref_dq = ref_quantize(
        x, 0, 15, channel_axes=axes, group_axis=gaxis, group_size=gsize, symmetric=False
    )
    assert q.zero_point.shape == want and q.zero_point.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    np.testing.assert_array_equal(np.asarray(q.zero_point, np.int64), ref_zp)
    np.testing.assert_array_equal(np.asarray(q.unpacked_values(), np.int64), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_dq)


def test_per_channel_scale_is_per_channel_absmax():
    # an analytic case: channel j holds multiples of (j + 1)
    x = np.arange(1, 5, dtype=np.float32)[None, :] * np.linspace(-1, 1, 9, dtype=np.float32)[:, None]
    s, zp = compute_scale_eager(x, QuantSpec(qjax.int8, channel_axes=(-1,)))
    assert zp is None and s.shape == (1, 4)
    np.testing.assert_allclose(np.asarray(s)[0], np.arange(1, 5) / 127, rtol=1e-7)


def test_per_token_is_every_axis_but_last():
    x = _x((2, 3, 4))
    a = quantize(x, QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN))
    b = quantize(x, QuantSpec(qjax.int8, channel_axes=(0, 1)))
    assert a.scale.shape == (2, 3, 1)
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))


# --------------------------------------------------------------------------------
# group size that does not divide


def test_group_size_not_dividing_is_a_clear_error():
    spec = QuantSpec(qjax.int4, group_size=4, group_axis=1)
    with pytest.raises(
        ValueError, match=r"group_size=4 does not divide axis 1 of length 10.*pad_groups=True"
    ):
        quantize(np.ones((3, 10), np.float32), spec)
    with pytest.raises(ValueError, match="pad_groups"):
        compute_scale(np.ones((3, 10), np.float32), spec)
    with pytest.raises(ValueError, match="pad_groups"):
        qjax.fake_quant(np.ones((3, 10), np.float32), spec)


PAD_CASES = [
    # shape, channel_axes, group_axis, group_size, calib, symmetric, fmt
    ((3, 10), (), 1, 4, "absmax", True, qjax.int4),
    ((10, 3), (-1,), 0, 4, "absmax", True, qjax.int8),
    ((2, 7, 3), (0,), 1, 3, "minmax", False, qjax.uint8),
    ((2, 7, 3), (0, 2), -2, 5, "absmax", True, qjax.int3),
    ((13,), (), 0, 5, "minmax", False, qjax.int8),
    ((3, 10), (0,), 1, 4, "percentile", True, qjax.int8),
    ((3, 10), (), 1, 4, "percentile", False, qjax.uint8),
]


@pytest.mark.parametrize("shape,axes,gaxis,gsize,calib,sym,fmt", PAD_CASES)
def test_pad_groups_matches_reference_short_last_group(shape, axes, gaxis, gsize, calib, sym, fmt):
    """With pad_groups=True the short last group is quantized as a group on its own:
    its range (and so its scale) must come from its own elements only."""
    kw = dict(p=90.0) if calib == "percentile" else {}
    c = qjax.calib.percentile(90.0) if calib == "percentile" else None
    spec = QuantSpec(
        fmt,
        channel_axes=axes,
        group_axis=gaxis,
        group_size=gsize,
        pad_groups=True,
        symmetric=sym,
        calibration=c,
    )
    x = _x(shape, "t")
    q = quantize(x, spec)
    codes, ref_s, ref_zp, ref_dq = ref_quantize(
        x,
        fmt.qmin,
        fmt.qmax,
        channel_axes=axes,
        group_axis=gaxis,
        group_size=gsize,
        symmetric=sym,
        calib=calib,
        **kw,
    )
    assert q.scale.shape == ref_s.shape
    assert q.shape == shape
    if calib == "percentile":
        # jnp.percentile in float32 vs numpy in float64
        np.testing.assert_allclose(np.asarray(q.scale), ref_s, rtol=2e-6)
        xh = np.asarray(dequantize(q))
        np.testing.assert_allclose(xh, ref_dq, rtol=0, atol=float(np.max(ref_s)) * 1.001)
        assert np.mean(np.asarray(q.unpacked_values(), np.int64) == codes) > 0.95
        return
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    if ref_zp is not None:
        np.testing.assert_array_equal(np.asarray(q.zero_point, np.int64), ref_zp)
    np.testing.assert_array_equal(np.asarray(q.unpacked_values(), np.int64), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_dq)
    np.testing.assert_array_equal(np.asarray(qjax.fake_quant(x, spec)), ref_dq)


def test_pad_groups_short_group_is_independent_of_other_groups():
    """Changing the full groups must not change the short last group's scale, and the
    short group's scale is its own absmax / qmax (analytic)."""
    spec = QuantSpec(qjax.int8, group_size=4, group_axis=0, pad_groups=True)
    x = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, -10], np.float32)
    s, _ = compute_scale(x, spec)
    np.testing.assert_allclose(np.asarray(s), np.array([4, 8, 10], np.float32) / 127, rtol=1e-7)
    x2 = x.copy()
    x2[:8] *= 100
    s2, _ = compute_scale(x2, spec)
    assert np.asarray(s2)[-1] == np.asarray(s)[-1]


def test_pad_groups_percentile_short_group_uses_only_its_elements():
    # last group is [9, 10]: its median of |x| is 9.5 (numpy), whatever the padding
    spec = QuantSpec(
        qjax.int8, group_size=4, group_axis=0, pad_groups=True, calibration=qjax.calib.percentile(50)
    )
    x = np.arange(1, 11, dtype=np.float32)
    s, _ = compute_scale(x, spec)
    want = np.array([np.percentile([1, 2, 3, 4], 50), np.percentile([5, 6, 7, 8], 50), 9.5]) / 127
    np.testing.assert_allclose(np.asarray(s), want, rtol=1e-6)


def test_pad_groups_mse_short_group_uses_only_its_elements():
    """MSE calibration of the short last group equals MSE calibration of that group
    quantized as a tensor of its own (edge padding would weight its last element, an
    outlier here, several times over and pick a wider range)."""
    c = qjax.calib.mse(num_candidates=16)
    x = np.random.default_rng(4).standard_normal(25).astype(np.float32)
    x[-1] = 5.0
    spec = QuantSpec(qjax.int4, group_size=16, group_axis=0, pad_groups=True, calibration=c)
    s, _ = compute_scale(x, spec)
    for i, sl in enumerate([slice(0, 16), slice(16, 25)]):
        alone, _ = compute_scale(x[sl], QuantSpec(qjax.int4, calibration=c))
        assert np.asarray(s)[i] == np.asarray(alone).item(), i
    # and the short group's choice is genuinely a clipped one (not the full range)
    assert np.asarray(s)[1] < 5.0 / 7


def test_pad_groups_when_group_size_exceeds_length():
    spec = QuantSpec(qjax.int8, group_size=16, group_axis=-1, pad_groups=True)
    x = _x((2, 5))
    q = quantize(x, spec)
    assert q.scale.shape == (1, 1)
    _, ref_s, _, ref_dq = ref_quantize(x, -128, 127)
    np.testing.assert_array_equal(np.asarray(q.scale), ref_s)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref_dq)


# --------------------------------------------------------------------------------
# axis errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(channel_axes=(2,)), r"channel_axes entry=2 .*rank 2"),
        (dict(channel_axes=(-3,)), r"channel_axes entry=-3 .*rank 2"),
        (dict(channel_axes=(0, 5)), r"channel_axes entry=5"),
        (dict(group_axis=2, group_size=2), r"group_axis=2 .*rank 2"),
        (dict(group_axis=-3, group_size=2), r"group_axis=-3"),
        (dict(pack_axis=2, format=qjax.int4), r"pack_axis=2"),
        (dict(pack_axis=-3, format=qjax.int4), r"pack_axis=-3"),
    ],
)
def test_axis_out_of_range_names_the_axis(kwargs, match):
    kwargs = {"format": qjax.int8, **kwargs}
    spec = QuantSpec(**kwargs)
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match=match):
        quantize(x, spec)
    if "pack_axis" not in kwargs:
        with pytest.raises(ValueError, match=match):
            compute_scale(x, spec)
        with pytest.raises(ValueError, match=match):
            qjax.fake_quant(x, spec)


def test_axes_equal_after_normalisation_rejected():
    with pytest.raises(ValueError, match="repeats"):
        QuantSpec(qjax.int8, channel_axes=(1, -1)).layout((4, 6))
    with pytest.raises(ValueError, match="group_axis=1 is also in channel_axes"):
        QuantSpec(qjax.int8, channel_axes=(-1,), group_axis=1, group_size=2).layout((4, 6))


def test_channel_axis_on_scalar_rejected():
    with pytest.raises(ValueError, match=r"channel_axes entry=0 .*rank 0"):
        quantize(np.float32(1.0), QuantSpec(qjax.int8, channel_axes=(0,)))
