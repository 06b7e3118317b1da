"""``quantized_dot_general``: a ``lax.dot_general`` with quantized operands.

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
from qjax.quant import ops_dot_core as core

# Weight-only (float activation x integer weight): method "split" up to this many
# activation rows (tokens) (int4/int2 packed weights in groups: SPLIT_MAX_ROWS_PACKED_GROUPS,
# as their bit fields run as one dot per field and group), then "dequant" (float32
# activation, int8 weight) or "convert" (see qjax.quant.ops).
SPLIT_MAX_ROWS = 4
SPLIT_MAX_ROWS_PACKED_GROUPS = 1


@dataclasses.dataclass(frozen=True)
class _Config:
    dn: tuple
    lhs_spec: QuantSpec | None  # resolved (PER_TOKEN -> axes, pack off)
    rhs_spec: QuantSpec | None
    method: str  # resolved, never "auto"
    out_dtype: Any
    token_axes: tuple  # (lhs, rhs) non-contracting axes
    kernel: Any = None  # a qjax.kernels.dispatch.KernelPlan when method == "kernel"


# -- dimension numbers ----------------------------------------------------------------


def _normalize_dn(dimension_numbers, lshape, rshape, lhs, rhs) -> tuple:
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc, lb, rb = (tuple(int(d) for d in v) for v in (lc, rc, lb, rb))
    except (TypeError, ValueError):
        raise ValueError(
            "dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)) "
            f"as for lax.dot_general, got {dimension_numbers!r}"
        ) from None
    out = []
    for side, dims, shape, x in (("lhs", lc + lb, lshape, lhs), ("rhs", rc + rb, rshape, rhs)):
        nd = len(shape)
        for d in dims:
            if not -nd <= d < nd:
                raise ValueError(
                    f"dimension_numbers {dimension_numbers!r} name axis {d} of {side}, which has rank {nd} "
                    f"({oc.describe(x)})"
                )
        norm = tuple(d % nd for d in dims)
        if len(set(norm)) != len(norm):
            raise ValueError(f"dimension_numbers {dimension_numbers!r} repeat an axis of {side}")
        out.append(norm)
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(
            f"dimension_numbers {dimension_numbers!r}: lhs and rhs must name as many contracting "
            "(and batch) axes"
        )
    lc, lb = out[0][: len(lc)], out[0][len(lc) :]
    rc, rb = out[1][: len(rc)], out[1][len(rc) :]
    for kind, ldims, rdims in (("contracted", lc, rc), ("batch", lb, rb)):
        for a, b in zip(ldims, rdims):
            if lshape[a] != rshape[b]:
                raise ValueError(
                    f"shape mismatch: lhs axis {a} (size {lshape[a]}) and rhs axis {b} "
                    f"(size {rshape[b]}) are {kind} together; lhs is {oc.describe(lhs)}, "
                    f"rhs is {oc.describe(rhs)}"
                )
    return ((lc, rc), (lb, rb))


# -- entry point --------------------------------------------------------------------------------


def _impl(cfg: _Config, lhs, rhs, ls, lz, rs, rz, key):
    if cfg.method == "kernel":
        return kdispatch.run(cfg.kernel, lhs, rhs, cfg.lhs_spec, ls, lz, key, cfg.out_dtype)
    lkey = rkey = key
    if key is not None and cfg.lhs_spec is not None and cfg.rhs_spec is not None:
        lkey, rkey = jax.random.split(key)
    a = oc.prepare("lhs", lhs, cfg.lhs_spec, ls, lz, lkey)
    b = oc.prepare("rhs", rhs, cfg.rhs_spec, rs, rz, rkey)
    m = cfg.method
    if m == "dequant":
        _, acc_t = oc.compute_dtypes(a, b)
        y = lax.dot_general(oc.dequantized(a), oc.dequantized(b), cfg.dn, preferred_element_type=acc_t)
    elif m == "split":
        y = core.split_contract(a, b, cfg.dn)
    else:
        y = core.contract(a, b, cfg.dn, m)
    return y.astype(cfg.out_dtype)


def _float_fn(cfg: _Config, a, b):
    acc = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return lax.dot_general(a, b, cfg.dn, preferred_element_type=acc)


_qdot = jax.jit(oc.with_ste_jvp(_impl, _float_fn), static_argnums=0)


def _kind(x, spec) -> str:
    fmt = x.format if isinstance(x, QArray) else (spec.format if spec is not None else None)
    if fmt is None:
        return "float"
    return "fp8" if fmt.is_float else "int"


def _choose(method: str, kinds, rows, dtypes, packed=(False, False), groups=(None, None)) -> str:
    """Resolve ``method`` (see the table in :mod:`qjax.quant.ops`).

    Raises:
      ValueError: unknown method, or one that does not apply to these operands.
    """
    if method not in oc.METHODS:
        raise ValueError(f"method={method!r} is not one of {oc.METHODS}")
    kinds = tuple(kinds)
    weight_only = sorted(kinds) == ["float", "int"]
    if method == "int" and kinds != ("int", "int"):
        raise ValueError(
            f"method='int' needs two integer-quantized operands, got lhs {kinds[0]}, rhs {kinds[1]}"
        )
    if method == "split":
        if not weight_only:
            raise ValueError(
                "method='split' needs one plain float operand (no spec) and one integer-quantized "
                f"operand, got lhs {kinds[0]}, rhs {kinds[1]}"
            )
        if jnp.dtype(dtypes[kinds.index("float")]) == jnp.float64:
            raise ValueError("method='split' resolves float32 precision only; use 'convert' for float64")
    if method != "auto":
        return method
    if kinds == ("int", "int"):
        return "int"
    if weight_only:
        f = kinds.index("float")
        dt = jnp.dtype(dtypes[f])
        limit = SPLIT_MAX_ROWS_PACKED_GROUPS if packed[1 - f] and groups[1 - f] else SPLIT_MAX_ROWS
        if rows[f] <= limit and dt != jnp.float64:
            return "split"
        if dt.itemsize >= 4 and not packed[1 - f]:
            return "dequant"
        gs = groups[1 - f]
        if gs is not None and rows[f] >= gs:
            # Per-group weights with many rows: one dequantize beats a dot per group plus
            # per-group rescaling (1.05x vs 1.46x float32 at M=1024, K=1536, N=384 g128;
            # experiments/results/bench_quantized.md) and compiles ~9x faster.
            return "dequant"
    return "convert"


def quantized_dot_general(
    lhs,
    rhs,
    dimension_numbers,
    *,
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
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` with quantized operands.

    Args:
      lhs, rhs: each a float array or a :class:`qjax.QArray` whose axes are those of the
        operand as passed.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      lhs_spec, rhs_spec: quantize that float operand on the fly (``None``: leave it
        float). ``channel_axes=qjax.PER_TOKEN`` means one scale per index of every
        non-contracting axis of the operand. Scales may vary along a contracting axis
        only per group (``group_axis`` on that axis).
      lhs_scale, lhs_zero_point, rhs_scale, rhs_zero_point: static (calibrated) scale and
        zero point for that operand's spec instead of computing them from the data; they
        broadcast to the spec's scale shape and may not vary along a non-contracting,
        non-batch axis (batch / sequence length).
      out_dtype: result dtype (default: the result type of the operands' float dtypes).
      key: PRNG key for specs with ``rounding="stochastic"``.
      method: ``"auto"`` (default), or force a formulation: ``"int"`` (integer
        accumulation; both operands integer-quantized), ``"split"`` (float x integer:
        the float operand cut into int8 pieces), ``"convert"`` (codes converted to a
        float dtype in which they are exact, scales applied after the dot),
        ``"dequant"`` (dequantize, then a float dot).
      backend: ``"auto"`` (a Pallas kernel where the platform, op and shape are covered and
        the tuning table measured it faster; else XLA), ``"xla"``, ``"pallas"`` (the kernel
        or a ``ValueError`` saying why not), ``"interpret-gpu"`` / ``"interpret-tpu"``
        (the kernel in the Pallas interpreter). See :mod:`qjax.kernels.dispatch`.

    Returns:
      The ``dot_general`` result, in ``out_dtype``. Differentiable w.r.t. float
      operands (straight-through through their on-the-fly quantizer, as
      ``qjax.fake_quant`` with the spec's ``ste``).

    Raises:
      TypeError: an operand is neither a float array nor a QArray, or a spec is not a
        QuantSpec.
      ValueError: dimension numbers that do not fit the shapes (the message names the
        operand and axis), a spec or static scale that does not fit its operand, a scale
        that varies along a contracting axis other than per group, a spec or static scale
        given for an operand that is already a QArray, an unknown or inapplicable method.
    """
    lshape = oc.logical_shape(lhs, "lhs")
    rshape = oc.logical_shape(rhs, "rhs")
    dn = _normalize_dn(dimension_numbers, lshape, rshape, lhs, rhs)
    oc.check_args("lhs", lhs, lhs_spec, lhs_scale, lhs_zero_point)
    oc.check_args("rhs", rhs, rhs_spec, rhs_scale, rhs_zero_point)
    (lc, rc), (lb, rb) = dn
    token = (
        tuple(d for d in range(len(lshape)) if d not in lc),
        tuple(d for d in range(len(rshape)) if d not in rc),
    )
    specs = []
    for name, x, spec, shape, c, bt, tok, sc, zp in (
        ("lhs", lhs, lhs_spec, lshape, lc, lb, token[0], lhs_scale, lhs_zero_point),
        ("rhs", rhs, rhs_spec, rshape, rc, rb, token[1], rhs_scale, rhs_zero_point),
    ):
        specs.append(None)
        if isinstance(x, QArray):
            oc.check_factorable(f"{name} ({x!r})", name, np.shape(x.scale), x.group_axis, c)
        elif spec is not None:
            free = tuple(d for d in tok if d not in bt)
            specs[-1], layout = oc.resolve_operand_spec(name, spec, shape, sc, zp, tok, free)
            oc.check_factorable(f"{name}_spec ({spec!r})", name, layout.scale_shape, layout.group_axis, c)
    dtypes = [x.dtype if isinstance(x, QArray) else jnp.result_type(x) for x in (lhs, rhs)]
    kinds = (_kind(lhs, lhs_spec), _kind(rhs, rhs_spec))
    rows = (math.prod(lshape[d] for d in token[0]), math.prod(rshape[d] for d in token[1]))
    packed = tuple((isinstance(x, QArray) and x.packed_axis is not None) for x in (lhs, rhs))
    groups = tuple(
        (x.group_size if isinstance(x, QArray) and x.group_axis is not None else None) for x in (lhs, rhs)
    )
    m = _choose(method, kinds, rows, dtypes, packed, groups)
    out_dtype = jnp.dtype(out_dtype if out_dtype is not None else jnp.result_type(*dtypes))
    kdispatch.check_backend(backend)
    plan = None
    if backend != "xla" and (method == "auto" or backend != "auto"):
        plan, why = kdispatch.plan(lhs, rhs, dn, specs[0], lhs_scale, lhs_zero_point, backend)
        if plan is None and backend != "auto":
            raise ValueError(f"backend={backend!r} cannot run this dot_general with a kernel: {why}")
        if plan is not None:
            m = "kernel"
    cfg = _Config(dn, specs[0], specs[1], m, out_dtype, token, plan)
    return _qdot(cfg, lhs, rhs, lhs_scale, lhs_zero_point, rhs_scale, rhs_zero_point, key)


__all__ = ["quantized_dot_general"]
