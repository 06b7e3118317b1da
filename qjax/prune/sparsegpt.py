"""SparseGPT (Frantar & Alistarh 2023) one-shot pruning of a float model: per matmul kernel,
block by block of input rows, prune the weights whose removal costs least by the OBS score
``w² / [H⁻¹]ᵢᵢ`` (``H = XᵀX`` of the layer's inputs) and move the error onto the weights
not yet visited, as GPTQ does with rounding errors. It is GPTQ's pass
(:mod:`qjax.quant.gptq_core`) without the rounding; with quantization,
``qjax.gptq(..., sparsity=...)`` runs both at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax.numpy as jnp

from qjax.graph.statistics import gram, input_statistics
from qjax.quant.gptq import _gptq_leaf
from qjax.quant.gptq_core import GPTQLayoutError, check_prune
from qjax.quant.transforms import require_float_params
from qjax.rules import leaves_with_paths, map_with_path


def sparsegpt(
    f: Callable,
    params: Any,
    batches: Iterable,
    sparsity: float | None = None,
    *,
    n_m: tuple[int, int] | None = None,
    patterns: str | Sequence[str] = r".*kernel",
    block_size: int = 128,
    damp: float = 0.01,
    **kwargs,
) -> tuple[Any, Any]:
    """Prune every matmul kernel of ``f`` matching ``patterns`` with SparseGPT.

    Layer-input Hessians are collected from the float model in one pass (as
    :func:`qjax.gptq` without ``stages``). Leaves are read as ``qjax.gptq`` reads them:
    ``x @ w`` and ``x @ w.T`` kernels, ``nn.scan`` stacks slice by slice, expert weights
    per expert with their own tokens (``lax.ragged_dot``, ``"ecd,edf->ecf"``), several
    contracted axes flattened. Each block of ``block_size`` input rows prunes ``sparsity``
    of its entries, or each group of ``m`` input rows its ``n`` smallest per output
    (``n_m``), chosen when it comes up from the error-updated weights. Weights already 0
    count as pruned.

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, plain).
      params: float params.
      batches: calibration batches (tuples of positional args).
      sparsity: the fraction pruned per block, in ``[0, 1)``.
      n_m: an ``(n, m)`` pattern along the input rows instead, e.g. ``(2, 4)``.
      patterns: path regex(es) (``re.fullmatch``) of the kernels to prune; each must match
        a kernel a matmul reads.
      block_size, damp: the block of input rows, and the relative diagonal damping.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``(pruned params, masks)``: ``masks`` mirrors ``params`` with a bool array (True =
      kept) for every pruned leaf and ``None`` elsewhere, as :mod:`qjax.prune` masks (for
      ``apply_masks``, ``sparsify``'s fine-tuning, or ``qjax.gptq(masks=...)``).

    Raises:
      ValueError: neither or both of ``sparsity`` / ``n_m``, bad values, no batches, a
        pattern matching no matmul kernel, NaN/Inf weights (naming the leaf). A kernel
        whose layout cannot take the pattern (an ``m`` not dividing its inputs) or read by
        a convolution is left unpruned, with a warning.

    Example:
      >>> pruned, masks = qjax.prune.sparsegpt(model.apply, variables, calib, 0.5)
      >>> pruned, masks = qjax.prune.sparsegpt(model.apply, variables, calib, n_m=(2, 4))
    """
    require_float_params(params, "sparsegpt")
    prune = check_prune(sparsity, n_m, False, "sparsegpt")
    if prune is None:
        raise ValueError("sparsegpt: give sparsity= (a fraction) or n_m= (an n:m pattern)")
    batches = list(batches)
    if not batches:
        raise ValueError("sparsegpt needs at least one batch")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    stats = input_statistics(f, params, batches, gram, patterns=patterns, grouped=True, **kwargs)
    leaves = dict(leaves_with_paths(params))
    options = dict(block_size=block_size, damp=damp, act_order=False, sparsity=sparsity, n_m=n_m)
    pruned: dict[str, Any] = {}
    for path, st in stats.items():
        if st.op == "conv_general_dilated":
            warnings.warn(f"sparsegpt: {path!r} is read by a convolution: left unpruned", stacklevel=2)
            continue
        try:
            pruned[path] = _gptq_leaf(leaves[path], st, None, None, path, options)
        except GPTQLayoutError as e:
            warnings.warn(f"sparsegpt: {e}; this leaf is left unpruned", stacklevel=2)
    new = map_with_path(lambda p, x: pruned.get(p, x), params)
    masks = map_with_path(lambda p, x: (jnp.asarray(pruned[p]) != 0) if p in pruned else None, params)
    return new, masks


__all__ = ["sparsegpt"]
