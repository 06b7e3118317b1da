"""Two local processes (gloo CPU collectives on 127.0.0.1, 4 devices each) form one 8-device
mesh and train the same as one process; process-0 coordination of a sharded checkpoint."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qjax import parallel as qp

from .common import two_process_run

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    env = dict(os.environ)  # the worker sets its own device count
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "multihost", str(port), str(i), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("two-process run timed out")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    assert "qjax-log from process 0" in logs[0] and "qjax-log" not in logs[1]  # process-0-only logging
    got = np.load(tmp_path / "result.npz")
    state, losses, _ = two_process_run(global_batch=False)
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-6)
    for k, v in jax.tree_util.tree_leaves_with_path(state.params):
        np.testing.assert_allclose(got[jax.tree_util.keystr(k)], v, rtol=1e-6, atol=1e-7)
    # the checkpoint both processes wrote (each its shards, process 0 committing) restores here,
    # onto one device, with the two-process values
    one = NamedSharding(qp.make_mesh(1, 1, 1, devices=jax.devices()[:1]), P())
    with qp.TrainCheckpointer(tmp_path / "ckpt", every=1) as ckpt:
        assert ckpt.all_steps() == [3]
        restored = ckpt.restore(state, jax.tree.map(lambda _: one, state))
    for k, v in jax.tree_util.tree_leaves_with_path(restored.params):
        np.testing.assert_array_equal(got[jax.tree_util.keystr(k)], v)
    assert int(restored.step) == 3


def test_initialize_single_process_and_late_call():
    # no cluster, no coordinator, backend already running (this process): stays single process
    info = qp.initialize()
    assert (info.process_index, info.process_count, info.global_devices) == (0, 1, 8)
    assert qp.is_main_process()
    with pytest.raises(ValueError, match="call it before any JAX device operation"):
        qp.initialize("127.0.0.1:1", num_processes=2, process_id=0)
    mesh = qp.make_mesh(data=8)
    assert qp.process_rows(16, qp.batch_sharding(mesh, 2)) == slice(0, 16)
