"""Timing for the kernel benchmarks (``bench_kernels.py``, ``profile_w4a16.py``): many calls
in one compiled program with rotated weights (past the L2 cache), wall clock per call and,
on NVIDIA GPUs, device time from CUPTI; the device's datasheet peaks and copy bandwidth."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

PEAKS = {  # dense tensor-core peaks, datasheet (SXM): (bf16, int8) in op/s
    "H100": (989e12, 1979e12),
    "H200": (989e12, 1979e12),
    "A100": (312e12, 624e12),
}
L2_BYTES = 60 * 2**20


def log(*a):
    print(*a, flush=True)


def device_info():
    d = jax.devices()[0]
    name = getattr(d, "device_kind", str(d))
    peak = next((v for k, v in PEAKS.items() if k in name), (None, None))
    return d.platform, name, peak


def copy_bandwidth(elements: int = 2**30) -> float:
    """Bytes read + written per second by an on-device elementwise update of 2 GiB: the
    better of one update per program and eight chained in one program (a loop of in-place
    updates; launch cost amortized), best of five runs each."""
    x = jnp.ones((elements,), jnp.bfloat16)
    one = jax.jit(lambda x: x + 1)
    eight = jax.jit(lambda x: jax.lax.fori_loop(0, 8, lambda i, y: y + 1, x))
    best = 0.0
    for f, updates in ((one, 1), (eight, 8)):
        f(x).block_until_ready()
        for _ in range(5):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = max(best, updates * 2 * x.nbytes / (time.perf_counter() - t))
    return best


def _program(fn, xs, ws, min_calls):
    """One jitted program calling ``fn(x, w, *rest)`` on every pair of distinct activation
    buffers and rotated weight buffers (at least ``min_calls`` calls, so the per-program
    dispatch cost is amortized; distinct buffers, so XLA cannot merge identical calls). Each
    call's operands pass an optimization barrier: XLA:GPU's dot merger would otherwise fuse
    the dots that share a weight into one dot that reads the weight once (seen 2026-11-26 on
    an H200: a 1 x 8192 x 8192 bf16 dot "ran" at 2 us, 60 TB/s)."""
    xs = list(xs)
    while len(xs) * len(ws) < min_calls:
        xs.append(xs[0] + 0)
    fn = jax.jit(fn)  # lowered once, not once per call: a Mosaic GPU kernel lowers in ~0.2 s
    run = jax.jit(
        lambda xs, ws, rest: [fn(*jax.lax.optimization_barrier((x, w)), *rest) for x in xs for w in ws]
    )
    return run, xs, len(xs) * len(ws)


def wall_per_call(run, xs, ws, rest, reps: int, calls: int) -> float:
    """Median wall seconds per call of a warm ``_program``."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(xs, ws, rest))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) / calls


def time_calls(fn, xs, ws, rest=(), reps=5, min_calls=96, device=False):
    """Seconds per call of ``fn(x, w, *rest)`` in one compiled program (see ``_program``):
    ``(wall, gpu)``. ``wall``: median wall clock, the kernel plus the launch gaps a model pays
    between calls. ``gpu`` (with ``device=True``): median device time from CUPTI's kernel
    records, no launch gaps; ``None`` where CUPTI is unavailable."""
    run, xs, calls = _program(fn, xs, ws, min_calls)
    jax.block_until_ready(run(xs, ws, rest))
    wall = wall_per_call(run, xs, ws, rest, reps, calls)
    gpu = None
    if device and (profiler := _cupti()) is not None:
        try:
            _, ms = profiler.measure(run, aggregate=True, iterations=reps)(xs, ws, rest)
            gpu = float(np.median(ms)) / 1e3 / calls if ms else None
        except Exception as e:
            log(f"device timing failed: {e!r:.200}")
    return wall, gpu


@functools.cache
def _cupti():
    """JAX's CUPTI profiler if it works here (probed once), else ``None``."""
    try:
        from jax.experimental.mosaic.gpu import profiler

        profiler.measure(jax.jit(lambda x: x + 1))(jnp.ones(8))
        return profiler
    except Exception as e:  # no CUPTI (or another profiler attached): wall time only
        log(f"device timing unavailable: {e!r:.200}")
        return None


def gpu_fields(times: dict) -> dict:
    """``device_<name>_us`` for each ``(wall, gpu)`` in ``times`` (which holds ``"kernel"``),
    and the kernel's device-time speedup over every other entry."""
    dk = times["kernel"][1]
    out = {f"device_{name}_us": None if g is None else g * 1e6 for name, (_, g) in times.items()}
    for name, (_, g) in times.items():
        if name != "kernel":
            out[f"device_speedup_vs_{name}"] = None if g is None or dk is None else g / dk
    return out


def rotations(nbytes: int) -> int:
    return int(min(32, max(2, math.ceil(4 * L2_BYTES / max(1, nbytes)))))


@dataclasses.dataclass(frozen=True)
class Mode:
    """How the cases run: the kernel platform (``None``: XLA's fallback), and for a dry run
    the kernels in the Pallas interpreter with short timing loops."""

    platform: str | None
    interpret: object = False
    reps: int = 5
    max_calls: int | None = None
    wgmma_interpret: object = False  # a dry run: JAX's GPU interpreter for the Mosaic GPU kernels

    def interpret_for(self, cfg) -> object:
        """The ``interpret=`` of a kernel config: the Mosaic GPU (``wgmma``) kernels run in
        JAX's GPU interpreter, the Triton ones in Pallas's."""
        return self.wgmma_interpret if cfg is not None and cfg.engine == "wgmma" else self.interpret

    @property
    def on_gpu(self) -> bool:  # real GPU timing (device time from CUPTI)
        return self.platform == "gpu" and not self.interpret

    def calls(self, n: int) -> int:
        return n if self.max_calls is None else min(n, self.max_calls)

    def timed(self, fn, xs, ws, rest=(), min_calls=96):
        n = self.calls(min_calls)
        if self.max_calls is not None:  # a short loop: one activation, at most max_calls weights
            xs, ws = list(xs)[:1], list(ws)[: self.max_calls]
        return time_calls(fn, xs, ws, rest, reps=self.reps, min_calls=n, device=self.on_gpu)


def dry_run_mode(stack) -> Mode:
    """The mode of a ``--dry-run`` on a CPU: the Triton kernels in the Pallas interpreter,
    the Mosaic GPU (``wgmma``) ones in JAX's GPU interpreter with the tests' patch
    (:mod:`tests.kernels.mgpu_interpret`: transposed and register operands), entered on
    ``stack`` (a :class:`contextlib.ExitStack`) until it closes; one rep of at most two calls."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernels.mgpu_interpret import interpret_params, transposed_wgmma_operands

    stack.enter_context(transposed_wgmma_operands(watchdog_s=3600))
    return Mode("gpu", True, reps=1, max_calls=2, wgmma_interpret=interpret_params())
