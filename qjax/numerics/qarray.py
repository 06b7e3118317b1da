"""``QArray``: a quantized tensor as a pytree.

Children: ``values`` (integer codes in the format's storage dtype, or ``uint8`` when
packed; fp8/fp4 values for float formats, table indices for codebook formats), ``scale``
and ``zero_point`` (``None`` when symmetric), and optionally ``act_scale`` /
``act_zero_point``: the static (calibrated) quantization of the activations of the ops
that read this weight, stored with it so a stacked (``nn.scan``) weight carries one per
layer. Static aux data: format, original dtype, granularity and packing. All axes are
stored as negative indices, so ``jax.vmap`` over leading axes keeps a ``QArray``
consistent; the logical shape is derived from ``values``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.formats import Format
from qjax.numerics.granularity import Layout, from_grouped, scale_to_grouped, to_grouped
from qjax.numerics.packing import packed_length, unpack
from qjax.numerics.scaling import dequantize_values

_CHILDREN = ("values", "scale", "zero_point", "act_scale", "act_zero_point")
_AUX = ("format", "dtype", "channel_axes", "group_axis", "group_size", "packed_axis", "packed_length")


def channel_axes_from_scale(shape, scale_shape, group_axis: int | None = None) -> tuple[int, ...]:
    """The channel axes (negative indices) that a scale of ``scale_shape`` gives an array of
    logical ``shape``: every axis but the group axis where the scale has the array's full,
    non-unit length (an emptied axis, length 0, counts). Reads the true granularity of a
    QArray whose scale gained axes its metadata does not list (a ``jax.vmap`` output)."""
    ndim = len(shape)
    pos_g = None if group_axis is None else group_axis % ndim
    return tuple(a - ndim for a in range(ndim) if a != pos_g and shape[a] != 1 and scale_shape[a] == shape[a])


@jax.tree_util.register_pytree_with_keys_class
class QArray:
    """A quantized array: ``dequantize() == (values - zero_point) * scale`` broadcast per
    its granularity. Build one with ``qjax.quantize``; the constructor checks that the
    parts fit together.

    Raises:
      ValueError: scale or zero point shape does not match the granularity, or the values
        dtype does not match the format.
    """

    __slots__ = (*_CHILDREN, *_AUX)

    def __init__(
        self,
        values: jax.Array,
        scale: jax.Array,
        zero_point: jax.Array | None = None,
        *,
        act_scale: jax.Array | None = None,
        act_zero_point: jax.Array | None = None,
        format: Format,
        dtype,
        channel_axes: tuple[int, ...] = (),
        group_axis: int | None = None,
        group_size: int | None = None,
        packed_axis: int | None = None,
        packed_length: int | None = None,
    ):
        self.values, self.scale, self.zero_point = values, scale, zero_point
        self.act_scale, self.act_zero_point = act_scale, act_zero_point
        self.format = format
        self.dtype = jnp.dtype(dtype)
        self.channel_axes = tuple(channel_axes)
        self.group_axis, self.group_size = group_axis, group_size
        self.packed_axis, self.packed_length = packed_axis, packed_length
        self._validate()

    # -- pytree --------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        children = (
            (jax.tree_util.GetAttrKey("values"), self.values),
            (jax.tree_util.GetAttrKey("scale"), self.scale),
            (jax.tree_util.GetAttrKey("zero_point"), self.zero_point),
            (jax.tree_util.GetAttrKey("act_scale"), self.act_scale),
            (jax.tree_util.GetAttrKey("act_zero_point"), self.act_zero_point),
        )
        return children, tuple(getattr(self, k) for k in _AUX)

    def tree_flatten(self):
        # The key-less flatten JAX uses on every jit call: cheaper than building keys.
        children = (self.values, self.scale, self.zero_point, self.act_scale, self.act_zero_point)
        return children, tuple(getattr(self, k) for k in _AUX)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        for k, v in zip(_CHILDREN, children):
            object.__setattr__(obj, k, v)
        for k, v in zip(_AUX, aux):
            object.__setattr__(obj, k, v)
        return obj

    def replace_children(self, children) -> QArray:
        """The same static metadata with new children (``values, scale, zero_point,
        act_scale, act_zero_point``); no validation (children may be specs or shapes)."""
        return QArray.tree_unflatten(tuple(getattr(self, k) for k in _AUX), list(children))

    def with_act_scale(self, act_scale, act_zero_point=None) -> QArray:
        """This weight with a static activation scale (and zero point) stored beside it:
        the quantization of the activations of ops that read this weight."""
        return self.replace_children([self.values, self.scale, self.zero_point, act_scale, act_zero_point])

    # -- derived properties ---------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Logical (unpacked) shape."""
        shape = list(np.shape(self.values))
        if self.packed_axis is not None:
            shape[self.packed_axis] = self.packed_length
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(np.shape(self.values))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> Layout:
        return Layout(self.shape, self.channel_axes, self.group_axis, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes held by values, scale and zero point."""
        total = 0
        for leaf in (self.values, self.scale, self.zero_point, self.act_scale, self.act_zero_point):
            if leaf is not None:
                total += math.prod(np.shape(leaf)) * jnp.dtype(leaf.dtype).itemsize
        return total

    def unpacked_values(self) -> jax.Array:
        """Stored values at the logical shape (unpacks int4/int2/fp4/nf4 storage): integer
        codes, fp8/fp4 values, or codebook indices."""
        if self.packed_axis is None:
            return self.values
        fields = unpack(
            self.values,
            self.format.pack_bits,
            self.packed_length,
            axis=self.packed_axis,
            signed=self.format.codes_signed,
        )
        return self.format.from_codes(fields)

    def dequantize(self) -> jax.Array:
        """The real values this array stands for, in its original dtype."""
        layout = self.layout
        q = to_grouped(self.unpacked_values(), layout, pad_mode="zero")
        scale = scale_to_grouped(self.scale, layout)
        zp = None if self.zero_point is None else scale_to_grouped(self.zero_point, layout)
        return from_grouped(dequantize_values(q, scale, zp, self.dtype, self.format), layout)

    # -- checks ---------------------------------------------------------------------
    def _validate(self) -> None:
        fmt = self.format
        expected = jnp.dtype(jnp.uint8) if self.packed_axis is not None else fmt.storage_dtype
        if jnp.dtype(self.values.dtype) != expected:
            raise ValueError(
                f"QArray values have dtype {self.values.dtype}, expected {expected} for {fmt.name}"
            )
        if not jnp.issubdtype(self.dtype, jnp.floating):
            raise TypeError(f"QArray dtype must be a float dtype, got {self.dtype}")
        ndim = self.ndim
        for a in self.channel_axes + tuple(x for x in (self.group_axis, self.packed_axis) if x is not None):
            if not -ndim <= a < 0:
                raise ValueError(f"QArray axis {a} must be a negative index into rank {ndim}")
        if self.packed_axis is not None:
            n = np.shape(self.values)[self.packed_axis]
            if packed_length(self.packed_length, fmt.pack_bits) != n:
                raise ValueError(
                    f"QArray packed axis holds {n} bytes but packed_length={self.packed_length} needs "
                    f"{packed_length(self.packed_length, fmt.pack_bits)}"
                )
        want = self.layout.scale_shape
        if tuple(np.shape(self.scale)) != want:
            raise ValueError(
                f"QArray scale has shape {tuple(np.shape(self.scale))} but values of shape {self.shape} "
                f"with channel_axes={self.channel_axes}, group_axis={self.group_axis}, "
                f"group_size={self.group_size} need scale shape {want} (a QArray returned by "
                "jax.vmap(qjax.quantize) has the mapped axis in its scale but not in its channel_axes: "
                "quantize the stacked array with that axis in channel_axes instead)"
            )
        if self.zero_point is not None and tuple(np.shape(self.zero_point)) != want:
            raise ValueError(
                f"QArray zero_point has shape {tuple(np.shape(self.zero_point))}, expected {want}"
            )

    def __repr__(self) -> str:
        gran = "per-tensor"
        if self.channel_axes:
            gran = f"channel_axes={self.channel_axes}"
        if self.group_axis is not None:
            gran += f", group_axis={self.group_axis}, group_size={self.group_size}"
        packed = ", packed" if self.packed_axis is not None else ""
        zp = ", asymmetric" if self.zero_point is not None else ""
        return f"QArray({self.format.name}, shape={self.shape}, dtype={self.dtype.name}, {gran}{zp}{packed})"


def is_qarray(x) -> bool:
    """``True`` for a :class:`QArray` (use as ``is_leaf`` in tree utilities)."""
    return isinstance(x, QArray)
