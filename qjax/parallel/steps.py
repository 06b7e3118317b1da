"""Sharded train and eval steps: one ``jax.jit`` with in/out shardings and donated state.

:func:`train_step` is the core: ``loss_fn(params, batch, key, *extra)`` is differentiated,
the gradients are pinned to the params' shardings, the optax update runs, and the new
params and optimizer state are pinned to theirs (in Auto mode they drift otherwise). The
builders for quantization-aware training (:func:`qat_step`), int8 training
(:func:`int8_step`, optionally with per-shard local scales), pruning (:func:`prune_step`,
a :func:`qjax.prune.sparsify` optimizer) and distillation (:func:`distill_train_step`) only
make the loss. :func:`eval_step` serves quantized params with :func:`qjax.quantized`.

LSQ (``ste="lsq"`` weight specs): train ``qjax.lsq_params(params, policy)`` (params and
learned scales in one :class:`qjax.LSQParams`) as the params, in
:func:`train_state_shardings` and :func:`init_train_state` too (for
:func:`distill_train_step`, as the ``"student"`` entry); the scales are sharded like their
weights, trained by the same optimizer and never pruned. Export the trained tree with
``qjax.quantize_params(state.params, policy)``.

A batch is a mapping with ``"x"`` (the model input, or a tuple of inputs) and whatever
the objective reads (``"y"``); every array is split on its leading axis over
``("data", "fsdp")`` unless other shardings are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qjax.parallel.mesh import BATCH_AXES, is_explicit
from qjax.parallel.shardings import pin, place, shardings, state_shardings
from qjax.quant.act_delayed import ActHistory
from qjax.quant.policy import Policy
from qjax.quant.serve import quantized


class TrainState(NamedTuple):
    """What a training run holds: params, optimizer state, step count and a raw PRNG key
    (``uint32[2]``, split every step)."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def _raw_key(key: Any) -> np.ndarray:
    if isinstance(key, int):
        return np.asarray(jax.random.key_data(jax.random.key(key)))
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32)


def _mesh_of(tree: Any) -> Mesh:
    for s in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, NamedSharding)):
        if isinstance(s, NamedSharding):
            return s.mesh
    raise ValueError("no NamedSharding found: build the shardings with qjax.parallel.shardings")


def train_state_shardings(
    params: Any, tx: optax.GradientTransformation, rules: Any, mesh: Mesh, *, logical_axis_rules=None
) -> TrainState:
    """Shardings of a :class:`TrainState`: params by ``rules``, optimizer state like the
    params it mirrors (``sparsify`` masks included), step and key replicated.

    Args:
      params: the params (or ``jax.eval_shape`` of them).
      tx: the optax optimizer (its state's structure is read with ``jax.eval_shape``).
      rules: partition rules (e.g. a :mod:`qjax.parallel.presets` preset).
      mesh: the mesh.
      logical_axis_rules: Flax logical-axis rules for annotated params.

    Returns:
      A :class:`TrainState` of ``NamedSharding`` trees.

    Raises:
      ValueError: a rule does not fit a leaf (names the path and the rule).

    Example:
      >>> sh = train_state_shardings(params, tx, presets.hybrid(), make_mesh(data=2, fsdp=2, tensor=2))
    """
    ps = shardings(params, rules, mesh, logical_axis_rules=logical_axis_rules)
    opt = state_shardings(jax.eval_shape(tx.init, params), params, ps, mesh)
    rep = NamedSharding(mesh, P())
    return TrainState(ps, opt, rep, rep)


def init_train_state(
    params: Any, tx: optax.GradientTransformation, state_shardings: TrainState, *, key: Any = 0
) -> TrainState:
    """Place ``params`` and build the optimizer state directly in its shardings.

    Args:
      params: params (host or device arrays; every process passes the same values).
      tx: the optax optimizer.
      state_shardings: from :func:`train_state_shardings`.
      key: an int seed, a typed or raw PRNG key (the step's randomness: stochastic
        rounding, dropout).

    Returns:
      A sharded :class:`TrainState` at step 0.
    """
    rep = state_shardings.key
    params = place(params, state_shardings.params)
    key = place(_raw_key(key), rep)

    def init(p, k):
        return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32), k)

    mesh = _mesh_of(state_shardings)
    with jax.set_mesh(mesh):
        return jax.jit(init, in_shardings=(state_shardings.params, rep), out_shardings=state_shardings)(
            params, key
        )


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """A jitted sharded function that runs under its mesh (``jax.set_mesh``).

    Attributes:
      jitted: the ``jax.jit`` function.
      mesh: its mesh.
      arg_names: the names of its positional arguments, when fixed: a call with another
        number of them raises a ``TypeError`` naming them (``None``: not checked).
    """

    jitted: Any
    mesh: Mesh
    arg_names: tuple[str, ...] | None = None

    def __call__(self, *args):
        if self.arg_names is not None and len(args) != len(self.arg_names):
            raise TypeError(
                f"this step takes {len(self.arg_names)} arguments, step({', '.join(self.arg_names)}); "
                f"got {len(args)}"
            )
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        """``jitted.lower(*args)`` under the mesh."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)

    def compile(self, *args):
        """The compiled executable for these arguments (callable like the step; its
        ``as_text()`` is the partitioned HLO)."""
        return self.lower(*args).compile()

    def hlo(self, *args) -> str:
        """The compiled (partitioned) HLO text, e.g. for :func:`qjax.parallel.hlo.collectives`."""
        return self.compile(*args).as_text()


def _split(out: Any) -> tuple[jax.Array, dict]:
    value, metrics = out if isinstance(out, tuple) else (out, {})
    return value, dict(metrics)


def _value_and_grad(loss_fn: Callable, params, batch, key, extra):
    def loss(p):
        value, metrics = _split(loss_fn(p, batch, key, *extra))
        return value, {"loss": value, **metrics}

    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return metrics, grads


def _local_value_and_grad(loss_fn: Callable, mesh: Mesh, axes: tuple[str, ...], batch_specs: Any):
    """Per-shard loss and gradients (everything, scales included, computed from the local
    batch), averaged over the batch axes: the only collective is the mean of the results."""

    def per_shard(params, batch, key, extra):
        idx = lax.axis_index(axes)
        metrics, grads = _value_and_grad(loss_fn, params, batch, jax.random.fold_in(key, idx), extra)
        # delayed-scaling histories are already the same on every shard (reduced with
        # pmin / pmax): a mean could move them by a rounding; take them as they are
        agreed = lambda m: isinstance(m, ActHistory)
        metrics = jax.tree.map(
            lambda m: lax.pmax(m, axes) if agreed(m) else lax.pmean(m, axes), metrics, is_leaf=agreed
        )
        return metrics, lax.pmean(grads, axes)

    def run(params, batch, key, extra):
        context = jax.sharding.get_abstract_mesh()  # under auto_axes: the mesh with Auto axes
        f = jax.shard_map(
            per_shard,
            mesh=mesh if context.empty else context,
            in_specs=(P(), batch_specs, P(), P()),
            out_specs=P(),
            axis_names=set(axes),
            check_vma=False,
        )
        return f(params, batch, key, extra)

    return run


def local_axes(mesh: Mesh, local_batch_axes: Sequence[str] | None) -> tuple[str, ...] | None:
    """The mesh axes :func:`train_step` runs the loss per shard of (inside a ``shard_map``):
    ``local_batch_axes`` when one of them splits the mesh, else ``None`` (one global loss)."""
    if local_batch_axes is not None and any(mesh.shape[a] > 1 for a in local_batch_axes):
        return tuple(local_batch_axes)
    return None


def _batch_split(mesh: Mesh, aval) -> NamedSharding:
    """An output split on its leading axis like the batch, or replicated where it has no
    leading axis the batch axes divide (a scalar aux loss, a per-class table)."""
    n = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    splits = len(aval.shape) >= 1 and aval.shape[0] % n == 0
    return NamedSharding(mesh, P(BATCH_AXES) if splits else P())


def train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    state_shardings: TrainState,
    batch_shardings: Any,
    *,
    extra_shardings: Sequence[Any] = (),
    extra_names: Sequence[str] | None = None,
    donate: bool = True,
    local_batch_axes: Sequence[str] | None = None,
) -> ShardedStep:
    """One sharded training step.

    Args:
      loss_fn: ``loss_fn(params, batch, key, *extra) -> loss`` or ``(loss, metrics_dict)``;
        ``key`` is a fresh raw PRNG key every step.
      tx: the optax optimizer.
      state_shardings: from :func:`train_state_shardings`.
      batch_shardings: shardings of the batch (a prefix tree), e.g.
        ``qjax.parallel.batch_shardings(mesh, batch)``.
      extra_shardings: shardings of extra (not trained, not donated) arguments, e.g. the
        teacher params.
      extra_names: their names, for the error a call with a missing argument raises
        (default ``extra0``, ``extra1``, ...).
      donate: donate the state (its buffers are reused for the new state).
      local_batch_axes: compute loss and gradients per shard of these mesh axes inside
        ``jax.shard_map`` and average them (per-shard quantization scales; params must be
        replicated along these axes or are gathered); ``None``, or axes of size 1 only
        (one shard: the same thing): one global computation.

    Returns:
      A :class:`ShardedStep` ``step(state, batch, *extra) -> (state, metrics)``; metrics
      (``"loss"`` and the loss function's) are replicated.

    Example:
      >>> step = train_step(lambda p, b, k: xent(apply(p, b["x"]), b["y"]), tx, sh, batch_shardings(mesh, b))
      >>> state, metrics = step(state, batch)
    """
    mesh = _mesh_of(state_shardings)
    rep = NamedSharding(mesh, P())
    explicit = is_explicit(mesh)
    grad_specs = state_shardings.params
    local = None
    axes = local_axes(mesh, local_batch_axes)
    if axes is not None:
        specs = jax.tree.map(
            lambda s: s.spec, batch_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
        )
        local = _local_value_and_grad(loss_fn, mesh, axes, specs)

    def step(state: TrainState, batch, *extra):
        key, sub = jax.random.split(state.key)
        if local is None and explicit:
            # Explicit axes: model code rarely names the output sharding of every matmul, so
            # the loss and gradients are computed with the axes Auto and come back pinned.
            vg = jax.sharding.auto_axes(
                lambda *a: _value_and_grad(loss_fn, *a), out_sharding=(rep, grad_specs)
            )
            metrics, grads = vg(state.params, batch, sub, extra)
        elif local is None:
            metrics, grads = _value_and_grad(loss_fn, state.params, batch, sub, extra)
        elif explicit:  # the axes not made manual (e.g. tensor) must be Auto in the body too
            vg = jax.sharding.auto_axes(local, out_sharding=(rep, grad_specs))
            metrics, grads = vg(state.params, batch, sub, extra)
        else:
            metrics, grads = local(state.params, batch, sub, extra)
        grads = pin(grads, state_shardings.params, mesh)
        update = tx.update
        if explicit:  # optimizers (e.g. sparsify's global top-k) are not written for explicit types
            update = jax.sharding.auto_axes(update, out_sharding=(grad_specs, state_shardings.opt_state))
        updates, opt_state = update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(
            pin(params, state_shardings.params, mesh),
            pin(opt_state, state_shardings.opt_state, mesh),
            state.step + 1,
            key,
        )
        return new, metrics

    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, *extra_shardings),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,) if donate else (),
    )
    names = (
        tuple(extra_names)
        if extra_names is not None
        else tuple(f"extra{i}" for i in range(len(extra_shardings)))
    )
    return ShardedStep(jitted, mesh, ("state", "batch", *names))


def eval_step(
    apply_fn: Callable,
    policy: Policy | None,
    param_shardings: Any,
    batch_shardings: Any,
    *,
    out_shardings: Any = None,
) -> ShardedStep:
    """Sharded evaluation: ``quantized(apply_fn, policy)(params, *inputs)`` (``apply_fn``
    itself when ``policy`` is ``None``) with the params and inputs in their shardings.

    Args:
      apply_fn: ``apply_fn(params, *inputs)``.
      policy: the :class:`qjax.Policy` for integer execution of ``QArray`` params.
      param_shardings: ``shardings(qparams, rules, mesh)`` (``QArray`` scales derived).
      batch_shardings: shardings of the inputs tuple (a prefix).
      out_shardings: shardings of the output (default: chosen by the compiler; on an
        Explicit-axes mesh, each output leaf split on its leading axis like the batch, or
        replicated when it has none that the batch axes divide, e.g. a scalar).

    Returns:
      ``step(params, *inputs) -> outputs``.

    Example:
      >>> ev = eval_step(model.apply, policy, shardings(qparams, presets.hybrid(), mesh), batch_sh)
      >>> logits = ev(qparams, x)
    """
    f = apply_fn if policy is None else quantized(apply_fn, policy)
    mesh = _mesh_of(param_shardings)
    explicit = is_explicit(mesh)

    def run(params, *inputs):
        if not explicit:
            return f(params, *inputs)
        # Explicit axes: run the model with the axes Auto (model code rarely names every
        # matmul's output sharding); outputs come back split like the batch unless given.
        out = out_shardings
        if out is None:
            shapes = jax.eval_shape(jax.sharding.auto_axes(f, out_sharding=P()), params, *inputs)
            out = jax.tree.map(lambda a: _batch_split(mesh, a), shapes)
        return jax.sharding.auto_axes(f, out_sharding=out)(params, *inputs)

    in_sh = (
        param_shardings,
        *(batch_shardings if isinstance(batch_shardings, tuple) else (batch_shardings,)),
    )
    return ShardedStep(jax.jit(run, in_shardings=in_sh, out_shardings=out_shardings), mesh)
