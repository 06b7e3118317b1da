"""Streamed histograms of activations: percentile and MSE ranges of a whole calibration set.

Percentile and MSE calibration need the distribution of every value an op quantizes, not
one batch's. Keeping the values is out of the question at real sizes, so each batch is
reduced on device to a fixed-size histogram (:func:`histogram`), and the histograms are
summed on the host (:class:`Pooled`), as TensorRT's histogram calibrators do.

Binning: ``bins`` bins of equal width over ``[0, r)`` for the magnitudes of the positive
values and, separately, of the negative ones; ``r`` is a power of two. When a batch holds a
larger magnitude, ``r`` grows by a power of two, so the bins seen so far merge exactly
(groups of ``2^j`` neighbours make one new bin): no value is ever re-binned inexactly,
whatever order the batches come in. A range is then read off the pooled histogram:
:func:`percentile_range` interpolates inside the bin where the cumulative count crosses the
percentile, within one bin (``r / bins``) of the empirical (inverted-CDF) percentile of all
the values; :func:`mse_range` searches the clip
ratios of :class:`qjax.calib.MSE` on the bin centres, each weighted by its count, through
the format's own quantizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import Format
from qjax.numerics.scaling import dequantize_values, quantize_values, scale_from_range

DEFAULT_BINS = 2048


def histogram(
    x: jax.Array, r_prev: jax.Array, bins: int, valid: jax.Array | None = None
) -> dict[str, jax.Array]:
    """One batch's histogram (traceable; reduces over every axis of ``x``).

    Args:
      x: the values an op quantizes.
      r_prev: the pooled histogram's range so far (a power of two), ``0`` for none yet.
      bins: bins per sign.
      valid: an optional boolean mask broadcastable to ``x``: only those values count (a
        ragged dot's padding rows do not).

    Returns:
      ``{"pos", "neg"}``: float32 ``(bins,)`` counts of the magnitudes of the values ``>= 0``
      / ``< 0`` over ``[0, r)``; ``"r"``: the range used (a power of two, at least
      ``r_prev``; infinite for a magnitude ``>= 2**127``, which :meth:`Pooled.add`
      refuses); ``"max_pos"`` / ``"max_neg"``: the largest magnitude of each sign;
      ``"bad"``: 1.0 when ``x`` holds NaN or infinity (its range is then NaN, as
      everywhere in qjax), else 0.0.
    """
    # without a mask no all-true bool array is built: one such array made later int1 arrays
    # of its shape come out as bool in the test process (BUILD_NOTES, nineteenth session)
    shape = jnp.shape(x)
    x = jnp.ravel(x).astype(jnp.float32)
    finite = jnp.isfinite(x)
    if valid is None:
        keep, weight = finite, 1.0
        bad = jnp.any(~finite)
    else:
        mask = jnp.ravel(jnp.broadcast_to(valid, shape))
        keep, weight = finite & mask, mask.astype(jnp.float32)
        bad = jnp.any(~finite & mask)
    x = jnp.where(keep, x, 0.0)
    mag = jnp.abs(x)
    m = jnp.max(mag, initial=0.0)
    # the smallest power of two above m (strictly: m itself must fall inside [0, r)); frexp
    # is exact where a float32 log2 rounds up just below a power of two (2**128 for m < 2**127)
    _, e = jnp.frexp(jnp.maximum(m, jnp.finfo(jnp.float32).tiny))  # m = f 2^e, f in [0.5, 1)
    need = jnp.ldexp(jnp.float32(1), e)
    r = jnp.maximum(need, jnp.asarray(r_prev, jnp.float32))
    # halved: XLA may divide by multiplying with 1 / r, and 1 / 2**127 is subnormal (flushed
    # to 0 on CPU, which put the whole top binade in bin 0); r >= 2**-125, so 2 / r is finite
    idx = jnp.clip(jnp.floor(mag * 0.5 / (r * 0.5) * bins), 0, bins - 1).astype(jnp.int32)
    neg = x < 0
    counts = jnp.zeros((2, bins), jnp.float32).at[neg.astype(jnp.int32), idx].add(weight)
    return {
        "pos": counts[0],
        "neg": counts[1],
        "r": r,
        "max_pos": jnp.max(jnp.where(neg, 0.0, mag), initial=0.0),
        "max_neg": jnp.max(jnp.where(neg, mag, 0.0), initial=0.0),
        "bad": bad.astype(jnp.float32),
    }


def _rebin(counts: np.ndarray, factor: int) -> np.ndarray:
    """Counts over ``[0, r)`` as counts over ``[0, factor * r)`` (``factor`` a power of two)."""
    if factor == 1:
        return counts
    bins = counts.shape[-1]
    out = np.zeros_like(counts)
    if factor >= bins:
        out[0] = counts.sum()
    else:
        out[: bins // factor] = counts.reshape(bins // factor, factor).sum(-1)
    return out


@dataclasses.dataclass
class Pooled:
    """The histogram of every batch seen so far, for one op (one layer of a stack)."""

    pos: np.ndarray
    neg: np.ndarray
    r: float
    max_pos: float = 0.0
    max_neg: float = 0.0
    bad: bool = False

    @classmethod
    def empty(cls, bins: int) -> Pooled:
        return cls(np.zeros(bins), np.zeros(bins), 0.0)

    @property
    def total(self) -> float:
        return float(self.pos.sum() + self.neg.sum())

    def add(self, h: dict) -> None:
        """Fold in one :func:`histogram` (host arrays of one op and layer). A histogram of
        NaNs (a ``cond`` branch that did not run) is skipped.

        Raises:
          ValueError: the batch holds a finite magnitude ``>= 2**127``, whose power-of-two
            range ``2**128`` overflows float32.
        """
        r = float(h["r"])
        if math.isnan(r):
            return
        if math.isinf(r):
            m = max(float(h["max_pos"]), float(h["max_neg"]))
            raise ValueError(
                f"histogram calibration cannot bin magnitudes >= 2**127 (~1.7e38): a batch holds "
                f"max |x| = {m:.4g}, whose power-of-two histogram range 2**128 overflows float32; "
                "calibrate without histogram_bins, or scale these activations down"
            )
        self.bad = self.bad or bool(h["bad"] > 0)
        new_r = max(self.r, r)
        pos, neg = np.asarray(h["pos"], np.float64), np.asarray(h["neg"], np.float64)
        if self.r:
            self.pos, self.neg = (_rebin(c, round(new_r / self.r)) for c in (self.pos, self.neg))
        self.pos = self.pos + _rebin(pos, round(new_r / r))
        self.neg = self.neg + _rebin(neg, round(new_r / r))
        self.r = new_r
        self.max_pos = max(self.max_pos, float(h["max_pos"]))
        self.max_neg = max(self.max_neg, float(h["max_neg"]))

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, left bin edges)`` over ``[-r, r)`` in increasing value order."""
        bins = self.pos.shape[0]
        width = self.r / bins
        counts = np.concatenate([self.neg[::-1], self.pos])
        edges = np.concatenate([-(np.arange(bins, 0, -1)) * width, np.arange(bins) * width])
        return counts, edges


def _quantile(counts: np.ndarray, edges: np.ndarray, width: float, q: float) -> float:
    """The value below which a fraction ``q`` of the counts lie (linear inside a bin)."""
    cum = np.cumsum(counts)
    target = q * cum[-1]
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, counts.shape[0] - 1)
    before = cum[i - 1] if i else 0.0
    inside = (target - before) / counts[i] if counts[i] else 0.0
    return float(edges[i] + inside * width)


def percentile_range(pooled: Pooled, p: float, symmetric: bool) -> tuple[float, float]:
    """``(lo, hi)`` of ``qjax.calib.percentile(p)`` on the pooled values: symmetric, the
    ``p``-th percentile of the magnitudes; else the ``100 - p``-th and ``p``-th of the values."""
    if pooled.bad:
        return math.nan, math.nan
    if pooled.total == 0:
        return 0.0, 0.0
    width = pooled.r / pooled.pos.shape[0]
    if symmetric:
        mags = pooled.pos + pooled.neg
        a = _quantile(mags, np.arange(mags.shape[0]) * width, width, p / 100)
        a = min(a, max(pooled.max_pos, pooled.max_neg))
        return -a, a
    counts, edges = pooled.signed()
    lo = max(_quantile(counts, edges, width, 1 - p / 100), -pooled.max_neg)
    hi = min(_quantile(counts, edges, width, p / 100), pooled.max_pos)
    return lo, hi


def mse_range(
    pooled: Pooled, fmt: Format, symmetric: bool, num_candidates: int, min_ratio: float, norm: float
) -> tuple[float, float]:
    """``(lo, hi)`` minimising the pooled quantization error: the clip ratios ``r`` of
    ``qjax.calib.mse`` applied to the full range, the error ``sum count * |c - Q_r(c)|^norm``
    over the bin centres ``c``, scaled as in ``qjax.calib.mse`` (invariant to magnitude)."""
    if pooled.bad:
        return math.nan, math.nan
    if pooled.total == 0:
        return 0.0, 0.0
    counts, edges = pooled.signed()
    width = pooled.r / pooled.pos.shape[0]
    centres = np.clip(edges + width / 2, -pooled.max_neg, pooled.max_pos)
    lo0, hi0 = -pooled.max_neg, pooled.max_pos
    if symmetric:
        a = max(-lo0, hi0)
        lo0, hi0 = -a, a
    ratios = np.linspace(min_ratio, 1.0, num_candidates)
    # errors of the values scaled (exactly) by the power of two that brings the largest
    # magnitude into [0.5, 1): they neither overflow nor underflow float32, so the ratio
    # chosen does not depend on the data's magnitude
    e = -math.frexp(max(-lo0, hi0))[1]
    f32 = lambda v: jnp.asarray(np.ldexp(v, e), dtype=jnp.float32)
    err = np.asarray(
        _clip_errors(
            f32(centres),
            jnp.asarray(counts, jnp.float32),
            f32(lo0),
            f32(hi0),
            jnp.asarray(ratios, jnp.float32),
            fmt,
            symmetric,
            norm,
        )
    )
    i = int(np.argmin(err))  # as qjax.calib.MSE: the full range unless a ratio is strictly better
    best = 1.0 if err[-1] <= err[i] else float(ratios[i])
    return lo0 * best, hi0 * best


@functools.partial(jax.jit, static_argnames=("fmt", "symmetric", "norm"))
def _clip_errors(centres, weights, lo0, hi0, ratios, fmt: Format, symmetric: bool, norm: float):
    """``sum weights * |centres - Q_r(centres)|^norm`` for each clip ratio ``r`` of the range
    ``[lo0, hi0]`` (compiled once per format and histogram size, not per op)."""

    def one(r):
        scale, zp = scale_from_range(lo0 * r, hi0 * r, fmt, symmetric)
        q = dequantize_values(quantize_values(centres, scale, zp, fmt), scale, zp, jnp.float32, fmt)
        return jnp.sum(weights * jnp.abs(centres - q) ** norm)

    return jax.vmap(one)(ratios)
