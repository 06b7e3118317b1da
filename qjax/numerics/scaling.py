"""Scales, zero points, rounding and the elementwise quantize/dequantize maps.

These are the arithmetic kernels shared by ``quantize``, ``fake_quant`` and the
calibrators. They operate on arrays that are already laid out so the scale
broadcasts (see :mod:`qjax.numerics.granularity`), in float32 (float64 when the input
is float64).

Non-finite input: a scale group whose range is not finite (it saw a NaN or ±Inf) gets
a NaN scale, so every element of that group dequantizes to NaN. Integer codes cannot
hold NaN; this makes bad input visible instead of silently finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import CodebookFormat, FloatFormat, Format

ROUNDING_MODES = ("nearest", "stochastic")
POW2_SCALE_DTYPE = "float8_e8m0fnu"  # QuantSpec.scale_dtype of OCP MX (E8M0) power-of-two scales


def compute_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; every other float computes in float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def round_scale_up(scale: jnp.ndarray, dtype) -> jnp.ndarray:
    """``scale`` rounded to ``dtype`` (e.g. bfloat16) toward +inf, returned in its own dtype.

    Rounding a scale to nearest can make it smaller, so ``max|x| / scale`` would exceed
    ``qmax`` and the largest values would clip; rounded up, they never do. Positive scales
    only (scales are positive or NaN); the largest finite value of ``dtype`` caps it.
    """
    r = scale.astype(dtype)
    below = r.astype(scale.dtype) < scale
    finfo = jnp.finfo(dtype)
    bits = jax.lax.bitcast_convert_type(r, jnp.dtype(f"uint{finfo.bits}"))
    up = jax.lax.bitcast_convert_type(bits + jnp.ones_like(bits), r.dtype)  # next value above r > 0
    r = jnp.where(below, jnp.minimum(up, jnp.asarray(finfo.max, dtype)), r)
    return r.astype(scale.dtype)


def pow2_scale(amax: jnp.ndarray, fmt: Format) -> jnp.ndarray:
    """The OCP MX (Microscaling v1.0, section 6.3) shared scale of a block with largest
    magnitude ``amax > 0``: ``2^(floor(log2 amax) - emax)``, ``emax = floor(log2 fmt.qmax)``
    the exponent of the format's largest value (2 for fp4 e2m1, 8 for fp8 e4m3, 6 for int8
    codes). It maps ``amax`` into ``[2^emax, 2^(emax+1))``: values above ``qmax`` there
    saturate (by design of the spec; e.g. fp4 blocks with amax in ``[6, 8) * 2^k``).
    Computed exactly (``frexp``), kept within ``[2^-126, 2^127]``."""
    emax = int(np.floor(np.log2(fmt.qmax)))
    _, ex = jnp.frexp(amax)  # amax = m 2^ex, m in [0.5, 1): floor(log2 amax) = ex - 1
    e = jnp.clip(ex - 1 - emax, -126, 127)
    return jnp.ldexp(jnp.ones_like(amax), e)


def scale_from_range(
    lo: jnp.ndarray, hi: jnp.ndarray, fmt: Format, symmetric: bool, scale_dtype=None
) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Map a calibrated range ``[lo, hi]`` to ``(scale, zero_point)``.

    Divisions by constants are written as multiplications by their reciprocal, and
    ``quantize_values`` multiplies by ``1 / scale``: XLA rewrites divisions that way
    inside ``jit`` but not op by op, so writing it explicitly makes eager and jitted
    quantization round identically.

    Symmetric: ``scale = max(|lo|, |hi|) / qmax`` and no zero point. Asymmetric: the
    range is widened to contain 0 (so 0 is exact), ``scale = (hi - lo) / (qmax - qmin)``
    and ``zero_point = clip(round(qmin - lo / scale))`` (``hi / n - lo / n`` when
    ``hi - lo`` overflows). A zero range (all-zero input: a constant one still has a
    range, since the range contains 0) gets scale 1, never 0 or NaN; a non-zero range gets
    at least the smallest normal float (a subnormal scale may be flushed to 0). A
    non-finite range gets scale NaN.
    With ``scale_dtype`` (e.g. ``"bfloat16"``) the scale is rounded up to it
    (:func:`round_scale_up`) before the zero point is computed, so the range still fits;
    a symmetric scale of :data:`POW2_SCALE_DTYPE` (E8M0) follows the OCP MX rule instead
    (:func:`pow2_scale`).
    """
    finite = jnp.isfinite(lo) & jnp.isfinite(hi)
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = pow2_scale(amax, fmt) if scale_dtype == POW2_SCALE_DTYPE else amax * (1.0 / fmt.qmax)
        nonzero = amax > 0
        zero_point = None
    else:
        lo = jnp.minimum(lo, 0)
        hi = jnp.maximum(hi, 0)
        width = hi - lo  # overflows for a range wider than the float's max: split it then
        inv = 1.0 / (fmt.qmax - fmt.qmin)
        scale = jnp.where(jnp.isfinite(width), width * inv, hi * inv - lo * inv)
        nonzero = width > 0
    # a subnormal scale (range below ~qmax * 1.2e-38 in float32) is flushed to 0 on some
    # backends: keep the smallest normal instead, so a non-zero range stays non-zero
    tiny = jnp.finfo(scale.dtype).tiny
    scale = jnp.where(nonzero, jnp.maximum(scale, tiny), jnp.ones_like(scale))
    scale = jnp.where(finite, scale, jnp.full_like(scale, jnp.nan))
    if scale_dtype is not None:
        scale = round_scale_up(scale, scale_dtype)
    if not symmetric:
        # round(qmin - lo / scale), written so that no subtraction follows the product: under
        # jit XLA:CPU contracts `qmin - lo * inv` into one fused multiply-add, and a range
        # [-a, a] puts the zero point on a tie (-0.5) that the fused form misses by an ulp
        # (-1 jitted, 0 eagerly), so a jitted training step and the eager quantize_params
        # stored different zero points for one range. For an even qmin (every integer format)
        # round-half-even(qmin - t) == qmin - round-half-even(t) exactly.
        shift = lo * (1.0 / scale)
        raw = fmt.qmin - jnp.round(shift) if fmt.qmin % 2 == 0 else jnp.round(fmt.qmin - shift)
        zp = jnp.clip(raw, fmt.qmin, fmt.qmax)
        zero_point = jnp.where(finite, zp, 0).astype(fmt.storage_dtype)
    return scale, zero_point


def rounding_noise(key: jax.Array | None, shape, dtype) -> jnp.ndarray:
    """The ``U[0, 1)`` noise stochastic rounding adds (one draw per element).

    Raises:
      ValueError: ``key`` is ``None``.
    """
    if key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")
    return jax.random.uniform(key, shape, dtype=dtype)


def round_values(
    y: jnp.ndarray, rounding: str, key: jax.Array | None = None, noise: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Round to integers: ties to even (``"nearest"``) or stochastically, unbiased:
    ``floor(y + u)`` with ``u ~ U[0, 1)`` so ``E[round(y)] = y``. Stochastic rounding
    draws ``u`` from ``key`` unless the ``noise`` itself is given."""
    if rounding == "nearest":
        return jnp.round(y)
    if rounding == "stochastic":
        u = rounding_noise(key, y.shape, y.dtype) if noise is None else noise
        return jnp.floor(y + u)
    raise ValueError(f"rounding={rounding!r} is not one of {ROUNDING_MODES}")


def float_grid_step(a: jnp.ndarray, fmt: FloatFormat) -> jnp.ndarray:
    """The spacing of ``fmt``'s values at magnitudes ``a >= 0``: ``2^(e - mantissa_bits)``
    with ``e = floor(log2 a)`` in the normal range and the smallest normal exponent below it
    (subnormals are evenly spaced)."""
    emin = 2 - 2 ** (fmt.exponent_bits - 1)  # 1 - bias
    _, ex = jnp.frexp(a)  # a = m 2^ex, m in [0.5, 1)
    return jnp.ldexp(jnp.ones_like(a), jnp.maximum(ex - 1, emin) - fmt.mantissa_bits)


def round_to_float_grid(y: jnp.ndarray, fmt: FloatFormat, u: jnp.ndarray) -> jnp.ndarray:
    """Stochastic rounding of ``y`` (already clipped to ``±fmt.max_value``) onto ``fmt``'s
    grid, unbiased: each magnitude goes to one of its two neighbours on the grid with
    probability proportional to closeness, ``floor(|y| / step + u) * step`` with
    ``u ~ U[0, 1)``, so ``E[round(y)] = y``. Values on the grid stay; NaN stays NaN.

    Returns:
      the rounded values in ``y``'s dtype, exactly representable in ``fmt``.
    """
    a = jnp.abs(y)
    step = float_grid_step(a, fmt)
    # min: |y| = max with u near 1 can round up to floor(max / step) + 1 in float32
    r = jnp.minimum(jnp.floor(a / step + u) * step, fmt.max_value)
    return jnp.where(y < 0, -r, r)


def quantize_values(
    x: jnp.ndarray,
    scale: jnp.ndarray,
    zero_point: jnp.ndarray | None,
    fmt: Format,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    noise: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Elementwise ``x -> clip(round(x * (1 / scale)) + zero_point)`` in the storage dtype.

    For fp8/fp4 formats: ``clip(x / scale, ±max)`` rounded onto the float grid (nearest,
    ties to even, or stochastically: :func:`round_to_float_grid`) and cast. For codebook
    formats: the index of the nearest table value (nearest only). ``scale`` must broadcast
    against ``x``.
    """
    y = x.astype(scale.dtype) * (1.0 / scale)
    if isinstance(fmt, CodebookFormat):
        if rounding != "nearest":
            raise ValueError(f"{fmt.name} supports rounding='nearest' only, got {rounding!r}")
        return fmt.encode(y)
    if fmt.is_float:
        y = jnp.clip(y, -fmt.max_value, fmt.max_value)
        if rounding == "stochastic":
            u = rounding_noise(key, y.shape, y.dtype) if noise is None else noise
            y = round_to_float_grid(y, fmt, u)
        elif rounding != "nearest":
            raise ValueError(f"rounding={rounding!r} is not one of {ROUNDING_MODES}")
        return y.astype(fmt.storage_dtype)
    q = round_values(y, rounding, key, noise)
    if zero_point is not None:
        q = q + zero_point.astype(q.dtype)
    q = jnp.clip(q, fmt.qmin, fmt.qmax)
    # NaN codes would be undefined after the cast; their scale is already NaN, so any
    # finite code dequantizes to NaN. Use 0 to keep the cast well defined.
    q = jnp.where(jnp.isnan(q), 0, q)
    return q.astype(fmt.storage_dtype)


def dequantize_values(
    q: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray | None, dtype, fmt: Format
) -> jnp.ndarray:
    """Elementwise ``(decode(q) - zero_point) * scale`` cast to ``dtype``, computed in
    float32 (or float64 for float64 scales; a bfloat16 / E8M0-stored scale is widened
    first). ``decode`` is ``fmt``'s: the code itself, or a codebook's table value."""
    cdt = compute_dtype(scale.dtype)
    y = fmt.decode(q, cdt)
    if zero_point is not None:
        y = y - zero_point.astype(cdt)
    return (y * scale.astype(cdt)).astype(dtype)


def representable_bounds(
    scale: jnp.ndarray, zero_point: jnp.ndarray | None, fmt: Format
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Real-valued interval ``[lo, hi]`` that quantizes without clipping."""
    scale = scale.astype(compute_dtype(scale.dtype))
    zp = 0.0 if zero_point is None else zero_point.astype(scale.dtype)
    return (fmt.qmin - zp) * scale, (fmt.qmax - zp) * scale
