"""``quantized_conv_general_dilated``: a ``lax.conv_general_dilated`` with quantized
operands.

See :mod:`qjax.quant.ops` for the formulations and why each is chosen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.kernels import dispatch as kdispatch
from qjax.numerics.qarray import QArray
from qjax.numerics.spec import QuantSpec
from qjax.quant import ops_common as oc
from qjax.quant.ops_common import Operand
from qjax.quant.ops_conv_pointwise import as_dot, is_pointwise

# the conv_general_dilated parameters that fix its geometry (what a quantized replacement
# of a traced conv takes over from the equation, and what its transpose rules need)
CONV_GEOMETRY = (
    "window_strides",
    "padding",
    "lhs_dilation",
    "rhs_dilation",
    "dimension_numbers",
    "feature_group_count",
    "batch_group_count",
)


@dataclasses.dataclass(frozen=True)
class _Config:
    window_strides: tuple
    padding: Any  # str or tuple of pairs
    lhs_dilation: tuple
    rhs_dilation: tuple
    dn: lax.ConvDimensionNumbers
    feature_group_count: int
    batch_group_count: int
    lhs_spec: QuantSpec | None
    rhs_spec: QuantSpec | None
    method: str
    out_dtype: Any


def _conv(cfg: _Config, a, b, pref):
    return lax.conv_general_dilated(
        a,
        b,
        cfg.window_strides,
        cfg.padding,
        cfg.lhs_dilation,
        cfg.rhs_dilation,
        cfg.dn,
        feature_group_count=cfg.feature_group_count,
        batch_group_count=cfg.batch_group_count,
        preferred_element_type=pref,
    )


def _to_out(arr, axis: int, out_axis: int, out_ndim: int):
    """A scale / zero point that varies (at most) along ``axis`` -> broadcastable against
    the output, varying along ``out_axis``."""
    v = jnp.moveaxis(arr, axis, 0).reshape(arr.shape[axis], -1)[:, 0]
    shape = [1] * out_ndim
    shape[out_axis] = v.shape[0]
    return v.reshape(shape)


def _int_acc(cfg: _Config, av, bv, za, zb, nd):
    """Exact int32 ``conv(qa - za, qb - zb)`` (zero points moved out of the conv)."""
    (n_l, c_l), (o_r, _), (n_o, c_o) = cfg.dn.lhs_spec[:2], cfg.dn.rhs_spec[:2], cfg.dn.out_spec[:2]
    acc = _conv(cfg, av, bv, jnp.int32)
    ones_x = None
    if za is not None:
        shape = list(av.shape)
        shape[n_l] = cfg.batch_group_count
        ones_x = jnp.ones(shape, jnp.int8)
        acc = acc - _to_out(za, n_l, n_o, nd) * _conv(cfg, ones_x, bv, jnp.int32)
    if zb is not None:
        acc = acc - _to_out(zb, o_r, c_o, nd) * _conv(cfg, av, jnp.ones_like(bv), jnp.int32)
    if za is not None and zb is not None:
        both = _conv(cfg, ones_x, jnp.ones(bv.shape, jnp.int8), jnp.int32)
        acc = acc + _to_out(za, n_l, n_o, nd) * _to_out(zb, o_r, c_o, nd) * both
    del c_l
    return acc


def _scale(y, a: Operand, b: Operand, cfg: _Config):
    nd = y.ndim
    if a.scale is not None:
        y = y * _to_out(a.scale, cfg.dn.lhs_spec[0], cfg.dn.out_spec[0], nd)
    if b.scale is not None:
        y = y * _to_out(b.scale, cfg.dn.rhs_spec[0], cfg.dn.out_spec[1], nd)
    return y


def _int_conv(cfg: _Config, a: Operand, b: Operand):
    """Integer conv with int32 accumulation; the input features are cut into chunks
    (partials scaled and summed in float32) when the accumulation could overflow."""
    c_l, (o_r, i_r), sp = cfg.dn.lhs_spec[1], cfg.dn.rhs_spec[:2], cfg.dn.rhs_spec[2:]
    window = math.prod(b.shape[d] for d in sp)
    mag = a.bound * b.bound
    i_size = b.shape[i_r]
    chunk = i_size
    if mag * window * i_size > oc.INT32_LIMIT:
        chunk = oc.INT32_LIMIT // (mag * window)
        if chunk < 1 or cfg.feature_group_count != 1 or cfg.batch_group_count != 1:
            return _float_conv(cfg, a, b)  # no exact int32 form: float32 accumulation
    nd = len(a.shape)
    ftype = jnp.promote_types(a.scale.dtype, b.scale.dtype)
    y = None
    for start in range(0, i_size, chunk):
        stop = min(start + chunk, i_size)
        av, bv = a.values, b.values
        if chunk < i_size:
            av = lax.slice_in_dim(av, start, stop, axis=c_l)
            bv = lax.slice_in_dim(bv, start, stop, axis=i_r)
        if av.dtype != bv.dtype:
            av, bv = av.astype(jnp.int16), bv.astype(jnp.int16)
        part = _scale(_int_acc(cfg, av, bv, a.zero_point, b.zero_point, nd).astype(ftype), a, b, cfg)
        y = part if y is None else y + part
    del o_r
    return y


def _float_conv(cfg: _Config, a: Operand, b: Operand):
    cdt, acc_t = oc.compute_dtypes(a, b)
    y = _conv(cfg, oc.as_float_codes(a, cdt), oc.as_float_codes(b, cdt), acc_t)
    return _scale(y, a, b, cfg)


def _impl(cfg: _Config, lhs, rhs, ls, lz, rs, rz, key):
    lkey = rkey = key
    if key is not None and cfg.lhs_spec is not None and cfg.rhs_spec is not None:
        lkey, rkey = jax.random.split(key)
    a = oc.densify_group(oc.unpacked(oc.prepare("lhs", lhs, cfg.lhs_spec, ls, lz, lkey)))
    b = oc.densify_group(oc.unpacked(oc.prepare("rhs", rhs, cfg.rhs_spec, rs, rz, rkey)))
    if cfg.method == "dequant":
        _, acc_t = oc.compute_dtypes(a, b)
        y = _conv(cfg, oc.dequantized(a), oc.dequantized(b), acc_t)
    elif cfg.method == "int":
        y = _int_conv(cfg, a, b)
    else:
        y = _float_conv(cfg, a, b)
    return y.astype(cfg.out_dtype)


def _float_fn(cfg: _Config, a, b):
    return _conv(cfg, a, b, jnp.promote_types(jnp.result_type(a, b), jnp.float32))


_qconv = jax.jit(oc.with_ste_jvp(_impl, _float_fn), static_argnums=0)


def _ints(v, n: int, name: str, default: int = 1) -> tuple[int, ...]:
    if v is None:
        return (default,) * n
    try:
        v = tuple(int(s) for s in v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {n} ints, got {v!r}") from None
    if len(v) != n:
        raise ValueError(f"{name} must have {n} entries (one per spatial dimension), got {v!r}")
    return v


def quantized_conv_general_dilated(
    lhs,
    rhs,
    *,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    lhs_spec: QuantSpec | None = None,
    rhs_spec: QuantSpec | None = None,
    lhs_scale=None,
    lhs_zero_point=None,
    out_dtype=None,
    key: jax.Array | None = None,
    rhs_scale=None,
    rhs_zero_point=None,
    method: str = "auto",
    backend: str = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated`` with quantized operands.

    A pointwise conv (kernel of size 1 in every spatial dimension, no padding, no input
    dilation, no groups) runs as a ``quantized_dot_general`` over the feature axis: the
    same sums, with XLA's faster integer GEMM and, where covered, the Pallas kernels
    (:mod:`qjax.quant.ops_conv_pointwise`).

    Args:
      lhs: the input (activation): a float array or a :class:`qjax.QArray`.
      rhs: the kernel (weight): a float array or a QArray (axes as passed, e.g. HWIO).
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count: as for ``lax.conv_general_dilated``
        (dimension numbers as a ``ConvDimensionNumbers`` or the string / tuple forms;
        dilations default to 1).
      lhs_spec, rhs_spec: quantize that float operand on the fly. A scale may vary only
        along the lhs batch dimension (``channel_axes=qjax.PER_TOKEN`` means per batch
        element) and along the rhs output-feature dimension (per output channel, or
        groups along it); the other dimensions are summed over.
      lhs_scale, lhs_zero_point, rhs_scale, rhs_zero_point: static (calibrated) scale /
        zero point instead of computing them from the data (the lhs ones must not vary
        along the batch dimension).
      out_dtype: result dtype (default: the result type of the operands' float dtypes).
      key: PRNG key for specs with ``rounding="stochastic"``.
      method: ``"auto"`` (``"int"`` when both operands are integer-quantized, else
        ``"convert"``), ``"int"`` (int8 conv with int32 accumulation), ``"convert"``
        (codes converted to an exact float dtype, scales after) or ``"dequant"``.
      backend: as for ``quantized_dot_general``, for a pointwise conv (run as a dot);
        other convs have no kernel and run on XLA whatever the backend.

    Returns:
      The convolution in ``out_dtype``; differentiable w.r.t. float operands
      (straight-through through their on-the-fly quantizer).

    Raises:
      TypeError: an operand is neither a float array nor a QArray.
      ValueError: dimension numbers or feature counts that do not fit the shapes, a
        scale that varies along a summed dimension, a spec or static scale given for an
        operand that is already a QArray, an unknown or inapplicable method.
    """
    lshape = oc.logical_shape(lhs, "lhs")
    rshape = oc.logical_shape(rhs, "rhs")
    if len(lshape) != len(rshape) or len(lshape) < 3:
        raise ValueError(
            f"lhs and rhs must have the same rank >= 3 (batch, feature, spatial...); got lhs "
            f"{oc.describe(lhs)} and rhs {oc.describe(rhs)}"
        )
    try:
        cdn = lax.conv_dimension_numbers(lshape, rshape, dimension_numbers)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"dimension_numbers {dimension_numbers!r} do not fit lhs {lshape} / rhs {rshape}: {e}"
        ) from None
    nsp = len(lshape) - 2
    fgc, bgc = int(feature_group_count), int(batch_group_count)
    n_l, c_l = cdn.lhs_spec[:2]
    o_r, i_r = cdn.rhs_spec[:2]
    if fgc < 1 or bgc < 1 or (fgc > 1 and bgc > 1):
        raise ValueError(f"feature_group_count={fgc} / batch_group_count={bgc}: both >= 1, at most one > 1")
    if lshape[c_l] != rshape[i_r] * fgc:
        raise ValueError(
            f"shape mismatch: lhs feature dimension {c_l} has size {lshape[c_l]} but rhs input-feature "
            f"dimension {i_r} has size {rshape[i_r]} and feature_group_count={fgc} "
            f"(need {rshape[i_r] * fgc}); "
            f"lhs is {oc.describe(lhs)}, rhs is {oc.describe(rhs)}"
        )
    if rshape[o_r] % (fgc * bgc) or lshape[n_l] % bgc:
        raise ValueError(
            f"rhs output features ({rshape[o_r]}) must divide by feature_group_count={fgc} x "
            f"batch_group_count={bgc}, and the lhs batch ({lshape[n_l]}) by batch_group_count"
        )
    padding = padding if isinstance(padding, str) else tuple((int(lo), int(hi)) for lo, hi in padding)
    oc.check_args("lhs", lhs, lhs_spec, lhs_scale, lhs_zero_point)
    oc.check_args("rhs", rhs, rhs_spec, rhs_scale, rhs_zero_point)
    lhs_dilation = _ints(lhs_dilation, nsp, "lhs_dilation")
    window_strides = _ints(window_strides, nsp, "window_strides")
    # a pointwise conv runs as a dot, which also takes a kernel grouped along its input features
    pointwise = is_pointwise(cdn, rshape, padding, lhs_dilation, fgc, bgc)
    pointwise = pointwise and rhs_scale is None and rhs_zero_point is None  # a static one: conv form
    specs, rhs_groups_in = [], False
    for name, x, spec, shape, keep, sc, zp in (
        ("lhs", lhs, lhs_spec, lshape, n_l, lhs_scale, lhs_zero_point),
        ("rhs", rhs, rhs_spec, rshape, o_r, rhs_scale, rhs_zero_point),
    ):
        specs.append(None)
        summed = [d for d in range(len(shape)) if d != keep or (name == "lhs" and bgc > 1)]
        hint = (
            "a conv input may be quantized per tensor or per batch element (qjax.PER_TOKEN), a "
            "kernel per tensor or per output feature (a pointwise 1x1 kernel also per group of "
            "input features)"
        )
        group = None
        if isinstance(x, QArray):
            scale_shape, group = np.shape(x.scale), x.group_axis
        elif spec is not None:
            free = (keep,) if name == "lhs" else ()
            specs[-1], layout = oc.resolve_operand_spec(name, spec, shape, sc, zp, (keep,), free)
            scale_shape, group = layout.scale_shape, layout.group_axis
        else:
            continue
        in_group = name == "rhs" and pointwise and group is not None and group % len(shape) == i_r
        rhs_groups_in = rhs_groups_in or in_group
        what = f"{name} ({x!r})" if isinstance(x, QArray) else f"{name}_spec ({spec!r})"
        oc.check_factorable(what, name, scale_shape, group if in_group else None, summed, hint)
    dtypes = [x.dtype if isinstance(x, QArray) else jnp.result_type(x) for x in (lhs, rhs)]
    kinds = []
    for x, spec in ((lhs, lhs_spec), (rhs, rhs_spec)):
        fmt = x.format if isinstance(x, QArray) else (spec.format if spec is not None else None)
        kinds.append("float" if fmt is None else ("fp8" if fmt.is_float else "int"))
    if method not in oc.METHODS or method == "split":
        raise ValueError(f"method={method!r} is not one of ('auto', 'int', 'convert', 'dequant') for a conv")
    if method == "int" and kinds != ["int", "int"]:
        raise ValueError(
            f"method='int' needs two integer-quantized operands, got lhs {kinds[0]}, rhs {kinds[1]}"
        )
    kdispatch.check_backend(backend)
    if pointwise:
        y = as_dot(
            lhs,
            rhs,
            cdn,
            window_strides,
            specs[0],
            specs[1],
            dict(
                lhs_scale=lhs_scale,
                lhs_zero_point=lhs_zero_point,
                out_dtype=out_dtype if out_dtype is not None else jnp.result_type(*dtypes),
                key=key,
                method=method,
                backend=backend,
            ),
        )
        if y is not None:
            return y
    if rhs_groups_in:  # only a dot can sum per group of input features
        raise ValueError(
            f"rhs {oc.describe(rhs)}: a kernel grouped along its input features runs only as a pointwise "
            "conv (a dot over the features), and this one cannot be: its input is strided and quantized "
            "per batch element on the fly (or a strided QArray whose scales cannot follow the stride)"
        )
    if method == "auto":
        method = "int" if kinds == ["int", "int"] else "convert"
    cfg = _Config(
        window_strides,
        padding,
        lhs_dilation,
        _ints(rhs_dilation, nsp, "rhs_dilation"),
        cdn,
        fgc,
        bgc,
        specs[0],
        specs[1],
        method,
        jnp.dtype(out_dtype if out_dtype is not None else jnp.result_type(*dtypes)),
    )
    return _qconv(cfg, lhs, rhs, lhs_scale, lhs_zero_point, rhs_scale, rhs_zero_point, key)


__all__ = ["quantized_conv_general_dilated"]
