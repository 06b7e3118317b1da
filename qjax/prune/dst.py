"""Dynamic sparse training: SET and RigL.

The number of active weights of every pruned leaf is fixed; every mask update (the update
steps of the schedule given to :func:`qjax.prune.sparsify.sparsify`, typically
``periodic(ΔT, start=ΔT, end=T_end)``) drops the ``k`` active weights of smallest magnitude
and regrows ``k`` inactive ones, so the per-leaf count of active weights is preserved
exactly. ``k = floor(f_t * n_active)`` with the drop fraction ``f_t``:

* :class:`SET` (Mocanu et al. 2018, "Scalable training of artificial neural networks with
  adaptive sparse connectivity"): regrows uniformly at random; constant drop fraction by
  default.
* :class:`RigL` (Evci et al. 2020, "Rigging the lottery"): regrows the inactive weights with
  the largest dense-gradient magnitude ``|∂L/∂w|``; the drop fraction decays as
  ``α/2 · (1 + cos(π t / T_end))`` and updates stop at ``T_end``.

As in RigL's reference implementation, regrowth picks among all weights inactive after the
drop (a weight just dropped can be regrown: it then keeps its value and optimizer state);
regrown weights start at zero and ``sparsify`` resets their optimizer state (for any optax
state, :func:`qjax.prune.sparsify.reset_opt_state`). Initial masks are random with the
pruner's sparsity and distribution (``"erk"`` in the RigL paper), drawn by the
:class:`qjax.prune.pruners.Random` pruner. Only :class:`~qjax.prune.sparsity.Unstructured`
sparsity (without ``per_slice``) is supported; drop/regrow is always per leaf (``scope``
only affects the initial masks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qjax.prune.pruners import Pruner, Random
from qjax.prune.sparsity import Unstructured, select_prune
from qjax.rules import fold_in_path, leaves_with_paths, map_with_path

__all__ = ["RigL", "SET", "DynamicSparse", "drop_and_grow"]

_DECAYS = ("cosine", "constant")


def drop_and_grow(mask: jax.Array, drop_score: jax.Array, grow_score: jax.Array, fraction: Any) -> jax.Array:
    """One drop/regrow update of one leaf's mask, keeping the number of active weights.

    ``k = floor(fraction * n_active)`` (computed in float32; ``fraction`` may be traced) of
    the active positions with the lowest ``drop_score`` are dropped, then the ``k``
    positions with the highest ``grow_score`` among those inactive after the drop
    (including the just dropped ones) become active. Ties go to the lower index; NaN drop
    scores are dropped first, NaN grow scores grown last.

    Args:
      mask: ``bool`` mask (``True`` = active).
      drop_score: scores of the same shape (e.g. ``|w|``).
      grow_score: scores of the same shape (e.g. ``|∂L/∂w|`` or uniform noise).
      fraction: the drop fraction in ``[0, 1]`` (clipped).

    Returns:
      The new ``bool`` mask, with exactly as many ``True`` entries as ``mask``.

    Example:
      >>> m = jnp.array([True, True, False, False])
      >>> drop_and_grow(m, jnp.array([1.0, 2.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 5.0, 1.0]), 0.5).tolist()
      [False, True, True, False]
    """
    shape, n = mask.shape, mask.size
    m = mask.reshape(-1)
    ones = np.ones(n, np.int64)
    n_active = m.sum(dtype=jnp.int32)
    frac = jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)
    k = jnp.floor(frac * n_active.astype(jnp.float32)).astype(jnp.int32)
    k = jnp.clip(k, 0, n_active)
    drop = select_prune(drop_score.reshape(-1).astype(jnp.float32), ones, k, protected=~m)
    after = m & ~drop
    g = grow_score.reshape(-1).astype(jnp.float32)
    g = jnp.where(jnp.isnan(g), -jnp.inf, g)
    grow = select_prune(-g, ones, k, protected=after)
    return (after | grow).reshape(shape)


def _check_fraction(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value!r}")
    return v


@dataclasses.dataclass(frozen=True)
class DynamicSparse(Pruner):
    """Base of the drop/regrow pruners (:class:`SET`, :class:`RigL`).

    Args (beyond :class:`~qjax.prune.pruners.Pruner`'s):
      drop_fraction: ``α``, the fraction of active weights dropped (and regrown) per update.
      decay: ``"cosine"`` (``α/2 · (1 + cos(π t / end))``, 0 after ``end``) or ``"constant"``.
      end: ``T_end`` of the cosine decay; ``None`` takes the schedule's last update step in
        ``sparsify`` (a schedule without an end leaves the fraction constant).

    The pruner state is the number of optimizer steps seen (``update_state`` is called
    once per step by ``sparsify``), so ``t`` in the decay is the step of the update.
    """

    drop_fraction: float = 0.3
    decay: str = "cosine"
    end: int | None = None

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        name = type(self).__name__
        object.__setattr__(
            self, "drop_fraction", _check_fraction(f"{name}.drop_fraction", self.drop_fraction)
        )
        if self.decay not in _DECAYS:
            raise ValueError(f"{name}: `decay` must be one of {_DECAYS}, got {self.decay!r}")
        if self.end is not None and (not isinstance(self.end, int) or self.end <= 0):
            raise ValueError(f"{name}: `end` must be a positive int or None, got {self.end!r}")
        st = self.sparsity_type
        if not isinstance(st, Unstructured) or st.per_slice is not None:
            raise ValueError(
                f"{name} supports only Unstructured() sparsity (no per_slice), got {st!r}: drop/regrow "
                "moves single weights"
            )

    # -- hooks used by sparsify --------------------------------------------------------

    def with_schedule(self, schedule: Any) -> DynamicSparse:
        """This pruner with ``end`` taken from ``schedule.last_step`` when unset (called by
        ``sparsify``).

        Args:
          schedule: a :mod:`qjax.prune.schedules` schedule.

        Returns:
          ``self``, or a copy with ``end`` set.

        Example:
          >>> RigL().with_schedule(periodic(100, start=100, end=5000)).end  # doctest: +SKIP
          5000
        """
        last = getattr(schedule, "last_step", None)
        if self.end is None and last is not None and last > 0:
            return dataclasses.replace(self, end=int(last))
        return self

    def init_masks(self, params: Any, *, key: Any = None) -> Any:
        """Random initial masks at ``self.sparsity`` (with this pruner's scope,
        distribution and rules), each leaf exactly at its count (called by ``sparsify``'s
        ``init``).

        Args:
          params: the params tree.
          key: PRNG key (``None``: ``PRNGKey(0)``).

        Returns:
          The mask tree (``None`` for skipped leaves).

        Raises:
          ValueError: a rule matches no leaf.

        Example:
          >>> masks = SET(0.9, distribution="erk").init_masks(params, key=key)  # doctest: +SKIP
        """
        return self._random().masks(params, key=jax.random.PRNGKey(0) if key is None else key)

    def init_state(self, params: Any) -> jax.Array:
        """The step counter, ``0``."""
        return jnp.zeros((), jnp.int32)

    def update_state(self, state: Any, params: Any, grads: Any) -> jax.Array:
        """Count one step."""
        return state + 1

    # -- drop/regrow -------------------------------------------------------------------

    def fraction_at(self, step: Any) -> jax.Array:
        """The drop fraction at ``step`` (``jnp`` float32; ``step`` may be traced).

        Example:
          >>> round(float(RigL(drop_fraction=0.3, end=100).fraction_at(50)), 4)
          0.15
        """
        a = jnp.float32(self.drop_fraction)
        if self.decay == "constant" or self.end is None:
            return a
        t = jnp.asarray(step, jnp.float32)
        f = a / 2 * (1 + jnp.cos(jnp.float32(math.pi) * jnp.minimum(t, self.end) / self.end))
        return jnp.where(t <= self.end, f, 0.0)

    def grow_scores(self, params: Any, *, grads: Any = None, key: Any = None) -> Any:
        """Params-shaped regrowth scores (higher = regrown first)."""
        raise NotImplementedError

    def masks(
        self,
        params: Any,
        sparsity: Any = None,
        *,
        grads: Any = None,
        state: Any = None,
        key: Any = None,
        masks: Any = None,
    ) -> Any:
        """Drop/regrow update of ``masks``; without ``masks``, the initial random masks.

        Args:
          params: the params.
          sparsity: used only for the initial masks (``None``: ``self.sparsity``); an
            update keeps each leaf's count of active weights.
          grads: the dense gradients (required by :class:`RigL`).
          state: the step counter from :meth:`update_state` (``t = state - 1``); ``None``
            means ``t = 0`` (full drop fraction).
          key: PRNG key (random initial masks, SET's regrowth).
          masks: the current masks (``None`` leaves are left alone).

        Returns:
          The new mask tree.

        Raises:
          ValueError: RigL without ``grads``.
        """
        if masks is None:
            pr = self if sparsity is None else dataclasses.replace(self, sparsity=sparsity)
            return pr.init_masks(params, key=key)
        t = 0 if state is None else jnp.maximum(state - 1, 0)
        frac = self.fraction_at(t)
        w = dict(leaves_with_paths(params))
        g = dict(leaves_with_paths(self.grow_scores(params, grads=grads, key=key)))

        def visit(path, m):
            if m is None:
                return None
            return drop_and_grow(m, jnp.abs(w[path]), g[path], frac)

        return map_with_path(visit, masks)

    def _random(self) -> Random:
        fields = {f.name for f in dataclasses.fields(Random)}
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(Pruner) if f.name in fields}
        return Random(**kw)


@dataclasses.dataclass(frozen=True)
class SET(DynamicSparse):
    """Sparse Evolutionary Training: drop the smallest-magnitude active weights, regrow as
    many at random inactive positions (Mocanu et al. 2018).

    Args:
      sparsity, sparsity_type, scope, distribution, rules: as for every pruner (only the
        initial random masks depend on scope/distribution).
      drop_fraction: ``ζ``, fraction of active weights replaced per update (0.3).
      decay: ``"constant"`` (default, as in the paper) or ``"cosine"``.
      end: end of the cosine decay (see :class:`DynamicSparse`).

    Example:
      >>> tx = sparsify(optax.sgd(0.1), SET(sparsity=0.9), periodic(100, start=100))  # doctest: +SKIP
    """

    decay: str = "constant"

    def grow_scores(self, params: Any, *, grads: Any = None, key: Any = None) -> Any:
        """Uniform noise in ``[0, 1)`` per element (independent per leaf path)."""
        key = jax.random.PRNGKey(0) if key is None else key
        return map_with_path(lambda p, w: jax.random.uniform(fold_in_path(key, p), jnp.shape(w)), params)


@dataclasses.dataclass(frozen=True)
class RigL(DynamicSparse):
    """Rigging the Lottery: drop by magnitude, regrow by dense-gradient magnitude, with a
    cosine-decayed drop fraction (Evci et al. 2020).

    Args:
      sparsity, sparsity_type, scope, distribution, rules: as for every pruner (only the
        initial random masks depend on scope/distribution; the paper uses ``"erk"``).
      drop_fraction: ``α`` (0.3).
      decay: ``"cosine"`` (default) or ``"constant"``.
      end: ``T_end`` (``None``: the schedule's last update step).

    Example:
      >>> tx = sparsify(optax.adam(1e-3), RigL(sparsity=0.9, distribution="erk"),
      ...               periodic(100, start=100, end=75_000))  # doctest: +SKIP
    """

    needs_grads: ClassVar[bool] = True

    def grow_scores(self, params: Any, *, grads: Any = None, key: Any = None) -> Any:
        """``|grads|`` (the dense gradient, including at inactive positions).

        Raises:
          ValueError: ``grads`` is None.
        """
        if grads is None:
            raise ValueError("RigL needs the dense gradients: masks(..., grads=grads)")
        return jax.tree.map(jnp.abs, grads)
