"""Pointwise (1×1) convolutions run as a ``dot_general``.

A conv whose kernel has size 1 in every spatial dimension, with no padding, no input
dilation and no feature or batch groups, is a matmul over the feature axis of every
(strided) pixel. Running it as :func:`qjax.quant.ops_dot.quantized_dot_general` instead of
an integer ``conv_general_dilated`` gives it the dot's formulations (XLA's int8 GEMM,
which on XLA:CPU is several times faster than its int8 conv) and, where the platform and
shape are covered, the Pallas matmul kernels. The result is the same sum of the same
products: the activation is neither reshaped nor re-scaled (a per-batch-element scale
stays per batch element), and the kernel only loses its size-1 axes (packed int4 codes
stay packed).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from qjax.graph.layout import apply_layout, axis_after_squeeze
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import QuantSpec


def is_pointwise(cdn: lax.ConvDimensionNumbers, rshape, padding, lhs_dilation, fgc: int, bgc: int) -> bool:
    """Whether a conv of this geometry is a matmul over features at every strided pixel."""
    if fgc != 1 or bgc != 1 or any(d != 1 for d in lhs_dilation):
        return False
    if any(rshape[d] != 1 for d in cdn.rhs_spec[2:]):
        return False
    if isinstance(padding, str):  # VALID, SAME and SAME_LOWER all pad a 1x1 window by 0
        return True
    return all(lo == 0 and hi == 0 for lo, hi in padding)


def _moved_spec(spec: QuantSpec | None, dims: tuple[int, ...], ndim: int) -> QuantSpec | None:
    """A resolved kernel spec with the size-1 axes ``dims`` removed from its axes."""
    if spec is None:
        return None
    moved = [axis_after_squeeze(a, dims, ndim) for a in spec.channel_axes]
    group = None if spec.group_axis is None else axis_after_squeeze(spec.group_axis, dims, ndim)
    kw = {"channel_axes": tuple(a for a in moved if a is not None), "group_axis": group}
    if group is None:
        kw["group_size"] = None
    return spec.replace(pack=False, pack_axis=-1, **kw)  # an operand's spec never packs


def as_dot(
    lhs,
    rhs,
    cdn: lax.ConvDimensionNumbers,
    window_strides: tuple[int, ...],
    lhs_spec: QuantSpec | None,
    rhs_spec: QuantSpec | None,
    dot_kwargs: dict,
):
    """The pointwise conv ``lhs * rhs`` as a quantized ``dot_general``, or ``None`` when
    the rewrite would change the result: a strided conv whose input is quantized on the
    fly per batch element, or a strided QArray input whose scales cannot follow the
    stride. (A strided input quantized per tensor on the fly keeps the scale of the whole
    input, pixels the stride skips included, as the conv does: it is computed first and
    passed to the dot as a static scale.)

    Args:
      lhs, rhs: the conv's operands (float arrays or QArrays), as validated by the conv.
      cdn: the conv's dimension numbers.
      window_strides: one stride per spatial dimension.
      lhs_spec, rhs_spec: the operands' resolved specs (explicit axes, or ``None``).
      dot_kwargs: the other ``quantized_dot_general`` arguments (static activation scale,
        ``out_dtype``, ``key``, ``method``, ``backend``).

    Returns:
      The conv's output in its ``out_spec`` layout, or ``None``.
    """
    from qjax.quant.ops_dot import quantized_dot_general  # ops_dot imports the kernels

    lsp, rsp = cdn.lhs_spec[2:], cdn.rhs_spec[2:]
    x = lhs
    if any(s != 1 for s in window_strides):
        if lhs_spec is not None and dot_kwargs.get("lhs_scale") is None:
            if any(d > 1 for d in lhs_spec.layout(tuple(x.shape)).scale_shape):
                return None  # per batch element: the dot would refuse it as a static scale
            # the scale does not depend on the rounding (stochastic rounding would want a key)
            whole = quantize(lax.stop_gradient(x), lhs_spec.replace(rounding="nearest"))
            dot_kwargs = {**dot_kwargs, "lhs_scale": whole.scale, "lhs_zero_point": whole.zero_point}
        nd = len(lhs.shape)
        strides = [1] * nd
        for d, s in zip(lsp, window_strides):
            strides[d] = s
        if isinstance(x, QArray):
            x = apply_layout(
                x,
                "slice",
                {"start_indices": (0,) * nd, "limit_indices": tuple(x.shape), "strides": tuple(strides)},
            )
            if x is None:
                return None
        else:
            x = lax.slice(x, (0,) * nd, tuple(x.shape), tuple(strides))
    dims = tuple(sorted(rsp))
    if isinstance(rhs, QArray):
        w = apply_layout(rhs, "squeeze", {"dimensions": dims})
    else:
        w = lax.squeeze(rhs, dims)
    o_r, i_r = cdn.rhs_spec[:2]
    w_in = int(i_r > o_r)  # the kernel's input-feature axis once the spatial axes are gone
    c_l = cdn.lhs_spec[1]
    y = quantized_dot_general(
        x,
        w,
        (((c_l,), (w_in,)), ((), ())),
        lhs_spec=lhs_spec,
        rhs_spec=_moved_spec(rhs_spec, dims, len(rhs.shape)),
        **dot_kwargs,
    )
    # the dot gives the input's non-feature axes in increasing order, then the output features
    free = [d for d in range(len(lhs.shape)) if d != c_l]
    src_of = {cdn.out_spec[0]: free.index(cdn.lhs_spec[0]), cdn.out_spec[1]: len(free)}
    for dl, do in zip(lsp, cdn.out_spec[2:]):
        src_of[do] = free.index(dl)
    perm = tuple(src_of[p] for p in range(y.ndim))
    return y if perm == tuple(range(y.ndim)) else jnp.transpose(y, perm)
