"""Subprocess worker of the preemption and multi-process tests (not a test module).

python worker.py train CKPT_DIR OUT_NPZ NUM_STEPS EVERY [--sleep S] [--hold-at STEP] [--kill-in-save STEP]
python worker.py multihost PORT PROCESS_ID OUT_DIR
"""

import os
import signal
import sys

MODE = sys.argv[1]
# the caller's XLA flags (the test suite's compile options) with this worker's device count
_FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(
    [*_FLAGS, f"--xla_force_host_platform_device_count={8 if MODE == 'train' else 4}"]
)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from qjax import parallel as qp  # noqa: E402


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def train(ckpt_dir, out, num_steps, every, *options):
    from common import preemptible_run
    from orbax.checkpoint._src.path import atomicity

    opts = dict(zip(options[::2], options[1::2]))
    sleep = float(opts.get("--sleep", 0))
    hold = int(opts.get("--hold-at", -1))  # stop at this step (until killed) so a test can kill it there
    kill_step = opts.get("--kill-in-save")
    if kill_step is not None:
        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == kill_step:  # arrays written, not yet committed
                os.kill(os.getpid(), signal.SIGKILL)
            return await original(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    step, state, batch_fn, sh = preemptible_run()

    def on_step(s, metrics):
        print(f"step {s}", flush=True)
        time.sleep(600 if s == hold else sleep)

    with qp.TrainCheckpointer(ckpt_dir, every=int(every), keep=3) as ckpt:
        print(f"start {ckpt.latest_step()}", flush=True)
        state = qp.train_loop(
            step,
            state,
            batch_fn,
            num_steps=int(num_steps),
            checkpointer=ckpt,
            state_shardings=sh,
            on_step=on_step,
        )
    np.savez(out, **flat(state))
    print("done", flush=True)


def multihost(port, pid, out_dir):
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
    logging.getLogger("qjax.parallel").setLevel(logging.INFO)
    info = qp.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
    qp.multihost.log("qjax-log from process %d", info.process_index)
    assert (info.process_count, info.global_devices, info.local_devices) == (2, 8, 4), info
    from common import two_process_run

    state, losses, _ = two_process_run(global_batch=True)
    with qp.TrainCheckpointer(os.path.join(out_dir, "ckpt"), every=1, async_save=False) as ckpt:
        ckpt.save(int(state.step), state, force=True)
    params = qp.multihost.to_host(state.params)
    if qp.multihost.is_main_process():
        np.savez(os.path.join(out_dir, "result.npz"), losses=np.asarray(losses), **flat(params))
    qp.multihost.sync("done")
    print("done", pid, flush=True)


if __name__ == "__main__":
    {"train": train, "multihost": multihost}[MODE](*sys.argv[2:])
