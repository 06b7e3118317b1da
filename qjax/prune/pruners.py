"""Pruners: a score per weight plus a selection rule give masks.

A :class:`Pruner` is a frozen dataclass (hashable, safe to close over under ``jit``):
``scores(params, ...)`` computes params-shaped scores (``None`` for skipped leaves) and
``masks(params, sparsity, ...)`` selects with
:func:`qjax.prune.masks.masks_from_scores`. Subclasses set ``score_name`` (a name in the
:mod:`qjax.prune.scores` registry) or override :meth:`Pruner.leaf_score`;
``init_state``/``update_state`` carry per-step state (Movement's gradient sums) and are
called by :func:`qjax.prune.sparsify`.

Example:
  >>> masks = Magnitude(sparsity=0.9, scope="global").masks(params)
  >>> masks = magnitude(params, 0.5, sparsity_type=NM(2, 4))        # one-shot helper
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qjax.prune.distribution import get_distribution
from qjax.prune.masks import Target, as_rules, check_scope, masks_from_scores, resolve_targets
from qjax.prune.scores import get_score
from qjax.prune.sparsity import SparsityType, Unstructured, check_sparsity
from qjax.rules import fold_in_path, leaves_with_paths, map_with_path

__all__ = ["Magnitude", "Movement", "Pruner", "Random", "Saliency", "Wanda", "magnitude"]

PyTree = Any


def _by_path(tree: Any) -> dict[str, Any]:
    return {} if tree is None else dict(leaves_with_paths(tree))


def _freeze_rules(rules: Any) -> tuple:
    out = []
    for r in rules or ():
        out.append(tuple(r) if isinstance(r, list) else r)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Pruner:
    """Base pruner (magnitude scores unless a subclass says otherwise).

    Args:
      sparsity: target fraction of zeros among targeted elements (``masks`` may override
        it, e.g. with a traced schedule value).
      sparsity_type: ``Unstructured()``, ``NM(n, m)``, ``Block(shape)``, ``Channel(axis)``.
      scope: ``"layer"`` (rank within each leaf) or ``"global"`` (rank across leaves).
      distribution: per-leaf sparsities in layer scope: ``"uniform"``, ``"erk"`` or a
        callable (see :mod:`qjax.prune.distribution`).
      rules: per-path overrides ``[(pattern, value), ...]``: ``None`` skips, a float sets
        the sparsity, a ``LeafConfig``/sparsity type sets both (see :mod:`qjax.prune.masks`).

    Raises:
      ValueError: unknown scope/distribution, sparsity outside [0, 1], bad rules.

    Example:
      >>> p = Magnitude(sparsity=0.8, rules=[(r".*/embed/.*", None)])
      >>> masks = p.masks(params)
    """

    sparsity: float = 0.5
    sparsity_type: SparsityType = Unstructured()  # noqa: RUF009 (frozen, immutable)
    scope: str = "layer"
    distribution: str | Callable = "uniform"
    rules: tuple = ()
    needs_grads: ClassVar[bool] = False
    score_name: ClassVar[str] = "magnitude"

    def __post_init__(self):
        object.__setattr__(self, "rules", _freeze_rules(self.rules))
        check_sparsity(self.sparsity, f"{type(self).__name__}.sparsity")
        check_scope(self.scope)
        get_distribution(self.distribution)
        if not isinstance(self.sparsity_type, SparsityType):
            raise TypeError(f"sparsity_type must be a SparsityType, got {self.sparsity_type!r}")
        if self.scope == "global" and self.distribution != "uniform":
            raise ValueError(f"distribution={self.distribution!r} applies to scope='layer' only")
        as_rules(self.rules)  # validates the patterns

    # -- state -----------------------------------------------------------------------------

    def targets(self, params: PyTree, state: PyTree = None) -> dict[str, Target]:
        """``{path: Target}`` of the leaves this pruner prunes (see ``resolve_targets``);
        ``state``: the pruner state, for pruners that learn stacked-layer depths from it."""
        return resolve_targets(params, self.rules, self.sparsity_type)

    def init_state(self, params: PyTree) -> PyTree:
        """Per-pruner state carried across steps (``()`` when none)."""
        return ()

    def update_state(self, state: PyTree, params: PyTree, grads: PyTree) -> PyTree:
        """The state after one training step with ``grads`` (jit-safe); unchanged by default."""
        return state

    # -- scores and masks ------------------------------------------------------------------

    def leaf_score(self, path: str, w: jax.Array, **ctx: Any) -> jax.Array:
        """Score of one targeted leaf; ``ctx`` holds ``grad``, ``state``, ``key``,
        ``act_norm`` for this leaf (``None`` when absent)."""
        return get_score(self.score_name)(w, path=path, **ctx)

    def scores(
        self, params: PyTree, *, grads: PyTree = None, state: PyTree = None, key: jax.Array | None = None
    ) -> PyTree:
        """Params-shaped scores (float32; ``None`` for skipped leaves).

        Args:
          params: the params tree (Linen variables, NNX state, any pytree).
          grads: params-shaped gradients (Saliency, Movement without state).
          state: this pruner's state (from ``init_state``/``update_state``).
          key: PRNG key (Random); folded with each leaf's path.

        Raises:
          ValueError: a needed input is missing for a leaf (names the path).
        """
        targets = self.targets(params)
        if self.needs_grads and grads is None and not self._state_suffices(state):
            raise ValueError(f"{type(self).__name__} needs grads=... (params-shaped gradients)")
        g_of, s_of = _by_path(grads), self._state_by_path(state)

        def visit(path, w):
            if path not in targets:
                return None
            if grads is not None and path not in g_of and not self._state_suffices(state):
                raise ValueError(f"{type(self).__name__}: grads have no leaf {path!r}")
            return self.leaf_score(
                path, w, grad=g_of.get(path), state=s_of.get(path), key=fold_in_path(key, path), act_norm=None
            )

        return map_with_path(visit, params)

    def _state_by_path(self, state: PyTree) -> dict[str, Any]:
        return {} if state is None or state == () else _by_path(state)

    def _state_suffices(self, state: PyTree) -> bool:
        return False

    def masks(
        self,
        params: PyTree,
        sparsity: Any = None,
        *,
        grads: PyTree = None,
        state: PyTree = None,
        key: jax.Array | None = None,
        masks: PyTree = None,
    ) -> PyTree:
        """Masks at ``sparsity`` (``None``: ``self.sparsity``; may be a traced scalar).

        Args:
          params: the params tree.
          sparsity: the target, overriding ``self.sparsity``.
          grads, state, key: as for :meth:`scores`.
          masks: the current masks (ignored by score-based pruners; DST pruners use them).

        Returns:
          The mask tree (bool, True = kept, ``None`` for skipped leaves), mirroring ``params``.
        """
        del masks
        s = self.sparsity if sparsity is None else sparsity
        return self._select(self.scores(params, grads=grads, state=state, key=key), params, s)

    def _select(self, scores: PyTree, params: PyTree, sparsity: Any, stacks: Any = None) -> PyTree:
        return masks_from_scores(
            scores,
            sparsity,
            sparsity_type=self.sparsity_type,
            scope=self.scope,
            distribution=self.distribution,
            rules=self.rules,
            params=params,
            stacks=stacks,
        )


@dataclasses.dataclass(frozen=True)
class Magnitude(Pruner):
    """Keep the largest ``|w|`` (Han et al. 2015; Zhu & Gupta 2017 with a schedule).

    Example:
      >>> masks = Magnitude(sparsity=0.9, scope="global").masks(params)
    """

    score_name: ClassVar[str] = "magnitude"


@dataclasses.dataclass(frozen=True)
class Random(Pruner):
    """Random masks (a baseline): uniform scores from ``key``, independent per leaf.

    Example:
      >>> masks = Random(sparsity=0.5).masks(params, key=jax.random.key(0))
    """

    score_name: ClassVar[str] = "random"

    def scores(self, params, *, grads=None, state=None, key=None):
        if key is None:
            raise ValueError("Random pruner needs key=... (a PRNG key)")
        return super().scores(params, grads=grads, state=state, key=key)


@dataclasses.dataclass(frozen=True)
class Saliency(Pruner):
    """Keep the largest ``|w * g|`` (first-order Taylor saliency, SNIP-style).

    Example:
      >>> grads = jax.grad(loss)(params, batch)
      >>> masks = Saliency(sparsity=0.9).masks(params, grads=grads)
    """

    needs_grads: ClassVar[bool] = True
    score_name: ClassVar[str] = "saliency"


@dataclasses.dataclass(frozen=True)
class Movement(Pruner):
    """Movement pruning (Sanh et al. 2020): keep the largest ``-w * sum_t g_t``.

    The state is the params-shaped float32 sum of gradients of the targeted leaves
    (``None`` elsewhere), accumulated by :meth:`update_state` every step. Without state,
    ``masks(params, grads=g)`` uses the single gradient.

    Example:
      >>> p = Movement(sparsity=0.5); st = p.init_state(params)
      >>> st = p.update_state(st, params, grads)           # every step
      >>> masks = p.masks(params, state=st)
    """

    needs_grads: ClassVar[bool] = True
    score_name: ClassVar[str] = "movement"

    def init_state(self, params):
        targets = self.targets(params)
        return map_with_path(
            lambda p, w: jnp.zeros(jnp.shape(w), jnp.float32) if p in targets else None, params
        )

    def update_state(self, state, params, grads):
        if grads is None:
            raise ValueError("Movement.update_state needs grads")
        g_of = _by_path(grads)

        def add(path, s):
            if path not in g_of:
                raise ValueError(f"Movement.update_state: grads have no leaf {path!r}")
            return s + g_of[path].astype(jnp.float32)

        return map_with_path(add, state)

    def _state_suffices(self, state):
        return state is not None and state != ()


@dataclasses.dataclass(frozen=True)
class Wanda(Pruner):
    """Wanda (Sun et al. 2023): keep the largest ``|w| * ||x||``, ``||x||`` the L2 norm of
    each input feature of the layer over the calibration tokens.

    The activation norms come from :func:`qjax.prune.activations.activation_norms` and are
    passed as ``act_norms=`` (or ``state=``) to :meth:`scores`/:meth:`masks`. Ranking is
    layer-wise over the whole leaf by default; the paper's per-output comparison group is
    ``sparsity_type=Unstructured(per_slice=-1)`` for Dense kernels ``(in, out)``. A leaf
    that the norms' ``stacks`` mark as an ``nn.scan`` stack is counted and ranked layer by
    layer, as the unrolled model (a rule ``LeafConfig(stack=...)`` overrides it).

    Raises:
      ValueError: no norms, or no norm for a targeted leaf (names the path; skip such
        leaves, e.g. embeddings, with a rule).

    Example:
      >>> norms = activation_norms(model.apply, variables, batches)
      >>> masks = Wanda(sparsity=0.5, rules=[(r".*embed.*", None)]).masks(variables, act_norms=norms)
    """

    score_name: ClassVar[str] = "wanda"

    def scores(self, params, *, grads=None, state=None, key=None, act_norms=None):
        norms = act_norms if act_norms is not None else state
        if not norms:
            raise ValueError("Wanda needs act_norms=... (from qjax.prune.activations.activation_norms)")
        targets = self.targets(params, norms)

        def visit(path, w):
            if path not in targets:
                return None
            if path not in norms:
                raise ValueError(
                    f"Wanda: no activation norm for {path!r} (is it read by a matmul/conv of the "
                    f"function? skip it with a rule ({path!r}, None)); have {sorted(norms)}"
                )
            return self.leaf_score(path, w, grad=None, state=None, key=None, act_norm=norms[path])

        return map_with_path(visit, params)

    def masks(self, params, sparsity=None, *, grads=None, state=None, key=None, masks=None, act_norms=None):
        s = self.sparsity if sparsity is None else sparsity
        norms = act_norms if act_norms is not None else state
        stacks = getattr(norms, "stacks", None)  # nn.scan stacks: ranked layer by layer
        return self._select(self.scores(params, state=state, act_norms=act_norms), params, s, stacks)

    def targets(self, params: PyTree, state: PyTree = None) -> dict[str, Target]:
        """As :meth:`Pruner.targets`, with the stack depths of ``state``'s norms (``.stacks``):
        a stacked bias or norm scale has per-layer rank 1 and is skipped by default."""
        return resolve_targets(params, self.rules, self.sparsity_type, getattr(state, "stacks", None))


def magnitude(
    tree: PyTree,
    sparsity: Any,
    scope: str = "layer",
    sparsity_type: SparsityType | None = None,
    distribution: str | Callable = "uniform",
    rules: Any = (),
) -> PyTree:
    """One-shot magnitude pruning masks.

    Args:
      tree: params (Linen variables, NNX state, any pytree).
      sparsity: fraction of zeros among targeted elements (may be a traced scalar).
      scope: ``"layer"`` or ``"global"``.
      sparsity_type: ``Unstructured()`` (default), ``NM``, ``Block``, ``Channel``.
      distribution: ``"uniform"``, ``"erk"`` or a callable (layer scope).
      rules: per-path overrides (see :class:`Pruner`).

    Returns:
      The mask tree (True = kept; ``None`` for skipped leaves); apply it with
      :func:`qjax.prune.masks.apply_masks`.

    Example:
      >>> masks = magnitude(params, sparsity=0.9, scope="global")
      >>> sparse = apply_masks(params, masks)
    """
    pruner = Magnitude(
        sparsity=0.0,
        sparsity_type=sparsity_type if sparsity_type is not None else Unstructured(),
        scope=scope,
        distribution=distribution,
        rules=rules,
    )
    return pruner.masks(tree, sparsity)
