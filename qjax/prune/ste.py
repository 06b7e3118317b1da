"""Straight-through pruning: dense weights, masked forward.

The model reads ``w * mask`` in the forward pass while the gradient flows to the dense ``w``
as if no mask were there (the straight-through estimator), so pruned weights keep learning
and can come back when the masks are recomputed (Zhou et al. 2021, "Learning N:M
fine-grained structured sparse neural networks from scratch"). With ``sr_decay > 0`` the
backward adds ``sr_decay * (1 - mask) * w`` (their SR-STE), pulling pruned weights towards 0.

Use it with ``sparsify(tx, pruner, schedule, ste=True)``, which keeps the params dense and only
maintains the masks (read them with :func:`qjax.prune.sparsify.get_masks`)::

    tx = sparsify(optax.adam(1e-3), Magnitude(0.5, sparsity_type=NM(2, 4)), periodic(100), ste=True)
    def loss_fn(params, opt_state, x, y):
        w = apply_masks_ste(params, get_masks(opt_state))
        return loss(model.apply(w, x), y)

When the masks are computed: ``sparsify(..., ste=True)`` recomputes them inside
``tx.update``, from the params *before* that update, so the forward pass of step ``t``
reads masks computed from step ``t - 1``'s params (with ``periodic(k)``, from the params
of the last update step). jaxpruner's ``SteMixin`` computes the mask from the *current*
params in every forward pass. For that behaviour compute the masks inside the loss, from
the params it is given, without a gradient through them::

    pruner = Magnitude(0.5, sparsity_type=NM(2, 4))
    def loss_fn(params, x, y):  # train with the plain optimizer; no sparsify needed
        masks = pruner.masks(jax.lax.stop_gradient(params))  # or (..., schedule(step))
        return loss(model.apply(apply_masks_ste(params, masks), x), y)

and prune the trained params once at the end (``apply_masks(params, pruner.masks(params))``).

With quantization-aware training, mask the params *before* :func:`qjax.fake_quantized`,
``fake_quantized(model.apply, policy)(apply_masks_ste(params, masks), x)``, not inside the
function it wraps (``fake_quantized(lambda p, x: model.apply(apply_masks_ste(p, masks), x),
policy)``): there the mask is an op on the weight before its matmul, so the weight is
fake-quantized at the leaf with scales of the *dense* weight, while deployment
(``quantize_params(apply_masks(params, masks), policy)``) scales the masked one (~14% off
on an int4 MLP at 50% sparsity). Masked outside, QAT and the deployed model agree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qjax.numerics.transposed import is_quantized
from qjax.prune.masks import unpack_masks
from qjax.rules import path_str

__all__ = ["apply_masks_ste", "masked_ste"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste(x: jax.Array, mask: jax.Array, sr_decay: float) -> jax.Array:
    return jnp.where(mask, x, jnp.zeros_like(x))


def _ste_fwd(x, mask, sr_decay):
    return _ste(x, mask, sr_decay), (x, mask)


def _ste_bwd(sr_decay, res, g):
    x, mask = res
    if sr_decay:
        g = g + (sr_decay * jnp.where(mask, jnp.zeros_like(x), x)).astype(g.dtype)
    return g, None


_ste.defvjp(_ste_fwd, _ste_bwd)


def masked_ste(x: jax.Array, mask: jax.Array, sr_decay: float = 0.0) -> jax.Array:
    """``x * mask`` in the forward pass, identity gradient with respect to ``x``.

    Args:
      x: a float array (the dense weight).
      mask: a ``bool`` array broadcastable to ``x`` (``True`` = kept).
      sr_decay: SR-STE decay ``λ``: the gradient becomes ``g + λ (1 - mask) x`` (default 0,
        plain straight-through).

    Returns:
      ``where(mask, x, 0)`` with ``x``'s dtype; its VJP maps a cotangent ``g`` to ``g``
      (plus the SR-STE term), none to the mask.

    Raises:
      TypeError: ``x`` is not a floating-point array.

    Example:
      >>> x, m = jnp.array([1.0, -2.0]), jnp.array([True, False])
      >>> masked_ste(x, m).tolist(), jax.grad(lambda x: masked_ste(x, m).sum())(x).tolist()
      ([1.0, 0.0], [1.0, 1.0])
    """
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"masked_ste needs a floating-point array, got {jnp.asarray(x).dtype}")
    return _ste(x, jnp.asarray(mask, bool), float(sr_decay))


def apply_masks_ste(tree: Any, masks: Any, sr_decay: float = 0.0) -> Any:
    """Apply a mask tree with a straight-through gradient (see :func:`masked_ste`).

    Same contract as :func:`qjax.prune.masks.apply_masks` (``None`` mask = leaf unchanged;
    boxes such as NNX ``Variable`` kept), but ``jax.grad`` of a function of the result with
    respect to ``tree`` is the gradient with respect to the masked tree, unmasked.

    Args:
      tree: params (or any params-shaped tree) of float arrays.
      masks: a mask tree mirroring ``tree`` (``bool`` arrays or ``None``), or a packed one.
      sr_decay: SR-STE decay (default 0).

    Returns:
      A tree like ``tree`` with masked leaves replaced by ``where(mask, w, 0)``.

    Raises:
      TypeError: a masked leaf is a ``QArray`` or not floating point (names the path).
      ValueError: ``tree`` and ``masks`` have different structures.

    Example:
      >>> p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> m = {"w": jnp.eye(2, dtype=bool), "b": None}
      >>> apply_masks_ste(p, m)["w"].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """

    def one(kp, mask, leaf):
        if mask is None:
            return leaf
        if not is_quantized(leaf) and not hasattr(leaf, "dtype"):
            raise ValueError(
                f"apply_masks_ste: masks do not mirror the tree at {path_str(kp)!r}: got {type(leaf)}"
            )
        if is_quantized(leaf) or not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            kind = "quantized" if is_quantized(leaf) else jnp.asarray(leaf).dtype
            raise TypeError(
                f"apply_masks_ste: leaf {path_str(kp)!r} is {kind}; only float leaves can be masked"
            )
        return _ste(leaf, jnp.asarray(mask, bool), float(sr_decay))

    masks = unpack_masks(masks)
    try:
        return jax.tree_util.tree_map_with_path(
            one, masks, tree, is_leaf=lambda x: x is None or is_quantized(x)
        )
    except ValueError as e:
        raise ValueError(f"apply_masks_ste: masks do not mirror the tree: {e}") from None
