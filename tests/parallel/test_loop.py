"""Preemption: a run SIGKILLed mid-way, then killed while writing a checkpoint, then
restarted, ends bit-identical to an uninterrupted run; a half-written checkpoint is never
picked up."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from qjax import parallel as qp

from .common import preemptible_run

WORKER = os.path.join(os.path.dirname(__file__), "worker.py")
STEPS, EVERY = 12, 3


def _start(ckpt, out, *options):
    env = dict(os.environ)  # the worker sets its own device count
    # the three runs compile the same programs: share them through a persistent cache
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(ckpt.parent / "xla_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    return subprocess.Popen(
        [sys.executable, WORKER, "train", str(ckpt), str(out), str(STEPS), str(EVERY), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _finish(p, timeout=120):
    try:
        return p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("worker timed out")


def test_killed_and_restarted_run_is_bit_identical(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "final.npz"
    # 1. SIGKILL from outside, mid-way: the worker holds at step 5 until step 3's background
    #    save is committed (however loaded the machine), then it is killed there
    p = _start(ckpt, out, "--hold-at", "5")
    log = []
    for line in p.stdout:
        log.append(line)
        if line.strip() == "step 5":
            break
    deadline = time.monotonic() + 120
    while "3" not in os.listdir(ckpt) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    _finish(p)
    assert p.returncode == -signal.SIGKILL, "".join(log)
    assert not out.exists()
    with qp.TrainCheckpointer(ckpt, every=EVERY) as c:
        first = c.latest_step()
    assert first == 3, "".join(log)
    # 2. restart; the process kills itself while committing step 9 (its arrays written):
    #    the previous checkpoint stays the latest
    p = _start(ckpt, out, "--kill-in-save", "9")
    log = _finish(p)
    assert "start 3" in log and p.returncode == -signal.SIGKILL, log[-3000:]
    names = os.listdir(ckpt)
    assert any(n.startswith("9.") and "tmp" in n for n in names), names  # the half-written one
    with qp.TrainCheckpointer(ckpt, every=EVERY) as c:
        assert c.latest_step() == 6 and 9 not in c.all_steps()
    # 3. restart again: resumes from 6, finishes
    p = _start(ckpt, out)
    log = _finish(p)
    assert p.returncode == 0 and "start 6" in log, log[-3000:]
    got = np.load(out)
    # the uninterrupted run of the same length, in this process (same program, same devices)
    step, state, batch_fn, _ = preemptible_run()
    state = qp.train_loop(step, state, batch_fn, num_steps=STEPS)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    assert len(got.files) == len(leaves)
    for k, v in leaves:
        np.testing.assert_array_equal(
            got[jax.tree_util.keystr(k)], np.asarray(v), err_msg=jax.tree_util.keystr(k)
        )
