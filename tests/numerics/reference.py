"""Independent numpy references for qjax.numerics tests.

Nothing here imports qjax: scale groups are enumerated with explicit slices (not the
library's grouped view), and every formula is the documented one, written in numpy
float32 the way the docs say the library computes it (divisions by constants as
multiplications by a float32 reciprocal, ``x * (1 / scale)``), so integer codes can be
compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import ml_dtypes
import numpy as np

F32 = np.float32


def scale_groups(
    shape: tuple[int, ...],
    channel_axes: tuple[int, ...] = (),
    group_axis: int | None = None,
    group_size: int | None = None,
) -> tuple[tuple[int, ...], Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]]:
    """Scale shape, and for every scale index the slice of ``x`` it covers.

    A short last group (``group_size`` not dividing) is simply the shorter slice: it is
    quantized on its own, with no padding.
    """
    nd = len(shape)
    ch = {a % nd for a in channel_axes}
    g = None if group_axis is None else group_axis % nd
    scale_shape = tuple(
        shape[a] if a in ch else (math.ceil(shape[a] / group_size) if a == g else 1) for a in range(nd)
    )

    def it():
        for idx in np.ndindex(*scale_shape):
            sl = []
            for a, i in enumerate(idx):
                if a in ch:
                    sl.append(slice(i, i + 1))
                elif a == g:
                    sl.append(slice(i * group_size, (i + 1) * group_size))
                else:
                    sl.append(slice(None))
            yield idx, tuple(sl)

    return scale_shape, it()


def ref_range(v: np.ndarray, calib: str, symmetric: bool, p: float = 99.0, lohi=(-1.0, 1.0)):
    """Calibrated range of one group, as documented (float64 for percentile)."""
    v = np.asarray(v, np.float32)
    if calib == "fixed":
        lo, hi = F32(lohi[0]), F32(lohi[1])
    elif calib == "absmax":
        a = np.max(np.abs(v), initial=F32(0))
        return -a, a
    elif calib == "minmax":
        lo, hi = np.min(v, initial=F32(0)), np.max(v, initial=F32(0))
    elif calib == "percentile":
        if v.size == 0:
            return F32(0), F32(0)
        if symmetric:
            a = np.percentile(np.abs(v).astype(np.float64), p)
            return -a, a
        return np.percentile(v.astype(np.float64), 100 - p), np.percentile(v.astype(np.float64), p)
    else:  # pragma: no cover
        raise ValueError(calib)
    if symmetric:
        a = max(abs(lo), abs(hi))
        return -a, a
    return lo, hi


def bf16_up(s) -> np.float32:
    """A positive float32 ``s`` rounded up (toward +inf) to bfloat16, as float32."""
    b = np.asarray(F32(s)).astype(ml_dtypes.bfloat16)
    if np.isfinite(s) and F32(b) < F32(s):
        b = (b.view(np.uint16) + np.uint16(1)).view(ml_dtypes.bfloat16)
    return F32(b)


def ref_scale(lo, hi, qmin: int, qmax: int, symmetric: bool, scale_dtype=None):
    """``scale_from_range`` as documented, in float32 (``scale_dtype="bfloat16"``: the
    scale rounded up to bfloat16 before the zero point is computed)."""
    lo, hi = F32(lo), F32(hi)
    finite = np.isfinite(lo) and np.isfinite(hi)
    if symmetric:
        a = F32(max(abs(lo), abs(hi)))
        s, nonzero = a * F32(1.0 / qmax), a > 0
        zp = None
    else:
        lo, hi = min(lo, F32(0)), max(hi, F32(0))
        inv = F32(1.0 / (qmax - qmin))
        with np.errstate(over="ignore"):
            w = F32(hi - lo)
        s, nonzero = (w * inv if np.isfinite(w) else hi * inv - lo * inv), w > 0
    # a non-zero range keeps at least the smallest normal scale; a zero range gets 1
    s = max(F32(s), np.finfo(F32).tiny) if nonzero else F32(1)
    if not finite:
        s = F32(np.nan)
    if scale_dtype == "bfloat16":
        s = bf16_up(s)
    if not symmetric:
        zp = 0 if not finite else int(np.clip(np.rint(F32(qmin) - lo * (F32(1) / s)), qmin, qmax))
    return s, zp


def ref_codes(v, s, zp, qmin, qmax):
    """``clip(rint(v * (1/s)) + zp)`` in float32; NaN codes become 0."""
    y = np.asarray(v, np.float32) * (F32(1) / F32(s))
    q = np.rint(y) + (0 if zp is None else zp)
    q = np.clip(q, qmin, qmax)
    return np.where(np.isnan(q), 0, q).astype(np.int64)


def ref_quantize(
    x,
    qmin: int,
    qmax: int,
    *,
    channel_axes=(),
    group_axis=None,
    group_size=None,
    symmetric=True,
    calib=None,
    scale_dtype=None,
    **calib_kw,
):
    """Reference fake-quantization of ``x`` (float32 numpy). ``scale_dtype="bfloat16"``:
    each scale is rounded up to bfloat16 (so the range never clips), and the zero point
    and the codes use the rounded scale.

    Returns ``(codes int64, scale (scale shape), zero_point or None, dequantized float32)``.
    """
    x = np.asarray(x, np.float32)
    calib = calib or ("absmax" if symmetric else "minmax")
    scale_shape, groups = scale_groups(x.shape, channel_axes, group_axis, group_size)
    scale = np.zeros(scale_shape, np.float32)
    zps = None if symmetric else np.zeros(scale_shape, np.int64)
    codes = np.zeros(x.shape, np.int64)
    dq = np.zeros(x.shape, np.float32)
    for idx, sl in groups:
        v = x[sl]
        lo, hi = ref_range(v, calib, symmetric, **calib_kw)
        s, zp = ref_scale(lo, hi, qmin, qmax, symmetric, scale_dtype)
        if calib == "fixed" and not np.all(np.isfinite(v)):
            s = F32(np.nan)
        scale[idx] = s
        if zps is not None:
            zps[idx] = zp
        q = ref_codes(v, s, zp, qmin, qmax)
        codes[sl] = q
        dq[sl] = (q - (0 if zp is None else zp)).astype(np.float32) * s
    return codes, scale, zps, dq


def ulp(x) -> np.ndarray:
    """Float32 unit in the last place of ``x``."""
    return np.spacing(np.abs(np.asarray(x, np.float32)))
