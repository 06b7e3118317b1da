"""Pruning: masks as pytrees, scores, sparsity types, distributions, schedules, optax
integration, dynamic sparse training and physical shrinking of structured-pruned models.

Structured pruning of coupled layers ranks whole channel groups (:mod:`qjax.prune.groups`):
``group_scores`` combines each channel's importance over every member of its coupled group
(``reduction="sum"|"mean"|"max"``, optional per-member ``normalize``) and
``masks_from_group_scores`` prunes exactly the requested fraction per group
(``scope="group"``) or across groups (``"global"``), with ``multiple`` and per-group
``rules``; ``shrink`` then removes exactly those channels.

Stacked layers: a leaf holding several layers along its leading axes (an ``nn.scan`` stack
``(L, K, N)``) cannot be told from one layer by its shape. Say so with a rule
``(r"params/layers/.*", LeafConfig(stack=1))`` over the whole stacked subtree: layer scope
and ``Unstructured(per_slice=...)`` then count and rank each layer as its own leaf (ERK
too), exactly as in the unrolled model, and stacked biases and norm scales (per-layer rank
1) stay unpruned by default; without it the layers are ranked together. Wanda does this by
itself: the norms of :func:`activation_norms` carry ``.stacks`` for every stacked leaf.
``NM`` is per group anyway; ``Channel`` keeps the same channels in every layer (what
``shrink`` needs). Axes of a sparsity type count in the full stacked shape
(``Unstructured(per_slice=0)`` is the layer axis): prefer negative axes.

Example:
    >>> masks = qjax.prune.magnitude(params, sparsity=0.9, scope="global")
    >>> params = qjax.prune.apply_masks(params, masks)
    >>> tx = qjax.prune.sparsify(optax.adam(1e-3), qjax.prune.Magnitude(0.9),
    ...                          qjax.prune.polynomial(0.9, begin=0, end=1000, every=50))
    >>> small, plan = qjax.prune.shrink(model.apply, variables, channel_masks, x)
    >>> groups = qjax.graph.coupling.channel_groups(f, variables, x)
    >>> gs = qjax.prune.group_scores(groups, qjax.prune.Magnitude().scores(variables))
    >>> masks = qjax.prune.masks_from_group_scores(gs, 0.5, groups, variables, multiple=8)
"""

from qjax.prune.activations import ActivationNorms, activation_norms
from qjax.prune.distribution import erk, leaf_counts, uniform
from qjax.prune.dst import SET, DynamicSparse, RigL, drop_and_grow
from qjax.prune.groups import group_scores, masks_from_group_scores
from qjax.prune.iterative import IterativeResult, Round, iterative_prune
from qjax.prune.masks import (
    LeafSummary,
    PackedMask,
    Summary,
    apply_masks,
    masks_from_scores,
    pack_masks,
    summary,
    unpack_masks,
)
from qjax.prune.pruners import Magnitude, Movement, Pruner, Random, Saliency, Wanda, magnitude
from qjax.prune.rebuild import feature_counts, linen_apply, shrink_nnx
from qjax.prune.schedules import OneShot, Periodic, Polynomial, Schedule, one_shot, periodic, polynomial
from qjax.prune.scores import (
    get_score,
    magnitude_score,
    movement_score,
    random_score,
    register_score,
    saliency_score,
    wanda_score,
)
from qjax.prune.shrink import GroupPlan, ShrinkPlan, make_plan, shrink
from qjax.prune.sparsegpt import sparsegpt
from qjax.prune.sparsify import SparsifyState, get_masks, get_sparsify_state, reset_opt_state, sparsify
from qjax.prune.sparsity import NM, Block, Channel, LeafConfig, SparsityType, Unstructured
from qjax.prune.ste import apply_masks_ste, masked_ste

__all__ = [
    "NM",
    "SET",
    "Block",
    "Channel",
    "DynamicSparse",
    "GroupPlan",
    "IterativeResult",
    "LeafConfig",
    "LeafSummary",
    "Magnitude",
    "Movement",
    "OneShot",
    "PackedMask",
    "Periodic",
    "Polynomial",
    "Pruner",
    "Random",
    "RigL",
    "Round",
    "Saliency",
    "Schedule",
    "ShrinkPlan",
    "SparsifyState",
    "SparsityType",
    "Summary",
    "Unstructured",
    "Wanda",
    "sparsegpt",
    "ActivationNorms",
    "activation_norms",
    "apply_masks",
    "apply_masks_ste",
    "drop_and_grow",
    "erk",
    "feature_counts",
    "get_masks",
    "get_score",
    "get_sparsify_state",
    "group_scores",
    "iterative_prune",
    "leaf_counts",
    "linen_apply",
    "magnitude",
    "magnitude_score",
    "make_plan",
    "masked_ste",
    "masks_from_group_scores",
    "masks_from_scores",
    "movement_score",
    "one_shot",
    "pack_masks",
    "periodic",
    "polynomial",
    "random_score",
    "register_score",
    "reset_opt_state",
    "saliency_score",
    "shrink",
    "shrink_nnx",
    "sparsify",
    "summary",
    "uniform",
    "unpack_masks",
    "wanda_score",
]
