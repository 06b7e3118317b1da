"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): quantize a weight one input feature at a time, moving each
step's rounding error onto the not-yet-quantized features through the inverse Hessian of
the layer's reconstruction loss ``‖XW − XŴ‖²`` (``H = XᵀX``).

Implementation notes:

* The kernel is read as a matrix ``[K inputs, N outputs]`` (Flax's layout; :func:`gptq`
  transposes a leaf its matmul reads as ``x @ w.T``, and transposes the result back). Rows are
  quantized in order (or by decreasing ``diag(H)`` with ``act_order=True``) in blocks of
  ``block_size`` rows ("lazy batch" updates: the error of a block reaches the remaining
  rows in one matmul); inside a block, row by row with the upper Cholesky factor ``U`` of
  ``H⁻¹`` (``err = (w − q)/U[i,i]``, ``W[j] −= U[i,j]·err``).
* Damping ``λ = damp · mean(diag H)`` is added to the diagonal; inputs that never fire
  (``H[i,i] = 0``) get ``H[i,i] = 1`` and a zero weight row.
* Sparsity (as SparseGPT, Frantar & Alistarh 2023): masked-out weights (by default the
  weights that are exactly zero, e.g. of a model pruned with :mod:`qjax.prune`) are fixed
  at 0, which every integer grid holds exactly (a symmetric code 0; an asymmetric zero
  point, a code, since its range always contains 0). Their error against the current
  (error-updated) value is fed back to the later rows like any other, and group scales are
  computed from the kept weights only, so an N:M pattern survives exactly.
* Group scales are computed lazily (from the current, error-updated rows when the block
  holding the group starts); with ``act_order`` they are computed up front from the
  original weight (the "static groups" variant), so groups stay contiguous in the
  original order and the result is an ordinary grouped :class:`QArray`.
* One ``jax.jit`` per (shape, spec): the block loop is a ``lax.fori_loop``; ``K`` is padded
  to a multiple of the block size with zero rows and unit Hessian entries (no effect).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from qjax.graph.statistics import InputStatistic, gram, input_statistics
from qjax.numerics.granularity import normalize_axis
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import compute_scale, quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.numerics.transposed import transpose_storage
from qjax.quant.policy import Policy
from qjax.quant.transforms import quantize_params, require_float_params
from qjax.rules import RuleSet, leaves_with_paths, map_with_path


def _matrix_spec(spec: QuantSpec, shape: tuple[int, ...], path: str) -> int | None:
    """Check ``spec`` is one GPTQ handles for a ``[K, N]`` kernel; the group size or None."""
    if len(shape) != 2:
        raise ValueError(f"GPTQ of {path!r}: needs a 2-D [inputs, outputs] kernel, got shape {shape}")
    if spec.format.is_float:
        raise ValueError(f"GPTQ of {path!r}: integer formats only, got {spec.format.name}")
    if spec.rounding != "nearest":
        raise ValueError(
            f"GPTQ of {path!r}: the weight spec must round to nearest (GPTQ's error feedback "
            f"chooses every code), got rounding={spec.rounding!r}"
        )
    channel = tuple(sorted(normalize_axis(a, 2, "channel_axes") % 2 for a in spec.channel_axes))
    if channel not in ((), (1,)):
        raise ValueError(
            f"GPTQ of {path!r}: scales must be per output channel (channel_axes=(-1,)) or per tensor, "
            f"got channel_axes={spec.channel_axes}"
        )
    if spec.group_size is None:
        return None
    if normalize_axis(spec.group_axis, 2, "group_axis") % 2 != 0:
        raise ValueError(f"GPTQ of {path!r}: groups must run along the input axis (group_axis=0)")
    return spec.group_size


def _code(w, s, zp, fmt):
    """Round one row to the grid: ``(codes, dequantized)``."""
    q = jnp.round(w * (1.0 / s))
    if zp is not None:
        q = q + zp
    q = jnp.clip(q, fmt.qmin, fmt.qmax)
    return q, (q - (0.0 if zp is None else zp)) * s


def _inverse_cholesky(h: jax.Array, lam: jax.Array) -> jax.Array:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` (rows: the quantization order)."""
    k = h.shape[0]
    h = h + lam * jnp.eye(k, dtype=h.dtype)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
    return jnp.linalg.cholesky(h_inv).T


def _row_scales(scale: jax.Array, zp: jax.Array | None, rows: jax.Array, group: int | None):
    """Per-row (``[len(rows), N]``) scale/zero point from a stored ``[G or 1, N]`` one."""
    idx = jnp.zeros_like(rows) if group is None else rows // group

    def pick(a):
        return None if a is None else jnp.take(jnp.broadcast_to(a, (a.shape[0], scale.shape[1])), idx, 0)

    return pick(scale), pick(zp)


@functools.partial(jax.jit, static_argnames=("spec", "block", "group", "act_order", "damp"))
def _gptq(w, h, keep, spec: QuantSpec, block: int, group: int | None, act_order: bool, damp: float):
    k, n = w.shape
    fmt = spec.format
    w = jnp.where(keep, w.astype(jnp.float32), 0.0)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = jnp.where(jnp.diag(dead), 1.0, h)
    w = jnp.where(dead[:, None], 0.0, w)
    lazy = group is not None and not act_order
    static_scale = static_zp = None
    if not lazy:
        static_scale, static_zp = compute_scale(w, spec)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(k)
    w, h, keep = w[perm], h[perm][:, perm], keep[perm]
    lam = damp * jnp.mean(jnp.diag(h))  # from the real inputs, before padding
    kp = -(-k // block) * block
    w = jnp.pad(w, ((0, kp - k), (0, 0)))
    keep = jnp.pad(keep, ((0, kp - k), (0, 0)), constant_values=True)
    h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(jnp.arange(kp) >= k).astype(h.dtype)
    u = _inverse_cholesky(h, lam)
    orig_rows = jnp.concatenate([perm, jnp.arange(k, kp)])
    n_groups = kp // group if lazy else 1
    asym = not spec.symmetric
    scales0 = jnp.ones((n_groups, n), jnp.float32)
    zps0 = jnp.zeros((n_groups, n), jnp.float32) if asym else None

    def block_step(b, carry):
        w, qw, scales, zps = carry
        start = b * block
        wb = lax.dynamic_slice(w, (start, 0), (block, n))
        ub = lax.dynamic_slice(u, (start, start), (block, block))
        rows = lax.dynamic_slice(orig_rows, (start,), (block,))
        kb = lax.dynamic_slice(keep, (start, 0), (block, n))
        if not lazy:
            rs, rz = _row_scales(
                static_scale.astype(jnp.float32),
                None if static_zp is None else static_zp.astype(jnp.float32),
                jnp.minimum(rows, k - 1),
                group,
            )

        def group_scale(wb, i, s_zp):
            # A group's scale is set when its first row comes up, from the current rows
            # (which carry the error of every earlier row), as in the reference GPTQ; the
            # masked-out weights, set to 0 whatever they hold, take no part.
            def fresh(_):
                rows_g = lax.dynamic_slice(wb, (i, 0), (group, n))
                kept = lax.dynamic_slice(kb, (i, 0), (group, n))
                s_g, zp_g = compute_scale(jnp.where(kept, rows_g, 0.0), spec)
                zp_row = s_g[0] * 0 if zp_g is None else zp_g[0]
                return s_g[0].astype(jnp.float32), zp_row.astype(jnp.float32)

            return lax.cond(i % group == 0, fresh, lambda _: s_zp, None)

        def row_step(i, carry):
            wb, qb, eb, s_zp, scales, zps = carry
            row = wb[i]
            if lazy:
                s_zp = group_scale(wb, i, s_zp)
                g = (start + i) // group
                scales = scales.at[g].set(s_zp[0])
                zps = None if zps is None else zps.at[g].set(s_zp[1])
                s_i, z_i = s_zp[0], (s_zp[1] if asym else None)
            else:
                s_i, z_i = rs[i], None if rz is None else rz[i]
            deq = jnp.where(kb[i], _code(row, s_i, z_i, fmt)[1], 0.0)  # masked out: exactly 0
            err = (row - deq) / ub[i, i]
            later = jnp.where(jnp.arange(block) > i, ub[i], 0.0)
            wb = wb - later[:, None] * err[None, :]
            return wb, qb.at[i].set(deq), eb.at[i].set(err), s_zp, scales, zps

        zeros = jnp.zeros((block, n), jnp.float32)
        s_zp = (jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
        _, qb, eb, _, scales, zps = lax.fori_loop(0, block, row_step, (wb, zeros, zeros, s_zp, scales, zps))
        # Lazy batch update of every later row with this block's errors.
        u_rows = lax.dynamic_slice(u, (start, 0), (block, kp))
        u_rows = jnp.where(jnp.arange(kp)[None, :] >= start + block, u_rows, 0.0)
        w = w - lax.dot_general(u_rows, eb, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
        qw = lax.dynamic_update_slice(qw, qb, (start, 0))
        return w, qw, scales, zps

    _, qw, scales, zps = lax.fori_loop(0, kp // block, block_step, (w, jnp.zeros_like(w), scales0, zps0))
    w_hat = jnp.zeros((k, n), jnp.float32).at[perm].set(qw[:k])
    if lazy:
        g_real = -(-k // group)
        return w_hat, scales[:g_real], None if zps is None else zps[:g_real]
    return w_hat, static_scale, static_zp


def _check_mask(mask: Any, shape: tuple[int, ...], path: str) -> jax.Array:
    """``mask`` as a bool array of ``shape``, or an error naming ``path``."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"GPTQ of {path!r}: the mask must be boolean (True = kept), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"GPTQ of {path!r}: mask shape {tuple(mask.shape)} != the weight's {tuple(shape)}")
    return mask


def gptq_quantize(
    w: jax.Array,
    hessian: jax.Array,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    masks: jax.Array | None = None,
    path: str = "weight",
) -> QArray:
    """GPTQ-quantize one ``[K inputs, N outputs]`` kernel, keeping its sparsity.

    Args:
      w: the float kernel (``x @ w`` layout).
      hessian: ``[K, K]`` ``XᵀX`` of the layer's inputs (any positive multiple: the scale
        cancels), e.g. from :func:`input_hessians`.
      spec: integer :class:`QuantSpec` with per-output-channel (``channel_axes=(-1,)``) or
        per-tensor scales, optionally ``group_size`` along the input axis (``group_axis=0``).
        Its calibration (absmax, MSE, …) is applied to each group when its scale is set.
      block_size: rows per lazy-batch block (rounded to a multiple of the group size).
      damp: relative diagonal damping (fraction of the mean diagonal).
      act_order: quantize inputs in order of decreasing ``diag(H)`` (static group scales).
      masks: a bool ``[K, N]`` mask (True = kept), e.g. a :mod:`qjax.prune` mask. Masked-out
        weights dequantize to exactly 0 (their error still feeds the other weights, as in
        SparseGPT) and kept ones may take any code. Default ``None``: the weights that are
        exactly 0 in ``w`` stay exactly 0 (a pruned kernel keeps its pattern, N:M included).
      path: the leaf's name, used in error messages.

    Returns:
      A :class:`QArray` with ``spec``'s layout (packing included), usable wherever
      ``qjax.quantize(w, spec)`` is.

    Raises:
      ValueError: ``w`` is not 2-D, the spec is not supported, the Hessian's or the mask's
        shape does not match, or ``block_size``/``damp`` is out of range.
      TypeError: ``masks`` is not boolean.

    Example:
      >>> h = input_hessians(model.apply, variables, batches)["params/Dense_0/kernel"]
      >>> q = gptq_quantize(kernel, h, qjax.QuantSpec(qjax.int4, channel_axes=(-1,),
      ...                                              group_size=128, group_axis=0))
    """
    w = jnp.asarray(w)
    group = _matrix_spec(spec, tuple(w.shape), path)
    if hessian.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"GPTQ of {path!r}: Hessian shape {hessian.shape} != ({w.shape[0]}, {w.shape[0]})")
    if block_size < 1 or not 0 <= damp < 1:
        raise ValueError(f"GPTQ of {path!r}: block_size must be >= 1 and 0 <= damp < 1")
    if group is not None and w.shape[0] % group and not spec.pad_groups:
        raise ValueError(
            f"GPTQ of {path!r}: group_size={group} does not divide {w.shape[0]} inputs (set pad_groups=True)"
        )
    block = block_size if group is None else group * max(1, round(block_size / group))
    if not jnp.all(jnp.isfinite(w)) or not jnp.all(jnp.isfinite(hessian)):
        raise ValueError(f"GPTQ of {path!r}: the weight or its Hessian has NaN/Inf entries")
    keep = w != 0 if masks is None else _check_mask(masks, w.shape, path)
    w_hat, scale, zp = _gptq(w, jnp.asarray(hessian), keep, spec, block, group, act_order, float(damp))
    return quantize(w_hat.astype(w.dtype), spec, scale=scale, zero_point=zp)


def input_hessians(
    f: Callable, params: Any, batches: Iterable, *, patterns=None, **kwargs
) -> dict[str, jax.Array]:
    """Mean layer-input Gram matrices ``XᵀX / rows`` per weight path, streamed over batches.

    Args:
      f, params, batches, patterns, kwargs: as :func:`qjax.graph.statistics.input_statistics`.

    Returns:
      ``{path: [K, K] float32}`` with ``K`` the weight's contracted size.
    """
    stats: dict[str, InputStatistic] = input_statistics(f, params, batches, gram, patterns=patterns, **kwargs)
    return {p: s.value / max(s.rows, 1) for p, s in stats.items()}


def _transposed_spec(spec: QuantSpec) -> QuantSpec:
    """``spec`` of a 2-D leaf read transposed (``x @ w.T``), for the ``[inputs, outputs]``
    kernel GPTQ works on: every axis swapped."""
    swap = lambda a: 1 - normalize_axis(a, 2, "axis") % 2
    if spec.channel_axes is PER_TOKEN:
        return spec  # refused by gptq_quantize with its reason
    changes = {"channel_axes": tuple(swap(a) for a in spec.channel_axes)}
    if spec.group_axis is not None:
        changes["group_axis"] = swap(spec.group_axis)
    if spec.pack_axis is not None:
        changes["pack_axis"] = swap(spec.pack_axis)
    return dataclasses.replace(spec, **changes)


def _masks_by_path(masks: Any, leaves: dict[str, Any]) -> dict[str, jax.Array]:
    """``{path: bool mask}`` of a :mod:`qjax.prune` mask tree (bit-packed or not, ``None``
    leaves skipped), each checked against its params leaf."""
    if masks is None:
        return {}
    # qjax.prune sits above this layer: its PackedMask is recognised by its unpack().
    packed = lambda x: callable(getattr(x, "unpack", None))
    pairs = leaves_with_paths(jax.tree.map(lambda x: x.unpack() if packed(x) else x, masks, is_leaf=packed))
    unknown = sorted(p for p, _ in pairs if p not in leaves)
    if unknown:
        raise ValueError(f"gptq: masks for paths that are not leaves of params: {unknown}")
    return {p: _check_mask(m, tuple(jnp.shape(leaves[p])), p) for p, m in pairs}


def _apply_mask(leaf: Any, mask: jax.Array | None) -> Any:
    return leaf if mask is None else jnp.where(mask, leaf, jnp.zeros((), jnp.asarray(leaf).dtype))


def _stage_statistics(f, params, batches, todo, read, kwargs) -> dict[str, InputStatistic]:
    """Hessians of a stage's kernels. The first pass (``read`` unknown) collects every matmul
    weight's, which tells which kernels a matmul reads; later passes only their own (a pattern
    for a kernel no matmul reads would be an error)."""
    if read is None:
        return input_statistics(f, params, batches, gram, **kwargs)
    patterns = [re.escape(p) for p in todo if p in read]
    if not patterns:
        return {}
    return input_statistics(f, params, batches, gram, patterns=patterns, **kwargs)


def gptq(
    f: Callable,
    params: Any,
    batches: Iterable,
    policy: Policy,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    stages: Sequence[str] | None = None,
    act_stats: dict[str, Any] | None = None,
    masks: Any = None,
    **kwargs,
) -> Any:
    """:func:`qjax.quantize_params` with GPTQ for every 2-D kernel a matmul reads.

    Layer-input Hessians are collected by streaming the calibration batches through
    ``f``; every leaf whose rule has a weight spec and that is read as ``x @ kernel`` (or
    ``x @ kernel.T``: PyTorch layout, a tied LM head) is GPTQ-quantized with that spec,
    the other quantized leaves (e.g. embeddings) are rounded to nearest as
    ``quantize_params`` does. Static activation scales
    (``act_stats``) are attached as usual.

    With ``stages`` (path patterns, e.g. one per transformer block), the layers are
    quantized stage by stage and each stage's Hessians are collected on the model whose
    earlier stages are already quantized (so later layers compensate for the error of
    earlier ones, as in the reference GPTQ's sequential mode); without, all Hessians come
    from the float model (one pass).

    Sparsity is kept (as SparseGPT): the weights that are exactly 0, or masked out by
    ``masks``, are exactly 0 in the result, and GPTQ moves the error of fixing them at 0
    onto the kept weights.

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, plain).
      params: float params.
      batches: calibration batches (tuples of positional args); iterated once per stage.
      policy: the :class:`qjax.Policy` (its weight specs: integer, per output channel or
        per tensor, optionally grouped along the input axis).
      block_size, damp, act_order: see :func:`gptq_quantize`.
      stages: ordered path patterns (``re.fullmatch``); a kernel goes in the first stage
        it matches; kernels matching none are quantized in a final stage.
      act_stats: from :func:`qjax.calibrate`, for W8A8-style static activation scales.
      masks: a :mod:`qjax.prune` mask tree (bool leaves, True = kept; bit-packed ones too;
        ``None`` leaves and missing paths unmasked), matched by path. Masked-out elements of
        every leaf (GPTQ'd, rounded or float) are 0 in the result, and the model is
        calibrated with them at 0. Default ``None``: only the exact zeros are kept at 0
        (a model already pruned with ``qjax.prune.apply_masks`` keeps its pattern).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      The quantized params (``QArray`` leaves), runnable with ``qjax.quantized(f, policy)``.

    Raises:
      ValueError: as :func:`gptq_quantize`, naming the leaf; a stage pattern matching no
        GPTQ kernel; a mask for a path that is not a leaf, or of another shape than its leaf.
      TypeError: a non-boolean mask (names the leaf).

    Example:
      >>> qparams = gptq(model.apply, variables, [(x,) for x in calib], policy)
      >>> y = qjax.quantized(model.apply, policy)(qparams, x)
    """
    require_float_params(params, "gptq")
    for path, _ in leaves_with_paths(params):
        spec = policy.weight_spec(path)
        if spec is not None and spec.rounding != "nearest":
            raise ValueError(
                f"gptq: leaf {path!r}: the weight spec must round to nearest (GPTQ's error "
                f"feedback chooses every code), got rounding={spec.rounding!r}"
            )
    batches = list(batches)
    mask_of = _masks_by_path(masks, dict(leaves_with_paths(params)))
    params = map_with_path(lambda p, x: _apply_mask(x, mask_of.get(p)), params)
    qparams = quantize_params(params, policy, act_stats=act_stats)
    leaves = dict(leaves_with_paths(params))
    rtn = dict(leaves_with_paths(qparams))
    candidates = [
        p
        for p, leaf in leaves.items()
        if policy.weight_spec(p) is not None and isinstance(rtn[p], QArray) and jnp.ndim(leaf) == 2
    ]
    stage_rules = RuleSet([(pattern, i) for i, pattern in enumerate(stages or ())])
    unused = stage_rules.unused(candidates)
    if unused:
        raise ValueError(f"gptq: stage pattern(s) {unused} match no kernel the policy quantizes")
    order = {p: (m.value if (m := stage_rules.match(p)) else len(stage_rules)) for p in candidates}
    done: dict[str, QArray] = {}
    current = params
    read = None  # the kernels a matmul reads: known after the first pass
    for stage in sorted(set(order.values())):
        todo = [p for p in candidates if order[p] == stage]
        stats = _stage_statistics(f, current, batches, todo, read, kwargs)
        read = set(stats) if read is None else read
        for path in todo:
            if path not in stats:
                continue  # not read by a matmul (e.g. an embedding table): stays RTN
            st = stats[path]
            options = dict(block_size=block_size, damp=damp, act_order=act_order, path=path)
            hessian, spec, mask = st.value / max(st.rows, 1), policy.weight_spec(path), mask_of.get(path)
            if st.weight_axes == (0,):
                done[path] = gptq_quantize(leaves[path], hessian, spec, masks=mask, **options)
            elif st.weight_axes == (1,):  # read as x @ w.T (PyTorch layout, a tied LM head)
                mask = None if mask is None else mask.T
                q = gptq_quantize(leaves[path].T, hessian, _transposed_spec(spec), masks=mask, **options)
                done[path] = transpose_storage(q).stored
            else:
                raise ValueError(f"GPTQ of {path!r}: its matmul contracts leaf axes {st.weight_axes}")
        current = map_with_path(lambda p, x: done[p].dequantize() if p in done else x, params)

    def visit(path, leaf):
        if path not in done:
            return leaf
        q = done[path]
        return q.with_act_scale(leaf.act_scale, leaf.act_zero_point) if leaf.act_scale is not None else q

    return map_with_path(visit, qparams)
