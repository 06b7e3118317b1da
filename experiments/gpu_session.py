"""One device call that runs the open GPU measurements of issue 10, in priority order.

A session lent a GPU has about 15 minutes of device time, and every machine start costs
one to two of them, so the measurements BUILD_NOTES lists under "Next GPU session" run
here as steps of one command, each a subprocess with its own time limit (a crash or a
timeout ends that step, not the session; ``bench_kernels.py`` saves after every case, so
a step cut short keeps what it measured). Default steps (the twenty-first session,
2026-11-27, measured ``w8a8``, ``floor``, ``breakdown`` and the int4 part of ``nk``:
experiments/results/gpu_session_2026-11-27_s21/; earlier sessions the rest,
experiments/results/gpu_session_2026-11-26/ and _s18/):

0. ``kv``: ``bench_kv_cache.py``: one decode step on a ``qjax.KVCache`` of each format
   (int8 / int4 / KIVI / fp8) against a bf16 cache, at 1 x 4096, 8 x 4096 and 16 x 8192
   tokens. The twenty-first session's 90 s cap ended it before 16 x 8192 (1 x 4096:
   quantized caches 1.2-1.6x the bf16 step; 8 x 4096: int8 0.78-0.88x, fp8 0.79x).
1. ``nk``: ``bench_kernels.py`` on the int8 weight stored ``(N, K)`` (``int8_nk``, W8A16) at
   4096 (batch 1 / 4 / 16), which the 200 s cap did not reach after the int4 layouts.
2. ``floor``: ``profile_w4a16.py --size 4096``: how fast anything can read the 8 MB of an
   int4 4096^2 weight (Pallas streaming probes that only sum the words, XLA's reduction of
   them) next to the bf16 dot. On the H100 (2026-11-27) the probes read it in 3.3 us
   (2.56 TB/s), the bf16 dot took 15.1 us, the best W4A16 kernel 5.35 us plus XLA's 1.4 us
   split-K sum: the 2.5x goal (5.9 us) is not a bandwidth limit.
3. ``breakdown``: ``w4a16_breakdown.py``: CUPTI device time per kernel (the Pallas kernel,
   XLA's split-K sum) at 4096 and 8192, batch 1 and 16, for the tiles around the fastest
   W4A16 one, then the Hopper TMA + ``wgmma`` kernel.
4. ``small``: W4A16 at batch 1 / 4 / 16, K = N = 8192 then 4096, layouts ``n_pairs`` and
   ``k_halves``: the gemv kernel and the inline-PTX tensor-core tiles against bf16.
5. ``methods``: ``bench_ops.py`` at K = N = 4096: every XLA formulation of a weight-only
   dot with float32 activations (``split`` / ``convert`` / ``dequant``).
6. ``w8a8``: ``bench_kernels.py --layouts none``: W8A8 at 4096^3 (Triton on ``(K, N)`` and
   ``(N, K)``, then the Hopper ``wgmma`` kernel). On the H100 (2026-11-27) the persistent
   wgmma kernel ran 1.82x bf16 and 1.45x XLA's int8 dot in device time on a weight stored
   ``(N, K)``, 1.58x / 1.26x with the transpose of a ``(K, N)`` one in the call.

Also selectable (``--steps``): ``stored`` (``quantized`` on Flax ``(K, N)`` weights vs the
same after ``qjax.store_transposed``) and ``pointwise`` (quantized 1x1 convs as dots vs as
convs), both measured on 2026-11-26.

Each step gets at most its ``cap_s`` and never more than the time left before
``--limit-s`` minus a reserve; ``bench_kernels.py``'s tuning budget is the step's time
less its fixed overhead. Writes every step's files and log to ``--out``, a
``gpu_session.json`` summary (return code, seconds, files per step) and, with ``--tar``,
one archive of them all (a device call brings back at most 8 files).

Usage (on the device machine, in the repository root)::

    python3 experiments/gpu_session.py --out /tmp/s --tar "$OUT/gpu_session.tgz" --limit-s 560
    python3 experiments/gpu_session.py --out /tmp/s --dry-run   # on CPU: every step, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, share cap in seconds, fixed overhead of bench_kernels outside its tuning budget); caps
# from the 2026-11-26 H100 run: "stored" took ~100 s and "pointwise" ~45 s at these sizes
STEPS = (
    ("breakdown", 250, 20),
    ("w8a8", 150, 40),
    ("floor", 60, 0),
    ("small", 300, 90),
    ("methods", 120, 0),
    ("nk", 120, 40),
    ("stored", 120, 0),
    ("pointwise", 60, 0),
    ("kv", 200, 0),
)
DEFAULT_STEPS = ("kv", "nk", "floor", "breakdown", "small", "methods", "w8a8")


def step_argv(name: str, out: Path, budget_s: float, dry_run: bool) -> list[str]:
    """The command of one step."""
    py = [sys.executable, "-u"]
    if name in ("small", "nk"):
        args = {
            "small": ["--sizes", "8192,4096", "--batches", "1,4,16", "--layouts", "n_pairs,k_halves"],
            "nk": ["--sizes", "4096", "--batches", "1,4,16", "--layouts", "int8_nk"],
        }[name]
        cands = ["--max-candidates", "4" if name == "small" else "3"]
        extra = ["--dry-run", "--sizes", "256", "--batches", "1,16"] if dry_run else []
        return [
            *py,
            str(HERE / "bench_kernels.py"),
            "--part",
            "main",
            "--no-w8a8",
            *args,
            *cands,
            "--budget-s",
            f"{max(budget_s, 5):.0f}",
            "--out",
            str(out / f"bench_kernels_{name}.json"),
            *extra,
        ]
    if name == "w8a8":  # the W8A8 4096^3 cases only, the wgmma kernel's last (its own part)
        extra = ["--dry-run", "--w8a8-size", "256"] if dry_run else []
        return [
            *py,
            str(HERE / "bench_kernels.py"),
            "--part",
            "all",
            "--layouts",
            "none",
            "--max-candidates",
            "4",
            "--budget-s",
            f"{max(budget_s, 5):.0f}",
            "--out",
            str(out / "bench_kernels_w8a8.json"),
            *extra,
        ]
    if name == "floor":  # the weight-read floor at 4096^2: streaming probes vs the bf16 dot
        sizes = ["--interpret", "--size", "2048"] if dry_run else ["--size", "4096"]
        return [*py, str(HERE / "profile_w4a16.py"), "--out", str(out / "profile_w4a16_4096.json"), *sizes]
    if name == "breakdown":  # per-kernel device time of the tiles around the fastest W4A16 one
        extra = ["--dry-run", "--batches", "1"] if dry_run else []
        return [
            *py,
            str(HERE / "w4a16_breakdown.py"),
            "--out",
            str(out / "w4a16_breakdown.json"),
            "--no-checks",
            "--budget-s",
            f"{max(budget_s, 5):.0f}",
            *extra,
        ]
    if name == "methods":
        sizes = ["--quick"] if dry_run else ["--size", "4096"]
        return [*py, str(HERE / "bench_ops.py"), "--out", str(out), "--skip-conv", *sizes]
    if name == "kv":  # a decode step on a qjax.KVCache of each format vs a bf16 cache
        sizes = ["--quick"] if dry_run else ["--cases", "1x4096,8x4096,16x8192"]
        return [*py, str(HERE / "bench_kv_cache.py"), "--out", str(out), *sizes]
    if name == "stored":
        sizes = ["--quick"] if dry_run else ["--size", "4096", "--batches", "1,16,4096"]
        return [*py, str(HERE / "bench_stored_transposed.py"), "--out", str(out), *sizes]
    return [*py, str(HERE / "bench_pointwise_conv.py"), "--out", str(out), *(["--quick"] if dry_run else [])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--limit-s", type=float, default=560, help="the whole session's wall-clock limit")
    p.add_argument("--reserve-s", type=float, default=15, help="kept free at the end (copying results)")
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS), help=f"of {[s[0] for s in STEPS]}")
    p.add_argument("--tar", type=Path, default=None, help="also pack --out into this .tgz at the end")
    p.add_argument("--dry-run", action="store_true", help="on CPU: every step at tiny sizes")
    args = p.parse_args(argv)
    known = {s[0]: s for s in STEPS}
    chosen = args.steps.split(",")
    unknown = [s for s in chosen if s not in known]
    if unknown:
        p.error(f"unknown steps {unknown}; known: {list(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    start, summary = time.perf_counter(), []
    for name in chosen:
        _, cap, overhead = known[name]
        left = args.limit_s - args.reserve_s - (time.perf_counter() - start)
        if left < 20:
            summary.append({"step": name, "skipped": f"{left:.0f} s left"})
            continue
        limit = min(cap, left)
        argv_step = step_argv(name, args.out, limit - overhead, args.dry_run)
        before = set(args.out.iterdir())
        t = time.perf_counter()
        with open(args.out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(
                    argv_step, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit
                ).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        files = sorted(str(f.name) for f in set(args.out.iterdir()) - before)
        summary.append({"step": name, "rc": rc, "s": round(time.perf_counter() - t, 1), "files": files})
        print(json.dumps(summary[-1]), flush=True)
        (args.out / "gpu_session.json").write_text(json.dumps(summary, indent=1))
    if args.tar is not None:
        with tarfile.open(args.tar, "w:gz") as tar:
            tar.add(args.out, arcname=".")
    return 0 if all(s.get("rc") == 0 for s in summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
