"""``TransposedQArray``: a quantized weight stored with its last two axes swapped.

A Flax ``Dense`` kernel is ``(K, N)`` (inputs, outputs) and the model reads it as ``x @ w``.
The fast 8-bit matmuls want it the other way round: Hopper's 8-bit ``wgmma`` reads both
operands K-major, and XLA:GPU's int8 dot on a ``(K, N)`` weight took 1.9x the time of the
same dot on ``(N, K)`` (H200, 4096^3). Transposing the codes inside every call costs a copy
of the weight per call. ``TransposedQArray`` stores them transposed once, outside the
program, while the model still sees a ``(K, N)`` array: its logical shape and value are
those of ``swapaxes(stored.dequantize(), -1, -2)``. ``qjax.quantized`` folds the swap into
the matmul's dimension numbers, so no transpose runs per call.

Build one with :func:`transpose_storage` (or ``qjax.store_transposed`` on a params tree).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qjax.numerics.granularity import Layout
from qjax.numerics.packing import pack
from qjax.numerics.qarray import QArray, channel_axes_from_scale


def _swapped_axis(axis: int | None) -> int | None:
    """A negative axis index after swapping the last two axes."""
    return {-1: -2, -2: -1}.get(axis, axis) if axis is not None else None


@jax.jit  # one program per layout: eager, the unpack / repack ops would compile one by one
def _swap_qarray(q: QArray) -> QArray:
    """``q`` with its last two axes swapped: codes (repacked along the same logical axis),
    scales, zero points and axis metadata. The static activation scale is unchanged."""
    if q.ndim < 2:
        raise ValueError(f"only a QArray of rank >= 2 can be stored transposed, got {q!r}")
    packed_axis = _swapped_axis(q.packed_axis)
    if q.packed_axis is None:
        values = jnp.swapaxes(q.values, -1, -2)
    else:
        codes = q.format.to_codes(jnp.swapaxes(q.unpacked_values(), -1, -2))
        values = pack(codes, q.format.pack_bits, packed_axis)

    def swap(x):
        return None if x is None else jnp.swapaxes(x, -1, -2)

    scale, group_axis = swap(q.scale), _swapped_axis(q.group_axis)
    shape = (*q.shape[:-2], q.shape[-1], q.shape[-2])
    channel_axes = tuple(sorted(_swapped_axis(a) for a in q.channel_axes))
    if Layout(shape, channel_axes, group_axis, q.group_size).scale_shape != scale.shape:
        # the scale has axes the metadata does not list (a jax.vmap(qjax.quantize) output
        # over stacked layers): read the channel axes off the scale itself
        channel_axes = channel_axes_from_scale(shape, scale.shape, group_axis)
    return QArray(
        values,
        scale,
        swap(q.zero_point),
        act_scale=q.act_scale,
        act_zero_point=q.act_zero_point,
        format=q.format,
        dtype=q.dtype,
        channel_axes=channel_axes,
        group_axis=group_axis,
        group_size=q.group_size,
        packed_axis=packed_axis,
        packed_length=q.packed_length,
    )


_dequantize = jax.jit(lambda stored: jnp.swapaxes(stored.dequantize(), -1, -2))


@jax.tree_util.register_pytree_with_keys_class
class TransposedQArray:
    """A quantized array whose codes are stored with the last two axes swapped.

    It stands for ``jnp.swapaxes(stored.dequantize(), -1, -2)``: ``shape``, ``dtype`` and
    :meth:`dequantize` are the logical ones (what the model reads), ``stored`` is the
    ``QArray`` as it sits in memory. Leading (stacked) axes are not moved, so a ``scan``
    over stacked layers slices it like a ``QArray``.

    Attributes:
      stored: the ``QArray`` in memory, shape ``(..., N, K)`` for a logical ``(..., K, N)``.
    """

    __slots__ = ("stored",)

    def __init__(self, stored: QArray):
        if not isinstance(stored, QArray):
            raise TypeError(f"TransposedQArray stores a QArray, got {type(stored).__name__}")
        if stored.ndim < 2:
            raise ValueError(f"TransposedQArray needs a stored QArray of rank >= 2, got {stored!r}")
        self.stored = stored

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("stored"), self.stored),), None

    def tree_flatten(self):
        return (self.stored,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "stored", children[0])
        return obj

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape (the stored shape with its last two axes swapped)."""
        s = self.stored.shape
        return (*s[:-2], s[-1], s[-2])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self):
        return self.stored.dtype

    @property
    def format(self):
        return self.stored.format

    @property
    def nbytes(self) -> int:
        """Bytes held (the stored codes and scales)."""
        return self.stored.nbytes

    def dequantize(self) -> jax.Array:
        """The real values, in the logical layout and the original dtype."""
        return _dequantize(self.stored)

    def as_qarray(self) -> QArray:
        """The same quantized array as a plain ``QArray`` in the logical layout (the codes
        transposed back; exact)."""
        return _swap_qarray(self.stored)

    def __repr__(self) -> str:
        return f"TransposedQArray(shape={self.shape}, stored={self.stored!r})"


def transpose_storage(q: QArray) -> TransposedQArray:
    """Store ``q`` with its last two axes swapped; the result stands for the same array.

    Packed int4/int2 codes stay packed along the same logical axis (a ``(K, N)`` weight
    packed along N is stored ``(N, K)`` packed along N). Exact: no code or scale changes.

    Args:
      q: a ``QArray`` of rank >= 2.

    Returns:
      A :class:`TransposedQArray` with ``shape == q.shape``.

    Raises:
      TypeError: ``q`` is not a ``QArray``; ValueError: rank below 2.

    Example:
      >>> w = qjax.quantize(kernel, qjax.QuantSpec(qjax.int8, channel_axes=(-1,)))  # (K, N)
      >>> wt = qjax.transpose_storage(w)         # codes stored (N, K)
      >>> wt.shape == w.shape, wt.stored.shape   # ((K, N) logical, (N, K) stored)
    """
    if isinstance(q, TransposedQArray):
        raise TypeError("transpose_storage got a TransposedQArray: it is stored transposed already")
    if not isinstance(q, QArray):
        raise TypeError(f"transpose_storage expects a qjax.QArray, got {type(q).__name__}")
    return TransposedQArray(_swap_qarray(q))


def swapped_spec(spec: PartitionSpec, ndim: int) -> PartitionSpec:
    """A partition spec for a rank-``ndim`` array, with its last two entries swapped: the
    stored codes' spec from the logical array's, and back (the swap is its own inverse)."""
    entries = [*spec, *([None] * (ndim - len(spec)))]
    entries[-2:] = entries[-1], entries[-2]
    return PartitionSpec(*entries)


def is_quantized(x) -> bool:
    """``True`` for a quantized leaf: a ``QArray`` or a ``TransposedQArray`` (use as
    ``is_leaf`` in tree utilities that should not descend into them)."""
    return isinstance(x, (QArray, TransposedQArray))
