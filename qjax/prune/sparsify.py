"""Optax integration: train with masks that a pruner recomputes on a schedule.

:func:`sparsify` wraps an optax ``GradientTransformation``. Its state (:class:`SparsifyState`)
holds the masks, the step, the pruner's state, the inner optimizer's state and a PRNG key.
At every update:

1. the pruner's state is updated with the (dense) gradients (``pruner.update_state``);
2. on an update step of the schedule (``schedule.is_update(step)``, a ``lax.cond`` under
   ``jax.jit``) the masks are recomputed by ``pruner.masks`` at ``schedule(step)`` (a traced
   sparsity), given the params, the dense gradients, the pruner state, a fresh key and the
   current masks;
3. gradients of pruned weights are zeroed before the inner optimizer, so its moments do
   not accumulate for them;
4. the inner optimizer's state is reset (zeroed) at the positions whose mask changed, for
   any optax state (see :func:`reset_opt_state`): pruned weights keep zero moments and
   regrown ones (dynamic sparse training) start from a fresh state;
5. the update of a weight that is pruned now or was pruned before the step is ``-p``, so
   after ``optax.apply_updates`` pruned weights are exactly ``0`` (``p + (-p) == 0`` in
   floating point) and regrown weights start at ``0``; other updates are the inner ones.

With ``ste=True`` the params stay dense: steps 3–5 are skipped and the masks are only
maintained for a masked forward pass (:func:`qjax.prune.ste.apply_masks_ste`).

Read the masks from any optimizer state that contains a sparsify state (``optax.chain``,
``optax.MultiSteps``, ``optax.inject_hyperparams``) with :func:`get_masks`.

Place it last: the zeroing update ``-p`` must reach ``apply_updates`` unchanged, so no
transformation may follow :func:`sparsify` in a chain (``chain(clip, sparsify(adam(lr)))``
is right; ``chain(sparsify(scale_by_adam()), scale(-lr))`` scales ``-p`` to ``lr·p`` and
pruned weights are not zeroed). Wrappers around it that pass its updates through
(``MultiSteps``, ``inject_hyperparams``) are fine.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from qjax.prune.schedules import Schedule
from qjax.rules import leaves_with_paths, map_with_path

__all__ = ["SparsifyState", "dense_masks", "get_masks", "get_sparsify_state", "reset_opt_state", "sparsify"]


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`.

    Attributes:
      step: int32 scalar, the number of updates done (the schedule's step).
      masks: the mask tree (``bool`` arrays mirroring params, ``None`` for skipped leaves).
      pruner_state: ``pruner.init_state(params)`` as updated every step.
      inner_state: the wrapped optimizer's state.
      key: a raw ``uint32`` PRNG key, split at every step.
    """

    step: jax.Array
    masks: Any
    pruner_state: Any
    inner_state: optax.OptState
    key: jax.Array


def _is_none(x: Any) -> bool:
    return x is None


def _raw_key(key: Any) -> jax.Array:
    """A raw ``uint32`` key from an int seed, a raw key or a typed key."""
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.ndim == 0 and jnp.issubdtype(key.dtype, jnp.integer):
        return jax.random.PRNGKey(key)
    return key


def _as_bool_masks(masks: Any) -> Any:
    return jax.tree.map(lambda m: None if m is None else jnp.asarray(m, bool), masks, is_leaf=_is_none)


def dense_masks(pruner: Any, params: Any, state: Any = None) -> Any:
    """All-``True`` masks for the leaves ``pruner`` targets (``None`` elsewhere).

    Args:
      pruner: a :class:`qjax.prune.pruners.Pruner` (its ``targets``: default filter + rules).
      params: the params tree.
      state: the pruner state (Wanda's norms carry the ``nn.scan`` stack depths).

    Returns:
      A mask tree mirroring ``params`` that prunes nothing.

    Raises:
      ValueError: a rule of the pruner matches no leaf (names the pattern).

    Example:
      >>> dense_masks(Magnitude(), {"w": jnp.ones((2, 2)), "b": jnp.ones(2)})["b"] is None
      True
    """
    targets = pruner.targets(params, state)
    return map_with_path(lambda p, w: jnp.ones(jnp.shape(w), bool) if p in targets else None, params)


def _conform(new: Any, old: Any) -> Any:
    """``new`` masks in ``old``'s structure (looked up by path), ``bool``."""
    by_path = dict(leaves_with_paths(new))

    def visit(path, m):
        n = by_path.get(path)
        if n is None:
            raise ValueError(f"sparsify: the pruner returned no mask for targeted leaf {path!r}")
        if jnp.shape(n) != jnp.shape(m):
            raise ValueError(
                f"sparsify: the pruner's mask for {path!r} has shape {jnp.shape(n)}, not {jnp.shape(m)}"
            )
        return jnp.asarray(n, bool)

    return map_with_path(visit, old)


def _full_positions(positions: Any, params: Any) -> Any:
    """``positions`` with ``None`` replaced by ``False`` (a leaf), so it has params' structure."""
    return jax.tree.map(lambda m, _: False if m is None else m, positions, params, is_leaf=_is_none)


def _zero_at(value: Any, pos: Any) -> Any:
    if isinstance(pos, bool) or not hasattr(value, "shape") or jnp.shape(value) != jnp.shape(pos):
        return value  # skipped leaf, or a leaf of another shape (e.g. Adafactor factored rows)
    return jnp.where(pos, jnp.zeros((), value.dtype), value)


def _cond(flag: jax.Array, true_fn: Any, false_fn: Any, operand: Any) -> Any:
    """``lax.cond``, or a Python branch when ``flag`` is concrete (eager: no retracing)."""
    if isinstance(flag, jax.core.Tracer):
        return lax.cond(flag, true_fn, false_fn, operand)
    return true_fn(operand) if bool(flag) else false_fn(operand)


def reset_opt_state(opt_state: Any, positions: Any, params: Any, tx: Any = None) -> Any:
    """Zero an optimizer state at given positions of the params, for any optax state.

    Every params-shaped subtree of ``opt_state`` (Adam's ``mu``/``nu``, SGD/Lion momentum,
    the ``v`` of Adafactor's unfactored leaves, the states inside ``optax.chain``,
    ``inject_hyperparams``, ``MultiSteps``, ...) is zeroed where ``positions`` is True.
    Leaves whose shape differs from their param's (Adafactor's factored ``v_row``/``v_col``,
    scalar placeholders) and non-params leaves (counts, hyperparameters) are left alone.

    The params-shaped subtrees are found with ``optax.tree_utils.tree_map_params(tx, ...)``
    when ``tx`` is given and its ``init`` accepts optax's placeholder; otherwise (or if that
    fails) by walking ``opt_state`` for subtrees that have the params' tree structure as a
    prefix (so ``optax.masked`` states, with ``MaskedNode`` for unselected leaves, match).

    Args:
      opt_state: any optax state.
      positions: a mask-like tree mirroring ``params`` (``bool`` arrays, ``None`` = leave
        the leaf alone).
      params: the params (only their structure is used).
      tx: the transformation whose state this is (optional, see above).

    Returns:
      ``opt_state`` with the selected entries set to zero (dtypes kept).

    Example:
      >>> p = {"w": jnp.ones(3)}
      >>> tx = optax.sgd(0.1, momentum=0.9)
      >>> st = jax.tree.map(lambda x: x + 1, tx.init(p))
      >>> reset_opt_state(st, {"w": jnp.array([True, False, False])}, p, tx)[0].trace["w"].tolist()
      [0.0, 1.0, 1.0]
    """
    full = _full_positions(positions, params)

    def zero_tree(value):  # ``full`` first: a leaf there may face a subtree (optax.masked's MaskedNode)
        return jax.tree.map(lambda pos, v: _zero_at(v, pos), full, value)

    if tx is not None:
        try:
            return optax.tree_utils.tree_map_params(tx, zero_tree, opt_state, is_leaf=lambda _: True)
        except Exception:  # the placeholder init is unsupported by some transformation: walk instead
            pass
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(full)):  # params is a single array
        return jax.tree.map(lambda v: _zero_at(v, full), opt_state)

    def matches(node):
        if not jax.tree.leaves(node):
            return False
        try:
            jax.tree.map(lambda *_: None, full, node)
        except (ValueError, TypeError):
            return False
        return True

    return jax.tree.map(lambda n: zero_tree(n) if matches(n) else n, opt_state, is_leaf=matches)


def sparsify(
    tx: optax.GradientTransformation,
    pruner: Any,
    schedule: Schedule,
    *,
    key: Any = 0,
    ste: bool = False,
    pruner_state: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Wrap an optimizer so that it trains with pruning masks updated on a schedule.

    See the module docstring for what happens at each step. Pruned weights are exactly zero
    after every ``optax.apply_updates(params, updates)``; no other call is needed, provided
    ``sparsify`` is the last transformation (the learning rate goes inside, in ``tx``: a
    transformation after it would rescale the zeroing update). Params
    may be Linen variable dicts, NNX ``State`` or any pytree of arrays. ``update`` must be
    given the params. For pruners with a random component (``Random``, ``SET``, ``RigL``'s
    initial masks) the key in the state is split every step.

    A schedule without a target (``one_shot``, ``periodic``) takes ``pruner.sparsity``; a
    pruner with a ``with_schedule(schedule)`` method (``SET``, ``RigL``: the end of the drop
    fraction's decay) is bound to the schedule; a pruner with ``init_masks(params, key)``
    (dynamic sparse training: random initial masks) starts from those, others from dense
    masks. Apply ``get_masks(state)`` to the initial params (``apply_masks``) to start from
    sparse weights; otherwise the first update zeroes them.

    Args:
      tx: the inner optax transformation (any, including chains).
      pruner: a :class:`qjax.prune.pruners.Pruner` (``Magnitude``, ``Saliency``, ``SET``, ...).
      schedule: a :mod:`qjax.prune.schedules` schedule (``one_shot``, ``periodic``,
        ``polynomial``).
      key: PRNG key (int seed, raw or typed key) for pruners that use randomness.
      ste: keep the params dense and only maintain the masks (straight-through training,
        the forward pass applies :func:`qjax.prune.ste.apply_masks_ste`). The masks are
        computed here from the params before the update, so step ``t``'s forward reads
        masks of step ``t - 1``'s params; :mod:`qjax.prune.ste` shows how to compute them
        from the current params in the loss instead (jaxpruner's ``SteMixin``).
      pruner_state: the initial pruner state instead of ``pruner.init_state(params)``, e.g.
        ``Wanda``'s activation norms (``{path: norm}`` from
        :func:`qjax.prune.activations.activation_norms`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SparsifyState`.

    Raises:
      TypeError: ``tx``, ``pruner`` or ``schedule`` is not of the expected kind.
      ValueError: ``update`` called without ``params``.

    Example:
      >>> from qjax.prune.pruners import Magnitude
      >>> from qjax.prune.schedules import polynomial
      >>> tx = sparsify(optax.adam(1e-2), Magnitude(0.5), polynomial(0.5, 0, 10, 2))
      >>> params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
      >>> state = tx.init(params)
      >>> for _ in range(11):
      ...     updates, state = tx.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int((params["w"] == 0).sum())
      8
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(f"sparsify: `tx` must be an optax GradientTransformation, got {tx!r}")
    if not callable(getattr(pruner, "masks", None)):
        raise TypeError(f"sparsify: `pruner` must be a qjax.prune Pruner (with .masks), got {pruner!r}")
    if not (callable(schedule) and callable(getattr(schedule, "is_update", None))):
        raise TypeError(
            "sparsify: `schedule` must be a qjax.prune schedule (one_shot, periodic, polynomial), "
            f"got {schedule!r}"
        )
    if isinstance(schedule, Schedule) and schedule.target is None:
        schedule = schedule.with_target(pruner.sparsity)
    if callable(getattr(pruner, "with_schedule", None)):
        pruner = pruner.with_schedule(schedule)
    inner = optax.with_extra_args_support(tx)
    base_key = _raw_key(key)

    def init(params):
        init_key, state_key = jax.random.split(base_key)
        pstate = pruner.init_state(params) if pruner_state is None else pruner_state
        if callable(getattr(pruner, "init_masks", None)):
            masks = pruner.init_masks(params, key=init_key)
        else:
            masks = dense_masks(pruner, params, pstate)
        return SparsifyState(
            step=jnp.zeros((), jnp.int32),
            masks=_as_bool_masks(masks),
            pruner_state=pstate,
            inner_state=inner.init(params),
            key=state_key,
        )

    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "sparsify needs the params: call tx.update(grads, opt_state, params) (the masks are "
                "computed from them and pruned weights are zeroed against them)"
            )
        grads = updates
        step, old = state.step, state.masks
        next_key, mask_key = jax.random.split(state.key)
        pstate = pruner.update_state(state.pruner_state, params, grads)
        flag = schedule.is_update(step)

        def recompute(_):
            new = pruner.masks(params, schedule(step), grads=grads, state=pstate, key=mask_key, masks=old)
            return _conform(new, old)

        new = _cond(flag, recompute, lambda _: old, None)

        if ste:
            u, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
        else:
            g = jax.tree.map(
                lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype)),
                new,
                grads,
                is_leaf=_is_none,
            )
            u, inner_state = inner.update(g, state.inner_state, params, **extra_args)

            def reset(s):  # only on update steps: the comparison is a full pass over the masks
                changed = jax.tree.map(lambda a, b: None if a is None else a != b, old, new, is_leaf=_is_none)
                return reset_opt_state(s, changed, params, inner)

            inner_state = _cond(flag, reset, lambda s: s, inner_state)
            u = jax.tree.map(
                lambda a, b, x, p: x if a is None else jnp.where(a & b, x, -p.astype(x.dtype)),
                old,
                new,
                u,
                params,
                is_leaf=_is_none,
            )
        new_state = SparsifyState(
            step=optax.safe_increment(step),
            masks=new,
            pruner_state=pstate,
            inner_state=inner_state,
            key=next_key,
        )
        return u, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def get_sparsify_state(opt_state: Any) -> SparsifyState:
    """The :class:`SparsifyState` inside an optimizer state (searched through chains,
    ``MultiSteps``, ``inject_hyperparams`` and any other nesting).

    Args:
      opt_state: an optax state that contains exactly one ``SparsifyState``.

    Returns:
      That ``SparsifyState``.

    Raises:
      ValueError: none found, or more than one.

    Example:
      >>> get_sparsify_state(opt_state).step  # doctest: +SKIP
    """
    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparsifyState))
        if isinstance(x, SparsifyState)
    ]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(
            f"get_sparsify_state: the optimizer state holds {what} sparsify states; expected one"
        )
    return found[0]


def get_masks(opt_state: Any) -> Any:
    """The current masks held by the :func:`sparsify` state inside ``opt_state``.

    Args:
      opt_state: an optax state containing one ``SparsifyState`` (directly or nested).

    Returns:
      The mask tree (``bool`` arrays mirroring params, ``None`` for skipped leaves).

    Raises:
      ValueError: the state holds no (or several) sparsify states.

    Example:
      >>> masks = get_masks(opt_state)  # doctest: +SKIP
      >>> params = apply_masks(params, masks)  # doctest: +SKIP
    """
    return get_sparsify_state(opt_state).masks
