"""Candidate formats of the precision search: what one layer may become.

A :class:`Candidate` is a named pair of specs: how the layer's weight is stored
(``weight``) and how the activations of the ops reading it are quantized (``act``).
``Candidate("float")`` (both ``None``) keeps the layer as it is. The chosen candidate of
each layer becomes one :class:`qjax.Rule` of the output policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from qjax.numerics import calibration as calib
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One choice for a layer.

    Args:
      name: a short unique label (``"int4"``, ``"w8a8"``, ``"float"``); it names the
        choice in reports and in ``pins=``.
      weight: how to quantize the weight leaf, or ``None`` to keep it in float.
      act: how to quantize the activations of the ops reading the leaf, or ``None``.

    Raises:
      TypeError: ``name`` is not a non-empty string, or a spec is not a ``QuantSpec``.

    Example:
      >>> Candidate("int4", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,)))
    """

    name: str
    weight: QuantSpec | None = None
    act: QuantSpec | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Candidate name must be a non-empty string, got {self.name!r}")
        for field in ("weight", "act"):
            v = getattr(self, field)
            if v is not None and not isinstance(v, QuantSpec):
                raise TypeError(
                    f"Candidate {self.name!r}: {field} must be a qjax.QuantSpec or None, got {v!r}"
                )
        if self.weight is not None and self.weight.channel_axes is PER_TOKEN:
            raise ValueError(f"Candidate {self.name!r}: qjax.PER_TOKEN is for activations, not weights")

    @property
    def is_float(self) -> bool:
        """True when the candidate leaves the layer unchanged."""
        return self.weight is None and self.act is None

    def weight_bits(self, float_bits: int) -> int:
        """Bits per weight element (``float_bits`` when the weight stays float).

        Example:
          >>> FLOAT.weight_bits(32), weight_candidates((4,))[0].weight_bits(32)
          (32, 4)
        """
        return float_bits if self.weight is None else self.weight.bits

    def act_bits(self, float_bits: int) -> int:
        """Bits per activation element (``float_bits`` when activations stay float)."""
        return float_bits if self.act is None else self.act.bits

    def compute_format(self, float_name: str = "float32") -> str:
        """The format the matmul runs in: the activation's float dtype for float or
        weight-only candidates (the weight is dequantized on the fly); otherwise the
        wider operand's format, integers widened to ``int8`` (``"int8"`` for W4A8).

        Args:
          float_name: the float format activations are computed in.

        Returns:
          A format name as used by :class:`qjax.autoprec.Hardware`.

        Example:
          >>> Candidate("w4a8", weight=W4, act=A8).compute_format()
          'int8'
        """
        w, a = self.weight, self.act
        if w is None or a is None:
            return float_name
        if w.format.is_float or a.format.is_float:
            return a.format.name if w.format == a.format else float_name
        bits = max(w.bits, a.bits)
        return "int8" if bits <= 8 else f"int{bits}"

    def key(self) -> str:
        """A stable text key of the name and both specs (for latency caches)."""
        parts = [self.name]
        for s in (self.weight, self.act):
            parts.append("-" if s is None else repr(sorted(s.to_dict().items())))
        return "|".join(parts)

    def fits(self, leaf: Any) -> str | None:
        """Why the weight spec cannot quantize ``leaf`` (an array or ShapeDtypeStruct),
        or ``None`` when it can (never raises: the reason is returned).

        Example:
          >>> Candidate("g128", weight=W4G128).fits(jnp.zeros((100, 8)))
          'group_size 128 ...'
        """
        if self.weight is None:
            return None
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return f"weight dtype {jnp.dtype(leaf.dtype).name} is not a float type"
        try:
            jax.eval_shape(lambda w: quantize(w, self.weight), jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        except (TypeError, ValueError) as e:
            return str(e)
        return None


FLOAT = Candidate("float")


def weight_candidates(
    bits: Iterable[int] = (2, 4, 8),
    *,
    channel_axes: tuple[int, ...] = (-1,),
    calibration: calib.Calibration | None = None,
    include_float: bool = True,
) -> tuple[Candidate, ...]:
    """Weight-only integer candidates ``int{b}`` (symmetric, one scale per output
    channel by default) plus ``"float"``.

    Args:
      bits: integer widths (2–8).
      channel_axes: scale axes of the weight (``(-1,)``: the output channels of a Dense
        ``(in, out)`` or Conv ``HWIO`` kernel).
      calibration: a ``qjax.calib`` calibrator; default ``qjax.calib.mse()`` (clip search:
        plain absmax makes symmetric int2 ternary and loses most of its accuracy).
      include_float: append the ``"float"`` candidate.

    Returns:
      Candidates in the given order, ``"float"`` last.

    Raises:
      ValueError: a width is not a supported integer width.

    Example:
      >>> [c.name for c in weight_candidates((4, 8))]
      ['int4', 'int8', 'float']
    """
    cal = calib.mse() if calibration is None else calibration
    out = []
    for b in bits:
        if b not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"weight_candidates: bits {b!r} is not an integer width in 2..8")
        out.append(
            Candidate(f"int{b}", weight=QuantSpec(f"int{b}", channel_axes=channel_axes, calibration=cal))
        )
    if include_float:
        out.append(FLOAT)
    return tuple(out)


def check_candidates(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """Validate a candidate list: non-empty, ``Candidate`` objects, unique names.

    Args:
      candidates: the list to check.

    Returns:
      The candidates as a tuple.

    Raises:
      TypeError: an entry is not a ``Candidate``; ValueError: empty or repeated names.

    Example:
      >>> check_candidates(weight_candidates((4,)))[0].name
      'int4'
    """
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates is empty: give at least one Candidate")
    for i, c in enumerate(candidates):
        if not isinstance(c, Candidate):
            raise TypeError(f"candidates[{i}] must be a qjax.autoprec.Candidate, got {c!r}")
    names = [c.name for c in candidates]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; repeated: {dup}")
    return candidates
