"""Real functions of one integer value, evaluated on integers: piecewise cubic polynomials
in fixed point, with linear tails (the integer-only GELU, exp, tanh, rsqrt, ... of
:func:`qjax.integer_only`; I-BERT's i-GELU / i-exp generalised to any smooth function).

Given ``g`` (float64, element-wise) and an int32 value ``q`` standing for ``q · s`` with
``q`` in ``[lo, hi]``, :func:`fit_integer_function` builds, when the program is traced, an
:class:`IntegerFunction` that maps ``q`` to int32 codes of a static output scale:

* **tails**: beyond the interval where ``g`` bends, ``g`` is a line ``α x + β`` (GELU → x
  or 0, exp → 0, tanh → ±1); there the output is ``α' q + β'`` with ``α'`` a 30-bit
  dyadic number (two 15-bit ones), so a loose static range costs no table;
* **middle**: the bending interval is cut into segments of ``2^w`` codes (uniform, or per
  octave of ``q`` for functions like ``rsqrt`` that bend near 0), each a cubic in the
  local coordinate ``t = r / 2^w`` (14 bits) fitted by least squares in float64 and stored
  as integer coefficients (a gathered table); Horner's rule runs in int32 with
  :func:`qjax.quant.dyadic.dyadic_mul` (``acc · t / 2^14``, exact).

The integer program's NumPy int64 mirror (:meth:`IntegerFunction.reference`, bit-identical
to the jnp evaluator) is then run on a dense sample of codes (every segment's ends
included) and its error against ``g`` in float64 is recorded as ``max_error``; a function
that cannot be brought within ``2^-12`` of its output range raises, and so does one whose
values at inputs of magnitude 1 would keep fewer than ``KEEP_BITS`` bits of the output
scale its range sets (a pole, exponential growth). A measured output range
(``out_limit``) first restricts the inputs to where ``|g|`` stays within it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.quant.dyadic import dyadic_mul, fine_dyadic, fine_dyadic_mul, fine_dyadic_mul_reference

T_BITS = 14  # the local coordinate t in [0, 1], as an integer of T_BITS fraction bits
OUT_BITS = 27  # |output codes| <= 2^OUT_BITS: headroom for sums and adds
FIT_BITS = 20  # each piece is fitted within 2^-FIT_BITS of its value (or of the range, near 0)
KEEP_BITS = 14  # a function whose values near |x| = 1 would keep fewer bits raises
FAIL_BITS = 12  # a measured error beyond 2^-FAIL_BITS of the output range raises
_SEGMENTS = (16, 64, 256, 1024, 4096)  # uniform segment counts tried, fewest first
_SUB_BITS = (2, 4, 6)  # octave mode: 2^s segments per octave
_TAIL_MIN_CODES = 2**13  # smaller domains are tabulated whole (no tails)


@dataclasses.dataclass(frozen=True)
class _Tail:
    """``y = sign · α' q + offset`` in output codes, ``α'`` of 30 significant bits."""

    sign: int
    terms: tuple
    offset: int

    def __call__(self, q):
        return self.sign * fine_dyadic_mul(q, self.terms) + self.offset

    def reference(self, q) -> np.ndarray:
        return self.sign * fine_dyadic_mul_reference(q, self.terms) + self.offset


def _dyadic_mul_reference(x, b, c: int) -> np.ndarray:
    """:func:`qjax.quant.dyadic.dyadic_mul` in int64: ``floor(x · b / 2^c + 1/2)``."""
    x = np.asarray(x, np.int64) * np.asarray(b, np.int64)
    return (x + (1 << (c - 1))) >> c if c > 0 else x


@dataclasses.dataclass(frozen=True)
class IntegerFunction:
    """``g`` on int32 codes in ``[lo, hi]``: ``self(q)`` returns int32 codes of
    ``out_scale`` with ``|codes| ≤ bound``; ``max_error`` is the largest error against
    ``g`` measured on a dense sample of the codes (in ``g``'s units)."""

    lo: int
    hi: int
    out_scale: float
    bound: float
    max_error: float
    lo_value: float  # the smallest and largest function value on the sample
    hi_value: float
    middle: tuple[int, int]
    octave: bool
    width_bits: int  # uniform: 2^w codes per segment; octave: 2^w segments per octave
    guard: int  # fraction bits of the coefficients
    table: np.ndarray  # (segments, 4) int32: c0..c3 of each cubic
    left: _Tail | None
    right: _Tail | None

    def reference(self, q) -> np.ndarray:
        """The same integer program in NumPy int64 (bit-identical to :meth:`__call__`)."""
        q = np.clip(np.asarray(q, np.int64), self.lo, self.hi)
        qa, qb = self.middle
        qm = np.clip(q, qa, qb)
        if self.octave:
            e = np.where(qm > 0, np.floor(np.log2(np.maximum(qm, 1))).astype(np.int64), -1)
            ec = np.maximum(e, 0)
            m = qm - (np.int64(1) << ec)
            shift = ec - self.width_bits
            w = np.maximum(shift, 0)
            k = np.where(shift >= 0, m >> w, m << np.maximum(-shift, 0))
            r = np.where(shift >= 0, m & ((np.int64(1) << w) - 1), 0)
            seg = np.where(qm == 0, 0, 1 + ec * (1 << self.width_bits) + k)
            t = np.where(
                w <= T_BITS,
                r << np.maximum(T_BITS - w, 0),
                (r + (np.int64(1) << np.maximum(w - T_BITS - 1, 0))) >> np.maximum(w - T_BITS, 0),
            )
        else:
            u = qm - qa
            seg, t = u >> self.width_bits, _t_numpy(u & ((1 << self.width_bits) - 1), self.width_bits)
        coeffs = self.table.astype(np.int64)[np.clip(seg, 0, len(self.table) - 1)]
        acc = coeffs[..., 3]
        for i in (2, 1, 0):
            acc = _dyadic_mul_reference(acc, t, T_BITS) + coeffs[..., i]
            if np.any(np.abs(acc) >= 2**31 - 1):  # the int32 program would wrap
                raise ValueError("a partial sum of the fitted polynomial overflows int32")
        if self.guard:
            acc = (acc + (1 << (self.guard - 1))) >> self.guard
        if self.left is not None:
            acc = np.where(q < qa, self.left.reference(q), acc)
        if self.right is not None:
            acc = np.where(q > qb, self.right.reference(q), acc)
        return acc

    def __call__(self, q: jnp.ndarray) -> jnp.ndarray:
        q = jnp.clip(jnp.asarray(q, jnp.int32), self.lo, self.hi)
        qa, qb = self.middle
        qm = jnp.clip(q, qa, qb)
        seg, t = (
            _octave_index(qm, self.width_bits) if self.octave else _uniform_index(qm - qa, self.width_bits)
        )
        # computed once: without the barrier XLA recomputes the index (and all that feeds it)
        # inside each of the four gathers' fusions
        seg, t, q = lax.optimization_barrier((jnp.clip(seg, 0, len(self.table) - 1), t, q))
        coeff = lambda i: jnp.take(jnp.asarray(self.table[:, i]), seg, mode="clip")  # one column each
        acc = coeff(3)
        for i in (2, 1, 0):
            acc = dyadic_mul(acc, t, T_BITS) + coeff(i)
        if self.guard:
            acc = lax.shift_right_arithmetic(acc + (1 << (self.guard - 1)), jnp.int32(self.guard))
        if self.left is not None:
            acc = jnp.where(q < qa, self.left(q), acc)
        if self.right is not None:
            acc = jnp.where(q > qb, self.right(q), acc)
        return acc


def _t_from(r, w):
    """The local coordinate of offset ``r`` in a segment of ``2^w`` codes, ``T_BITS`` bits
    (``w`` static or an int32 array)."""
    r, w = jnp.asarray(r, jnp.int32), jnp.asarray(w, jnp.int32)
    up = lax.shift_left(r, jnp.clip(T_BITS - w, 0, 31))
    down_shift = jnp.clip(w - T_BITS, 1, 31)
    down = lax.shift_right_logical(r + lax.shift_left(jnp.int32(1), down_shift - 1), down_shift)
    return jnp.where(w <= T_BITS, up, down)


def _t_numpy(r, w):
    r = np.asarray(r, np.int64)
    if w <= T_BITS:
        return r << (T_BITS - w)
    return (r + (1 << (w - T_BITS - 1))) >> (w - T_BITS)


def _uniform_index(u, w: int):
    seg = lax.shift_right_logical(u, jnp.int32(w)) if w else u
    r = u & jnp.int32((1 << w) - 1)
    return seg, _t_from(r, w)


def _octave_index(q, sub_bits: int):
    """Segment and local coordinate of ``q ≥ 0``: segment 0 is ``q = 0``; octave ``e``
    (``2^e ≤ q < 2^(e+1)``) has ``2^sub_bits`` segments after it."""
    e = 31 - lax.clz(q)  # -1 for q = 0
    ec = jnp.maximum(e, 0)
    m = q - lax.shift_left(jnp.int32(1), ec)
    shift = ec - sub_bits
    w = jnp.maximum(shift, 0)
    k = jnp.where(shift >= 0, lax.shift_right_logical(m, w), lax.shift_left(m, jnp.maximum(-shift, 0)))
    r = jnp.where(shift >= 0, m & (lax.shift_left(jnp.int32(1), w) - 1), 0)
    seg = jnp.where(q == 0, 0, 1 + ec * (1 << sub_bits) + k)
    return seg, _t_from(r, w)


# -- fitting ------------------------------------------------------------------------------


def _sample_codes(lo: int, hi: int, extra=()) -> np.ndarray:
    n = hi - lo + 1
    dense = np.arange(lo, hi + 1) if n <= 2**16 else np.linspace(lo, hi, 2**16 + 1).round()
    near = [lo + np.geomspace(1, n, 256), hi - np.geomspace(1, n, 256)]
    if lo < 0 < hi:
        near += [np.geomspace(1, hi, 512), -np.geomspace(1, -lo, 512), np.arange(-64, 65)]
    codes = np.concatenate([dense, *near, np.asarray(extra, np.float64).ravel(), [lo, hi]]).round()
    return np.unique(np.clip(codes, lo, hi)).astype(np.int64)


def _line_fits(g, c0: int, c1: int, tol, max_slope: float) -> tuple[float, float] | None:
    """The line through ``g``'s values at codes ``c0`` and ``c1`` if it stays within ``tol``
    of ``g`` between them; ``(slope per code, value at code 0)``."""
    if c1 <= c0:
        return None
    y0, y1 = g(np.array([c0, c1], np.float64))
    slope = (y1 - y0) / (c1 - c0)
    if abs(slope) > max_slope:  # more output codes per input code than a 15-bit multiplier holds
        return None
    n = c1 - c0
    between = np.concatenate(
        [np.linspace(c0, c1, 2049), c0 + np.geomspace(1, n, 128), c1 - np.geomspace(1, n, 128)]
    ).round()
    y = g(between)
    if np.any(np.abs(y - (y0 + slope * (between - c0))) > tol(y)):
        return None
    return slope, y0 - slope * c0


def _candidates(lo: int, hi: int, scale: float) -> np.ndarray:
    grid = lo + (hi - lo) * np.arange(257) / 256
    powers = 2.0 ** np.arange(-10, 41) / scale
    c = np.concatenate([grid, powers, -powers, [0.0]]).round()
    return np.unique(c[(c >= lo) & (c <= hi)]).astype(np.int64)


def _first(cands, fits):
    """The first candidate ``fits`` accepts, by bisection (tails only get easier to fit
    further out; the measured error afterwards catches a function where they do not)."""
    lo, hi, found = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        f = fits(int(cands[mid]))
        if f is not None:
            found, hi = (int(cands[mid]), f), mid - 1
        else:
            lo = mid + 1
    return found


def _tails(g, lo: int, hi: int, scale: float, tol, max_slope: float):
    if hi - lo < _TAIL_MIN_CODES:
        return lo, hi, None, None
    cands = _candidates(lo, hi, scale)
    right = _first(cands, lambda c: _line_fits(g, c, hi, tol, max_slope))
    qb = right[0] if right else hi
    if right is not None and qb == lo:  # a line everywhere: one tail after the first code
        return lo, lo, None, right[1]
    inner = cands[cands <= qb][::-1]
    left = _first(inner, lambda c: _line_fits(g, lo, c, tol, max_slope))
    qa = left[0] if left else lo
    return qa, qb, (left[1] if left and qa > lo else None), (right[1] if right and qb < hi else None)


def _segments_uniform(qa: int, qb: int, w: int):
    n = -(-(qb - qa + 1) // (1 << w))
    return [(qa + j * (1 << w), w) for j in range(n)]


def _segments_octave(qa: int, qb: int, sub_bits: int):
    """``(start, w)`` per table row (``None`` for rows no code in ``[qa, qb]`` uses)."""
    rows = [(0, 0)]
    for e in range(31):
        for k in range(1 << sub_bits):
            shift = e - sub_bits
            if shift >= 0:
                rows.append(((1 << e) + (k << shift), shift))
            elif k % (1 << -shift) == 0:
                rows.append(((1 << e) + (k >> -shift), 0))
            else:
                rows.append(None)
        if (1 << (e + 1)) > qb:
            break
    return [r if r is not None and r[0] + (1 << r[1]) > qa and r[0] <= qb else None for r in rows]


def _fit(g, rows, qa: int, qb: int, tol):
    """Cubic coefficients (in ``g``'s units) per row and the largest fit error as a
    fraction of ``tol`` (``tol(values)``: the error allowed at each value)."""
    coeffs = np.zeros((len(rows), 4))
    err = 0.0
    by_w: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        if row is not None:
            by_w.setdefault(row[1], []).append(i)
    for w, idx in by_w.items():
        if w <= 8:
            r = np.arange(1 << w)
        else:  # spread over the residues t's rounding leaves (a plain grid would hit exact ones)
            grid = np.linspace(0, (1 << w) - 1, 257).round().astype(np.int64)
            r = np.unique(
                np.clip(grid + (np.arange(257) * 7919) % (1 << max(w - T_BITS, 0)), 0, (1 << w) - 1)
            )
        t = _t_numpy(r, w) / 2.0**T_BITS
        deg = min(3, len(r) - 1)
        vander = np.vander(t, deg + 1, increasing=True)
        starts = np.array([rows[i][0] for i in idx], np.int64)
        codes = starts[:, None] + r[None, :]
        inside = (codes >= qa) & (codes <= qb)
        # a row the range's end cuts is fitted over its whole width, g continued past the
        # end (where finite): fitted only inside, a few codes would make a wild cubic
        y = g(codes.astype(np.float64))
        clipped = g(np.clip(codes, qa, qb).astype(np.float64))
        y = np.where(inside | ~np.isfinite(y), clipped, y)
        sol = np.linalg.lstsq(vander, y.T, rcond=None)[0].T
        coeffs[np.asarray(idx), : deg + 1] = sol
        miss = np.where(inside, np.abs(sol @ vander.T - y) / tol(y), 0.0)
        err = max(err, float(np.max(miss)))
    return coeffs, err


def _tail(line, scale_out: float) -> _Tail:
    slope, value0 = line
    terms = tuple(int(t) for t in fine_dyadic(abs(slope) / scale_out))  # output codes per input code
    return _Tail(1 if slope >= 0 else -1, terms, round(value0 / scale_out))


def _within(gq, samples, values, lo: int, hi: int, limit: float) -> tuple[int, int]:
    """The run of consecutive sampled codes where ``|g| ≤ limit`` (a measured output range:
    an ``rsqrt(var + eps)`` kept away from its pole) that holds input 0, else the widest,
    as the new ``(lo, hi)``."""
    ok = np.isfinite(values) & (np.abs(values) <= limit)
    if ok.all() or not ok.any():
        return lo, hi
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2] - 1
    holds_zero = (samples[starts] <= 0) & (samples[ends] >= 0)
    # the run around input 0 (GELU's, where its dip splits the range), else the widest
    best = int(np.argmax(holds_zero)) if holds_zero.any() else int(np.argmax(ends - starts))
    a, b = starts[best], ends[best]
    inside = lambda c: bool(np.abs(gq(np.array([c]))[0]) <= limit)
    new_lo = int(samples[a]) if a == 0 else _edge(int(samples[a - 1]), int(samples[a]), inside)
    new_hi = int(samples[b]) if b == len(samples) - 1 else _edge(int(samples[b + 1]), int(samples[b]), inside)
    return new_lo, new_hi


def _edge(out: int, inn: int, inside) -> int:
    """The code nearest ``out`` between ``out`` (outside) and ``inn`` (inside), by bisection."""
    while abs(inn - out) > 1:
        mid = (inn + out) // 2
        if inside(mid):
            inn = mid
        else:
            out = mid
    return inn


def _check_precision(
    gq, samples, values, span: float, lo: int, hi: int, scale: float, name: str, measured: bool = False
) -> None:
    """Refuse a function whose values at inputs of magnitude about 1 would keep fewer than
    ``KEEP_BITS`` bits of the output scale its range sets: a pole (``rsqrt(x + 1e-12)``
    near ``x = 0``) or exponential growth (``exp`` of an unbounded input). Polynomial
    growth over a loose range (``x²``) passes: that is what the range's looseness costs."""
    near = np.round(np.array([-1.0, 1.0]) / scale)
    near = near[(near >= lo) & (near <= hi)]  # the inputs ±1 the range holds
    if not near.size:
        return
    with np.errstate(all="ignore"):
        typical = float(np.max(np.abs(gq(near))))
    if not 0 < typical < span * 2.0 ** (KEEP_BITS - OUT_BITS):
        return
    big = np.abs(values) >= span / 2
    at = float(np.min(np.abs(samples[big]))) * scale  # the nearest input to 0 where g is large
    reach = max(abs(lo), abs(hi)) * scale
    if at >= 1 and span <= typical * max(reach, 1.0) ** 4:
        return
    remedy = (
        "the calibration data itself reaches it (a row of zero variance under an rsqrt?): calibrate "
        "without such rows, or use a larger epsilon"
        if measured
        else "measure the ranges (integer_only(..., calibration=...)), or bound the input first (subtract "
        "the max before an exp; a larger epsilon under an rsqrt)"
    )
    raise ValueError(
        f"{name} reaches {span:g} on its input's range [{lo * scale:g}, {hi * scale:g}] (at {at:g}) but "
        f"{typical:g} at inputs of magnitude 1, which would keep fewer than {KEEP_BITS} bits: {remedy}"
    )


def fit_integer_function(
    g: Callable[[np.ndarray], np.ndarray],
    scale: float,
    lo: int,
    hi: int,
    *,
    name: str = "g",
    out_limit: float | None = None,
) -> IntegerFunction:
    """:class:`IntegerFunction` for ``g`` on codes ``q ∈ [lo, hi]`` of ``scale``.

    Args:
      g: element-wise float64 function of the real value ``q · scale``.
      scale: the input's (positive) scale.
      lo, hi: the input codes' static range, ``-2^31 < lo ≤ hi < 2^31``.
      name: what ``g`` is, for errors.
      out_limit: a measured bound of ``|g|`` (calibration): the inputs are first clipped to
        the widest interval where ``|g|`` stays within it, so a pole outside the measured
        values does not set the output scale.

    Returns:
      The integer evaluator, its output scale, bound and measured error.

    Raises:
      ValueError: ``g`` is not finite somewhere on the range, cannot be approximated
        within ``2^-12`` of its output range, or would keep fewer than ``KEEP_BITS`` bits at
        inputs of magnitude 1 (a pole or exponential growth over the range).
    """
    lo, hi = int(lo), int(hi)
    gq = lambda codes: np.asarray(g(np.asarray(codes, np.float64) * scale), np.float64)
    with np.errstate(all="ignore"):
        samples = _sample_codes(lo, hi)
        values = gq(samples)
    if out_limit is not None:  # keep to the inputs where |g| stays within its measured range
        with np.errstate(all="ignore"):
            lo, hi = _within(gq, samples, values, lo, hi, out_limit)
        samples = samples[(samples >= lo) & (samples <= hi)]
        with np.errstate(all="ignore"):
            values = gq(samples)
    if not np.all(np.isfinite(values)):
        bad = float(samples[~np.isfinite(values)][0]) * scale
        raise ValueError(
            f"{name} is not finite at {bad:g}, inside its input's range [{lo * scale:g}, {hi * scale:g}]"
        )
    span = float(np.max(np.abs(values)))
    if span == 0:
        span = 1.0
    _check_precision(gq, samples, values, span, lo, hi, scale, name, measured=out_limit is not None)
    out_scale = span / 2.0**OUT_BITS
    # the error allowed at a value: relative where the value is large against the range's
    # 2^-8 (rsqrt near its pole, exp near 1), absolute below it
    tol = lambda v: 2.0**-FIT_BITS * (np.abs(v) + span * 2.0**-8)
    with np.errstate(all="ignore"):
        qa, qb, left, right = _tails(gq, lo, hi, scale, lambda v: tol(v) / 2, 2.0**14 * out_scale)
        if qa > qb:
            qa = qb
        plans = []
        n = qb - qa + 1
        for segs in _SEGMENTS:
            w = max(0, math.ceil(math.log2(max(n / segs, 1))))
            rows = _segments_uniform(qa, qb, w)
            coeffs, err = _fit(gq, rows, qa, qb, tol)
            plans.append((err, False, w, coeffs))
            if err <= 0.5 or w == 0:
                break
        if plans[-1][0] > 0.5 and qa >= 0 and qb > 2 * max(qa, 1):
            for s in _SUB_BITS:
                rows = _segments_octave(qa, qb, s)
                coeffs, err = _fit(gq, rows, qa, qb, tol)
                plans.append((err, True, s, coeffs))
                if err <= 0.5:
                    break
    _, octave, w, coeffs = min(plans, key=lambda p: p[0])
    codes = coeffs / out_scale
    partial = np.max(np.abs(codes).sum(axis=1), initial=1.0)
    guard = int(np.clip(math.floor(math.log2(2.0**30 / partial)), 0, 8))
    table = np.round(codes * 2.0**guard)
    if np.max(np.abs(table), initial=0) >= 2**31 - 1:
        raise ValueError(
            f"{name}: its pieces' coefficients overflow int32 on [{lo * scale:g}, {hi * scale:g}]"
        )
    fn = IntegerFunction(
        lo=lo,
        hi=hi,
        out_scale=out_scale,
        bound=0.0,
        max_error=0.0,
        lo_value=float(values.min()),
        hi_value=float(values.max()),
        middle=(qa, qb),
        octave=octave,
        width_bits=w,
        guard=guard,
        table=table.astype(np.int32),
        left=None if left is None else _tail(left, out_scale),
        right=None if right is None else _tail(right, out_scale),
    )
    return _measured(fn, gq, samples, span, name, scale)


def _measured(fn: IntegerFunction, gq, samples, span: float, name: str, scale: float) -> IntegerFunction:
    lo_real, hi_real = fn.lo * scale, fn.hi * scale
    qa, qb = fn.middle
    ends = [qa - 1, qa, qa + 1, qb - 1, qb, qb + 1]
    if fn.octave:
        ends += [1 << e for e in range(31) if (1 << e) <= qb] + [
            (1 << e) - 1 for e in range(1, 32) if (1 << e) <= qb
        ]
    else:
        step = 1 << fn.width_bits
        ends += list(range(qa, qb + 1, step))[:4096] + list(range(qa + step - 1, qb + 1, step))[:4096]
    extra = np.clip(np.asarray(ends, np.int64), fn.lo, fn.hi)
    codes = np.unique(np.concatenate([samples, extra]))
    with np.errstate(all="ignore"):
        want = gq(codes)
    try:
        got = fn.reference(codes).astype(np.float64)
    except ValueError as e:
        raise ValueError(f"{name}: {e} on [{lo_real:g}, {hi_real:g}]") from None
    error = float(np.max(np.abs(got * fn.out_scale - want)))
    if error > span * 2.0**-FAIL_BITS:
        raise ValueError(
            f"{name} cannot be evaluated on integers within 2^-{FAIL_BITS} of its range on its input's "
            f"range [{lo_real:g}, {hi_real:g}]: error {error:g} against values up to {span:g} (is it "
            "discontinuous there?)"
        )
    # the sample holds every segment end, not every code: a margin for the codes between
    bound = float(np.max(np.abs(got))) + 2.0 ** (OUT_BITS - FIT_BITS) + 2
    return dataclasses.replace(fn, bound=bound, max_error=error)


__all__ = ["IntegerFunction", "fit_integer_function"]
