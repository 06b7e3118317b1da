"""An independent fixed-point reference in Python integers and ``fractions.Fraction``.

Nothing here uses qjax: values are exact rationals, rounding follows the ap_fixed
definitions literally, overflow is computed with Python's unbounded integers.
"""

from __future__ import annotations

import math
from fractions import Fraction


def round_units(v: Fraction, rounding: str) -> int:
    """Round the exact rational ``v`` (in units of the destination LSB) to an integer."""
    fl = math.floor(v)
    r = v - fl
    half = Fraction(1, 2)
    if rounding == "TRN":
        return fl
    if rounding == "TRN_ZERO":
        return fl + 1 if (v < 0 and r != 0) else fl
    if rounding == "RND":
        return fl + 1 if r >= half else fl
    if rounding == "RND_ZERO":
        if r > half:
            return fl + 1
        return fl + 1 if (r == half and v < 0) else fl
    if rounding == "RND_INF":
        if r > half:
            return fl + 1
        return fl + 1 if (r == half and v > 0) else fl
    if rounding == "RND_MIN_INF":
        return fl + 1 if r > half else fl
    if rounding == "RND_CONV":
        if r > half:
            return fl + 1
        return fl + 1 if (r == half and fl % 2 == 1) else fl
    raise ValueError(rounding)


def overflow(q: int, width: int, signed: bool, mode: str) -> int:
    """Bring the integer ``q`` into a ``width``-bit range by ``mode``."""
    lo, hi = (-(2 ** (width - 1)), 2 ** (width - 1) - 1) if signed else (0, 2**width - 1)
    if mode == "WRAP":
        q %= 2**width
        return q - 2**width if signed and q > hi else q
    if mode == "SAT":
        return min(max(q, lo), hi)
    if mode == "SAT_ZERO":
        return 0 if q < lo or q > hi else q
    if mode == "SAT_SYM":
        lo = -hi if signed else lo
        return min(max(q, lo), hi)
    raise ValueError(mode)


def quantize(v: Fraction, width: int, integer: int, signed: bool, rounding: str, mode: str) -> int:
    """The mantissa of ``ap_fixed<width, integer>`` (or ap_ufixed) assigned the exact value ``v``."""
    frac = width - integer
    return overflow(round_units(v * Fraction(2) ** frac, rounding), width, signed, mode)


def cast(m: int, src_frac: int, width: int, integer: int, signed: bool, rounding: str, mode: str) -> int:
    """Cast the mantissa ``m`` (``src_frac`` fraction bits) to ``ap_fixed<width, integer>``."""
    return quantize(Fraction(m) * Fraction(2) ** -src_frac, width, integer, signed, rounding, mode)


def value(m: int, frac: int) -> Fraction:
    return Fraction(m) * Fraction(2) ** -frac


def dense_latency(xm, wm, bm, x_frac, w_frac, b_frac, accum, result):
    """hls4ml's ``nnet::dense_latency`` for one input row, literally: ``mult = (accum_t)(x·w)``,
    ``acc = (accum_t) bias``, ``acc += mult`` over the inputs in order, ``res = (res_t) acc``.

    ``xm[n_in]``, ``wm[n_in][n_out]``, ``bm[n_out]`` are mantissas with the given fraction
    bits; ``accum`` and ``result`` are ``(width, integer, signed, rounding, overflow)``.
    Returns the result mantissas.
    """
    acc_frac = accum[0] - accum[1]
    out = []
    for j in range(len(bm)):
        acc = quantize(value(bm[j], b_frac), *accum)
        for k in range(len(xm)):
            mult = quantize(value(xm[k] * wm[k][j], x_frac + w_frac), *accum)
            acc = quantize(value(acc, acc_frac) + value(mult, acc_frac), *accum)
        out.append(quantize(value(acc, acc_frac), *result))
    return out
