"""Calibration: how the range ``[lo, hi]`` that a scale covers is chosen.

A calibrator is a small frozen dataclass called as ``calib(x, axes, fmt, symmetric)``
on a float array; it reduces over ``axes`` (keepdims) and returns ``(lo, hi)``. For
symmetric quantization it returns ``(-a, a)``. Calibrators serialise with
``to_dict``/``calibration_from_dict`` so policies can be stored as JSON.

Available as ``qjax.calib.absmax()``, ``minmax()``, ``percentile(p)``, ``mse()``,
``fixed(lo, hi)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qjax.numerics.formats import Format
from qjax.numerics.scaling import dequantize_values, quantize_values, scale_from_range

Axes = tuple[int, ...]


def _symmetric(lo, hi):
    a = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return -a, a


def _move_to_end(x: jnp.ndarray, axes: Axes) -> tuple[jnp.ndarray, tuple[int, ...]]:
    """Move ``axes`` last and merge them; also return the keepdims shape."""
    pos = sorted(a % x.ndim for a in axes)
    keep = [a for a in range(x.ndim) if a not in pos]
    y = jnp.transpose(x, keep + pos)
    kept_shape = tuple(x.shape[a] for a in keep)
    # explicit size, not -1: a -1 is ambiguous when a kept axis has length 0
    y = y.reshape((*kept_shape, math.prod(x.shape[a] for a in pos)))
    keepdims_shape = tuple(1 if a in pos else x.shape[a] for a in range(x.ndim))
    return y, keepdims_shape


class Calibration:
    """Base class of calibrators (see module docstring)."""

    name: str = ""

    def __call__(self, x: jnp.ndarray, axes: Axes, fmt: Format, symmetric: bool):
        raise TypeError(f"{type(self).__name__} is abstract")  # pragma: no cover

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class AbsMax(Calibration):
    """Range ``[-max|x|, max|x|]``.

    With ``half_step=True`` the largest magnitude maps to ``qmax + 1/2`` steps instead of
    ``qmax`` (scale ``max|x| / (qmax + 0.5)``): it still rounds onto ``±qmax`` (at most
    half a step of clipping), and the step is finer, which matters for narrow formats
    (int4: 7.5 instead of 7 steps per side; Qwix's default bound).

    ``clip`` multiplies the range (Qwix's ``"absmax,0.8"``, AQT's calibration ``scale``):
    ``clip=0.8`` maps ``0.8 max|x|`` onto ``qmax`` and saturates what lies beyond.
    """

    half_step: bool = False
    clip: float = 1.0
    name = "absmax"

    def __post_init__(self):
        c = self.clip
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < float(c) < math.inf:
            raise ValueError(f"absmax clip must be a positive finite number, got {c!r}")
        object.__setattr__(self, "clip", float(c))

    def __call__(self, x, axes, fmt, symmetric):
        a = jnp.max(jnp.abs(x), axis=axes, keepdims=True, initial=0.0)
        if self.half_step and not fmt.is_float:
            a = a * (fmt.qmax / (fmt.qmax + 0.5))
        if self.clip != 1.0:
            a = a * self.clip
        return -a, a


@dataclasses.dataclass(frozen=True)
class MinMax(Calibration):
    """Range ``[min x, max x]`` (its symmetric hull when symmetric)."""

    name = "minmax"

    def __call__(self, x, axes, fmt, symmetric):
        # initial=0: an empty group gets range [0, 0]; quantization widens every range
        # to contain 0 anyway, so this changes no scale.
        lo = jnp.min(x, axis=axes, keepdims=True, initial=0.0)
        hi = jnp.max(x, axis=axes, keepdims=True, initial=0.0)
        return _symmetric(lo, hi) if symmetric else (lo, hi)


def _unsharded(x: jax.Array, axes: Axes) -> jax.Array:
    """``x`` whole along ``axes`` on every device when its type shards them (Explicit mesh
    axes): a sort cannot run along a sharded axis, nor a reshape merge one. Other arrays
    pass unchanged."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return x
    entries = list(spec) + [None] * (x.ndim - len(spec))
    pos = {a % x.ndim for a in axes}
    if all(entries[a] is None for a in pos):
        return x
    unsharded = P(*(None if a in pos else e for a, e in enumerate(entries)))
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(sharding.mesh, unsharded))


@dataclasses.dataclass(frozen=True)
class Percentile(Calibration):
    """Clip outliers: symmetric ``a = p-th percentile of |x|``; asymmetric
    ``[(100 - p)-th, p-th percentile of x]``. ``p`` is in (0, 100]."""

    p: float = 99.99
    name = "percentile"

    def __post_init__(self):
        if not 0 < float(self.p) <= 100:
            raise ValueError(f"percentile p must be in (0, 100], got {self.p}")

    def __call__(self, x, axes, fmt, symmetric, valid=None):
        """``valid``: an optional boolean mask broadcastable to ``x``; the percentile is then
        of the valid values only (a ragged dot's padding rows must not count)."""
        y, shape = _move_to_end(_unsharded(x, axes), axes)
        if y.shape[-1] == 0:
            zero = jnp.zeros(shape, x.dtype)
            return zero, zero
        pct = jnp.percentile
        if valid is None:
            bad = jnp.any(~jnp.isfinite(y), axis=-1)
        else:
            keep, _ = _move_to_end(_unsharded(jnp.broadcast_to(valid, x.shape), axes), axes)
            bad = jnp.any(~jnp.isfinite(y) & keep, axis=-1)
            y, pct = jnp.where(keep, y, jnp.nan), jnp.nanpercentile
        if symmetric:
            a = pct(jnp.abs(y), self.p, axis=-1)
            a = jnp.where(bad, jnp.nan, a).reshape(shape)
            return -a, a
        lo = pct(y, 100 - self.p, axis=-1)
        hi = pct(y, self.p, axis=-1)
        lo = jnp.where(bad, jnp.nan, lo).reshape(shape)
        return lo, jnp.where(bad, jnp.nan, hi).reshape(shape)


def unit_exponent(a):
    """``e`` with ``a * 2**-e`` in ``[0.5, 1)`` for finite ``a > 0`` (0 elsewhere): scaling by
    ``2**-e`` is exact and puts the largest magnitude of a group near 1."""
    _, e = jnp.frexp(a)
    return jnp.where(jnp.isfinite(a) & (a > 0), e, 0)


@dataclasses.dataclass(frozen=True)
class MSE(Calibration):
    """MSE-optimal clipping: search clip ratios ``r`` in ``[min_ratio, 1]`` of the full
    (absmax or minmax) range and keep, per scale group, the one that minimises
    ``sum |x - Q_r(x)|^norm``, computed on the group scaled by a power of two so its largest
    magnitude is in ``[0.5, 1)`` (the choice is invariant to the data's magnitude). Memory
    stays O(|x|): candidates are scanned, not stacked."""

    num_candidates: int = 64
    min_ratio: float = 0.2
    norm: float = 2.0
    name = "mse"

    def __post_init__(self):
        if int(self.num_candidates) < 1:
            raise ValueError(f"mse num_candidates must be >= 1, got {self.num_candidates}")
        if not 0 < float(self.min_ratio) <= 1:
            raise ValueError(f"mse min_ratio must be in (0, 1], got {self.min_ratio}")

    def __call__(self, x, axes, fmt, symmetric):
        lo0 = jnp.min(x, axis=axes, keepdims=True, initial=0.0)
        hi0 = jnp.max(x, axis=axes, keepdims=True, initial=0.0)
        if symmetric:
            lo0, hi0 = _symmetric(lo0, hi0)
        ratios = jnp.linspace(self.min_ratio, 1.0, int(self.num_candidates), dtype=x.dtype)
        # search on each group scaled (exactly) by the power of two that brings its largest
        # magnitude into [0.5, 1): summed |errors|^norm neither overflow nor underflow, so
        # the ratio chosen does not depend on the data's magnitude
        e = -unit_exponent(jnp.maximum(-lo0, hi0))
        xn, lon, hin = (jnp.ldexp(v, e) for v in (x, lo0, hi0))

        def error(r):
            scale, zp = scale_from_range(lon * r, hin * r, fmt, symmetric)
            xq = dequantize_values(quantize_values(xn, scale, zp, fmt), scale, zp, x.dtype, fmt)
            return jnp.sum(jnp.abs(xn - xq) ** self.norm, axis=axes, keepdims=True)

        def step(carry, r):
            best_err, best_r = carry
            err = error(r)
            better = err < best_err
            return (jnp.where(better, err, best_err), jnp.where(better, r, best_r)), None

        init = (error(ratios[-1]), jnp.ones_like(lo0))
        (_, best), _ = jax.lax.scan(step, init, ratios[:-1])
        return lo0 * best, hi0 * best


@dataclasses.dataclass(frozen=True)
class Fixed(Calibration):
    """A fixed, user-given range ``[lo, hi]`` (no statistics)."""

    lo: float = -1.0
    hi: float = 1.0
    name = "fixed"

    def __post_init__(self):
        if not float(self.lo) <= float(self.hi):
            raise ValueError(f"fixed range needs lo <= hi, got lo={self.lo}, hi={self.hi}")

    def __call__(self, x, axes, fmt, symmetric):
        shape = tuple(1 if a in {b % x.ndim for b in axes} else s for a, s in enumerate(x.shape))
        lo = jnp.full(shape, self.lo, x.dtype)
        hi = jnp.full(shape, self.hi, x.dtype)
        return _symmetric(lo, hi) if symmetric else (lo, hi)


def absmax(half_step: bool = False, clip: float = 1.0) -> AbsMax:
    """Calibrate to the largest magnitude (``half_step``: map it to ``qmax + 1/2`` steps;
    ``clip``: times this factor, e.g. 0.8, saturating what lies beyond)."""
    return AbsMax(bool(half_step), clip)


def minmax() -> MinMax:
    """Calibrate to the observed minimum and maximum."""
    return MinMax()


def percentile(p: float = 99.99) -> Percentile:
    """Calibrate to the ``p``-th percentile (clips the top ``100 - p`` percent)."""
    return Percentile(float(p))


def mse(num_candidates: int = 64, min_ratio: float = 0.2, norm: float = 2.0) -> MSE:
    """Calibrate by searching the clip ratio that minimises quantization error."""
    return MSE(int(num_candidates), float(min_ratio), float(norm))


def fixed(lo: float, hi: float) -> Fixed:
    """Use the fixed range ``[lo, hi]``."""
    return Fixed(float(lo), float(hi))


_BY_NAME = {"absmax": AbsMax, "minmax": MinMax, "percentile": Percentile, "mse": MSE, "fixed": Fixed}


def calibration_from_dict(d: dict[str, Any]) -> Calibration:
    """Inverse of ``Calibration.to_dict``.

    Raises:
      ValueError: unknown calibration name or fields.
    """
    d = dict(d)
    name = d.pop("name", None)
    if name not in _BY_NAME:
        raise ValueError(f"unknown calibration {name!r}; expected one of {sorted(_BY_NAME)}")
    try:
        return _BY_NAME[name](**d)
    except TypeError as e:
        raise ValueError(f"bad fields for calibration {name!r}: {d}") from e
