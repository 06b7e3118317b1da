"""Packing narrow integers several to a byte.

``pack(values, bits, axis)`` stores ``8 // bits`` consecutive elements along ``axis`` in
one ``uint8`` (element ``j`` of a group of ``8 // bits`` in bits ``[j*bits, (j+1)*bits)``,
little-end first: for int4, element ``2i`` is the low nibble). An axis whose length is
not a multiple is zero-padded; ``unpack`` needs the original length to drop the pad.
The round trip is exact for every value representable in ``bits`` bits.
"""

from __future__ import annotations

import jax.numpy as jnp

from qjax.numerics.granularity import normalize_axis


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 4):
        raise ValueError(f"packing supports 1, 2 or 4 bits per element, got bits={bits}")


def packed_length(length: int, bits: int) -> int:
    """Number of bytes along the packed axis for ``length`` elements."""
    per = 8 // bits
    return -(-length // per)


def pack(values: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Pack integers of at most ``bits`` bits (signed or unsigned) into ``uint8``.

    Args:
      values: integer array; only its low ``bits`` bits are kept.
      bits: 1, 2 or 4.
      axis: axis along which neighbours share a byte.

    Returns:
      ``uint8`` array with ``ceil(n * bits / 8)`` entries along ``axis``.

    Raises:
      ValueError: unsupported ``bits`` or axis out of range; TypeError: non-integer input.
    """
    _check_bits(bits)
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.integer):
        raise TypeError(f"pack expects integer values, got dtype {values.dtype}")
    ax = values.ndim + normalize_axis(axis, values.ndim, "pack axis")
    per = 8 // bits
    n = values.shape[ax]
    extra = packed_length(n, bits) * per - n
    v = values.astype(jnp.uint8) & jnp.uint8((1 << bits) - 1)
    if extra:
        widths = [(0, 0)] * v.ndim
        widths[ax] = (0, extra)
        v = jnp.pad(v, widths)
    # explicit sizes, not -1: a -1 is ambiguous when another axis has length 0
    v = v.reshape((*v.shape[:ax], v.shape[ax] // per, per, *v.shape[ax + 1 :]))
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape((per,) + (1,) * (v.ndim - ax - 2))
    return _or_reduce(v << shifts, ax + 1)


def _or_reduce(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    # Bit fields are disjoint, so a sum is an OR; sum in uint32 then narrow.
    return jnp.sum(x.astype(jnp.uint32), axis=axis).astype(jnp.uint8)


def unpack(packed: jnp.ndarray, bits: int, length: int, axis: int = -1, signed: bool = True) -> jnp.ndarray:
    """Inverse of :func:`pack`.

    Args:
      packed: ``uint8`` array from :func:`pack`.
      bits: bits per element used when packing.
      length: original number of elements along ``axis``.
      axis: the packed axis.
      signed: sign-extend each field (``int8`` result) or not (``uint8``).

    Raises:
      ValueError: ``length`` does not match the packed size, or bad ``bits``/``axis``.
    """
    _check_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"unpack expects uint8 packed data, got dtype {packed.dtype}")
    ax = packed.ndim + normalize_axis(axis, packed.ndim, "pack axis")
    per = 8 // bits
    if packed_length(length, bits) != packed.shape[ax]:
        raise ValueError(
            f"cannot unpack {packed.shape[ax]} bytes along axis {axis} into {length} "
            f"{bits}-bit values (needs {packed_length(length, bits)} bytes)"
        )
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape((per,) + (1,) * (packed.ndim - ax - 1))
    fields = (jnp.expand_dims(packed, ax + 1) >> shifts) & jnp.uint8((1 << bits) - 1)
    if signed:
        sign = jnp.int16(1 << (bits - 1))
        fields = ((fields.astype(jnp.int16) ^ sign) - sign).astype(jnp.int8)
    out = fields.reshape((*packed.shape[:ax], packed.shape[ax] * per, *packed.shape[ax + 1 :]))
    if out.shape[ax] != length:
        index = [slice(None)] * out.ndim
        index[ax] = slice(0, length)
        out = out[tuple(index)]
    return out
