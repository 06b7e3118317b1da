"""Permuted layer inputs: ``x @ W == x[..., perm] @ W[perm]``.

An act-order GPTQ checkpoint (:func:`qjax.from_gptq_act_order`) stores its rows sorted by
scale group, so the layer reads its input in that order. :func:`with_input_permutation`
re-evaluates ``f`` with the input of each listed weight's matmuls gathered along the
contracted axis; the weight still flows from ``params`` to the matmul, so
``qjax.quantized`` (and the kernels it dispatches to) serve the permuted weight as any
other, and ``calibrate`` / ``fake_quantized`` compose with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.quant.smoothing import transform_inputs


def _gather(act, a_axes, perm, path: str):
    if len(a_axes) != 1 or act.shape[a_axes[0]] != perm.shape[0]:
        sizes = [act.shape[a] for a in a_axes]
        raise ValueError(
            f"with_input_permutation {path!r}: a permutation of {perm.shape[0]} rows, but the matmul "
            f"contracts axes of sizes {sizes} (one axis of that length needed)"
        )
    return jnp.take(act, jnp.asarray(perm), axis=a_axes[0])


def _check(path: str, perm) -> np.ndarray:
    p = np.asarray(perm)
    if (
        p.ndim != 1
        or not np.issubdtype(p.dtype, np.integer)
        or not np.array_equal(np.sort(p), np.arange(p.size))
    ):
        raise ValueError(f"with_input_permutation {path!r}: not a permutation of 0..K-1 (shape {p.shape})")
    return p.astype(np.int32)


def with_input_permutation(f: Callable, perms: Mapping[str, Any]) -> Callable:
    """``f`` with the input of the matmuls reading each listed weight permuted along the
    contracted axis: ``x @ W`` becomes ``x[..., perm] @ W`` (for a weight stored with its
    rows in ``perm``'s order, the product of the original layer).

    Args:
      f: ``f(params, *args, **kwargs)``.
      perms: ``{weight path: perm}``, ``perm`` an int ``(K,)`` permutation (e.g. from
        :func:`qjax.from_gptq_act_order`). Empty: ``f`` itself.

    Returns:
      ``g(params, *args, **kwargs)``.

    Raises:
      ValueError: a ``perm`` that is not a permutation (at once); when ``g`` is called, a
        path no matmul reads, a matmul contracting more than one axis or one of another
        length, or a weight inside a ``scan`` over stacked params (naming the path).

    Example:
      >>> kernel, perm = qjax.from_gptq_act_order(qweight, qzeros, scales, g_idx, bits=4)
      >>> g = qjax.with_input_permutation(model.apply, {"params/mlp/down/kernel": perm})
      >>> y = qjax.quantized(g, policy)(params, x)
    """
    table = {path: _check(path, p) for path, p in perms.items()}
    if not table:
        return f
    return transform_inputs(f, table, _gather, "with_input_permutation")


__all__ = ["with_input_permutation"]
