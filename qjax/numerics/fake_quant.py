"""``fake_quant``: quantize-dequantize with a straight-through backward pass.

The forward pass is bit-for-bit ``dequantize(quantize(x, spec))``. The backward pass
is a ``jax.custom_vjp`` chosen by ``spec.ste``:

* ``"plain"``: identity, ``dL/dx = g``.
* ``"clipped"``: ``dL/dx = g`` where the quantizer did not clip ``x`` (its rounded code
  ``round(x / s) + zero_point`` lies in ``[qmin, qmax]``; for fp8, ``|x / s|`` rounds
  to at most the largest finite value), else 0.
* ``"lsq"``: Learned Step Size Quantization (Esser et al., ICLR 2020). The scale ``s``
  is an input and gets the gradient
  ``dL/ds = gscale * sum g * (qmin if v < qmin, qmax if v > qmax, else q(v) - v)``,
  ``v = x / s``, with ``gscale = 1 / sqrt(N * qmax)`` where ``N`` is the number of
  elements sharing that scale; ``dL/dx`` is the clipped STE.

The scale of ``"plain"``/``"clipped"`` is treated as a constant (calibration is not
differentiated).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax.numerics.calibration import AbsMax
from qjax.numerics.formats import CodebookFormat, Format
from qjax.numerics.granularity import from_grouped, reduce_groups, scale_from_grouped, to_grouped
from qjax.numerics.quantize import _check_spec, as_float_array, check_zero_point, scale_grouped
from qjax.numerics.scaling import (
    POW2_SCALE_DTYPE,
    compute_dtype,
    dequantize_values,
    quantize_values,
    round_values,
    rounding_noise,
)
from qjax.numerics.spec import QuantSpec


def _forward(fmt: Format, x, s, zp, noise):
    rounding = "nearest" if noise is None else "stochastic"
    q = quantize_values(x, s, zp, fmt, rounding, noise=noise)
    return dequantize_values(q, s, zp, x.dtype, fmt), q


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fake_quant_core(fmt: Format, ste: str, grad_scale: float, x, s, zp, noise):
    return _forward(fmt, x, s, zp, noise)[0]


def _core_fwd(fmt, ste, grad_scale, x, s, zp, noise):
    y, q = _forward(fmt, x, s, zp, noise)
    return y, (x, s, zp, noise, q)


def _not_clipped(fmt: Format, x, s, zp, noise):
    """Where the forward pass did not saturate: the rounded code (before the clip) lies
    in ``[qmin, qmax]``. Testing ``x / s`` against ``[qmin, qmax]`` instead would cut
    the gradient of calibrated extremes that sit a float ulp (or, with a rounded zero
    point, up to half a step) past the bound yet round onto ``qmin``/``qmax`` unclipped."""
    y = x * (1.0 / s)
    if isinstance(fmt, CodebookFormat):  # nearest table value: beyond the ends it saturates
        return jnp.abs(y) <= fmt.max_value
    if fmt.is_float:
        if noise is not None:  # stochastic rounding saturates exactly what the clip moves
            return jnp.abs(y) <= fmt.max_value
        # the fp8 cast rounds |y| below max + ulp(max) / 2 onto max without saturating
        bound = fmt.max_value + 2.0 ** (math.floor(math.log2(fmt.max_value)) - fmt.mantissa_bits - 1)
        return jnp.abs(y) < bound
    r = round_values(y, "nearest" if noise is None else "stochastic", noise=noise)
    if zp is not None:
        r = r + zp
    return (r >= fmt.qmin) & (r <= fmt.qmax)


def _core_bwd(fmt, ste, grad_scale, res, g):
    x, s, zp, noise, q = res
    v = x * (1.0 / s)
    if zp is not None:
        v = v + zp
    inside = (v >= fmt.qmin) & (v <= fmt.qmax)
    if ste == "clipped":
        inside = _not_clipped(fmt, x, s, zp, noise)
    gx = g if ste == "plain" else jnp.where(inside, g, jnp.zeros_like(g))
    if ste == "lsq":
        qf = q.astype(x.dtype)
        ds = jnp.where(v < fmt.qmin, fmt.qmin, jnp.where(v > fmt.qmax, fmt.qmax, qf - v))
        axes = tuple(i for i in range(x.ndim) if s.shape[i] == 1 and x.shape[i] != 1)
        gs = jnp.sum(g * ds, axis=axes, keepdims=True).reshape(s.shape) * grad_scale
    else:
        gs = jnp.zeros_like(s)
    zero = lambda a: None if a is None else jnp.zeros_like(a)
    return gx, gs, zero(zp), zero(noise)


_fake_quant_core.defvjp(_core_fwd, _core_bwd)


def fake_quant(
    x,
    spec: QuantSpec,
    *,
    scale=None,
    zero_point=None,
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize and dequantize ``x``, differentiably (see module docstring).

    Args:
      x: floating-point array.
      spec: the :class:`QuantSpec`; ``spec.ste`` picks the backward rule.
      scale: optional scale (broadcastable to the stored scale shape). Required for
        ``ste="lsq"``, where it is learned: initialise it with :func:`lsq_init_scale`.
      zero_point: zero point for an asymmetric spec with a given scale (rounded and checked
        as in :func:`qjax.quantize`).
      key: PRNG key for ``rounding="stochastic"`` (the same key gives the same rounding
        as ``quantize(x, spec, key=key)``).

    Returns:
      An array of ``x``'s shape and dtype equal to ``dequantize(quantize(x, spec))``.

    Raises:
      TypeError / ValueError: as :func:`qjax.quantize`; also ``ste="lsq"`` without a scale.
    """
    spec = _check_spec(spec)
    x = as_float_array(x)
    check_zero_point(zero_point, spec)
    if spec.ste == "lsq" and scale is None:
        raise ValueError(
            "ste='lsq' learns the scale: pass scale=... (initialise it with qjax.lsq_init_scale(x, spec))"
        )
    return _fake_quant(x, spec, scale, zero_point, key)


def never_clips(spec: QuantSpec) -> bool:
    """Whether quantizing by ``spec`` with the scale computed from the data itself cannot
    saturate any element: symmetric absmax without the half step or a clip factor below 1,
    not E8M0 (OCP MX) scales, round-to-nearest, so
    every ``|x / s|`` rounds to at most ``qmax`` (an extreme may land a float ulp past it
    and still round onto it; for fp8, onto the largest finite value). A NaN/Inf group gets
    a NaN scale and NaN outputs either way."""
    cal = spec.calibration
    return (
        spec.symmetric
        and spec.rounding == "nearest"
        and isinstance(cal, AbsMax)
        and not cal.half_step
        and cal.clip >= 1
        and spec.scale_dtype != POW2_SCALE_DTYPE  # the OCP MX rule saturates by design
    )


@functools.partial(jax.jit, static_argnames=("spec",))
def _fake_quant(x, spec: QuantSpec, scale, zero_point, key):
    if scale is not None and spec.ste != "lsq":
        scale = jax.lax.stop_gradient(scale)
    g = scale_grouped(x, spec, scale=scale, zero_point=zero_point)
    s = g.scale if spec.ste == "lsq" else jax.lax.stop_gradient(g.scale)
    zp = None if g.zero_point is None else jax.lax.stop_gradient(g.zero_point.astype(s.dtype))
    noise = None
    if spec.rounding == "stochastic":
        noise = rounding_noise(key, g.x.shape, g.x.dtype)
    grad_scale = 1.0 / math.sqrt(max(g.layout.group_count, 1) * spec.format.qmax)
    ste = spec.ste
    if ste == "clipped" and scale is None and zero_point is None and never_clips(spec):
        # the same gradient without recomputing the mask in the backward pass: ~4% of a QAT
        # step with per-token int8 activations (encoder block, 2-core CPU, 2026-11-26)
        ste = "plain"
    y = _fake_quant_core(spec.format, ste, grad_scale, g.x, s, zp, noise)
    return from_grouped(y, g.layout).astype(x.dtype)


def lsq_init_scale(x, spec: QuantSpec) -> jax.Array:
    """LSQ's initial step size ``2 * mean(|x|) / sqrt(qmax)`` per scale group, in the
    stored scale shape (a zero group gets scale 1).

    Raises:
      TypeError / ValueError: as :func:`qjax.quantize`.
    """
    spec = _check_spec(spec)
    x = as_float_array(x)
    layout = spec.layout(x.shape)
    xg = to_grouped(jnp.abs(x.astype(compute_dtype(x.dtype))), layout, pad_mode="edge")
    axes = layout.grouped_reduce_axes()
    # a short last group averages its own elements only (not the padding)
    # (an empty group's mean is NaN, and gets scale 1 below)
    (m,) = reduce_groups(lambda part: (jnp.mean(part, axis=axes, keepdims=True),), xg, layout)
    # a non-zero group keeps at least the smallest normal scale (a subnormal one is flushed
    # to 0 on XLA:CPU), as scale_from_range; only an all-zero group gets scale 1
    s = jnp.maximum(2.0 * m / math.sqrt(spec.format.qmax), jnp.finfo(m.dtype).tiny)
    s = jnp.where(m > 0, s, jnp.ones_like(s))
    return jnp.broadcast_to(scale_from_grouped(s, layout), layout.scale_shape)
