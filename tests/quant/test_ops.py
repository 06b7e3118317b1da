"""Quantized ops (``qjax.quant.ops``) against independent numpy references.

Integer paths: the output must equal ``(sum (qa - za) * (qb - zb), in int64) * sa * sb``
within float32 rounding; where the scales do not vary along the contraction, the int64
accumulation is recovered exactly from the output (``round(y / (sa * sb)) == acc``).
Float paths: float64 references with stated tolerances. Conv references are a numpy
convolution written here (no XLA)."""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qjax
from qjax.quant.ops import quantized_conv_general_dilated as qconv
from qjax.quant.ops import quantized_dot_general as qdot

EPS = float(np.finfo(np.float32).eps)
MM = (((1,), (0,)), ((), ()))
Q = qjax.QuantSpec
A8 = Q(qjax.int8)
W8 = Q(qjax.int8, channel_axes=(-1,))


def normal(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# -- references ------------------------------------------------------------------------------


def parts(q: qjax.QArray):
    """(codes, scale, zero point) of a QArray as dense int64 / float64 arrays."""
    codes = np.asarray(q.unpacked_values()).astype(np.int64)
    nd = codes.ndim

    def dense(a):
        a = np.asarray(a)
        if q.group_axis is not None:
            g = q.group_axis % nd
            a = np.take(np.repeat(a, q.group_size, axis=g), np.arange(codes.shape[g]), axis=g)
        return np.broadcast_to(a, codes.shape)

    s = dense(np.asarray(q.scale, np.float64))
    z = np.zeros_like(codes) if q.zero_point is None else dense(np.asarray(q.zero_point).astype(np.int64))
    return codes, s, z


def np_dot_general(a, b, dn):
    """``lax.dot_general`` semantics with numpy.einsum (exact for int64)."""
    (lc, rc), (lb, rb) = dn
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    la, ra = [None] * a.ndim, [None] * b.ndim
    for x, y in list(zip(lc, rc)) + list(zip(lb, rb)):
        la[x] = ra[y] = next(letters)
    for sub in (la, ra):
        for i, v in enumerate(sub):
            if v is None:
                sub[i] = next(letters)
    out = [la[d] for d in lb] + [la[d] for d in range(a.ndim) if d not in lc + lb]
    out += [ra[d] for d in range(b.ndim) if d not in rc + rb]
    return np.einsum(f"{''.join(la)},{''.join(ra)}->{''.join(out)}", a, b)


def first_along(x, axes):
    """``x`` with the given axes reduced to their first entry (kept, size 1)."""
    idx = tuple(slice(0, 1) if d in axes else slice(None) for d in range(x.ndim))
    return x[idx]


def check_int_dot(y, qa, qb, dn, exact=True):
    """``y`` against the int64 reference; ``exact``: also recover the accumulation."""
    (ca, sa, za), (cb, sb, zb) = parts(qa), parts(qb)
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    ref = np_dot_general((ca - za) * sa, (cb - zb) * sb, dn)
    mag = np_dot_general(np.abs((ca - za) * sa), np.abs((cb - zb) * sb), dn)
    assert y.shape == ref.shape
    np.testing.assert_array_less(np.abs(y - ref), 16 * EPS * mag + 1e-30)
    if exact:  # scales constant along the contraction: recover the integer sum
        (lc, rc), _ = dn
        acc = np_dot_general(ca - za, cb - zb, dn)
        s_out = np_dot_general(first_along(sa, lc), first_along(sb, rc), dn)
        assert np.max(np.abs(acc)) < 2**22
        np.testing.assert_array_equal(np.round(y / s_out).astype(np.int64), acc)


def check_float(y, ref, mag, tol=64 * EPS):
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    assert y.shape == ref.shape
    np.testing.assert_array_less(np.abs(y - ref), tol * mag + 1e-30)


def dot_dtypes(closed) -> list[tuple[str, ...]]:
    """Input dtypes of every dot_general / conv in a jaxpr, sub-jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else [p]:
                    if isinstance(sub, jex.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jex.core.Jaxpr):
                        walk(sub)

    walk(closed.jaxpr)
    return found


# -- integer dot_general --------------------------------------------------------------------------

ATT = (((3,), (3,)), ((0, 1), (0, 1)))
TRANSPOSED = (((0,), (1,)), ((), ()))

# name: (x shape, w shape, dn, op's lhs spec, the same spec resolved, w spec, exact)
INT_CASES = {
    "per-tensor": ((8, 64), (64, 24), MM, A8, A8, Q(qjax.int8), True),
    "per-channel W, per-token A": (
        (6, 64),
        (64, 24),
        MM,
        Q(qjax.int8, channel_axes=qjax.PER_TOKEN),
        Q(qjax.int8, channel_axes=(0,)),
        W8,
        True,
    ),
    "asymmetric uint8 A": (
        (6, 64),
        (64, 24),
        MM,
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, symmetric=False),
        W8,
        True,
    ),
    "asymmetric per-token A": (
        (6, 64),
        (64, 24),
        MM,
        Q(qjax.uint8, channel_axes=qjax.PER_TOKEN, symmetric=False),
        Q(qjax.uint8, channel_axes=(0,), symmetric=False),
        W8,
        True,
    ),
    "group 32 W": (
        (5, 96),
        (96, 24),
        MM,
        A8,
        A8,
        Q(qjax.int8, channel_axes=(-1,), group_size=32, group_axis=0),
        False,
    ),
    "group 2 W (more groups than unrolled)": (
        (3, 256),
        (256, 8),
        MM,
        A8,
        A8,
        Q(qjax.int8, channel_axes=(-1,), group_size=2, group_axis=0),
        False,
    ),
    "group 32 padded (K=100)": (
        (3, 100),
        (100, 8),
        MM,
        A8,
        A8,
        Q(qjax.int8, channel_axes=(-1,), group_size=32, group_axis=0, pad_groups=True),
        False,
    ),
    "int4 packed along N (odd N)": ((5, 64), (64, 25), MM, A8, A8, Q(qjax.int4, channel_axes=(-1,)), True),
    "int4 packed along K": (
        (5, 64),
        (64, 24),
        MM,
        A8,
        A8,
        Q(qjax.int4, channel_axes=(-1,), pack_axis=0),
        True,
    ),
    "int4 packed along K (odd K)": (
        (5, 63),
        (63, 24),
        MM,
        A8,
        A8,
        Q(qjax.int4, channel_axes=(-1,), pack_axis=0),
        True,
    ),
    "int4 g32 packed along K": (
        (5, 64),
        (64, 24),
        MM,
        A8,
        A8,
        Q(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0, pack_axis=0),
        False,
    ),
    "uint4 asym g32 W, asym A": (
        (5, 96),
        (96, 24),
        MM,
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint4, channel_axes=(-1,), group_size=32, group_axis=0, symmetric=False),
        False,
    ),
    "int2 packed": ((5, 64), (64, 24), MM, A8, A8, Q(qjax.int2, channel_axes=(-1,)), True),
    "bfloat16-stored weight scales": (
        (5, 64),
        (64, 24),
        MM,
        A8,
        A8,
        Q(qjax.int8, channel_axes=(-1,), scale_dtype="bfloat16"),
        True,
    ),
    "batch 1 (vector lhs)": ((1, 64), (64, 24), MM, A8, A8, W8, True),
    "vector rhs": ((6, 64), (64,), MM, A8, A8, Q(qjax.int8), True),
    "contracting first, W transposed": (
        (64, 6),
        (24, 64),
        TRANSPOSED,
        Q(qjax.int8, channel_axes=qjax.PER_TOKEN),
        Q(qjax.int8, channel_axes=(1,)),
        Q(qjax.int8, channel_axes=(0,)),
        True,
    ),
}


@pytest.mark.parametrize("case", list(INT_CASES))
def test_int_dot_matches_int64_reference(case):
    xs, ws, dn, spec, resolved, wspec, exact = INT_CASES[case]
    x, w = normal(xs, 0), normal(ws, 1)
    qw = qjax.quantize(w, wspec)
    f = jax.jit(lambda x, qw: qdot(x, qw, dn, lhs_spec=spec))
    y = f(x, qw)
    assert y.dtype == jnp.float32
    check_int_dot(y, qjax.quantize(x, resolved), qw, dn, exact)
    # the contraction really runs on int8 codes with int32 accumulation
    assert ("int8", "int8") in dot_dtypes(jax.make_jaxpr(f)(x, qw))


def test_attention_both_operands_quantized_on_the_fly():
    q, k = normal((2, 3, 5, 16), 0), normal((2, 3, 7, 16), 1)
    tok = Q(qjax.int8, channel_axes=qjax.PER_TOKEN)
    y = jax.jit(lambda q, k: qdot(q, k, ATT, lhs_spec=tok, rhs_spec=tok))(q, k)
    assert y.shape == (2, 3, 5, 7)
    res = Q(qjax.int8, channel_axes=(0, 1, 2))
    check_int_dot(y, qjax.quantize(q, res), qjax.quantize(k, res), ATT)


def test_attention_with_quantized_keys_and_static_query_scale():
    q, k = normal((2, 3, 5, 16), 0), normal((2, 3, 7, 16), 1)
    qk = qjax.quantize(k, Q(qjax.int8, channel_axes=(0, 1, 2)))
    s = jnp.float32(0.02)
    y = qdot(q, qk, ATT, lhs_spec=A8, lhs_scale=s)
    check_int_dot(y, qjax.quantize(q, A8, scale=s), qk, ATT)


def test_int_dot_overflow_is_split_int16():
    # int16 codes near 32767 times int8 codes 127 over K=1024 overflow int32 (4.3e9)
    x = jnp.ones((3, 1024), jnp.float32) + 1e-3 * normal((3, 1024), 0)
    w = jnp.ones((1024, 5), jnp.float32) + 1e-3 * normal((1024, 5), 1)
    qw = qjax.quantize(w, W8)
    a16 = Q(qjax.int16)
    y = qdot(x, qw, MM, lhs_spec=a16)
    check_int_dot(y, qjax.quantize(x, a16), qw, MM, exact=False)
    assert float(jnp.min(y)) > 1000  # no wrapped (negative) accumulations


def test_int_dot_overflow_is_split_large_k():
    k = 140_000  # 128 * 127 * K > 2**31
    x = jnp.ones((2, k), jnp.float32)
    w = jnp.ones((k, 3), jnp.float32)
    y = qdot(x, qjax.quantize(w, W8), MM, lhs_spec=A8)
    np.testing.assert_allclose(np.asarray(y), k, rtol=1e-5)


def test_method_convert_with_int_operands_is_exact():
    x, w = normal((6, 64), 0), normal((64, 24), 1)
    qw = qjax.quantize(w, W8)
    y = qdot(x, qw, MM, lhs_spec=A8, method="convert")
    check_int_dot(y, qjax.quantize(x, A8), qw, MM)


# -- weight-only and fp8 ---------------------------------------------------------------------------

WEIGHT_ONLY = {
    "W8": W8,
    "W4": Q(qjax.int4, channel_axes=(-1,)),
    "W4 g32": Q(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0),
    "uint8 asym": Q(qjax.uint8, channel_axes=(-1,), symmetric=False),
    "W4 g32 bf16 scales": Q(
        qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0, scale_dtype="bfloat16"
    ),
}


@pytest.mark.parametrize("wname", list(WEIGHT_ONLY))
@pytest.mark.parametrize("method", ["auto", "split", "convert", "dequant"])
@pytest.mark.parametrize("m", [1, 12])
def test_weight_only_matches_float64(wname, method, m):
    x, w = normal((m, 96), 0), normal((96, 40), 1)
    qw = qjax.quantize(w, WEIGHT_ONLY[wname])
    y = qdot(x, qw, MM, method=method)
    wd = np.asarray(qw.dequantize(), np.float64)
    xd = np.asarray(x, np.float64)
    check_float(y, xd @ wd, np.abs(xd) @ np.abs(wd))


def test_weight_only_bf16_activations():
    x, w = normal((7, 96), 0, jnp.bfloat16), normal((96, 40), 1)
    qw = qjax.quantize(w, Q(qjax.int4, channel_axes=(-1,), group_size=32, group_axis=0))
    xd, wd = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(qw.dequantize(), np.float64)
    for m in ("auto", "split", "convert"):
        y = qdot(x, qw, MM, method=m)
        assert y.dtype == jnp.float32
        check_float(y, xd @ wd, np.abs(xd) @ np.abs(wd))
    yb = qdot(x, qw, MM, out_dtype=jnp.bfloat16)
    assert yb.dtype == jnp.bfloat16
    check_float(yb, xd @ wd, np.abs(xd) @ np.abs(wd), tol=2**-8)


def test_bf16_activations_int_path():
    x, w = normal((6, 64), 0, jnp.bfloat16), normal((64, 24), 1)
    qw = qjax.quantize(w, W8)
    spec = Q(qjax.int8, channel_axes=qjax.PER_TOKEN)
    y = qdot(x, qw, MM, lhs_spec=spec, out_dtype=jnp.float32)
    check_int_dot(y, qjax.quantize(x, Q(qjax.int8, channel_axes=(0,))), qw, MM)
    assert qdot(x, qw, MM, lhs_spec=spec).dtype == jnp.float32  # result type of bf16 and the f32 weight


def test_fp8_weights_and_activations():
    x, w = normal((6, 64), 0), normal((64, 24), 1)
    qw = qjax.quantize(w, Q(qjax.fp8_e4m3, channel_axes=(-1,)))
    wd, xd = np.asarray(qw.dequantize(), np.float64), np.asarray(x, np.float64)
    exact = xd @ np.asarray(w, np.float64)
    y = qdot(x, qw, MM)  # weight-only fp8
    check_float(y, xd @ wd, np.abs(xd) @ np.abs(wd))
    a8 = Q(qjax.fp8_e4m3)
    y2 = qdot(x, qw, MM, lhs_spec=a8)  # fp8 x fp8
    xq = np.asarray(qjax.quantize(x, a8).dequantize(), np.float64)
    check_float(y2, xq @ wd, np.abs(xq) @ np.abs(wd))
    for out in (y, y2):  # and within fp8 tolerance of the unquantized product
        assert np.max(np.abs(np.asarray(out) - exact)) < 0.1 * np.max(np.abs(exact))


def test_float_operands_without_specs_are_a_plain_dot():
    x, w = normal((4, 32), 0), normal((32, 8), 1)
    np.testing.assert_allclose(qdot(x, w, MM), x @ w, rtol=1e-6, atol=1e-6)


# -- conv --------------------------------------------------------------------------------------------


def np_conv_nhwc(x, w, strides, padding, groups):
    """Direct convolution, NHWC x HWIO, explicit padding pairs, feature groups."""
    n, h, wd, _c = x.shape
    kh, kw, ci, o = w.shape
    (pt, pb), (pl, pr) = padding
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (h + pt + pb - kh) // strides[0] + 1
    wo = (wd + pl + pr - kw) // strides[1] + 1
    out = np.zeros((n, ho, wo, o), np.result_type(x, w))
    og = o // groups
    for i in range(kh):
        for j in range(kw):
            patch = xp[
                :,
                i : i + strides[0] * (ho - 1) + 1 : strides[0],
                j : j + strides[1] * (wo - 1) + 1 : strides[1],
            ]
            for g in range(groups):
                out[..., g * og : (g + 1) * og] += (
                    patch[..., g * ci : (g + 1) * ci] @ w[i, j, :, g * og : (g + 1) * og]
                )
    return out


def same_padding(size, k, s):
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return (total // 2, total - total // 2)


CONV_CASES = {
    # name: (layout, x shape (in that layout), w shape, strides, groups, act spec, resolved, w spec)
    "NHWC/HWIO s2 W8 A8": ("NHWC", (2, 9, 9, 8), (3, 3, 8, 6), (2, 2), 1, A8, A8, W8),
    "NCHW/OIHW s2 asym per-batch A": (
        "NCHW",
        (2, 8, 9, 9),
        (6, 8, 3, 3),
        (2, 2),
        1,
        Q(qjax.uint8, channel_axes=qjax.PER_TOKEN, symmetric=False),
        Q(qjax.uint8, channel_axes=(0,), symmetric=False),
        Q(qjax.int8, channel_axes=(0,)),
    ),
    "depthwise": ("NHWC", (2, 8, 8, 8), (3, 3, 1, 8), (1, 1), 8, A8, A8, W8),
    "int4 packed W": (
        "NHWC",
        (2, 7, 7, 8),
        (3, 3, 8, 6),
        (1, 1),
        1,
        A8,
        A8,
        Q(qjax.int4, channel_axes=(-1,)),
    ),
    "asym W and asym A": (
        "NHWC",
        (2, 7, 7, 4),
        (3, 3, 4, 6),
        (2, 2),
        1,
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, channel_axes=(-1,), symmetric=False),
    ),
    # pointwise (1x1) convs run as a dot_general (qjax.quant.ops_conv_pointwise)
    "1x1 NHWC W8 A8": ("NHWC", (2, 5, 7, 8), (1, 1, 8, 6), (1, 1), 1, A8, A8, W8),
    "1x1 NCHW/OIHW asym per-batch A": (
        "NCHW",
        (3, 8, 9, 6),
        (6, 8, 1, 1),
        (1, 1),
        1,
        Q(qjax.uint8, channel_axes=qjax.PER_TOKEN, symmetric=False),
        Q(qjax.uint8, channel_axes=(0,), symmetric=False),
        Q(qjax.int8, channel_axes=(0,)),
    ),
    "1x1 int4 packed grouped W": (
        "NHWC",
        (2, 4, 4, 8),
        (1, 1, 8, 6),
        (1, 1),
        1,
        A8,
        A8,
        Q(qjax.int4, channel_axes=(-1,), pack=True, pack_axis=-2),
    ),
    # strided: the per-tensor activation scale still covers the pixels the stride skips
    "1x1 s3 asym W and asym A": (
        "NHWC",
        (2, 7, 7, 4),
        (1, 1, 4, 6),
        (3, 3),
        1,
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, symmetric=False),
        Q(qjax.uint8, channel_axes=(-1,), symmetric=False),
    ),
    "1x1 s2 per-batch A (stays a conv)": (
        "NHWC",
        (3, 5, 5, 4),
        (1, 1, 4, 6),
        (2, 2),
        1,
        Q(qjax.int8, channel_axes=qjax.PER_TOKEN),
        Q(qjax.int8, channel_axes=(0,)),
        W8,
    ),
}


def to_nhwc(layout, x, w):
    if layout == "NHWC":
        return x, w
    return np.transpose(x, (0, 2, 3, 1)), np.transpose(w, (2, 3, 1, 0))


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_int_conv_matches_int64_reference(case):
    layout, xs, ws, strides, groups, spec, resolved, wspec = CONV_CASES[case]
    dn = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    x, w = normal(xs, 0), normal(ws, 1)
    qw = qjax.quantize(w, wspec)
    f = jax.jit(
        lambda x, qw: qconv(
            x,
            qw,
            window_strides=strides,
            padding="SAME",
            lhs_dilation=None,
            rhs_dilation=None,
            dimension_numbers=dn,
            feature_group_count=groups,
            lhs_spec=spec,
        )
    )
    y = np.asarray(f(x, qw), np.float64)
    jaxpr = jax.make_jaxpr(f)(x, qw)
    assert ("int8", "int8") in dot_dtypes(jaxpr)
    pointwise = case.startswith("1x1") and "stays a conv" not in case
    assert ("conv_general_dilated" in str(jaxpr)) != pointwise  # 1x1 convs run as a dot
    (cx, sx, zx), (cw, sw, zw) = parts(qjax.quantize(x, resolved)), parts(qw)
    cx, cw = to_nhwc(layout, cx - zx, cw - zw)
    sx, sw = to_nhwc(layout, sx, sw)
    _, h, wd, _ = cx.shape
    pad = (same_padding(h, cw.shape[0], strides[0]), same_padding(wd, cw.shape[1], strides[1]))
    acc = np_conv_nhwc(cx, cw, strides, pad, groups)  # int64
    s_out = sx[:, :1, :1, :1] * sw[0, 0, 0, :]
    y = y if layout == "NHWC" else np.transpose(y, (0, 2, 3, 1))
    assert y.shape == acc.shape
    np.testing.assert_array_equal(np.round(y / s_out).astype(np.int64), acc)
    np.testing.assert_array_less(np.abs(y - acc * s_out), 4 * EPS * np.abs(acc * s_out) + 1e-30)


def test_conv_weight_only_and_dilation_vs_float_conv():
    x, w = normal((2, 9, 9, 6), 0), normal((3, 3, 3, 8), 1)  # feature_group_count=2
    qw = qjax.quantize(w, W8)
    kw = dict(
        window_strides=(1, 2),
        padding=((1, 1), (2, 0)),
        lhs_dilation=(1, 1),
        rhs_dilation=(2, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2,
    )
    ref = lax.conv_general_dilated(x, qw.dequantize(), **kw, precision=lax.Precision.HIGHEST)
    mag = lax.conv_general_dilated(
        jnp.abs(x), jnp.abs(qw.dequantize()), **kw, precision=lax.Precision.HIGHEST
    )
    for m in ("auto", "convert", "dequant"):
        check_float(qconv(x, qw, **kw, method=m), np.asarray(ref, np.float64), np.asarray(mag, np.float64))
    y8 = qconv(x, qw, **kw, lhs_spec=A8)
    xq = qjax.quantize(x, A8).dequantize()
    ref8 = lax.conv_general_dilated(xq, qw.dequantize(), **kw, precision=lax.Precision.HIGHEST)
    check_float(y8, np.asarray(ref8, np.float64), np.asarray(mag, np.float64))


def test_conv_overflow_is_split_int16():
    x = jnp.ones((1, 5, 5, 64), jnp.float32) + 1e-3 * normal((1, 5, 5, 64), 0)
    w = jnp.ones((3, 3, 64, 4), jnp.float32)
    qw = qjax.quantize(w, W8)
    y = qconv(
        x,
        qw,
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        lhs_spec=Q(qjax.int16),
    )
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.sum(x[:, :3, :3, :])), rtol=1e-3)


# -- derivatives, jit, vmap -----------------------------------------------------------------------------


def test_grad_int_path_is_straight_through():
    x, w, g = normal((4, 32), 0), normal((32, 8), 1), normal((4, 8), 2)
    qw = qjax.quantize(w, W8)
    for spec, method in ((A8, "auto"), (None, "split"), (None, "convert")):
        loss = lambda x, spec=spec, method=method: jnp.sum(qdot(x, qw, MM, lhs_spec=spec, method=method) * g)
        dx = jax.grad(loss)(x)
        np.testing.assert_allclose(dx, g @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_grad_both_operands_and_clipping():
    q, k, g = normal((2, 3, 5, 16), 0), normal((2, 3, 7, 16), 1), normal((2, 3, 5, 7), 2)
    tok = Q(qjax.int8, channel_axes=qjax.PER_TOKEN)
    res = Q(qjax.int8, channel_axes=(0, 1, 2))
    dq, dk = jax.grad(lambda q, k: jnp.sum(qdot(q, k, ATT, lhs_spec=tok, rhs_spec=tok) * g), (0, 1))(q, k)
    fq = lambda v: qjax.fake_quant(v, res)
    rq, rk = jax.grad(lambda q, k: jnp.sum(lax.dot_general(fq(q), fq(k), ATT) * g), (0, 1))(q, k)
    np.testing.assert_allclose(dq, rq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk, rk, rtol=1e-5, atol=1e-5)
    # a static scale clips large activations: the clipped STE zeroes their gradient
    x = jnp.array([[0.1, 5.0, -0.2, -7.0]])
    qw = qjax.quantize(normal((4, 3), 3), W8)
    dx = jax.grad(lambda x: jnp.sum(qdot(x, qw, MM, lhs_spec=A8, lhs_scale=1.0 / 127)))(x)
    assert dx[0, 1] == 0 and dx[0, 3] == 0 and dx[0, 0] != 0


def test_grad_conv_and_jvp():
    x, w = normal((2, 6, 6, 4), 0), normal((3, 3, 4, 5), 1)
    qw = qjax.quantize(w, W8)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    dx = jax.grad(lambda x: jnp.sum(qconv(x, qw, lhs_spec=A8, **kw)))(x)
    ref = jax.grad(
        lambda x: jnp.sum(
            lax.conv_general_dilated(
                x, qw.dequantize(), (1, 1), "SAME", dimension_numbers=kw["dimension_numbers"]
            )
        )
    )(x)
    np.testing.assert_allclose(dx, ref, rtol=1e-4, atol=1e-4)
    t = normal((4, 32), 5)
    xx, qq = normal((4, 32), 6), qjax.quantize(normal((32, 8), 7), W8)
    _, dy = jax.jvp(lambda v: qdot(v, qq, MM, lhs_spec=A8), (xx,), (t,))
    np.testing.assert_allclose(dy, t @ qq.dequantize(), rtol=1e-5, atol=1e-5)


def test_vmap_matches_loop():
    xs, w = normal((3, 4, 32), 0), normal((32, 8), 1)
    qw = qjax.quantize(w, W8)
    spec = Q(qjax.int8, channel_axes=qjax.PER_TOKEN)
    f = lambda x: qdot(x, qw, MM, lhs_spec=spec)
    np.testing.assert_allclose(jax.vmap(f)(xs), jnp.stack([f(x) for x in xs]), rtol=1e-6)


def test_stochastic_rounding_uses_key():
    x, w = normal((4, 32), 0), normal((32, 8), 1)
    qw = qjax.quantize(w, W8)
    spec = Q(qjax.int8, rounding="stochastic")
    k = jax.random.key(0)
    y1, y2 = qdot(x, qw, MM, lhs_spec=spec, key=k), qdot(x, qw, MM, lhs_spec=spec, key=k)
    np.testing.assert_array_equal(y1, y2)
    check_int_dot(y1, qjax.quantize(x, spec, key=k), qw, MM)


# -- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    x, w = normal((4, 32), 0), normal((32, 8), 1)
    qw = qjax.quantize(w, W8)
    with pytest.raises(ValueError, match=r"shape mismatch: lhs axis 1 \(size 32\).*rhs is QArray"):
        qdot(x, qjax.quantize(normal((16, 8), 2), W8), MM)
    with pytest.raises(ValueError, match="axis 2 of lhs, which has rank 2"):
        qdot(x, qw, (((2,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="dimension_numbers must be"):
        qdot(x, qw, ((1, 0), ()))
    with pytest.raises(ValueError, match=r"rhs \(QArray.*varies along axis 0 of rhs.*cannot be factored"):
        qdot(x, qjax.quantize(w, Q(qjax.int8, channel_axes=(0,))), MM)
    with pytest.raises(ValueError, match=r"lhs_spec .*varies along axis 1 of lhs"):
        qdot(x, qw, MM, lhs_spec=Q(qjax.int8, channel_axes=(-1,)))
    with pytest.raises(ValueError, match="rhs is already quantized"):
        qdot(x, qw, MM, rhs_spec=W8)
    with pytest.raises(ValueError, match="per-token"):
        qdot(x, qw, MM, lhs_spec=Q(qjax.int8, channel_axes=qjax.PER_TOKEN), lhs_scale=0.1)
    with pytest.raises(ValueError, match=r"lhs_scale of shape \(4, 1\) varies along axis 0"):
        qdot(x, qw, MM, lhs_spec=Q(qjax.int8, channel_axes=(0,)), lhs_scale=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=r"lhs_scale of shape \(3,\) does not broadcast"):
        qdot(x, qw, MM, lhs_spec=A8, lhs_scale=jnp.ones((3,)))
    with pytest.raises(ValueError, match="lhs_spec is None"):
        qdot(x, qw, MM, lhs_scale=0.1)
    with pytest.raises(ValueError, match="needs lhs_zero_point"):
        qdot(x, qw, MM, lhs_spec=Q(qjax.uint8, symmetric=False), lhs_scale=0.1)
    with pytest.raises(TypeError, match="QArray"):
        qdot(jnp.ones((4, 32), jnp.int8), qw, MM)
    with pytest.raises(ValueError, match="method="):
        qdot(x, qw, MM, method="fast")
    with pytest.raises(ValueError, match="two integer-quantized"):
        qdot(x, qw, MM, method="int")
    with pytest.raises(ValueError, match="one plain float operand"):
        qdot(x, qw, MM, lhs_spec=A8, method="split")


def test_conv_errors():
    x, w = normal((2, 8, 8, 4), 0), normal((3, 3, 4, 6), 1)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="shape mismatch: lhs feature dimension 3 has size 4"):
        qconv(x, qjax.quantize(normal((3, 3, 5, 6), 2), W8), **kw)
    with pytest.raises(ValueError, match="cannot be factored"):
        qconv(x, qjax.quantize(w, Q(qjax.int8, channel_axes=(2,))), **kw)
    with pytest.raises(ValueError, match="lhs_spec"):
        qconv(x, qjax.quantize(w, W8), lhs_spec=Q(qjax.int8, channel_axes=(-1,)), **kw)
    with pytest.raises(ValueError, match="for a conv"):
        qconv(x, qjax.quantize(w, W8), method="split", **kw)
    with pytest.raises(ValueError, match="window_strides must have 2 entries"):
        qconv(x, qjax.quantize(w, W8), **{**kw, "window_strides": (1,)})
