"""Learned LSQ step sizes trained beside the params, as one pytree.

``LSQParams(params, scales)`` is what a training step trains when a policy has
``ste="lsq"`` weight specs: the optimizer updates both parts, ``jax.grad`` returns an
``LSQParams`` of gradients, and :func:`qjax.fake_quantized`, :func:`qjax.quantize_params`
and :func:`qjax.fake_quant_params` take it in place of ``params`` with ``scales=``. So the
ready-made steps (``qjax.distill.distill_step``, ``qjax.parallel.qat_step`` /
``prune_step`` / ``distill_train_step``) train LSQ models unchanged.

Its params keep their own leaf paths (``params/Dense_0/kernel``, not
``params/params/...``: the params child adds no path part), so policies, pruning rules and
partition rules match them as before. The scales sit under ``lsq_scales/<weight path>``;
``qjax.parallel.shardings`` derives each one's sharding from its weight's and the pruners
skip them.
"""

from __future__ import annotations

from typing import Any

import jax

from qjax.rules import TransparentKey

SCALES_KEY = "lsq_scales"


class LSQParams:
    """Params and their learned LSQ scales ``{path: scale}`` (see the module docstring).

    Attributes:
      params: the model params.
      scales: ``{path: scale}`` as :func:`qjax.lsq_scales` builds it.
    """

    __slots__ = ("params", "scales")

    def __init__(self, params: Any, scales: dict[str, Any]):
        self.params, self.scales = params, scales

    def __repr__(self) -> str:
        return f"LSQParams(params=..., scales={sorted(self.scales)!r})"


jax.tree_util.register_pytree_with_keys(
    LSQParams,
    lambda t: (((TransparentKey(), t.params), (jax.tree_util.GetAttrKey(SCALES_KEY), t.scales)), None),
    lambda _, children: LSQParams(*children),
    lambda t: ((t.params, t.scales), None),
)


def is_lsq_params(x: Any) -> bool:
    return isinstance(x, LSQParams)


def split_scales(params: Any, scales: dict | None) -> tuple[Any, dict]:
    """``(params, scales)`` of a transform's arguments: an :class:`LSQParams` gives its
    params and its scales (merged with ``scales``; a path given twice is an error)."""
    scales = dict(scales or {})
    if not isinstance(params, LSQParams):
        return params, scales
    both = sorted(set(scales) & set(params.scales))
    if both:
        raise ValueError(f"scales=... gives {both}, which the LSQParams already holds: pass one of them")
    return params.params, {**params.scales, **scales}


def reject_lsq_params(params: Any, what: str, instead: str) -> None:
    """Raise for an :class:`LSQParams` given to a transform that takes plain params.

    Raises:
      TypeError: naming ``what`` and what to pass ``instead``.
    """
    if isinstance(params, LSQParams):
        raise TypeError(f"{what} got a qjax.LSQParams (params with learned LSQ scales): {instead}")
