"""Sharded execution: device meshes, partition rules and presets, shardings for params,
``QArray``s, masks and optimizer state, sharded train/eval steps, sharded calibration,
multi-host start-up and preemption-safe training loops.

Example:
  >>> from qjax import parallel as qp
  >>> mesh = qp.make_mesh(data=2, fsdp=2, tensor=2)
  >>> sh = qp.train_state_shardings(params, tx, qp.presets.hybrid(), mesh)
  >>> state = qp.init_train_state(params, tx, sh)
  >>> objective = lambda logits, b: xent(logits, b["y"])  # objective(outputs, batch)
  >>> step = qp.qat_step(model.apply, policy, objective, tx, sh, qp.batch_shardings(mesh, batch))
  >>> state, metrics = step(state, batch)
"""

from qjax.parallel import hlo, multihost, presets
from qjax.parallel.calibration import calibrate, input_hessians, shard_batches
from qjax.parallel.loop import TrainCheckpointer, train_loop
from qjax.parallel.mesh import (
    AXES,
    BATCH_AXES,
    batch_sharding,
    batch_shardings,
    batch_spec,
    is_explicit,
    make_mesh,
)
from qjax.parallel.multihost import global_batch, initialize, is_main_process, process_rows
from qjax.parallel.rules import PartitionRules, logical_to_spec
from qjax.parallel.shardings import (
    partition_specs,
    pin,
    place,
    replicated,
    shard_shapes,
    shardings,
    state_shardings,
)
from qjax.parallel.steps import (
    ShardedStep,
    TrainState,
    eval_step,
    init_train_state,
    train_state_shardings,
    train_step,
)
from qjax.parallel.variants import distill_train_step, int8_step, prune_step, qat_step

__all__ = [
    "AXES",
    "BATCH_AXES",
    "PartitionRules",
    "ShardedStep",
    "TrainCheckpointer",
    "TrainState",
    "batch_sharding",
    "batch_shardings",
    "batch_spec",
    "calibrate",
    "distill_train_step",
    "eval_step",
    "global_batch",
    "hlo",
    "init_train_state",
    "initialize",
    "input_hessians",
    "int8_step",
    "is_explicit",
    "is_main_process",
    "logical_to_spec",
    "make_mesh",
    "multihost",
    "partition_specs",
    "pin",
    "place",
    "presets",
    "process_rows",
    "prune_step",
    "qat_step",
    "replicated",
    "shard_batches",
    "shard_shapes",
    "shardings",
    "state_shardings",
    "train_loop",
    "train_state_shardings",
    "train_step",
]
