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

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.numerics.granularity import normalize_axis
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import compute_scale, quantize
from qjax.numerics.spec import QuantSpec


class GPTQLayoutError(ValueError):
    """A spec whose scale layout GPTQ cannot honour on this leaf (round to nearest can):
    :func:`qjax.gptq` rounds such a leaf to nearest with a warning instead."""


def _matrix_spec(spec: QuantSpec, shape: tuple[int, ...], path: str) -> int | None:
    """Check ``spec`` is one GPTQ handles for a ``[K, N]`` kernel; the group size or None."""
    if len(shape) != 2:
        raise ValueError(f"GPTQ of {path!r}: needs a 2-D [inputs, outputs] kernel, got shape {shape}")
    if spec is None:  # pruning only (SparseGPT without quantization)
        return None
    if spec.format.is_float:
        raise ValueError(f"GPTQ of {path!r}: integer formats only, got {spec.format.name}")
    if spec.rounding != "nearest":
        raise ValueError(
            f"GPTQ of {path!r}: the weight spec must round to nearest (GPTQ's error feedback "
            f"chooses every code), got rounding={spec.rounding!r}"
        )
    channel = tuple(sorted(normalize_axis(a, 2, "channel_axes") % 2 for a in spec.channel_axes))
    if channel not in ((), (1,)):
        raise GPTQLayoutError(
            f"GPTQ of {path!r}: scales must be per output channel (channel_axes=(-1,)) or per tensor, "
            f"got channel_axes={spec.channel_axes}"
        )
    if spec.group_size is None:
        return None
    if normalize_axis(spec.group_axis, 2, "group_axis") % 2 != 0:
        raise GPTQLayoutError(f"GPTQ of {path!r}: groups must run along the input axis (group_axis=0)")
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


def _obs_scores(w, u_diag, keep):
    """SparseGPT's OBS score ``w² / U[i,i]²`` (the error a weight's removal causes, with ``U``
    the upper Cholesky factor of ``H⁻¹``); masked-out weights score lowest (pruned first)."""
    return jnp.where(keep, w**2 / (u_diag[:, None] ** 2), -1.0)


def _prune_block(wb, ub, kb, valid, fraction):
    """SparseGPT's unstructured mask of one block of rows, chosen when the block comes up from
    its current (error-updated) rows: the kept weights of ``kb`` minus the smallest scores,
    ``fraction`` of the block's real entries (padding rows never count; masked-out weights
    count as pruned)."""
    score = _obs_scores(wb, jnp.diag(ub), kb)
    real = jnp.where(valid[:, None], score, jnp.inf).reshape(-1)
    count = jnp.floor(fraction * jnp.sum(valid) * score.shape[1]).astype(jnp.int32)
    ranks = jnp.argsort(jnp.argsort(real)).reshape(score.shape)
    return kb & (ranks >= count)


def _prune_rows(wb, ub, kb, i, nm):
    """SparseGPT's ``n:m`` mask of rows ``i .. i + m`` of a block, chosen when row ``i`` comes
    up (from the rows as the earlier rows of the block left them): the ``n`` smallest scores
    of each column pruned. Returns the block's mask with those rows updated."""
    n, m = nm
    rows = lax.dynamic_slice(wb, (i, 0), (m, wb.shape[1]))
    keep = lax.dynamic_slice(kb, (i, 0), (m, wb.shape[1]))
    d = lax.dynamic_slice(jnp.diag(ub), (i,), (m,))
    ranks = jnp.argsort(jnp.argsort(_obs_scores(rows, d, keep), axis=0), axis=0)  # 0: the smallest
    return lax.dynamic_update_slice(kb, keep & (ranks >= n), (i, 0))


@functools.partial(
    jax.jit, static_argnames=("spec", "block", "group", "act_order", "damp", "keep_dead", "prune")
)
def _gptq(
    w,
    h,
    keep,
    spec: QuantSpec,
    block: int,
    group: int | None,
    act_order: bool,
    damp: float,
    keep_dead=False,
    prune=None,
):
    """GPTQ of one ``[K, N]`` matrix. Inputs that are always 0 in the calibration data (a
    zero Hessian diagonal) are zeroed, as in the reference, or with ``keep_dead`` rounded
    to nearest (an expert that saw few tokens: its dead inputs are not dead in serving).
    With ``prune`` (:func:`_prune_block`), SparseGPT: each block's mask is chosen when the
    block comes up, and its pruned weights are fixed at 0 like masked-out ones."""
    k, n = w.shape
    fmt = None if spec is None else spec.format  # None: prune only, kept weights unrounded
    w = jnp.where(keep, w.astype(jnp.float32), 0.0)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    # a dead input's Hessian entry: 1, as in the reference; for an expert's inputs it never
    # saw but keeps (keep_dead), SparseGPT ranks them against the live ones, so the stand-in
    # is on their scale (the mean live entry), not an absolute 1
    fill = 1.0
    if keep_dead and prune is not None:
        live = jnp.sum(jnp.where(dead, 0.0, jnp.diag(h))) / jnp.maximum(jnp.sum(~dead), 1)
        fill = jnp.where(jnp.any(~dead), live, 1.0)
    h = jnp.where(jnp.diag(dead), fill, h)
    if not keep_dead:
        w = jnp.where(dead[:, None], 0.0, w)
    lazy = group is not None and not act_order
    static_scale = static_zp = None
    if not lazy and spec is not None:
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
    asym = spec is not None and not spec.symmetric
    scales0 = jnp.ones((n_groups, n), jnp.float32)
    zps0 = jnp.zeros((n_groups, n), jnp.float32) if asym else None

    def block_step(b, carry):
        w, qw, scales, zps = carry
        start = b * block
        wb = lax.dynamic_slice(w, (start, 0), (block, n))
        ub = lax.dynamic_slice(u, (start, start), (block, block))
        rows = lax.dynamic_slice(orig_rows, (start,), (block,))
        kb = lax.dynamic_slice(keep, (start, 0), (block, n))
        if prune is not None and prune[0] is not None:
            kb = _prune_block(wb, ub, kb, start + jnp.arange(block) < k, prune[0])
        if not lazy and spec is not None:
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
            wb, qb, eb, s_zp, scales, zps, kb = carry
            if prune is not None and prune[1] is not None:  # n:m: each group of m rows as it comes up
                kb = lax.cond(
                    i % prune[1][1] == 0, lambda b: _prune_rows(wb, ub, b, i, prune[1]), lambda b: b, kb
                )
            row = wb[i]
            if lazy:
                s_zp = group_scale(wb, i, s_zp)
                g = (start + i) // group
                scales = scales.at[g].set(s_zp[0])
                zps = None if zps is None else zps.at[g].set(s_zp[1])
                s_i, z_i = s_zp[0], (s_zp[1] if asym else None)
            elif spec is not None:
                s_i, z_i = rs[i], None if rz is None else rz[i]
            kept = row if spec is None else _code(row, s_i, z_i, fmt)[1]
            deq = jnp.where(kb[i], kept, 0.0)  # masked out: exactly 0
            err = (row - deq) / ub[i, i]
            later = jnp.where(jnp.arange(block) > i, ub[i], 0.0)
            wb = wb - later[:, None] * err[None, :]
            return wb, qb.at[i].set(deq), eb.at[i].set(err), s_zp, scales, zps, kb

        zeros = jnp.zeros((block, n), jnp.float32)
        s_zp = (jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
        _, qb, eb, _, scales, zps, _ = lax.fori_loop(
            0, block, row_step, (wb, zeros, zeros, s_zp, scales, zps, kb)
        )
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
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
) -> QArray:
    """GPTQ-quantize one ``[K inputs, N outputs]`` kernel, keeping its sparsity (or, with
    ``sparsity`` / ``n_m``, pruning it as SparseGPT does, in the same pass).

    Args:
      w: the float kernel (``x @ w`` layout).
      hessian: ``[K, K]`` ``XᵀX`` of the layer's inputs (any positive multiple: the scale
        cancels), e.g. from :func:`qjax.quant.gptq.input_hessians`.
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
      sparsity: SparseGPT (Frantar & Alistarh 2023): prune this fraction of each block of
        ``block_size`` input rows, choosing in each block, when it comes up, the weights
        with the smallest OBS score ``w² / [H⁻¹]ᵢᵢ`` (from the current, error-updated
        weights); their error is fed to the later rows like a rounding error.
      n_m: SparseGPT's ``n:m`` pattern instead: the ``n`` smallest scores of every ``m``
        consecutive input rows of each output column, chosen when the group's first row
        comes up (``m`` must divide the inputs and the block; not with ``act_order``).

    Returns:
      A :class:`QArray` with ``spec``'s layout (packing included), usable wherever
      ``qjax.quantize(w, spec)`` is. Pruned weights dequantize to exactly 0.

    Raises:
      ValueError: ``w`` is not 2-D, the spec is not supported, the Hessian's or the mask's
        shape does not match, or ``block_size``/``damp`` is out of range.
      TypeError: ``masks`` is not boolean.

    Example:
      >>> h = qjax.quant.gptq.input_hessians(model.apply, variables, batches)["params/Dense_0/kernel"]
      >>> q = gptq_quantize(kernel, h, qjax.QuantSpec(qjax.int4, channel_axes=(-1,),
      ...                                              group_size=128, group_axis=0))
    """
    w = jnp.asarray(w)
    prune = check_prune(sparsity, n_m, act_order, path)
    w_hat, scale, zp = _gptq_matrix(w, hessian, spec, block_size, damp, act_order, masks, path, prune)
    return quantize(w_hat.astype(w.dtype), spec, scale=scale, zero_point=zp)


def sparsegpt_prune(
    w: jax.Array,
    hessian: jax.Array,
    *,
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    masks: jax.Array | None = None,
    path: str = "weight",
) -> jax.Array:
    """SparseGPT (Frantar & Alistarh 2023) pruning of one ``[K inputs, N outputs]`` float
    kernel: :func:`gptq_quantize`'s pass without the rounding. Each block of input rows (each
    group of ``m`` rows for ``n_m``) prunes its smallest OBS scores ``w² / [H⁻¹]ᵢᵢ`` when
    it comes up, and the error of pruning them is moved onto the later rows.

    Args:
      w: the float kernel; hessian: ``[K, K]`` ``XᵀX`` of its inputs.
      sparsity, n_m, block_size, damp, masks, path: as :func:`gptq_quantize` (exact zeros
        and ``masks`` count as pruned).

    Returns:
      The pruned kernel (``w``'s dtype): its zeros are the pruned weights.

    Raises:
      ValueError: neither or both of ``sparsity`` / ``n_m``, bad values, shapes, NaN/Inf.
    """
    prune = check_prune(sparsity, n_m, False, path)
    if prune is None:
        raise ValueError(f"SparseGPT of {path!r}: give sparsity= or n_m=")
    w = jnp.asarray(w)
    w_hat, _, _ = _gptq_matrix(w, hessian, None, block_size, damp, False, masks, path, prune)
    return w_hat.astype(w.dtype)


def check_prune(sparsity, n_m, act_order: bool, path: str):
    """``(fraction, n_m)`` for :func:`_gptq`'s ``prune`` from the user's options, or ``None``."""
    if sparsity is None and n_m is None:
        return None
    if sparsity is not None and n_m is not None:
        raise ValueError(f"GPTQ of {path!r}: give sparsity= or n_m=, not both")
    if n_m is not None:
        ints = isinstance(n_m, (tuple, list)) and len(n_m) == 2
        ints = ints and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)
        if not ints or not 0 < n_m[0] < n_m[1]:
            raise ValueError(f"GPTQ of {path!r}: n_m must be a pair of ints 0 < n < m, got {n_m!r}")
        if act_order:
            raise ValueError(
                f"GPTQ of {path!r}: an n:m pattern runs along the input rows in order: act_order=False"
            )
        return None, (int(n_m[0]), int(n_m[1]))
    if not isinstance(sparsity, (int, float, np.floating, np.integer)) or isinstance(sparsity, bool):
        raise ValueError(f"GPTQ of {path!r}: sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0 <= float(sparsity) < 1:
        raise ValueError(f"GPTQ of {path!r}: sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity), None


def _gptq_setup(spec, shape, hessian_shape, block_size, damp, path, prune=None) -> tuple[int | None, int]:
    """Check one ``[K, N]`` GPTQ problem's spec, Hessian shape and options: ``(group, block)``
    (the group size along K or ``None``, the column block the updates run in)."""
    if prune is not None and prune[1] is not None:
        m = prune[1][1]
        group = _matrix_spec(spec, tuple(shape), path)
        block = block_size if group is None else group * max(1, round(block_size / group))
        if block % m or shape[0] % m:
            raise GPTQLayoutError(
                f"GPTQ of {path!r}: n_m's m={m} must divide the input rows ({shape[0]}) and the block "
                f"({block} rows: block_size, rounded to whole groups)"
            )
    group = _matrix_spec(spec, tuple(shape), path)
    if hessian_shape != (shape[0], shape[0]):
        raise ValueError(f"GPTQ of {path!r}: Hessian shape {hessian_shape} != ({shape[0]}, {shape[0]})")
    if block_size < 1 or not 0 <= damp < 1:
        raise ValueError(f"GPTQ of {path!r}: block_size must be >= 1 and 0 <= damp < 1")
    if group is not None and shape[0] % group and not spec.pad_groups:
        raise ValueError(
            f"GPTQ of {path!r}: group_size={group} does not divide {shape[0]} inputs (set pad_groups=True)"
        )
    return group, block_size if group is None else group * max(1, round(block_size / group))


def _check_finite(w, hessian, path) -> None:
    """Refuse NaN/Inf in the weight or its Hessian (one host sync for however many slices)."""
    if not jnp.all(jnp.isfinite(w)) or not jnp.all(jnp.isfinite(hessian)):
        raise ValueError(f"GPTQ of {path!r}: the weight or its Hessian has NaN/Inf entries")


def _gptq_matrix(w, hessian, spec, block_size, damp, act_order, masks, path, prune=None):
    """The checked GPTQ core of one ``[K, N]`` kernel: ``(dequantized weight, scale, zero point)``
    with the scale and zero point in ``spec``'s layout for that kernel."""
    w = jnp.asarray(w)
    group, block = _gptq_setup(spec, w.shape, hessian.shape, block_size, damp, path, prune)
    _check_finite(w, hessian, path)
    keep = w != 0 if masks is None else _check_mask(masks, w.shape, path)
    return _gptq(w, jnp.asarray(hessian), keep, spec, block, group, act_order, float(damp), prune=prune)
