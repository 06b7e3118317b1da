"""``FixedArray``: integer mantissas with a static fixed-point format."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qjax.fixed.format import Format


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedArray:
    """A fixed-point array: ``value = mantissa · 2^-format.fraction``.

    A pytree whose only child is ``mantissa`` (an integer array, ``int32`` or ``int64``);
    ``format`` is static metadata, so ``jit``, ``vmap``, ``scan`` and ``tree.map`` see one
    integer leaf and the format travels in the treedef.

    Attributes:
      mantissa: integer array.
      format: the :class:`~qjax.fixed.Format`.

    Build one with :func:`qjax.fixed.from_float` or :func:`qjax.fixed.cast`; the
    constructor does not check that ``mantissa`` lies in the format's range.
    """

    mantissa: Any
    format: Format = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(jnp.shape(self.mantissa))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(jnp.size(self.mantissa))

    def to_float(self, dtype=jnp.float32) -> jax.Array:
        """The represented values as floats (see :func:`qjax.fixed.to_float`)."""
        return to_float(self, dtype)

    def __getitem__(self, index) -> FixedArray:
        return FixedArray(self.mantissa[index], self.format)

    def reshape(self, *shape) -> FixedArray:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return FixedArray(jnp.reshape(self.mantissa, shape), self.format)

    def __repr__(self) -> str:
        return f"FixedArray({self.format}, shape={self.shape})"


def to_float(fx: FixedArray, dtype=jnp.float32) -> jax.Array:
    """``mantissa · 2^-F`` as floats.

    Exact when the mantissa fits the float's significand (``W <= 24`` for float32,
    ``W <= 53`` for float64); wider formats round to nearest once (the mantissa
    conversion), the power-of-two scaling being exact.

    Args:
      fx: a :class:`FixedArray`.
      dtype: a floating dtype.

    Returns:
      A float array of ``fx``'s shape.

    Raises:
      TypeError: ``fx`` is not a ``FixedArray`` or ``dtype`` is not floating.
    """
    if not isinstance(fx, FixedArray):
        raise TypeError(f"to_float expects a FixedArray, got {type(fx).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"to_float dtype must be floating, got {dtype}")
    scale = jnp.asarray(2.0**-fx.format.fraction, dtype)
    return jnp.asarray(fx.mantissa).astype(dtype) * scale


def is_fixed(x: Any) -> bool:
    """Whether ``x`` is a :class:`FixedArray`."""
    return isinstance(x, FixedArray)
