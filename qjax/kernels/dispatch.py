"""Dispatch of ``quantized_dot_general`` (and so ``qjax.quantized``) to the Pallas kernels.

``backend=`` on ``qjax.quantized`` / ``quantized_dot_general``:

* ``"auto"`` (default): a kernel when the platform is a GPU or TPU, the op is one a kernel
  covers (below), its shape fits a legal block config, and the tuning table holds a
  measured point for this kernel, group size and batch bucket where the kernel beat XLA's
  formulation on the same stored weight by ``tuning.MIN_SPEEDUP``; otherwise XLA.
* ``"xla"``: always XLA.
* ``"pallas"``: always the kernel; an op it does not cover raises ``ValueError`` saying why.
* ``"interpret-gpu"`` / ``"interpret-tpu"``: the GPU / TPU kernel in the Pallas interpreter
  (any machine; for tests and debugging).

Covered ops: ``x @ W`` with ``x`` of any rank contracted on its last axis and ``W`` a 2-D
symmetric (no zero point) integer ``QArray`` contracted on axis 0, scales per output channel
or per group along K; or the weight stored ``(N, K)`` and contracted on axis 1, as ``x @ w.T``
models and weights converted from PyTorch hold it (``qjax.quantized`` folds the ``.T`` into
the contraction), and as ``qjax.store_transposed`` stores a Flax ``(K, N)`` kernel (a
``TransposedQArray``), which the kernels read in place, no transpose per call (Hopper's
8-bit ``wgmma`` reads exactly that layout):

* weight-only (no activation spec): int8 codes (or unpacked int4), or int4 packed along K
  or N (``qjax.quantize``'s pair layouts; the kernels interleave nibbles in registers). With
  ``"auto"`` the activation must be bfloat16 (the kernels compute in bfloat16; a float32
  activation runs through XLA's exact formulation instead).
* W8A8: the activation quantized to int8, symmetric, per token or per tensor (dynamic or
  static scale); an int8 per-channel weight.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qjax.kernels import api, tuning
from qjax.kernels._common import BlockConfig, split_layout, transposed_packing
from qjax.numerics.formats import IntFormat
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize

BACKENDS = ("auto", "xla", "pallas", "interpret-gpu", "interpret-tpu")


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What the dispatch decided for one op (static: hashed into the jitted op)."""

    kind: str  # "w8a8", "w4a16", "w8a16"
    # weight-only: a qjax.kernels layout, "_nk" appended for a weight stored (N, K); W8A8: "kn",
    # "nk" (the (K, N) weight transposed in the program) or "nk_stored" (the weight stored (N, K):
    # no transpose)
    layout: str
    group_size: int | None
    m: int
    k: int
    n: int
    platform: str
    interpret: bool
    config: BlockConfig


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def _weight_layout(w: QArray) -> tuple[str | None, str]:
    """``(layout, reason)`` of a QArray weight ``(K, N)`` contracted on axis 0."""
    fmt = w.format
    if not isinstance(fmt, IntFormat) or not fmt.signed or fmt.bits > 8:
        return None, f"weight format {fmt!r} (kernels take signed integer codes of at most 8 bits)"
    if w.zero_point is not None:
        return None, "weight has a zero point (kernels take symmetric weights)"
    if w.packed_axis is None:
        return "int8", ""
    if fmt.bits != 4 and fmt.pack_bits != 4:
        return (
            None,
            f"weight format {fmt!r} packed {8 // fmt.pack_bits} to a byte (kernels unpack nibbles only)",
        )
    if w.packed_length % 2:
        return None, "int4 weight with an odd packed length"
    return ("k_pairs" if w.packed_axis % 2 == 0 else "n_pairs"), ""


def _weight_group(w: QArray, k: int, n: int, contract: int = 0) -> tuple[int | None, str]:
    """``(group size or None, reason)`` for a weight contracted on axis ``contract`` (0: the
    weight is ``(K, N)``; 1: it is stored ``(N, K)``)."""
    shape = tuple(jnp.shape(w.scale))
    if w.group_axis is not None:
        if w.group_axis % 2 != contract:
            return None, "weight groups run along N, not the contraction"
        want, name = (
            ((k // w.group_size, n), "(K // group, N)")
            if contract == 0
            else ((n, k // w.group_size), "(N, K // group)")
        )
        if shape != want:
            return None, f"weight scale shape {shape} is not {name}"
        return w.group_size, ""
    per_channel = ((1, n), (1, 1), (n,), ()) if contract == 0 else ((n, 1), (1, 1), ())
    if shape not in per_channel:
        return None, f"weight scale shape {shape} varies along K"
    return None, ""


def plan(lhs, rhs, dn, lhs_spec, lhs_scale, lhs_zero_point, backend: str) -> tuple[KernelPlan | None, str]:
    """Decide whether a kernel runs this ``dot_general``.

    Args:
      lhs, rhs: the operands as passed to ``quantized_dot_general``.
      dn: normalized dimension numbers.
      lhs_spec: the activation's resolved spec (``None``: weight-only).
      lhs_scale, lhs_zero_point: static activation scale / zero point, if any.
      backend: one of :data:`BACKENDS` other than ``"xla"``.

    Returns:
      ``(plan, "")`` or ``(None, reason)``.
    """
    if backend.startswith("interpret-"):
        platform, interpret = backend.split("-")[1], True
    else:
        platform, interpret = api.resolve_platform(None, False), False
        if platform == "xla":
            return None, f"no GPU or TPU (default backend is {jax.default_backend()})"
    if isinstance(lhs, QArray) or not isinstance(rhs, QArray):
        return None, "the kernels take a float activation on the left and a QArray weight on the right"
    if len(rhs.shape) != 2:
        return None, f"weight of rank {len(rhs.shape)} (kernels take 2-D weights)"
    nd = len(lhs.shape)
    contract = next((a for a in (0, 1) if dn == (((nd - 1,), (a,)), ((), ()))), None)
    if contract is None:
        return (
            None,
            f"dimension numbers {dn} (kernels contract the activation's last axis with weight axis 0, "
            "or with axis 1 for a W8A8 weight stored (N, K))",
        )
    k, n = rhs.shape if contract == 0 else rhs.shape[::-1]
    m = math.prod(lhs.shape[:-1])
    layout, why = _weight_layout(rhs)
    if layout is None:
        return None, why
    group, why = _weight_group(rhs, k, n, contract)
    if why:
        return None, why
    if lhs_spec is None and contract == 1:
        layout = f"{transposed_packing(layout)}_nk"  # _weight_layout named the stored axes
    if lhs_spec is None:
        if not jnp.issubdtype(lhs.dtype, jnp.floating):
            return None, f"activation dtype {lhs.dtype}"
        if backend == "auto" and jnp.dtype(lhs.dtype) != jnp.bfloat16:
            return (
                None,
                f"{lhs.dtype} activation (the kernels compute in bfloat16; backend='pallas' accepts that)",
            )
        kind = "w8a16" if layout.startswith("int8") else "w4a16"
    else:
        fmt = lhs_spec.format
        if not (isinstance(fmt, IntFormat) and fmt.signed and fmt.bits == 8):
            return None, f"activation format {fmt!r} (the W8A8 kernel takes int8)"
        if not lhs_spec.symmetric or lhs_zero_point is not None:
            return None, "asymmetric activation quantization (the W8A8 kernel takes symmetric int8)"
        if lhs_spec.group_size is not None or (nd - 1) in tuple(a % nd for a in lhs_spec.channel_axes):
            return None, "activation scale varies along K"
        if layout != "int8" or rhs.format.bits != 8 or group is not None:
            return None, "W8A8 needs an int8 per-channel weight"
        kind = "w8a8"
        layout = "kn" if contract == 0 else "nk_stored"
    if m == 0 or n == 0 or k == 0:
        return None, "empty operand"
    if backend == "auto":
        # W8A8 on a (K, N) weight may also run on it transposed (the transpose is in the timed program)
        layouts = (layout, "nk") if layout == "kn" else (layout,)
        # the preferred entry over every engine and layout, then the margin over XLA (the
        # same order api.tuned_entry gives the engines of one layout)
        found = {lo: e for lo in layouts if (e := api.tuned_entry(platform, kind, m, k, n, group, lo))}
        best = tuning.preferred(list(found.values()), m, k, n)
        if best is None or best.speedup < tuning.MIN_SPEEDUP:
            name = tuning.kernel_name(kind, layout)
            measured = ""
            if best is not None:
                measured = f" (the preferred entry, {best.kernel}, measured {best.speedup:.2f}x)"
            return (
                None,
                f"no measured speedup for {name} at M={m}, K={k}, N={n} in the {platform} tuning "
                f"table{measured}",
            )
        layout = next(lo for lo, e in found.items() if e is best)  # choose_config takes its entry
    try:
        cfg = api.choose_config(platform, kind, m, k, n, group, layout, None, None)
    except ValueError as e:
        return None, str(e)
    return KernelPlan(kind, layout, group, m, k, n, platform, interpret, cfg), ""


def run(p: KernelPlan, lhs, rhs: QArray, lhs_spec, lhs_scale, lhs_zero_point, key, out_dtype):
    """Execute a plan: the kernel's ``(M, N)`` result reshaped to ``lhs.shape[:-1] + (N,)``."""
    lead = tuple(lhs.shape[:-1])
    common = {"platform": p.platform, "config": p.config, "interpret": p.interpret, "out_dtype": out_dtype}
    scales = jnp.asarray(rhs.scale, jnp.float32)
    if p.group_size is None:  # (N,) fits every kernel's per-channel scales
        scales = jnp.broadcast_to(scales.reshape(-1) if scales.ndim else scales, (p.n,))
    if p.kind == "w8a8":
        q = quantize(lhs, lhs_spec, key=key, scale=lhs_scale, zero_point=lhs_zero_point)
        a_scale = jnp.broadcast_to(jnp.asarray(q.scale, jnp.float32), (*lead, 1)).reshape(p.m, 1)
        b = rhs.values.T if p.layout == "nk" else rhs.values  # "nk_stored": already (N, K)
        b_layout = "kn" if p.layout == "kn" else "nk"
        y = api.int8_matmul(q.values.reshape(p.m, p.k), b, a_scale, scales, b_layout=b_layout, **common)
    else:
        layout, nk = split_layout(p.layout)
        x, kw = (
            lhs.reshape(p.m, p.k),
            {"group_size": p.group_size, "b_layout": "nk" if nk else "kn", **common},
        )
        if p.kind == "w8a16":
            y = api.w8a16_matmul(x, rhs.values, scales, **kw)
        else:
            y = api.w4a16_matmul(x, rhs.values, scales, layout=layout, pack_block=None, **kw)
    return y.reshape(*lead, p.n)
