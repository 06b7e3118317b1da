"""Preemption-safe training: checkpoint the whole train state every N steps with Orbax's
``CheckpointManager`` and resume from the latest complete checkpoint on restart.

The state (params, ``QArray``s, masks, optimizer state, step, raw or typed PRNG keys: any
pytree of arrays) is stored as a flat dict of its arrays, sharded (every process writes its shards),
beside a JSON list of leaf paths, shapes and dtypes that a restore checks against its
target. Orbax writes a checkpoint into a temporary directory and renames (or commits) it
only when every array is written, and ``latest_step`` only sees finished ones: a run killed
while writing leaves the previous checkpoint as the latest. Saves are asynchronous where
available (the device-to-host copy happens before :meth:`TrainCheckpointer.save` returns,
so donating the state to the next step is safe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding

from qjax._storage import cast, check_storable, checkpoint_path, stored_dtype
from qjax.rules import path_str

_STATE, _META = "state", "meta"


def _flat(state: Any) -> tuple[list[str], list[Any]]:
    pairs = jax.tree_util.tree_flatten_with_path(state)[0]
    paths = [path_str(kp) for kp, _ in pairs]
    return paths, [_array(p, x) for p, x in zip(paths, (x for _, x in pairs))]


def _array(path: str, x: Any) -> Any:
    """An array leaf (or ``ShapeDtypeStruct``) as it is; a Python number (e.g. the ``step=0``
    of a fresh Flax ``TrainState``) as the 0-d array JAX makes of it (what a jitted step
    returns in its place), so it is saved, and restored, as an array."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    if isinstance(x, (bool, int, float, complex)):
        return jnp.asarray(x)
    raise TypeError(
        f"TrainCheckpointer: leaf {path!r} is a {type(x).__name__}: only arrays, PRNG key arrays "
        "and Python numbers can be checkpointed"
    )


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _describe(paths: list[str], leaves: list[Any]) -> list[dict[str, Any]]:
    """Path, shape and dtype of every leaf (a typed PRNG key: ``key<impl>``), as saved and
    compared against a restore's target."""
    return [
        {
            "path": p,
            "shape": [int(d) for d in np.shape(x)],
            "dtype": str(x.dtype) if _is_key(x) else np.dtype(x.dtype).name,
        }
        for p, x in zip(paths, leaves)
    ]


def _stored(x: Any) -> Any:
    """What is written for a leaf: a typed PRNG key's raw key data, else the array (bitcast
    to its stored dtype, see :mod:`qjax._storage`)."""
    return jax.random.key_data(x) if _is_key(x) else cast(x, stored_dtype(x.dtype))


def _unstored(data: Any, like: Any, impl: str | None) -> Any:
    """The leaf like ``like`` from the array read back (the inverse of :func:`_stored`)."""
    return jax.random.wrap_key_data(data, impl=impl) if impl is not None else cast(data, like.dtype)


class TrainCheckpointer:
    """Periodic, atomic, optionally asynchronous checkpoints of a train state.

    Args:
      directory: where the step directories go (created if needed).
      every: save every ``every`` steps (:meth:`save` with other steps does nothing
        unless forced).
      keep: how many recent checkpoints to keep (``None``: all).
      async_save: write in a background thread. :meth:`close` (or leaving the ``with``
        block) waits for the last write: a process that exits without it can lose that
        checkpoint (Orbax reports a failed commit at interpreter shutdown).

    Leaves are arrays, typed or raw PRNG key arrays and Python numbers (a fresh Flax
    ``TrainState``'s ``step``: saved as a 0-d array and restored as one).

    Example:
      >>> with TrainCheckpointer("/ckpt", every=100) as ckpt:
      ...     if ckpt.latest_step() is not None:
      ...         state = ckpt.restore(state, shardings)
      ...     for step in range(int(state.step), num_steps):
      ...         state = train(state)
      ...         ckpt.save(step + 1, state)
    """

    def __init__(self, directory: Any, *, every: int, keep: int | None = 2, async_save: bool = True):
        if every < 1:
            raise ValueError(f"TrainCheckpointer: every={every} must be >= 1")
        self.directory = checkpoint_path(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_STATE, _META))

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint, or ``None``."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint."""
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` if it is a multiple of ``every`` (or ``force``); Orbax
        also saves the first step it sees in an empty directory, whatever its number.

        The per-leaf work (dtype checks, metadata) is done only on steps that save: Orbax's own
        decision (``every``, a preemption sync point, an existing later step) is asked first,
        so a leaf that cannot be stored is reported at the first step that saves.

        Returns:
          Whether a save was started.
        """
        if not force and not self.manager.should_save(step):
            return False
        paths, leaves = _flat(state)
        for p, x in zip(paths, leaves):
            if not _is_key(x):
                check_storable(p, x.dtype)
        arrays = {f"{i:06d}": _stored(x) for i, x in enumerate(leaves)}
        impls = {f"{i:06d}": str(jax.random.key_impl(x)) for i, x in enumerate(leaves) if _is_key(x)}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(arrays),
                _META: ocp.args.JsonSave({"leaves": _describe(paths, leaves), "key_impls": impls}),
            }
        )
        # The decision is taken above (once: asking twice would query the preemption sync point twice).
        return bool(self.manager.save(step, args=args, force=True))

    def restore(self, target: Any, shardings: Any = None, *, step: int | None = None) -> Any:
        """Restore a checkpoint into ``target``'s structure.

        Args:
          target: a state (or its ``jax.eval_shape``) of the saved structure.
          shardings: a ``NamedSharding`` tree like ``target`` (e.g. from
            :func:`qjax.parallel.train_state_shardings`, possibly for another mesh shape);
            default: ``target``'s own shardings.
          step: the step to restore (default: the latest complete one).

        Returns:
          The restored state (bit-identical arrays), placed by ``shardings``.

        Raises:
          FileNotFoundError: no complete checkpoint.
          ValueError: ``target`` does not match the checkpoint (names the first differing leaf).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        paths, leaves = _flat(target)
        meta = self.manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        saved, want = meta["leaves"], _describe(paths, leaves)
        for i in range(max(len(saved), len(want))):
            a = saved[i] if i < len(saved) else None
            b = want[i] if i < len(want) else None
            if a != b:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} does not match the target: "
                    f"leaf {i} is {a} in the checkpoint and {b} in the target"
                )
        if shardings is None:
            flat_sh = [getattr(x, "sharding", None) for x in leaves]
        else:
            flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
            if len(flat_sh) != len(leaves):
                raise ValueError(f"restore: shardings hold {len(flat_sh)} shardings for {len(leaves)} arrays")
        abstract = {}
        for i, (x, sh) in enumerate(zip(leaves, flat_sh)):
            data = jax.eval_shape(_stored, x)  # a key's data has a trailing axis: replicated
            abstract[f"{i:06d}"] = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sh)
        out = self.manager.restore(
            step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
        )
        arrays, impls = out[_STATE], meta.get("key_impls", {})
        restored = [
            _unstored(arrays[k], x, impls.get(k)) for k, x in ((f"{i:06d}", x) for i, x in enumerate(leaves))
        ]
        return jax.tree.unflatten(jax.tree.structure(target), restored)

    def wait(self) -> None:
        """Block until pending asynchronous saves are finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_loop(
    step_fn: Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    batch_fn: Callable[[int], Any],
    *,
    num_steps: int,
    checkpointer: TrainCheckpointer | None = None,
    state_shardings: Any = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> Any:
    """Run ``step_fn`` up to ``num_steps``, checkpointing and resuming.

    On entry, if the checkpointer holds a complete checkpoint, the state is restored from
    the latest one (into ``state``'s structure, placed by ``state_shardings`` or
    ``state``'s shardings) and training continues from its step; then every
    ``checkpointer.every`` steps and at the end the state is saved. For a restarted run to
    end bit-identical to an uninterrupted one, ``batch_fn(step)`` must return the same batch
    for the same step (e.g. derived from the step number), and the state must carry all
    randomness (:class:`qjax.parallel.TrainState` holds its PRNG key).

    Args:
      step_fn: ``step_fn(state, batch) -> (state, metrics)`` (e.g. a
        :class:`qjax.parallel.ShardedStep`); it may donate ``state``.
      state: the initial state (used when there is no checkpoint, and as the restore target).
      batch_fn: ``batch_fn(step) -> batch`` for the step about to run (0-based).
      num_steps: total steps of the run.
      checkpointer: a :class:`TrainCheckpointer` (``None``: no checkpoints).
      state_shardings: shardings to restore into (default: ``state``'s).
      on_step: ``on_step(step, metrics)`` after every step (``step`` counts from 1); gate
        logging with :func:`qjax.parallel.multihost.is_main_process`.

    Returns:
      The state after ``num_steps`` steps (all saves finished).

    Example:
      >>> ckpt = TrainCheckpointer("/ckpt/run1", every=50)
      >>> state = train_loop(step, state, lambda s: make_batch(s), num_steps=1000, checkpointer=ckpt)
    """
    start = int(np.asarray(jax.device_get(state.step))) if hasattr(state, "step") else 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        step = checkpointer.latest_step()
        state = checkpointer.restore(state, state_shardings, step=step)
        start = step
    for s in range(start, num_steps):
        state, metrics = step_fn(state, batch_fn(s))
        if on_step is not None:
            on_step(s + 1, metrics)
        if checkpointer is not None:
            checkpointer.save(s + 1, state, force=(s + 1 == num_steps))
    if checkpointer is not None:
        checkpointer.wait()
    return state
