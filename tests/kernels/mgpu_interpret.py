"""Running the Mosaic GPU (``wgmma``) kernel in JAX's GPU interpreter on a CPU.

Two gaps in JAX's interpreter, closed by :func:`transposed_wgmma_operands` for the duration
of a block (every other ``wgmma`` call goes to JAX's own callback unchanged):

* jax 0.10's cannot read a ``wgmma`` operand through a transposed ref view (its callback
  turns every transform into an index range and fails on ``TransposeTransform``), and the
  kernels always read one operand through one (an ``(N, K)`` tile viewed as ``(K, N)``);
  jax 0.11's reads it natively. The patch applies a trailing transpose to the operand read.
* neither takes a register (array) left operand: its callback reads every operand from a
  buffer, and the weight-only kernel (:mod:`qjax.kernels.gpu_wgmma_weight_only`) passes the
  weight tile unpacked in registers. The patch multiplies such a value directly.

After a failed interpreted kernel the interpreter's state must be reset (JAX's note on
``InterpretGPUParams``); :func:`interpret_params` returns fresh parameters after resetting it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import inspect

import jax
import numpy as np
from jax._src.pallas.mosaic.interpret import utils as interpret_utils
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks as gc
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax._src.state.types import TransposeTransform

# jax 0.11's interpreter reads operands through transposed views itself (its callbacks take
# a ``mesh_location``); only jax 0.10's needs the patch below
NATIVE_TRANSPOSE = "mesh_location" in inspect.signature(gc.wgmma).parameters


def interpret_params() -> InterpretGPUParams:
    gc.reset_gpu_interpret_mode_state()
    return InterpretGPUParams()


def _trailing_transpose(transforms):
    """``(index transforms, permutation or None)``; a transpose is accepted only last."""
    transforms = jax.tree.map(int, gc._remove_noop_transforms(tuple(transforms)))
    if transforms and isinstance(transforms[-1], TransposeTransform):
        head, perm = transforms[:-1], transforms[-1].permutation
    else:
        head, perm = transforms, None
    if any(isinstance(t, TransposeTransform) for t in head):
        raise NotImplementedError("the test shim handles one transpose, applied last")
    return head, perm


def _is_register_operand(a) -> bool:
    """A ``wgmma`` left operand passed as a value (a float matrix), not a buffer key."""
    return np.ndim(a) == 2 and np.asarray(a).dtype.kind not in "iu"


def _register_wgmma_011(kw):
    """jax 0.11: ``acc += a @ b`` with ``a`` a register value (buffers read natively)."""
    from jax._src.pallas.mosaic_gpu.interpret import shared_memory as memory

    shared, thread = gc._get_shared_memory(), kw["thread"]
    info = memory.GPULoggingInfo(kw["mesh_location"], thread, kw.get("source_info"))

    def access(name):
        key = gc.HostAllocationKey.from_array(kw[f"{name}_allocation_key_as_array"])
        return key, shared.access(
            key, jax.tree.map(int, gc._remove_noop_transforms(kw[f"{name}_transforms"]))
        )

    b_key, b_access = access("b")
    b = shared.get_buffer_content(b_key, b_access, thread, logging_info=info)[0]
    acc_key, acc_access = access("acc")
    acc = shared.get_buffer_content(acc_key, acc_access, thread, logging_info=info)[0]
    a = np.asarray(kw["a_allocation_key_as_array"])
    shared.store_buffer_content(
        acc_key, acc_access, acc + np.matmul(a, b, dtype=acc.dtype), thread, logging_info=info
    )
    return kw["token"]


def _read(shared, key_array, transforms, thread, info):
    head, perm = _trailing_transpose(transforms)
    key = gc.HostAllocationKey.from_array(key_array)
    value, _, _ = shared.get_buffer_content(key, interpret_utils.to_range(head), thread, logging_info=info)
    assert value is not None
    return value if perm is None else np.transpose(value, perm)


@contextlib.contextmanager
def transposed_wgmma_operands(watchdog_s: float = 300.0):
    """Within the block, interpreted ``wgmma`` reads operands through trailing transposes.

    An exception inside an interpreted kernel leaves the interpreter's other threads waiting
    on barriers forever, so the block also arms a watchdog: past ``watchdog_s`` seconds the
    process prints every thread's traceback and exits (a failed test, not a stalled suite).
    """
    faulthandler.dump_traceback_later(watchdog_s, exit=True)
    original = gc.wgmma

    def wgmma(**kw):
        register_a = _is_register_operand(kw["a_allocation_key_as_array"])
        if NATIVE_TRANSPOSE:
            return _register_wgmma_011(kw) if register_a else original(**kw)
        if not register_a and all(_trailing_transpose(kw[f"{x}_transforms"])[1] is None for x in ("a", "b")):
            return original(**kw)
        device_id, thread_id = int(kw["device_id"]), int(kw["thread_id"])
        shared = gc._get_shared_memory()
        thread = shared.get_global_thread_id(device_id, thread_id)
        info = interpret_utils.GPULoggingInfo(
            device_id=device_id,
            grid_point_coords=tuple(int(x) for x in kw["grid_point_coords"]),
            thread_id=thread_id,
            source_info=kw.get("source_info"),
        )
        if register_a:
            a = np.asarray(kw["a_allocation_key_as_array"])
        else:
            a = _read(shared, kw["a_allocation_key_as_array"], kw["a_transforms"], thread, info)
        b = _read(shared, kw["b_allocation_key_as_array"], kw["b_transforms"], thread, info)
        acc_key = gc.HostAllocationKey.from_array(kw["acc_allocation_key_as_array"])
        acc_range = interpret_utils.to_range(_trailing_transpose(kw["acc_transforms"])[0])
        acc, _, _ = shared.get_buffer_content(acc_key, acc_range, thread, logging_info=info)
        res = acc + np.matmul(a, b, dtype=kw["acc_dtype"])
        shared.store_buffer_content(acc_key, acc_range, res, thread, logging_info=info)
        return kw["token"]

    gc.wgmma = wgmma
    try:
        yield
    finally:
        gc.wgmma = original
        faulthandler.cancel_dump_traceback_later()
