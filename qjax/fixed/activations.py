"""Fixed-point activations: lookup tables as hls4ml builds them, and piecewise-linear ones.

Table-based ``sigmoid``/``tanh`` (and the ``exp``/reciprocal tables of ``softmax``) hold
``N`` entries on a uniform grid of step ``δ`` starting at ``lo``. The index is computed from
the fixed-point input by integer operations only, as hls4ml's
``index = (int)(x · N / range) + N/2``: the input is cast to ``log2(1/δ)`` fraction bits
with truncation toward zero (C's ``int`` conversion), offset, and clipped to the table.
``N/range`` must therefore be a power of two (it is for hls4ml's defaults, 1024/16).
Entry ``i`` holds ``f(lo + i·δ)`` rounded to nearest onto the output format, so inside the
table's range the error is at most ``δ · max|f'| + LSB/2``.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import jax.numpy as jnp
import numpy as np

from qjax.fixed.arith import constant, mul, signed_bits
from qjax.fixed.array import FixedArray
from qjax.fixed.cast import cast, cast_mantissa
from qjax.fixed.format import Format, int_dtype_for_bits, x64_enabled


def _check(x) -> None:
    if not isinstance(x, FixedArray):
        raise TypeError(f"expected a FixedArray, got {type(x).__name__}; convert floats with from_float")


def _log2_exact(value: Fraction, what: str) -> int:
    """``k`` with ``value == 2^k``; raises if ``value`` is not a power of two."""
    num, den = value.numerator, value.denominator
    if num > 0 and num & (num - 1) == 0 and den == 1:
        return num.bit_length() - 1
    if num == 1 and den & (den - 1) == 0:
        return -(den.bit_length() - 1)
    raise ValueError(f"{what} must be a power of two, got {value}")


def table_entries(fn: Callable[[np.ndarray], np.ndarray], grid: np.ndarray, fmt: Format) -> np.ndarray:
    """``fn(grid)`` (float64) rounded to nearest (ties up) onto ``fmt`` and saturated:
    the mantissas a table stores."""
    with np.errstate(divide="ignore", over="ignore"):
        v = np.asarray(fn(np.asarray(grid, np.float64)), np.float64)
    v = np.where(np.isnan(v), 0.0, v)
    m = np.floor(np.clip(v * 2.0**fmt.fraction, -(2.0**64), 2.0**64) + 0.5)
    return np.clip(m, fmt.min_mantissa, fmt.max_mantissa).astype(np.int64)


class Table:
    """A uniform lookup table ``f(lo + i·step)``, ``i = 0..size-1``, indexed from
    fixed-point inputs with integer operations.

    Args:
      fn: numpy function evaluated in float64 to fill the table.
      size: number of entries.
      lo: the first grid point (a multiple of ``step``).
      step: grid step, a power of two.
      fmt: the format of the entries (and of the lookup result).

    Raises:
      ValueError: ``step`` not a power of two, ``lo`` not on the grid, ``size < 1``.
    """

    def __init__(self, fn, size: int, lo: float, step, fmt: Format):
        if size < 1:
            raise ValueError(f"table size must be at least 1, got {size}")
        step = Fraction(step)
        self.k = -_log2_exact(step, "the table step (range / size)")  # index = x · 2^k
        offset = Fraction(lo) / step
        if offset.denominator != 1:
            raise ValueError(f"the table start {lo} is not a multiple of its step {float(step)}")
        self.offset = int(offset)  # lo · 2^k
        self.size, self.step, self.lo, self.fmt = size, float(step), float(lo), fmt
        grid = (self.offset + np.arange(size)) * float(step)
        self.entries = table_entries(fn, grid, fmt)

    def index(self, x: FixedArray) -> jnp.ndarray:
        """The table index of each element of ``x``: ``trunc(x · 2^k) - lo · 2^k``, clipped."""
        span = max(abs(self.offset), abs(self.offset + self.size)) + 2
        bits = span.bit_length() + 2
        idx_fmt = Format(bits, bits - self.k, rounding="TRN_ZERO", overflow="SAT")
        raw = cast_mantissa(x.mantissa, x.format.fraction, idx_fmt)
        return jnp.clip(raw - self.offset, 0, self.size - 1)

    def __call__(self, x: FixedArray) -> FixedArray:
        _check(x)
        entries = jnp.asarray(self.entries.astype(np.int32 if self.fmt.width <= 31 else np.int64))
        return FixedArray(entries[self.index(x)].astype(self.fmt.dtype), self.fmt)


def _symmetric_table(fn, fmt: Format, size: int, table_range: float) -> Table:
    """hls4ml's layout: ``size`` entries over ``[-table_range, table_range)``."""
    return Table(fn, size, -table_range, Fraction(2 * Fraction(table_range), size), fmt)


def _sigmoid_np(v):
    return 1.0 / (1.0 + np.exp(-v))


def sigmoid(x: FixedArray, fmt: Format, *, table_size: int = 1024, table_range: float = 8.0) -> FixedArray:
    """Table-based sigmoid (hls4ml: 1024 entries over ``[-8, 8)``).

    Args:
      x: input ``FixedArray``.
      fmt: output format (the table's entries are rounded onto it).
      table_size: entries ``N``.
      table_range: the table covers ``[-R, R)``; ``N / 2R`` must be a power of two.

    Returns:
      A ``FixedArray`` in ``fmt``; inputs outside the range give the end entries.

    Raises:
      ValueError: ``N / 2R`` is not a power of two.
    """
    _check(x)
    return _symmetric_table(_sigmoid_np, fmt, table_size, table_range)(x)


def tanh(x: FixedArray, fmt: Format, *, table_size: int = 1024, table_range: float = 4.0) -> FixedArray:
    """Table-based tanh (hls4ml: 1024 entries over ``[-4, 4)``); see :func:`sigmoid`."""
    _check(x)
    return _symmetric_table(np.tanh, fmt, table_size, table_range)(x)


def relu(x: FixedArray, fmt: Format | None = None, *, key=None) -> FixedArray:
    """``max(x, 0)`` on mantissas, then cast to ``fmt`` if given."""
    _check(x)
    y = FixedArray(jnp.maximum(x.mantissa, 0).astype(x.mantissa.dtype), x.format)
    return y if fmt is None else cast(y, fmt, key=key)


def _bound(value: float, fmt: Format, up: bool) -> int:
    v = Fraction(value) * (Fraction(2) ** fmt.fraction)
    m = -((-v.numerator) // v.denominator) if up else v.numerator // v.denominator
    return min(max(m, fmt.min_mantissa), fmt.max_mantissa)


def clip(x: FixedArray, lo: float, hi: float, fmt: Format | None = None, *, key=None) -> FixedArray:
    """Clamp to ``[lo, hi]`` (bounds rounded inward onto ``x``'s grid), then cast to ``fmt``.

    Raises:
      ValueError: ``lo > hi``.
    """
    _check(x)
    if lo > hi:
        raise ValueError(f"clip needs lo <= hi, got lo={lo}, hi={hi}")
    m_lo, m_hi = _bound(lo, x.format, up=True), _bound(hi, x.format, up=False)
    y = FixedArray(jnp.clip(x.mantissa, m_lo, m_hi).astype(x.mantissa.dtype), x.format)
    return y if fmt is None else cast(y, fmt, key=key)


def hard_tanh(x: FixedArray, fmt: Format, *, key=None) -> FixedArray:
    """``clip(x, -1, 1)`` in ``fmt`` (piecewise linear tanh)."""
    return clip(x, -1.0, 1.0, fmt, key=key)


def hard_sigmoid(
    x: FixedArray,
    fmt: Format,
    *,
    slope: float = 0.2,
    offset: float = 0.5,
    coef_bits: int = 16,
    key=None,
) -> FixedArray:
    """``clip(slope · x + offset, 0, 1)`` in ``fmt`` (Keras/hls4ml hard sigmoid: slope 0.2).

    ``slope`` is rounded onto ``coef_bits`` fraction bits and ``offset`` onto the
    product's grid (``F_x + coef_bits`` fraction bits); the product and sum are exact,
    clipped exactly, then cast to ``fmt`` (its rounding applies). The error against the
    float function is at most ``2^-(coef_bits+1) · (|x| + 1)`` plus one output LSB.

    Raises:
      ValueError: ``coef_bits`` outside 1..30; ``|slope| >= 2`` or ``offset`` outside
        [0, 1]; 64-bit integers needed with x64 off (``F_x + coef_bits`` fraction bits
        plus sign and the bound 1.0 exceed 32 bits: the message gives a ``coef_bits``
        that fits).
    """
    _check(x)
    if not 1 <= coef_bits <= 30:
        raise ValueError(f"coef_bits must be between 1 and 30, got {coef_bits}")
    if not (abs(slope) < 2 and 0 <= offset <= 1):
        raise ValueError(f"hard_sigmoid needs |slope| < 2 and 0 <= offset <= 1, got {slope}, {offset}")
    frac = x.format.fraction + coef_bits  # the product's fraction bits
    if frac < 0:
        raise ValueError(f"hard_sigmoid: {x.format} with coef_bits={coef_bits} leaves no fraction bits")
    s_m, off_m, one_m, bits = _hard_sigmoid_grid(x.format, slope, offset, coef_bits)
    if bits > 32 and not x64_enabled():
        fits = [
            c for c in range(coef_bits - 1, 0, -1) if _hard_sigmoid_grid(x.format, slope, offset, c)[3] <= 32
        ]
        hint = f"pass coef_bits={fits[0]} or less, " if fits and x.format.fraction + fits[0] >= 0 else ""
        raise ValueError(
            f"hard_sigmoid: the exact product of {x.format} ({x.format.fraction} fraction bits) and the "
            f"slope on coef_bits={coef_bits} fraction bits has {frac} fraction bits; with its clip bound "
            f"1.0 = 2^{frac} it needs {bits}-bit integers and jax_enable_x64 is off: {hint}"
            "or give the input fewer fraction bits, or enable x64"
        )
    dtype = int_dtype_for_bits(bits, "hard_sigmoid")
    m = x.mantissa.astype(dtype) * jnp.asarray(s_m, dtype) + jnp.asarray(off_m, dtype)
    m = jnp.clip(m, 0, jnp.asarray(one_m, dtype))
    return FixedArray(cast_mantissa(m, frac, fmt, key=key), fmt)


def _hard_sigmoid_grid(x_fmt: Format, slope: float, offset: float, coef_bits: int):
    """Slope, offset and 1 as mantissas on the product grid (``F_x + coef_bits`` fraction
    bits), and the signed bits of the exact sum and clip bounds."""
    frac = x_fmt.fraction + coef_bits
    s_m = int(constant(slope, Format(coef_bits + 2, 2)).mantissa)
    off_m = round(Fraction(offset) * 2**frac)
    one_m = 1 << frac
    corners = [x_fmt.min_mantissa * s_m + off_m, x_fmt.max_mantissa * s_m + off_m, 0, one_m]
    return s_m, off_m, one_m, signed_bits(min(corners), max(corners))


def softmax(
    x: FixedArray,
    fmt: Format,
    *,
    axis: int = -1,
    exp_table_size: int = 1024,
    exp_range: float = 8.0,
    inv_table_size: int = 1024,
    inv_range: float | None = None,
    exp_format: Format | None = None,
    inv_format: Format | None = None,
) -> FixedArray:
    """hls4ml-style stable softmax: max subtraction, an ``exp`` table, an exact integer sum
    and a reciprocal table.

    1. ``d = x - max(x)`` exactly (``d <= 0``);
    2. ``e = exp(d)`` from a table of ``exp_table_size`` entries on the grid
       ``-(N-1)·δ, …, -δ, 0`` (``δ = exp_range / N``), indexed by ``trunc(d / δ)``;
    3. ``s = Σ e`` exactly in integers;
    4. ``r = 1/s`` from a table over ``[0, inv_range)`` indexed by ``trunc(s / δ_s)``
       (``inv_range`` defaults to the power of two above the axis length, which bounds
       ``s``);
    5. the output is the exact product ``e · r`` cast to ``fmt``.

    Args:
      x: input ``FixedArray``.
      fmt: output format.
      axis: the softmax axis.
      exp_table_size, exp_range: the ``exp`` table (``N / range`` a power of two).
      inv_table_size, inv_range: the reciprocal table (``N / range`` a power of two).
      exp_format: format of ``exp`` entries (default ``ap_ufixed<16,1,RND,SAT>``).
      inv_format: format of reciprocal entries (default ``ap_ufixed<15,1,RND,SAT>``); the
        defaults keep the exact product ``e · r`` within 32 bits (wider ones need x64).

    Returns:
      A ``FixedArray`` in ``fmt``.

    Raises:
      ValueError: a table's ``size / range`` is not a power of two; the exact sum needs
        more than 31 bits; the entry product needs more than 32 bits with x64 off.
    """
    _check(x)
    n = x.shape[axis]
    exp_format = exp_format or Format(16, 1, signed=False, rounding="RND", overflow="SAT")
    inv_format = inv_format or Format(15, 1, signed=False, rounding="RND", overflow="SAT")
    # 1. d = x - max(x) <= 0, exact (one more bit than x).
    d_fmt = Format(x.format.width + 1, x.format.integer + 1)
    m = x.mantissa.astype(d_fmt.dtype)
    d = FixedArray(m - jnp.max(m, axis=axis, keepdims=True), d_fmt)
    # 2. exp table on (-(N-1)δ ... 0].
    step = Fraction(Fraction(exp_range), exp_table_size)
    exp_table = Table(np.exp, exp_table_size, float(-(exp_table_size - 1) * step), step, exp_format)
    e = exp_table(d)
    # 3. exact sum.
    extra = max(1, (n - 1).bit_length())
    sum_fmt = Format(exp_format.width + extra, exp_format.integer + extra, signed=False)
    if sum_fmt.width > 31:
        raise ValueError(f"softmax: the exact sum of {n} exp values needs {sum_fmt.width} bits (> 31)")
    s = FixedArray(jnp.sum(e.mantissa, axis=axis, keepdims=True).astype(jnp.int32), sum_fmt)
    # 4. reciprocal table over [0, inv_range).
    if inv_range is None:
        inv_range = float(2 ** n.bit_length())  # > n >= the sum
    inv_step = Fraction(Fraction(inv_range), inv_table_size)
    inv_table = Table(lambda v: 1.0 / v, inv_table_size, 0.0, inv_step, inv_format)
    r = inv_table(s)
    # 5. exact product, cast.
    try:
        return mul(e, r, fmt)
    except ValueError as err:
        raise ValueError(f"softmax: the product of {exp_format} and {inv_format} entries: {err}") from None
