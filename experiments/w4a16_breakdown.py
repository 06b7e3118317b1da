"""Where the small-batch W4A16 kernels' device time goes: a per-kernel breakdown (GPU).

For each case (K = N, batch M, weight layout, block config) this times one jitted program
of many calls (rotated weights, as ``bench_kernels.py`` does) under CUPTI and reports the
device time per call *per kernel name*: the Pallas kernel itself, the split-K reduction XLA
runs after it (a separate kernel), and anything else. XLA's bf16 dot is the baseline.

It first runs the correctness checks of the layouts it times (``kernel_checks``: every
engine, the inline PTX and the in-kernel split-K sum, at M = 1, 13 and 70). Each case also
gets its wall time per call (launch gaps included, and anything CUPTI does not list as a
kernel, such as a memset). The first run (2026-11-27) showed the inline-PTX ``k_pairs``
tiles correct on an H100 and the split-K sum XLA runs after the kernel at 1.2-2.1 us.

    python3 experiments/w4a16_breakdown.py --out /tmp/b.json              # on the GPU
    python3 experiments/w4a16_breakdown.py --out /tmp/b.json --dry-run    # CPU, interpreter

``--ncu`` instead runs each case's kernel once with no timing, for Nsight Compute.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_checks import (
    exactness_checks,
    make_weight_only,
    reference_weight_only,
    weight_in_layout,
    wgmma_weight_only_checks,
)
from kernel_timing import Mode, _program, device_info, dry_run_mode, rotations, wall_per_call
from timing import rel_err

from qjax.kernels import BlockConfig, api, candidates
from qjax.kernels import _common as kc


def configs(m: int, size: int):
    """(layout, config, label) triples timed per case. On an H100 (2026-11-27) the inline-PTX
    tiles on the weight stored ``(N, K)`` packed along N (``n_pairs_nk``, what
    ``qjax.store_transposed`` gives) ran at 2.81-2.84x bf16 at 8192^2, ahead of the same kernel
    on ``(K, N)`` (2.38-2.41x, the 16 x 256 x 64 split-8 tile at 11.7% achieved occupancy);
    4096^2 was not measured for them. They come first, then the ``(K, N)`` tiles varying the
    number of programs, the in-kernel split-K sum and the other layouts, and last the Hopper
    Mosaic GPU kernel (TMA-fed ``wgmma``: :mod:`qjax.kernels.gpu_wgmma_weight_only`), correct
    on that H100 but slower (21.6-24.1 us at 8192^2)."""
    t = lambda bn, bk, split, w=4, s=4, red="xla": BlockConfig(
        16, bn, bk, split, False, w, s, dequant="ptx", split_reduce=red
    )
    wgmma = [  # the tuning list's tiles, in their measured order
        (
            "n_pairs_nk",
            BlockConfig(8 if m <= 8 else 16, wgs * 128, bk, split, True, num_stages=st, engine="wgmma"),
            "wgmma",
        )
        for wgs, bk, split, st in candidates._WGMMA_WEIGHT_ONLY_TILES
    ]
    out = [
        ("n_pairs_nk", t(256, 128, 8, w=8, s=3), "ptx nk"),  # the H100's winners at 8192^2
        ("n_pairs_nk", t(128, 128, 8), "ptx nk"),
        ("n_pairs_nk", t(128, 128, 4), "ptx nk"),
        ("n_pairs_nk", t(256, 128, 4, w=8, s=3), "ptx nk"),
        ("n_pairs_nk", t(128, 128, 8, red="kernel"), "ptx nk ksum"),
        ("n_pairs", t(256, 64, 8), "ptx best"),  # 2.38-2.41x bf16 at 8192^2 (2026-11-27)
        ("n_pairs", t(256, 64, 16), "ptx"),
        ("n_pairs", t(256, 64, 8, w=8), "ptx"),
        ("n_pairs", t(256, 32, 16), "ptx"),
        ("n_pairs", t(256, 64, 4), "ptx"),
        ("n_pairs", t(256, 64, 8, red="kernel"), "ptx ksum"),
        ("k_pairs_nk", t(128, 128, 8), "ptx"),
        ("k_pairs", t(128, 128, 8), "ptx"),
        ("k_halves", t(256, 64, 8), "ptx"),
        *wgmma,
    ]
    if m == 1:
        out += [("k_halves", BlockConfig(1, 128, 128, 8, False, 4, 3, engine="gemv"), "gemv")]
    return out


def kernel_call(layout, cfg, group, interpret):
    """``fn(x, w, s)`` running ``cfg`` through the public kernel API (``interpret``: a
    :class:`kernel_timing.Mode`'s choice per engine, or ``False``)."""
    base, nk = kc.split_layout(layout)
    pb = cfg.block_k if layout == "k_halves" else None
    kw = {"layout": base, "pack_block": pb, "b_layout": "nk" if nk else "kn"}
    return lambda x, w, s: api.w4a16_matmul(
        x, w, s, group_size=group, platform="gpu", config=cfg, interpret=interpret, **kw
    )


def per_kernel(fn, xs, ws, rest, reps, calls):
    """``(device, wall)`` of one compiled program of ``calls`` calls: the median device µs
    per call of each kernel name (and their total), and the median wall µs per call."""
    from jax.experimental.mosaic.gpu import profiler

    run, xs, n = _program(fn, xs, ws, calls)
    jax.block_until_ready(run(xs, ws, rest))
    wall = round(wall_per_call(run, xs, ws, rest, reps, n) * 1e6, 3)
    _, timings = profiler.measure(run, aggregate=False, iterations=reps)(xs, ws, rest)
    per_rep = []
    for rep in timings:
        acc = collections.defaultdict(float)
        for name, ms in rep:
            acc[name] += ms * 1e3 / n
        per_rep.append(acc)
    names = sorted({k for r in per_rep for k in r})
    out = {name: round(float(np.median([r.get(name, 0.0) for r in per_rep])), 3) for name in names}
    out["total"] = round(float(np.median([sum(r.values()) for r in per_rep])), 3)
    return out, wall


def save(report, cases, path):
    """Write the report with the cases so far."""
    with open(path, "w") as f:
        json.dump({**report, "cases": cases}, f, indent=1)


def summarize(path) -> str:
    """One line per case of a saved report: label, M, K, tile, device and wall µs, error."""
    r = json.load(open(path))
    failed = [c["check"] for c in r["checks"] if not c["ok"]]
    lines = [f"{r.get('device')} jax {r.get('jax')}; checks failed: {failed}"]
    for c in r["cases"]:
        cfg = c.get("config", {})
        tile = "{block_m}x{block_n}x{block_k}/s{split_k}/st{num_stages}".format(**cfg) if cfg else ""
        dev = c.get("device_us", {}).get("total")
        lines.append(
            f"{c['label']:9s} m={c['m']:<3d} k={c['k']:<5d} {tile:22s} dev={dev} wall={c.get('wall_us')}"
            f" err={c.get('rel_err', '')} {c.get('error', '')[:160]}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="4096,8192")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--group", type=int, default=None)
    p.add_argument("--ncu", action="store_true", help="run each kernel once, no timing")
    p.add_argument("--dry-run", action="store_true", help="CPU: interpreter, checks and one small case")
    p.add_argument("--budget-s", type=float, default=400)
    p.add_argument("--only", default=None, help="comma-separated labels to time (e.g. 'wgmma,ptx')")
    p.add_argument(
        "--checks", action=argparse.BooleanOptionalAction, default=True, help="the correctness checks first"
    )
    p.add_argument("--summarize", action="store_true", help="print the saved report at --out and exit")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(args.out))
        return 0
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    stack = contextlib.ExitStack()  # the GPU interpreter's patch, during a dry run
    mode = dry_run_mode(stack) if args.dry_run else Mode("gpu")
    _, name, _ = device_info()
    report = {
        "device": name,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    # under ncu the checks' launches would use up --launch-count: skip them
    layouts = ["k_pairs", "k_pairs_nk", "n_pairs", "n_pairs_nk", "k_halves", "int8"]
    checks = []
    if args.checks and not args.ncu:
        checks = exactness_checks(rng, "gpu", mode.interpret, layouts, w8a8=False, quick=args.dry_run)
    if args.checks and not args.ncu:  # 12 of 12 on an H100 (2026-11-27)
        checks += wgmma_weight_only_checks(rng, mode.wgmma_interpret, quick=args.dry_run)
    report["checks"] = checks
    save(report, [], args.out)
    failed = [(c["check"], c.get("rel_err"), c.get("error", "")[:200]) for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(failed)} of {len(checks)} pass; failed: {failed}", flush=True)
    sizes = [1024] if args.dry_run else [int(s) for s in args.sizes.split(",")]
    cases = []
    for size in sizes:
        k = n = size
        for m in [int(b) for b in args.batches.split(",")]:
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            codes, s = make_weight_only(rng, 4, k, n, args.group)
            ref = reference_weight_only(np.asarray(x, np.float32), codes, s, args.group)
            r = 2 if args.dry_run else rotations(k * n // 2)
            calls = 2 if args.dry_run else 96
            if not args.ncu and not args.dry_run:
                wf = jnp.asarray(codes, jnp.bfloat16)
                wfs = [wf + i for i in range(rotations(2 * k * n))]
                res, wall = per_kernel(lambda x, w: x @ w, [x], wfs, (), 5, calls)
                cases.append({"m": m, "k": k, "label": "xla bf16", "device_us": res, "wall_us": wall})
                print(json.dumps(cases[-1]), flush=True)
            for layout, cfg, label in configs(m, size):
                if args.only is not None and label not in args.only.split(","):
                    continue
                try:  # a tile that does not fit this shape (e.g. the dry run's 1024) is skipped
                    api.check_config_gpu(cfg, "w4a16", m, k, n, args.group, layout)
                except ValueError:
                    continue
                if time.perf_counter() - start > args.budget_s:
                    report["cut"] = "budget"
                    break
                case = {"m": m, "k": k, "layout": layout, "label": label, "config": cfg.to_dict()}
                try:
                    nk = kc.split_layout(layout)[1]
                    w = weight_in_layout(codes, layout, cfg.block_k if layout == "k_halves" else None)
                    s_w = s.T if nk else s
                    fn = kernel_call(layout, cfg, args.group, mode.interpret_for(cfg))
                    y = jax.jit(fn)(x, w, s_w)
                    case["rel_err"] = rel_err(y, ref)
                    if args.ncu:
                        jax.block_until_ready(y)
                    elif not args.dry_run:
                        ws = [w] + [w ^ jnp.zeros((), w.dtype) for _ in range(r - 1)]
                        case["device_us"], case["wall_us"] = per_kernel(fn, [x], ws, (s_w,), 5, calls)
                except Exception as e:
                    case["error"] = repr(e)[:3000]
                    traceback.print_exc()
                cases.append(case)
                print(json.dumps(cases[-1]), flush=True)
                save(report, cases, args.out)  # a step cut short keeps what it measured
    save(report, cases, args.out)
    stack.close()
    bad = [c for c in cases if "error" in c or c.get("rel_err", 0) > 2e-2]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
