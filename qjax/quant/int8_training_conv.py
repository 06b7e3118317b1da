"""int8 training (AQT-style) of ``lax.conv_general_dilated``: the forward conv and both
backward convs (input gradient and weight gradient) are int8×int8→int32 convolutions.

The forward conv quantizes the input and the kernel as their specs say (as
``qjax.quantized`` serves them; ``qjax.PER_TOKEN`` is one scale per batch sample for the
input, per output feature for the kernel). The backward convs quantize their operands
with scales that vary only along dimensions that are free in *that* conv, so every
int32 accumulation factors into scales exactly:

* input gradient ``dx = conv_transpose(g, w)`` sums over output features and the kernel
  window: ``g`` gets one scale per batch sample, ``w`` is re-quantized with one scale per
  input feature (per ``(group, input feature)`` for grouped convs);
* weight gradient ``dw = conv(x, g)`` sums over the batch and output positions: ``x`` is
  re-quantized with one scale per input feature, ``g`` gets one per output feature.

A per-tensor grad spec (``channel_axes=()``) gives ``g`` one scale in both instead.
The backward convs are built by JAX's own transpose rules of ``conv_general_dilated``
(strides, padding, dilations, dimension numbers and feature groups handled there), run
on the int8 codes with ``preferred_element_type=int32``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qjax.graph.ops import operand_channel_axes
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.quant.int8_training import (
    grad_pair,
    straight_through_vjp,
    with_float_cotangents,
    with_integer_backward,
)
from qjax.quant.ops_common import INT32_LIMIT, resolve_spec
from qjax.quant.ops_conv import CONV_GEOMETRY, quantized_conv_general_dilated

_TRANSPOSE_PARAMS = {*CONV_GEOMETRY, "precision", "preferred_element_type", "out_sharding"}
try:  # private JAX API: the transpose rules of conv_general_dilated
    from jax._src.lax.convolution import (
        _conv_general_dilated_transpose_lhs as _transpose_lhs,
    )
    from jax._src.lax.convolution import (
        _conv_general_dilated_transpose_rhs as _transpose_rhs,
    )

    for _fn in (_transpose_lhs, _transpose_rhs):
        if not _TRANSPOSE_PARAMS <= set(inspect.signature(_fn).parameters):
            raise ImportError(f"unexpected signature of {_fn.__name__}")
except (ImportError, AttributeError, TypeError, ValueError):
    # A future JAX without these rules (or with other parameters): _backward_conv then
    # transposes a float32 conv evaluated on the integer codes instead (exact while the
    # partial sums stay below 2**24).
    _transpose_lhs = _transpose_rhs = None


@dataclasses.dataclass(frozen=True)
class _Config:
    window_strides: tuple
    padding: tuple  # explicit (lo, hi) pairs
    lhs_dilation: tuple
    rhs_dilation: tuple
    dn: lax.ConvDimensionNumbers
    groups: int  # feature_group_count
    lhs_spec: QuantSpec
    rhs_spec: QuantSpec
    grad_specs: tuple  # the output gradient's spec in the dlhs and drhs convs (None: float)

    def int_grad_spec(self, side: int) -> QuantSpec:
        """The gradient's spec in backward conv ``side`` (a float side borrows the other's:
        its integer result is replaced by :func:`with_float_cotangents`)."""
        spec = self.grad_specs[side]
        return spec if spec is not None else self.grad_specs[1 - side]

    def conv_kwargs(self) -> dict[str, Any]:
        return dict(
            window_strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dn,
            feature_group_count=self.groups,
        )


def _quantize(x, spec: QuantSpec, axes, key, what: str):
    """Symmetric int codes of ``x`` with one scale per index of ``axes``."""
    spec = spec.replace(
        channel_axes=tuple(axes), symmetric=True, pack=False, group_size=None, group_axis=None
    )
    if spec.rounding == "stochastic" and key is None:
        raise ValueError(
            f"int8_conv_general_dilated: the {what} spec rounds stochastically and needs a PRNG key: "
            "pass key= (a fresh key every step)"
        )
    q = quantize(x.astype(jnp.float32), spec, key=key if spec.rounding == "stochastic" else None)
    return q.values, q.scale.astype(jnp.float32)


def _grad_axes(spec: QuantSpec, axis: int) -> tuple[int, ...]:
    """The axes of the output gradient's scales in one backward conv: ``axis`` (free in
    that conv) for a ``PER_TOKEN`` grad spec, none for a per-tensor one."""
    return (axis,) if spec.channel_axes is PER_TOKEN else ()


def _along(v, axes_sizes: dict[int, int], ndim: int):
    """``v`` (its dims in increasing order of ``axes_sizes``' keys) reshaped to broadcast
    against an array of rank ``ndim``."""
    shape = [1] * ndim
    for d, n in axes_sizes.items():
        shape[d] = n
    return v.reshape(shape)


def _group_slice(a, axis: int, groups: int, start: int, stop: int):
    """Indices ``start:stop`` of every group along ``axis`` (groups outermost)."""
    if start == 0 and stop * groups == a.shape[axis]:
        return a
    before, n, after = a.shape[:axis], a.shape[axis], a.shape[axis + 1 :]
    a = lax.slice_in_dim(a.reshape(*before, groups, n // groups, *after), start, stop, axis=axis + 1)
    return a.reshape(*before, groups * (stop - start), *after)


def _backward_conv(cfg: _Config, wrt: str, g, other, shape):
    """Integer-valued cotangent of operand ``wrt`` ("lhs" / "rhs", of ``shape``) of
    ``conv(lhs, rhs)`` given the codes ``g`` of the output cotangent and the codes
    ``other`` of the other operand; int32 from JAX's transpose rule, or float32."""
    kw = cfg.conv_kwargs()
    if _transpose_lhs is not None:
        rule = _transpose_lhs if wrt == "lhs" else _transpose_rhs
        # The rule reads only the abstract value of the operand it transposes for.
        undefined = SimpleNamespace(aval=jax.core.ShapedArray(tuple(shape), jnp.int32))
        lhs, rhs = (undefined, other) if wrt == "lhs" else (other, undefined)
        return rule(
            g,
            lhs,
            rhs,
            **kw,
            batch_group_count=1,
            precision=None,
            preferred_element_type=jnp.int32,
            out_sharding=None,
        )
    # Fallback when the private transpose rules are gone (a future JAX): transpose a float32
    # conv evaluated on the integer codes. Exact while the partial sums stay below 2**24;
    # beyond that float32 rounding (relative 6e-8) is far below the int8 quantization error.
    f32 = jnp.float32
    other = other.astype(f32)

    def conv(a, b):
        return lax.conv_general_dilated(
            a, b, **kw, precision=lax.Precision.HIGHEST, preferred_element_type=f32
        )

    primal = jax.ShapeDtypeStruct(tuple(shape), f32)
    fn = (lambda x: conv(x, other)) if wrt == "lhs" else (lambda w: conv(other, w))
    return jax.linear_transpose(fn, primal)(g.astype(f32))[0]


def _chunks(n: int, per_item: int, bound: int) -> list[tuple[int, int]]:
    """Split ``n`` summed items (``per_item`` products of magnitude <= ``bound`` each) into
    ranges whose sums fit int32."""
    size = max(1, min(n, INT32_LIMIT // max(1, bound * per_item)))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _bound(spec: QuantSpec) -> int:
    return max(-spec.format.qmin, spec.format.qmax)


def _dlhs(cfg: _Config, g, rhs, lhs_shape, kg, kw):
    (n_o, c_o), o_r, (n_l, c_l) = cfg.dn.out_spec[:2], cfg.dn.rhs_spec[0], cfg.dn.lhs_spec[:2]
    groups, nd = cfg.groups, rhs.ndim
    grad_spec = cfg.int_grad_spec(0)
    gq, sg = _quantize(g, grad_spec, _grad_axes(grad_spec, n_o), kg, "grad")
    # The weight with one scale per (group, input feature): split O into (groups, O / groups).
    perm = cfg.dn.rhs_spec
    w = lax.transpose(rhs, perm)  # O, I, spatial...
    n_out, n_in = w.shape[:2]
    wq, sw = _quantize(w.reshape(groups, n_out // groups, *w.shape[1:]), cfg.rhs_spec, (0, 2), kw, "weight")
    wq = lax.transpose(wq.reshape(w.shape), tuple(perm.index(d) for d in range(nd)))
    window = math.prod(w.shape[2:])
    acc = None
    # dx sums over the output features of a group and the window: chunk the features.
    for start, stop in _chunks(n_out // groups, window, _bound(grad_spec) * _bound(cfg.rhs_spec)):
        part = _backward_conv(
            cfg,
            "lhs",
            _group_slice(gq, c_o, groups, start, stop),
            _group_slice(wq, o_r, groups, start, stop),
            lhs_shape,
        ).astype(jnp.float32)
        acc = part if acc is None else acc + part
    if sg.size == 1:  # per tensor
        sg = sg.reshape((1,) * nd)
    else:
        sg = _along(sg.reshape(-1), {n_l: g.shape[n_o]}, nd)
    return acc * sg * _along(sw.reshape(-1), {c_l: groups * n_in}, nd)


def _drhs(cfg: _Config, g, lhs, rhs_shape, kg, kx):
    (n_o, c_o), (o_r, i_r), (n_l, c_l) = cfg.dn.out_spec[:2], cfg.dn.rhs_spec[:2], cfg.dn.lhs_spec[:2]
    groups, nd = cfg.groups, lhs.ndim
    grad_spec = cfg.int_grad_spec(1)
    gq, sg = _quantize(g, grad_spec, _grad_axes(grad_spec, c_o), kg, "grad")
    xq, sx = _quantize(lhs, cfg.lhs_spec, (c_l,), kx, "activation")
    positions = math.prod(g.shape[d] for d in cfg.dn.out_spec[2:])
    acc = None
    # dw sums over the batch and the output positions: chunk the batch.
    for start, stop in _chunks(g.shape[n_o], positions, _bound(grad_spec) * _bound(cfg.lhs_spec)):
        part = _backward_conv(
            cfg,
            "rhs",
            lax.slice_in_dim(gq, start, stop, axis=n_o),
            lax.slice_in_dim(xq, start, stop, axis=n_l),
            rhs_shape,
        ).astype(jnp.float32)
        acc = part if acc is None else acc + part
    n_out, n_in = rhs_shape[o_r], rhs_shape[i_r]
    # dw[o, i] sums x[., group(o) * n_in + i] * g[., o]: the scale of element (o, i).
    sg = jnp.broadcast_to(sg.reshape(-1), (n_out,))  # one scale per output feature (or per tensor)
    s = (sg.reshape(groups, n_out // groups, 1) * sx.reshape(groups, 1, n_in)).reshape(n_out, n_in)
    return acc * _along(s if o_r < i_r else s.T, {o_r: n_out, i_r: n_in}, nd)


def _conv_forward(cfg: _Config, lhs, rhs, key):
    return quantized_conv_general_dilated(
        lhs, rhs, **cfg.conv_kwargs(), lhs_spec=cfg.lhs_spec, rhs_spec=cfg.rhs_spec, key=key, method="int"
    )


def _conv_backward(cfg: _Config, lhs, rhs, key, g, extra=None):
    keys = [None] * 4
    if key is not None:
        keys = list(jax.random.split(jax.random.fold_in(key, 1), 4))
    if g.size == 0 or lhs.size == 0 or rhs.size == 0:
        return jnp.zeros_like(lhs), jnp.zeros_like(rhs)
    dlhs = _dlhs(cfg, g, rhs, lhs.shape, keys[0], keys[1])
    drhs = _drhs(cfg, g, lhs, rhs.shape, keys[2], keys[3])
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype)


def conv_backward(cfg: _Config):
    """The integer backward pass of the conv ``cfg`` (:func:`conv_config`) for
    :func:`qjax.quant.int8_training.with_integer_backward` (a float side of
    ``cfg.grad_specs`` still integer: wrap it in :func:`with_float_cotangents`)."""
    return functools.partial(_conv_backward, cfg)


def _check_spec(name: str, spec) -> QuantSpec:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"int8_conv_general_dilated: {name} must be a qjax.QuantSpec, got {spec!r}")
    fmt = spec.format
    if fmt.is_float or not fmt.signed or fmt.bits > 8:
        raise ValueError(
            f"int8_conv_general_dilated: {name} format {fmt!r} is not supported: the integer convs need "
            "a signed integer format of at most 8 bits (e.g. qjax.int8, qjax.int4)"
        )
    return spec


def conv_config(
    lhs_shape,
    rhs_shape,
    *,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    lhs_spec: QuantSpec,
    rhs_spec: QuantSpec,
    grad_spec,
) -> _Config:
    """The checked, resolved configuration of an int8-trained conv (arguments as for
    :func:`int8_conv_general_dilated`, operands given by their shapes).

    Raises:
      ValueError / TypeError: as :func:`int8_conv_general_dilated`.
    """
    lhs_spec, rhs_spec = (_check_spec(n, s) for n, s in (("lhs_spec", lhs_spec), ("rhs_spec", rhs_spec)))
    pair = grad_pair(grad_spec, "int8_conv_general_dilated: grad_spec")
    pair = tuple(None if s is None else _check_spec("grad_spec", s) for s in pair)
    if int(batch_group_count) != 1:
        raise ValueError(
            f"int8_conv_general_dilated: batch_group_count={batch_group_count} is not supported: a "
            "batch-grouped conv sums batch samples into each output feature, so the per-sample input "
            "scales of int8 training cannot be applied by the integer forward conv; use the float conv "
            "(batch-grouped convs arise as weight gradients of grouped convs, rarely in models)"
        )
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
    if len(lhs_shape) != len(rhs_shape) or len(lhs_shape) < 3:
        raise ValueError(
            f"int8_conv_general_dilated: lhs {lhs_shape} and rhs {rhs_shape} need the same rank >= 3"
        )
    nsp = len(lhs_shape) - 2
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    ints = lambda v: (1,) * nsp if v is None else tuple(int(s) for s in v)
    strides, ldil, rdil = ints(window_strides), ints(lhs_dilation), ints(rhs_dilation)
    if isinstance(padding, str):
        if ldil != (1,) * nsp:
            raise ValueError(
                "int8_conv_general_dilated: string padding with lhs_dilation is not defined; give "
                "explicit (low, high) pairs"
            )
        in_sp = [lhs_shape[d] for d in dn.lhs_spec[2:]]
        k_sp = [(rhs_shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], rdil)]
        padding = lax.padtype_to_pads(in_sp, k_sp, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    fgc = int(feature_group_count)
    if (
        fgc < 1
        or rhs_shape[dn.rhs_spec[0]] % fgc
        or lhs_shape[dn.lhs_spec[1]] != fgc * rhs_shape[dn.rhs_spec[1]]
    ):
        raise ValueError(
            f"int8_conv_general_dilated: feature_group_count={feature_group_count} does not fit lhs "
            f"{lhs_shape} / rhs {rhs_shape} with dimension numbers {dn}"
        )
    return _Config(strides, padding, ldil, rdil, dn, fgc, lhs_spec, rhs_spec, pair)


def int8_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    lhs_spec: QuantSpec,
    rhs_spec: QuantSpec,
    grad_spec: QuantSpec,
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` trained in integers: the forward conv and both
    backward convs run as int8×int8→int32 convolutions with scales that factor exactly.

    Forward: ``quantized_conv_general_dilated`` with ``lhs_spec`` / ``rhs_spec`` as given
    (``qjax.PER_TOKEN``: one scale per batch sample of the input, per output feature of
    the kernel). Input gradient: the output gradient with one scale per batch sample, the
    kernel re-quantized with one per input feature. Weight gradient: the input
    re-quantized with one scale per input feature, the output gradient with one per output
    feature (a per-tensor ``grad_spec``: one scale for the output gradient in both).
    Grouped convs (``feature_group_count > 1``, depthwise included) are supported. The
    backward convs are JAX's transpose rules of ``conv_general_dilated`` run on the int8
    codes (if a future JAX drops that private API, a float32 conv on the codes is
    transposed instead, exact while partial sums stay below 2**24); contractions too
    long for int32 are split into chunks summed in float32.

    Args:
      lhs, rhs: float input and kernel.
      window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count: as for ``lax.conv_general_dilated``.
      lhs_spec, rhs_spec: how the input and the kernel are quantized in the forward conv
        (signed integers of at most 8 bits); the backward convs re-quantize them in the
        same formats, symmetric, with the scales above. An unsigned format (a post-ReLU
        ``QuantSpec(qjax.uint8, symmetric=False)``) is refused here, though int8 training
        of a matmul takes it and ``quantized`` / ``fake_quantized`` serve it for convs:
        use a signed format (``qjax.int8``) for the input.
      grad_spec: format of the output gradient in the backward convs, typically
        ``QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")``
        (symmetric); ``channel_axes=()``: one scale per tensor. A pair ``(dlhs, drhs)``
        gives each backward conv its own; ``None`` runs that one in float against the
        other operand as the forward conv quantized it (rounded to nearest).
      key: PRNG key, required when a spec rounds stochastically (``grad_spec``: at the
        backward pass).

    Returns:
      The float result; its VJP is the integer backward pass.

    Raises:
      ValueError: ``batch_group_count > 1`` (not supported), a spec format that is not a
        signed integer of at most 8 bits, a ``grad_spec`` with ``group_size`` or with
        ``channel_axes`` other than ``()`` / ``qjax.PER_TOKEN``, string padding with
        ``lhs_dilation``, shapes that do not fit, a stochastic spec without ``key``.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    cfg = conv_config(
        lhs.shape,
        rhs.shape,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        lhs_spec=lhs_spec,
        rhs_spec=rhs_spec,
        grad_spec=grad_spec,
    )
    kf = None if key is None else jax.random.fold_in(key, 0)
    params = {"dimension_numbers": cfg.dn}
    resolved = [  # PER_TOKEN as the forward conv resolves it: per batch element / output feature
        resolve_spec(sp, operand_channel_axes("conv_general_dilated", params, i, lhs.ndim))
        for i, sp in enumerate((cfg.lhs_spec, cfg.rhs_spec))
    ]
    float_op = lambda a, b: lax.conv_general_dilated(
        a, b, **cfg.conv_kwargs(), preferred_element_type=jnp.float32
    )
    backward = with_float_cotangents(
        conv_backward(cfg), cfg.grad_specs, straight_through_vjp(float_op, *resolved)
    )
    return with_integer_backward(functools.partial(_conv_forward, cfg), backward, lhs, rhs, kf, key)


__all__ = ["int8_conv_general_dilated"]
