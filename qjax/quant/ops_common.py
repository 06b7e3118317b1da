"""Shared machinery of the quantized ops (:mod:`qjax.quant.ops`): operands, their
preparation (a :class:`~qjax.QArray`, or a float array quantized on the fly by a spec),
checks, int4/int2 field extraction, and the straight-through derivative rule.

An :class:`Operand` is an operand of one op as the ops compute with it: integer codes
normalised to *signed* storage (an unsigned format is shifted by ``2**(bits-1)``, the
shift moved into the zero point), an fp8/fp4 array (or a codebook's table values), or
plain float values; its scale has the
operand's rank with, on every axis, size 1, the axis size (per channel) or the number of
groups (``group_axis``). Axes are non-negative here (the op's dimension numbers are).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from qjax.numerics.fake_quant import fake_quant, never_clips
from qjax.numerics.formats import int8
from qjax.numerics.packing import unpack
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.scaling import compute_dtype
from qjax.numerics.spec import PER_TOKEN, QuantSpec

METHODS = ("auto", "int", "split", "convert", "dequant")
INT32_LIMIT = 2**31 - 1
SPLIT_PIECES = 3  # int8 pieces a float activation is cut into by method="split"
SPLIT_RADIX = 254  # piece i+1 resolves the rounding error of piece i (|error| <= 1/2 step)


@dataclasses.dataclass(frozen=True)
class Operand:
    """One operand of a quantized op (see the module docstring)."""

    name: str  # "lhs" / "rhs", for messages
    kind: str  # "int" | "fp8" | "float"
    values: jax.Array  # signed int codes (packed uint8 when packed_axis is set), fp8, or float
    scale: jax.Array | None  # None for kind "float"
    zero_point: jax.Array | None  # int32, shape of scale
    dtype: Any  # the float dtype this operand stands for
    shape: tuple[int, ...]  # logical shape
    group_axis: int | None = None
    group_size: int | None = None
    packed_axis: int | None = None
    pack_bits: int | None = None
    signed_fields: bool = True  # how packed fields are sign-extended
    shift: int = 0  # subtracted from every unpacked field (unsigned formats)
    bound: int = 0  # max |code - zero_point| (kind "int")
    source: QArray | None = None  # the QArray this came from (for method="dequant")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def replace(self, **kw) -> Operand:
        return dataclasses.replace(self, **kw)


def describe(x) -> str:
    if isinstance(x, QArray):
        return repr(x)
    return f"array of shape {tuple(np.shape(x))} and dtype {jnp.result_type(x)}"


def logical_shape(x, name: str) -> tuple[int, ...]:
    """Shape of an operand (the logical shape of a QArray).

    Raises:
      TypeError: ``x`` is neither a QArray nor a floating-point array.
    """
    if isinstance(x, QArray):
        return tuple(x.shape)
    try:
        dt = jnp.result_type(x)
    except TypeError:
        raise TypeError(f"{name} must be a float array or a qjax.QArray, got {type(x).__name__}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array or a qjax.QArray, got dtype {dt}; integer codes "
            "must come wrapped in a QArray (their scale is needed)"
        )
    return tuple(np.shape(x))


def check_args(name: str, x, spec, scale, zero_point) -> None:
    """Argument combinations that make no sense, named."""
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(f"{name}_spec must be a qjax.QuantSpec or None, got {type(spec).__name__}")
    if isinstance(x, QArray):
        if spec is not None:
            raise ValueError(f"{name} is already quantized ({x!r}); {name}_spec must be None")
        if scale is not None or zero_point is not None:
            raise ValueError(
                f"{name} is already quantized ({x!r}); {name}_scale/{name}_zero_point must be None"
            )
        return
    if spec is None and (scale is not None or zero_point is not None):
        raise ValueError(f"{name}_scale/{name}_zero_point were given but {name}_spec is None")
    if spec is not None and scale is None and zero_point is not None:
        raise ValueError(f"{name}_zero_point was given without {name}_scale")
    if spec is not None and scale is not None:
        if spec.channel_axes is PER_TOKEN:
            raise ValueError(
                f"{name}_scale: a static (calibrated) scale cannot be per-token ({name}_spec has "
                "channel_axes=qjax.PER_TOKEN, one scale per token of this call); use a per-tensor "
                "or per-channel spec, or drop the static scale to quantize per token on the fly"
            )
        if not spec.symmetric and zero_point is None:
            raise ValueError(f"{name}_spec is asymmetric: a static {name}_scale needs {name}_zero_point")


def resolve_spec(spec: QuantSpec, token_axes: Sequence[int]) -> QuantSpec:
    """``spec`` with ``PER_TOKEN`` replaced by ``token_axes`` and packing off (on-the-fly
    quantized activations are consumed at once, never stored)."""
    if spec.channel_axes is PER_TOKEN:
        spec = spec.replace(channel_axes=tuple(token_axes))
    return spec.replace(pack=False)


def check_static_scale(name: str, value, spec: QuantSpec, shape, free_axes: Sequence[int]) -> None:
    """A static scale / zero point must broadcast to the spec's scale shape and must not
    vary along a free (batch/sequence) axis of the operand."""
    if value is None:
        return
    want = spec.layout(shape).scale_shape
    vshape = tuple(np.shape(value))
    try:
        np.broadcast_shapes(vshape, want)
        ok = len(vshape) <= len(want) and np.broadcast_shapes(vshape, want) == want
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {vshape} does not broadcast to the scale shape {want} that {name[:3]}_spec "
            f"gives an operand of shape {tuple(shape)}"
        )
    full = (1,) * (len(want) - len(vshape)) + vshape
    bad = [a for a in free_axes if full[a] != 1]
    if bad:
        raise ValueError(
            f"{name} of shape {vshape} varies along axis {bad[0]} of the operand (shape {tuple(shape)}), a "
            "non-contracting axis whose size is the batch or sequence length: a static scale must not "
            "depend on it"
        )


def _widened(scale):
    """A bfloat16-stored scale (``QuantSpec.scale_dtype``) as float32 for the arithmetic."""
    cdt = compute_dtype(scale.dtype)
    return scale if jnp.dtype(scale.dtype) == cdt else scale.astype(cdt)


def from_qarray(name: str, q: QArray) -> Operand:
    """Wrap a QArray as an Operand (signed codes, non-negative axes)."""
    nd = q.ndim
    fmt = q.format
    pos = lambda a: None if a is None else a % nd
    common = dict(
        name=name,
        scale=_widened(q.scale),
        dtype=q.dtype,
        shape=tuple(q.shape),
        group_axis=pos(q.group_axis),
        group_size=q.group_size,
        source=q,
    )
    if fmt.is_float:  # fp8 as stored; fp4 unpacked; codebook indices as their table values
        values = q.unpacked_values()
        if jnp.issubdtype(values.dtype, jnp.integer):
            values = fmt.decode(values, compute_dtype(q.scale.dtype))
        return Operand(kind="fp8", values=values, zero_point=None, **common)
    shift = 0 if fmt.signed else 2 ** (fmt.bits - 1)
    zp = None if q.zero_point is None else q.zero_point.astype(jnp.int32)
    if shift:
        zp = (jnp.zeros(np.shape(q.scale), jnp.int32) if zp is None else zp) - shift
    if zp is None:
        bound = max(-fmt.qmin, fmt.qmax)
    else:
        bound = fmt.qmax - fmt.qmin
    values = q.values
    if q.packed_axis is not None:
        return Operand(
            kind="int",
            values=values,
            zero_point=zp,
            bound=bound,
            packed_axis=pos(q.packed_axis),
            pack_bits=fmt.pack_bits,
            signed_fields=fmt.signed,
            shift=shift,
            **common,
        )
    if shift:
        target = jnp.int8 if fmt.bits <= 8 else jnp.int16
        values = (values.astype(jnp.int32) - shift).astype(target)
    return Operand(kind="int", values=values, zero_point=zp, bound=bound, **common)


def prepare(name: str, x, rspec: QuantSpec | None, scale, zero_point, key) -> Operand:
    """An Operand for ``x``: a QArray, a float array quantized by the resolved spec
    ``rspec`` (statically scaled when ``scale`` is given), or plain float values."""
    if isinstance(x, QArray):
        return from_qarray(name, x)
    x = jnp.asarray(x)
    if rspec is None:
        return Operand(
            name=name,
            kind="float",
            values=x,
            scale=None,
            zero_point=None,
            dtype=x.dtype,
            shape=tuple(x.shape),
        )
    if scale is None and zero_point is None and _lean_dynamic(rspec):
        return from_qarray(name, _quantize_dynamic_absmax(x, rspec))
    return from_qarray(name, quantize(x, rspec, key=key, scale=scale, zero_point=zero_point))


def _lean_dynamic(spec: QuantSpec) -> bool:
    """Integer specs whose data-derived scale cannot clip, without groups or packing."""
    return (
        not spec.format.is_float
        and spec.group_size is None
        and spec.tile_size is None  # tiles: the tile's range, computed by quantize
        and not spec.packed
        and spec.scale_dtype is None  # a rounded scale (bfloat16, e8m0) goes through quantize
        and never_clips(spec)
    )


def _quantize_dynamic_absmax(x: jax.Array, spec: QuantSpec) -> QArray:
    """``quantize(x, spec)`` for a spec that cannot clip (``never_clips``), as the three
    ops Qwix and AQT use (scale, multiply, round): the same codes and scales for finite
    ``x``, without ``quantize``'s clip and NaN guard, whose heavier loop XLA:CPU split over
    two threads (W8A8 1024-wide MLP at batch 4: 15% slower than Qwix with the same dots).
    A token with
    NaN/Inf gets a NaN scale, so its outputs are NaN whatever its codes."""
    layout = spec.layout(x.shape)
    channel = {a % x.ndim for a in layout.channel_axes}
    axes = tuple(d for d in range(x.ndim) if d not in channel)
    xf = x.astype(compute_dtype(x.dtype))
    amax = jnp.max(jnp.abs(xf), axis=axes, keepdims=True, initial=0.0)  # 0 for an empty axis
    # as scale_from_range: a non-zero token keeps at least the smallest normal scale (a
    # subnormal one is flushed to 0 on XLA:CPU, which made a token of ~1e-38 all zeros)
    s = jnp.maximum(amax * (1.0 / spec.format.qmax), jnp.finfo(xf.dtype).tiny)
    s = jnp.where(jnp.isfinite(amax), jnp.where(amax > 0, s, jnp.ones_like(s)), jnp.full_like(s, jnp.nan))
    codes = jnp.round(xf * (1.0 / s)).astype(spec.format.storage_dtype)
    return QArray(codes, s, None, format=spec.format, dtype=x.dtype, channel_axes=layout.channel_axes)


def resolve_operand_spec(
    name: str, spec: QuantSpec, shape, scale, zero_point, token_axes: Sequence[int], free_axes: Sequence[int]
):
    """Resolve ``spec`` for an operand of ``shape`` and check its static scale / zero point.

    Returns:
      ``(resolved spec, its Layout)``.

    Raises:
      ValueError: the spec does not fit the shape, or a static scale does not fit.
    """
    rspec = resolve_spec(spec, token_axes)
    try:
        layout = rspec.layout(shape)
    except ValueError as e:
        raise ValueError(f"{name}_spec does not fit {name} of shape {tuple(shape)}: {e}") from None
    check_static_scale(f"{name}_scale", scale, rspec, shape, free_axes)
    check_static_scale(f"{name}_zero_point", zero_point, rspec, shape, free_axes)
    return rspec, layout


def check_factorable(
    what: str, name: str, scale_shape, group_axis, contracting: Sequence[int], hint: str | None = None
) -> None:
    """Scales (and zero points) may vary along a summed axis only per group (when
    ``group_axis`` is given).

    Raises:
      ValueError: a scale that varies along a summed axis other than per group.
    """
    if group_axis is not None:
        group_axis %= len(scale_shape)
    for d in contracting:
        if scale_shape[d] > 1 and d != group_axis:
            hint = hint or (
                "quantize per output channel / per token, per tensor, or per group along that axis "
                f"(group_size=..., group_axis={d})"
            )
            raise ValueError(
                f"{what}: its scale varies along axis {d} of {name}, which the op sums over, so it "
                f"cannot be factored out of the sum; {hint}"
            )


def expand_groups(arr: jax.Array, axis: int, group_size: int, length: int) -> jax.Array:
    """Per-group array (``num_groups`` along ``axis``) -> one entry per element."""
    if arr.shape[axis] == 1:
        return arr
    arr = jnp.repeat(arr, group_size, axis=axis)
    return lax.slice_in_dim(arr, 0, length, axis=axis)


def densify_group(op: Operand) -> Operand:
    """Expand the group axis of ``op``'s scale and zero point to per-element."""
    if op.group_axis is None:
        return op
    g, gs, n = op.group_axis, op.group_size, op.shape[op.group_axis]
    zp = None if op.zero_point is None else expand_groups(op.zero_point, g, gs, n)
    return op.replace(
        scale=expand_groups(op.scale, g, gs, n), zero_point=zp, group_axis=None, group_size=None
    )


def unpacked(op: Operand) -> Operand:
    """``op`` with its packed codes unpacked to one signed code per element."""
    if op.packed_axis is None:
        return op
    v = unpack(
        op.values, op.pack_bits, op.shape[op.packed_axis], axis=op.packed_axis, signed=op.signed_fields
    )
    if op.shift:
        v = (v.astype(jnp.int16) - op.shift).astype(jnp.int8)
    return op.replace(values=v, packed_axis=None, pack_bits=None)


def fields(op: Operand) -> list[jax.Array]:
    """The ``8 // bits`` bit fields of packed codes, each the codes at indices ``j`` mod
    ``8 // bits`` along the packed axis, sign-extended by int8 shifts (no interleave)."""
    bits = op.pack_bits
    per = 8 // bits
    out = []
    if op.signed_fields:
        s = lax.bitcast_convert_type(op.values, jnp.int8)
        for j in range(per):
            left = 8 - bits * (j + 1)
            f = s if left == 0 else lax.shift_left(s, jnp.int8(left))
            out.append(lax.shift_right_arithmetic(f, jnp.int8(8 - bits)))
    else:
        for j in range(per):
            f = lax.shift_right_logical(op.values, jnp.uint8(bits * j)) & jnp.uint8((1 << bits) - 1)
            out.append(lax.bitcast_convert_type(f, jnp.int8))
    if op.shift:
        out = [f - jnp.int8(op.shift) for f in out]
    return out


def strided(x: jax.Array, axis: int, start: int, step: int) -> jax.Array:
    """``x[..., start::step, ...]`` along ``axis``."""
    n = x.shape[axis]
    if n == 1:
        return x
    return lax.slice_in_dim(x, start, n, stride=step, axis=axis)


def largest_divisor_at_most(n: int, limit: int) -> int:
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def code_dtype(op: Operand):
    """Narrowest float dtype in which ``op``'s codes are exact."""
    if op.kind == "float":
        return jnp.dtype(op.values.dtype)
    if op.kind == "fp8":  # fp8/fp4 are exact in bfloat16; decoded codebook values are not
        dt = jnp.dtype(op.values.dtype)
        return jnp.dtype(jnp.bfloat16) if dt.itemsize == 1 else dt
    return jnp.dtype(jnp.bfloat16) if op.bound <= 256 else jnp.dtype(jnp.float32)


def compute_dtypes(*ops: Operand):
    """(operand dtype, accumulation dtype) of a float-codes contraction."""
    dts = {code_dtype(o) for o in ops}
    if jnp.dtype(jnp.float64) in dts:
        return jnp.dtype(jnp.float64), jnp.dtype(jnp.float64)
    if dts == {jnp.dtype(jnp.bfloat16)}:
        return jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    return jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)


def as_float_codes(op: Operand, cdt) -> jax.Array:
    """``op``'s codes minus zero point in ``cdt`` (broadcast zero point)."""
    v = op.values.astype(cdt)
    if op.zero_point is not None:
        v = v - op.zero_point.astype(cdt)
    return v


def dequantized(op: Operand) -> jax.Array:
    """The real values ``op`` stands for (dequantize of its QArray)."""
    if op.kind == "float":
        return op.values
    return op.source.dequantize()


def split_pieces(x: jax.Array, token_axes: Sequence[int], n: int = SPLIT_PIECES):
    """Cut a float array into ``n`` int8 pieces with per-token scales
    ``s, s/254, s/254**2, ...``: ``x ~= sum_i q_i * s_i`` to about float32 precision
    relative to each token's absmax (piece 0 is ``quantize(x, int8 per token)``; piece
    ``i+1`` quantizes the remaining error with the static scale ``s_i / 254``).

    Returns:
      ``(codes, scales)``: int8 ``(n, *x.shape)`` and float32 ``(n, *token scale shape)``.
    """
    # Piece 0 by the lean dynamic quantizer, the rest written out: the same codes and scales
    # as ``quantize`` (tests/quant/test_ops_split_packed.py) in ~5 fused loops instead of
    # ~15 (its NaN bookkeeping for given scales), most of the cost at one or a few rows.
    xf = x.astype(jnp.float32)
    first = _quantize_dynamic_absmax(xf, QuantSpec(int8, channel_axes=tuple(token_axes)))
    s = first.scale
    codes, scales = [first.values], [s]
    r = xf - first.values.astype(jnp.float32) * s
    for _ in range(n - 1):
        s = jnp.maximum(s * (1.0 / SPLIT_RADIX), jnp.finfo(jnp.float32).tiny)  # never 0 (x / 0)
        q = jnp.clip(jnp.round(r * (1.0 / s)), -127, 127)  # |r| <= s * 127 / 254 up to rounding
        codes.append(q.astype(jnp.int8))
        scales.append(s)
        r = r - q * s
    return jnp.stack(codes), jnp.stack(scales)


# -- derivative rule ----------------------------------------------------------------------


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _ste_surrogate(x, spec, scale, zero_point, key):
    """(value, mask): the fake-quantized operand and d fake_quant / dx (the spec's STE)."""
    if spec is None:
        return x, None
    fq = lambda v: fake_quant(v, spec, scale=scale, zero_point=zero_point, key=key)
    y, vjp = jax.vjp(fq, x)
    (mask,) = vjp(jnp.ones_like(y))
    return y, mask


def with_ste_jvp(impl, float_fn):
    """``impl(cfg, lhs, rhs, lhs_scale, lhs_zp, rhs_scale, rhs_zp, key)`` with a JVP rule:
    the quantized operands are treated straight-through: the tangent is ``float_fn``
    (the op's float bilinear form) applied to the tangent of a float operand (masked by
    its spec's STE, as ``qjax.fake_quant``) and the other operand's fake-quantized /
    dequantized value. Scales, zero points and QArray operands get no derivative.
    ``cfg`` must have ``lhs_spec``/``rhs_spec`` (resolved) attributes."""
    f = jax.custom_jvp(impl, nondiff_argnums=(0,))

    def jvp(cfg, primals, tangents):
        lhs, rhs, ls, lz, rs, rz, key = primals
        y = f(cfg, *primals)
        dl, dr = tangents[0], tangents[1]
        lkey = rkey = key
        if key is not None and cfg.lhs_spec is not None and cfg.rhs_spec is not None:
            lkey, rkey = jax.random.split(key)
        sides = [(lhs, dl, cfg.lhs_spec, ls, lz, lkey), (rhs, dr, cfg.rhs_spec, rs, rz, rkey)]
        live = [not isinstance(x, QArray) and not _is_zero(t) for x, t, *_ in sides]

        def value(i):  # the operand as the straight-through surrogate sees it
            x, _, spec, s, z, k = sides[i]
            if isinstance(x, QArray):
                return x.dequantize()
            return x if spec is None else fake_quant(x, spec, scale=s, zero_point=z, key=k)

        dy = None
        for i in (0, 1):
            if not live[i]:
                continue
            x, t, spec, s, z, k = sides[i]
            _, mask = _ste_surrogate(x, spec, s, z, k)
            t = t if mask is None else t * mask.astype(t.dtype)
            args = [None, None]
            args[i], args[1 - i] = t, value(1 - i)
            term = float_fn(cfg, *args)
            dy = term if dy is None else dy + term
        dy = jnp.zeros_like(y) if dy is None else dy.astype(y.dtype)
        return y, dy

    f.defjvp(jvp, symbolic_zeros=True)
    return f


def prod(xs) -> int:
    return math.prod(int(v) for v in xs)
