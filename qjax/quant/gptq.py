"""GPTQ of a model (Frantar et al. 2023): layer-input Hessians collected through the graph
layer, then every matmul weight a policy quantizes GPTQ-quantized by the matrix algorithm
of :mod:`qjax.quant.gptq_core`, optionally stage by stage. Leaves with more than two axes
(an ``nn.scan`` stack ``(L, K, N)``, expert weights ``(E, K, N)`` read by an einsum) are
quantized one ``[K, N]`` slice at a time, each with its own layer's Hessian, exactly as
the unrolled model would be; adjacent contracted axes (an attention output kernel) are
flattened into one input axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.statistics import InputStatistic, gram, input_statistics
from qjax.numerics.granularity import normalize_axis
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.numerics.transposed import transpose_storage
from qjax.quant.gptq_core import (
    GPTQLayoutError,
    _check_finite,
    _check_mask,
    _gptq,
    _gptq_setup,
    check_prune,
    gptq_quantize,
    sparsegpt_prune,
)
from qjax.quant.policy import Policy
from qjax.quant.transforms import quantize_params, require_float_params
from qjax.rules import RuleSet, leaves_with_paths, map_with_path

__all__ = ["gptq", "gptq_quantize", "input_hessians"]


def input_hessians(
    f: Callable, params: Any, batches: Iterable, *, patterns=None, grouped: bool = False, **kwargs
) -> dict[str, jax.Array]:
    """Mean layer-input Gram matrices ``XᵀX / rows`` per weight path, streamed over batches.

    Args:
      f, params, batches, patterns, grouped, kwargs: as
        :func:`qjax.graph.statistics.input_statistics`.

    Returns:
      ``{path: [K, K] float32}`` with ``K`` the weight's contracted size; leading axes for
      stacked layers and (``grouped``) experts, each expert's divided by its own row count
      (0 for an expert no row reached).
    """
    stats: dict[str, InputStatistic] = input_statistics(
        f, params, batches, gram, patterns=patterns, grouped=grouped, **kwargs
    )
    return {p: _mean(s) for p, s in stats.items()}


def _mean(st: InputStatistic) -> jax.Array:
    """The statistic divided by its row count (per expert for a grouped one)."""
    rows = np.maximum(np.asarray(st.rows), 1).astype(np.float32)
    return st.value / jnp.asarray(rows).reshape(*rows.shape, *([1, 1] if rows.ndim else []))


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


def _slice_spec(spec: QuantSpec, ndim: int, slices: list[int], c: int, o: int, path: str) -> QuantSpec:
    """The spec of one ``[K, N]`` slice (leaf axes ``c``, ``o``) of a leaf quantized slice by
    slice along ``slices``; those must be channel axes (one scale per slice)."""
    if spec.channel_axes is PER_TOKEN:
        return spec  # refused by _matrix_spec with its reason
    channel = {normalize_axis(a, ndim, "channel_axes") % ndim for a in spec.channel_axes}
    missing = [a for a in slices if a not in channel]
    if missing:
        raise GPTQLayoutError(
            f"GPTQ of {path!r}: leaf axes {missing} index stacked layers / experts / heads, which GPTQ "
            f"quantizes one [inputs, outputs] slice at a time, so the spec needs one scale per slice: add "
            f"them to channel_axes (e.g. channel_axes={(*slices, -1)}), got channel_axes={spec.channel_axes}"
        )
    changes: dict[str, Any] = {
        "channel_axes": tuple(sorted({0 if a == c else 1 for a in channel - set(slices)})),
        "pack_axis": -1,  # the slice is never packed: only its values and scales are used
    }
    if spec.group_size is not None:
        g = normalize_axis(spec.group_axis, ndim, "group_axis") % ndim
        if g in slices:
            raise GPTQLayoutError(
                f"GPTQ of {path!r}: groups must run along the input axis ({c}), got group_axis={g}"
            )
        changes["group_axis"] = 0 if g == c else 1
    return dataclasses.replace(spec, **changes)


def _merged_spec(spec: QuantSpec, shape: tuple[int, ...], axes: tuple[int, ...], path: str) -> QuantSpec:
    """The spec of a leaf whose contracted ``axes`` (adjacent) are flattened into one input
    axis: the same scales, provided none of those axes has scales or groups of its own."""
    ndim, a, m = len(shape), axes[0], len(axes)
    if axes != tuple(range(a, a + m)):
        raise GPTQLayoutError(
            f"GPTQ of {path!r}: its matmul contracts leaf axes {axes}, which are not adjacent, so they "
            "cannot be flattened into one input axis (store the leaf with them adjacent)"
        )
    if spec.channel_axes is PER_TOKEN:
        return spec  # refused by _matrix_spec with its reason
    channel = sorted({normalize_axis(x, ndim, "channel_axes") % ndim for x in spec.channel_axes})
    group = None if spec.group_size is None else normalize_axis(spec.group_axis, ndim, "group_axis") % ndim
    if set(channel) & set(axes) or group in axes:
        keep = tuple(x - ndim for x in channel if x not in axes)
        has = f"channel_axes={spec.channel_axes}"
        has += "" if group is None else f", group_axis={spec.group_axis}"
        raise GPTQLayoutError(
            f"GPTQ of {path!r}: its matmul contracts leaf axes {axes}, which GPTQ flattens into one input "
            f"axis, but the spec gives them scales of their own ({has}): use scales shared along them, "
            f"e.g. channel_axes={keep}" + ("" if group is None else " without groups")
        )
    shift = lambda x: x if x < a else x - (m - 1)
    changes: dict[str, Any] = {"channel_axes": tuple(shift(x) for x in channel), "pack_axis": -1}
    if group is not None:
        changes["group_axis"] = shift(group)
    return dataclasses.replace(spec, **changes)


def _gptq_merged(
    leaf: Any, st: InputStatistic, spec: QuantSpec, mask: Any, path: str, options: dict
) -> QArray:
    """GPTQ of a leaf whose matmul contracts several adjacent axes (a multi-head attention
    output kernel ``(heads, head_dim, features)`` read as ``"nhk,hkd->nd"``): those axes
    flattened into one (the statistic's columns run over them in leaf order), quantized as
    that leaf, and the result reshaped back."""
    shape, axes = tuple(jnp.shape(leaf)), st.weight_axes
    a, m = axes[0], len(axes)
    if spec is None and axes != tuple(range(a, a + m)):
        # pruning has no scales to keep: bring the contracted axes together (in leaf order,
        # the statistic's), prune that leaf, and put the axes back
        others = [x for x in range(len(shape)) if x not in axes]
        perm = [x for x in others if x < a] + list(axes) + [x for x in others if x > a]
        st_t = dataclasses.replace(
            st,
            weight_axes=tuple(range(a, a + m)),
            weight_shape=tuple(shape[x] for x in perm),
            groups=tuple(perm.index(g) for g in st.groups),
        )
        mask_t = None if mask is None else jnp.transpose(mask, perm)
        out = _gptq_merged(jnp.transpose(jnp.asarray(leaf), perm), st_t, None, mask_t, path, options)
        return jnp.transpose(out, np.argsort(perm))
    spec2 = None if spec is None else _merged_spec(spec, shape, axes, path)
    flat = (*shape[:a], math.prod(shape[a : a + m]), *shape[a + m :])
    shift = lambda x: x if x < a else x - (m - 1)
    st2 = dataclasses.replace(st, weight_axes=(a,), weight_shape=flat, groups=tuple(map(shift, st.groups)))
    mask2 = None if mask is None else jnp.reshape(mask, flat)
    q = _gptq_leaf(jnp.reshape(jnp.asarray(leaf), flat), st2, spec2, mask2, path, options)
    if spec is None:  # pruning only: a float leaf
        return q.reshape(shape)
    unflatten = lambda x: None if x is None else jnp.expand_dims(x, tuple(range(a + 1, a + m)))
    w_hat = q.dequantize().reshape(shape)
    return quantize(w_hat, spec, scale=unflatten(q.scale), zero_point=unflatten(q.zero_point))


def _slice_hessians(st: InputStatistic, slices: list[int], k: int, path: str) -> tuple[jax.Array, Callable]:
    """The Hessians of a leaf GPTQ'd slice by slice along its axes ``slices``: ``(hs, pick)``,
    ``hs`` stacked ``[-1, k, k]`` and ``pick(i)`` the index in ``hs`` of the ``i``-th slice
    (row-major over ``slices``). Stacked layers and expert axes (``st.groups``) have one
    each; the other slice axes share them. Warns about experts whose Hessian is 0 (no
    calibration token reached them, or only zero rows: capacity padding)."""
    own = [a for a in slices if a < st.depth or a in st.groups]  # the axes the statistic has
    hs = _mean(st).reshape(-1, k, k)
    own_sizes = [st.weight_shape[a] for a in own]
    if st.groups:
        empty = np.flatnonzero(~np.asarray(jnp.any(jnp.diagonal(hs, axis1=1, axis2=2) != 0, axis=1)))
        if empty.size:
            at = [tuple(int(j) for j in np.unravel_index(i, own_sizes)) for i in empty]
            at_text = [x[0] if len(x) == 1 else x for x in at]
            warnings.warn(
                f"gptq: {path!r}: no calibration token reached experts {at_text} (indices along leaf axes "
                f"{own}); they are rounded to nearest (and with sparsity= / n_m= pruned by magnitude: "
                "no token scores their weights)",
                stacklevel=4,
            )
    sizes = [st.weight_shape[a] for a in slices]
    kept = [a in own for a in slices]

    def pick(i: int) -> int:
        index = np.unravel_index(i, sizes)
        return (
            int(np.ravel_multi_index([j for j, keep in zip(index, kept) if keep], own_sizes))
            if own_sizes
            else 0
        )

    return hs, pick


def _gptq_leaf(leaf: Any, st: InputStatistic, spec: QuantSpec, mask: Any, path: str, options: dict) -> QArray:
    """GPTQ of one params leaf from its layer-input statistic. A 2-D kernel directly
    (transposed when read as ``x @ w.T``); a leaf with more axes (an ``nn.scan`` stack
    ``(L, K, N)``, expert weights ``(E, K, N)``) one ``[K, N]`` slice at a time, each with
    its layer's and expert's Hessian (the statistic is stacked per layer, and per expert
    for a matmul that gives each expert its own tokens), slices that see the same inputs
    (experts of a dense einsum, heads) sharing it: as if unrolled."""
    if spec is not None and spec.tile_size is not None:
        raise GPTQLayoutError(
            f"GPTQ of {path!r}: 2-D tile scales (tile_size={spec.tile_size}) are not supported: GPTQ sets "
            "each column's scale as it goes"
        )
    if len(st.weight_axes) != 1:
        return _gptq_merged(leaf, st, spec, mask, path, options)
    shape = tuple(jnp.shape(leaf))
    ndim, c = len(shape), st.weight_axes[0]
    free = [a for a in range(st.depth, ndim) if a != c]
    outputs = [a for a in free if a not in st.groups]
    if not outputs:
        raise GPTQLayoutError(f"GPTQ of {path!r}: its matmul leaves no output axis of the leaf ({shape})")
    o = outputs[-1]
    slices = [*range(st.depth), *(a for a in free if a != o)]
    hessian = _mean(st)
    block_size, damp, act_order = options["block_size"], options["damp"], options["act_order"]
    prune = check_prune(options.get("sparsity"), options.get("n_m"), act_order, path)
    if spec is None and not slices:  # pruning only (SparseGPT without rounding)
        transposed = (c, o) != (0, 1)
        w2 = jnp.asarray(leaf).T if transposed else leaf
        m2 = mask.T if transposed and mask is not None else mask
        opts = dict(sparsity=options.get("sparsity"), n_m=options.get("n_m"))
        pruned = sparsegpt_prune(w2, hessian, block_size=block_size, damp=damp, masks=m2, path=path, **opts)
        return pruned.T if transposed else pruned
    if not slices and (c, o) == (0, 1):
        return gptq_quantize(leaf, hessian, spec, masks=mask, path=path, **options)
    if not slices:  # read as x @ w.T (PyTorch layout, a tied LM head)
        mask = None if mask is None else mask.T
        q = gptq_quantize(leaf.T, hessian, _transposed_spec(spec), masks=mask, path=path, **options)
        return transpose_storage(q).stored
    spec2 = None if spec is None else _slice_spec(spec, ndim, slices, c, o, path)
    perm = (*slices, c, o)
    sizes, (k, n) = [shape[a] for a in slices], (shape[c], shape[o])
    ws = jnp.transpose(jnp.asarray(leaf), perm).reshape(-1, k, n)
    ms = None if mask is None else jnp.transpose(mask, perm).reshape(-1, k, n)
    hs, pick = _slice_hessians(st, slices, k, path)
    # the checks once for the whole leaf, then the jitted core per slice
    group, block = _gptq_setup(spec2, (k, n), hs.shape[1:], block_size, damp, path, prune)
    _check_finite(ws, hs, path)
    keeps = ws != 0 if ms is None else _check_mask(ms, ws.shape, path)
    parts = [
        _gptq(
            ws[i], hs[pick(i)], keeps[i], spec2, block, group, act_order, float(damp), bool(st.groups), prune
        )
        for i in range(ws.shape[0])
    ]
    per_channel = spec2 is None or 1 in spec2.channel_axes

    def assemble(arrays):  # per-slice [a, b] arrays -> the leaf's layout
        arrays = [a if per_channel else a[:, :1] for a in arrays]  # per tensor: one column
        return jnp.transpose(jnp.stack(arrays).reshape(*sizes, *arrays[0].shape), np.argsort(perm))

    w_hat = assemble([w for w, _, _ in parts])
    if spec is None:  # pruning only
        return w_hat.astype(jnp.asarray(leaf).dtype)
    scale = assemble([s for _, s, _ in parts])
    zp = None if parts[0][2] is None else assemble([z for _, _, z in parts])
    return quantize(w_hat.astype(jnp.asarray(leaf).dtype), spec, scale=scale, zero_point=zp)


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
        return input_statistics(f, params, batches, gram, grouped=True, **kwargs)
    patterns = [re.escape(p) for p in todo if p in read]
    if not patterns:
        return {}
    return input_statistics(f, params, batches, gram, patterns=patterns, grouped=True, **kwargs)


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
    sparsity: float | None = None,
    n_m: tuple[int, int] | None = None,
    **kwargs,
) -> Any:
    """:func:`qjax.quantize_params` with GPTQ for every kernel a matmul reads.

    Layer-input Hessians are collected by streaming the calibration batches through
    ``f``; every leaf whose rule has a weight spec and that is read as ``x @ kernel`` (or
    ``x @ kernel.T``: PyTorch layout, a tied LM head) is GPTQ-quantized with that spec,
    the other quantized leaves (e.g. embeddings) are rounded to nearest as
    ``quantize_params`` does; a convolution kernel is rounded to nearest with a warning.
    Static activation scales (``act_stats``) are attached as usual.

    A leaf with more axes is quantized one ``[inputs, outputs]`` slice at a time, as the
    unrolled model would be: an ``nn.scan`` stack ``(L, K, N)`` with each layer's own
    Hessian, expert weights ``(E, K, N)`` with each expert's own Hessian when the matmul
    gives each expert its own tokens (a ``dot_general`` with the expert axis as a batch
    dimension, ``"ecd,edf->ecf"``, or a ``lax.ragged_dot``; an expert no calibration token
    reached is rounded to nearest, with a warning) and with the shared one when every
    expert sees all tokens (``"nd,edf->nef"``). The slice axes (leading stack axes, then
    every non-contracted axis but the last: the heads of an attention ``(D, H, hd)`` q/k/v
    kernel too) must be channel axes of the spec (e.g. ``channel_axes=(0, -1)``: one scale
    per slice). A leaf whose matmul contracts several adjacent axes (an attention output
    kernel ``(H, hd, D)`` read as ``"nhk,hkd->nd"``) is GPTQ'd with those axes flattened
    into one input axis, when its spec gives them no scales or groups of their own (e.g.
    ``channel_axes=(-1,)``). A leaf whose spec GPTQ cannot honour that way (per-head
    scales of an output kernel, q/k/v scales shared across heads, groups not along the
    input axis, scales along the input axis) is rounded to nearest with a warning that
    names the leaf and the spec change that would enable GPTQ.

    With ``stages`` (path patterns, e.g. one per transformer block), the layers are
    quantized stage by stage and each stage's Hessians are collected on the model whose
    earlier stages are already quantized (so later layers compensate for the error of
    earlier ones, as in the reference GPTQ's sequential mode); without, all Hessians come
    from the float model (one pass).

    Sparsity is kept (as SparseGPT): the weights that are exactly 0, or masked out by
    ``masks``, are exactly 0 in the result, and GPTQ moves the error of fixing them at 0
    onto the kept weights. With ``sparsity`` or ``n_m`` the GPTQ'd kernels are also pruned,
    SparseGPT's joint mode: each block of input rows (each group of ``m`` rows for
    ``n_m``) chooses its pruned weights by the OBS score ``w² / [H⁻¹]ᵢᵢ`` when it comes up.
    Exact zeros and ``masks`` count as pruned first: the fraction is a total per block.

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
      sparsity: prune this fraction of every GPTQ'd kernel, block by block (SparseGPT
        unstructured; see :func:`gptq_quantize`). Kernels rounded to nearest (convolutions,
        unsupported layouts) are not pruned.
      n_m: SparseGPT's ``(n, m)`` pattern instead (``n`` of every ``m`` consecutive input
        rows pruned per output), e.g. ``(2, 4)``; needs ``act_order=False``. A kernel whose
        inputs (or block) ``m`` does not divide is rounded to nearest, with a warning.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      The quantized params (``QArray`` leaves), runnable with ``qjax.quantized(f, policy)``.

    Raises:
      ValueError: as :func:`gptq_quantize` (a float format, a group size that does not
        divide), naming the leaf; a stage pattern matching no GPTQ kernel; a mask for a
        path that is not a leaf, or of another shape than its leaf.
      TypeError: a non-boolean mask (names the leaf).

    Example:
      >>> qparams = gptq(model.apply, variables, [(x,) for x in calib], policy)
      >>> y = qjax.quantized(model.apply, policy)(qparams, x)
    """
    require_float_params(params, "gptq")
    check_prune(sparsity, n_m, act_order, "gptq")  # bad pruning options fail before any pass
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
        if policy.weight_spec(p) is not None and isinstance(rtn[p], QArray) and jnp.ndim(leaf) >= 2
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
            if st.op == "conv_general_dilated":
                warnings.warn(
                    f"gptq: {path!r} is read by {st.op!r}, not a matmul: GPTQ handles matmul weights "
                    "only, this leaf is rounded to nearest",
                    stacklevel=2,
                )
                continue
            options = dict(block_size=block_size, damp=damp, act_order=act_order, sparsity=sparsity, n_m=n_m)
            try:
                done[path] = _gptq_leaf(
                    leaves[path], st, policy.weight_spec(path), mask_of.get(path), path, options
                )
            except GPTQLayoutError as e:
                warnings.warn(f"gptq: {e}; this leaf is rounded to nearest", stacklevel=2)
        current = map_with_path(lambda p, x: done[p].dequantize() if p in done else x, params)

    def visit(path, leaf):
        if path not in done:
            return leaf
        q = done[path]
        return q.with_act_scale(leaf.act_scale, leaf.act_zero_point) if leaf.act_scale is not None else q

    return map_with_path(visit, qparams)
