"""Low-bit matmul kernels: check correctness, tune block sizes, time against XLA.

On a GPU (or TPU) this:

1. checks each kernel against a float64 / integer reference (bit-exact for int8 x int8);
2. for each case times every candidate block config and keeps the fastest (the tuning
   table ``qjax/kernels/tuning_<platform>.json`` is written from these winners with
   ``--write-table``);
3. times, in the same run, XLA's bfloat16 dot and XLA's own quantized formulation (int8
   dot for W8A8; the int8 / int4 weight converted inside XLA's fused dot for weight-only),
   with warm-up, ``block_until_ready``, weights rotated past the L2 cache and each call's
   operands behind an optimization barrier (XLA may not merge calls that share a weight);
4. reports each time as a ratio to both and as a fraction of the roofline (measured copy
   bandwidth; datasheet tensor-core peaks), and writes a JSON to ``experiments/results/``.

Two times per program: wall clock per call over a jitted program of many calls (kernel
time plus the launch gaps a model pays; tuning decides on this) and, on NVIDIA GPUs, the
device time per call from CUPTI's kernel records (``device_*`` fields: no launch gaps, and
a split-K kernel's reduction counted as the kernel it is).

Cases (issue 10): W4A16 (the kernel-native ``k_halves`` layout and ``n_pairs``, the one
``qjax.quantize`` stores and ``qjax.quantized(..., backend=...)`` dispatches) and W8A16 at
batch 1, 4, 16, 64, 256 for K=N=4096 and 8192, W4 per channel and with groups of 128
(``--layouts`` adds ``k_pairs_nk`` / ``n_pairs_nk`` / ``int8_nk``: the weight stored ``(N,
K)`` as PyTorch-converted and ``x @ w.T`` models hold it, baselines on that same weight);
W8A8 at 4096^3 with the weight as stored ``(K, N)`` and transposed to ``(N, K)``
(K-major, what Hopper's 8-bit ``wgmma`` reads; the timed call includes the transpose,
``kernel_only_us`` is the kernel alone), and on Hopper also with the Mosaic GPU ``wgmma``
kernel (:mod:`qjax.kernels.gpu_wgmma`, its configs ``gpu_wgmma.CONFIGS``).

    python experiments/bench_kernels.py --out experiments/results/bench_kernels_gpu.json

On CPU only the correctness checks run (interpret mode) unless ``--force``. Table entries
compare the kernel with the XLA path ``qjax.quantized`` would otherwise run on the same
stored weight (:func:`fallback_us`); ``--table-from`` rebuilds a table from saved reports.

Helpers: ``kernel_timing.py`` (timing, device peaks), ``kernel_checks.py`` (operands,
references, correctness checks), ``kernel_report.py`` (table entries, Markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from kernel_checks import (
    exactness_checks,
    make_weight_only,
    reference_weight_only,
    weight_in_layout,
    wgmma_checks,
)
from kernel_report import markdown, merge_table, table_entries, table_from_reports
from kernel_timing import Mode, copy_bandwidth, device_info, dry_run_mode, gpu_fields, log, rotations
from timing import rel_err

from qjax.kernels import BlockConfig, api, gpu_wgmma, tuning
from qjax.kernels import _common as kc
from qjax.kernels.candidates import gpu_candidates, variant


def weight_only_case(rng, mode, bits, m, k, n, group, layout, tune_cfgs, bw, peak, deadline):
    x0 = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    kind = "w4a16" if bits == 4 else "w8a16"
    fn = api.w4a16_matmul if bits == 4 else api.w8a16_matmul
    codes, s = make_weight_only(rng, bits, k, n, group)
    ref = reference_weight_only(np.asarray(x0, np.float32), codes, s, group)
    wbytes = k * n * bits // 8
    r = rotations(wbytes)
    res = {"kernel": kind, "layout": layout, "m": m, "k": k, "n": n, "group_size": group, "rotations": r}
    base, nk = kc.split_layout(layout)
    s_w = s.T if nk else s  # the scales in the weight's orientation
    best = None
    for cfg in tune_cfgs:
        if time.perf_counter() > deadline and best is not None:
            break
        pb = (cfg.block_k if cfg is not None else 128) if layout == "k_halves" else None
        w = weight_in_layout(codes, layout, pb)
        kw = {"layout": base, "pack_block": pb} if bits == 4 else {}
        kw["b_layout"] = "nk" if nk else "kn"
        call = lambda x, w, s, cfg=cfg, kw=kw: fn(
            x,
            w,
            s_w,
            group_size=group,
            platform=mode.platform,
            config=cfg,
            interpret=mode.interpret_for(cfg),
            **kw,
        )
        try:
            out = jax.jit(call)(x0, w, s_w)
            err = rel_err(out, ref)
            if not err < 2e-2:
                res.setdefault("bad_configs", []).append(
                    {"config": cfg.to_dict() if cfg else None, "rel_err": err}
                )
                continue
            ws = [w] + [w + 0 if w.dtype != jnp.uint8 else w ^ jnp.uint8(0) for _ in range(r - 1)]
            t, t_gpu = mode.timed(call, [x0], ws, (s_w,))
        except Exception as e:  # a config the compiler rejects: record, go on
            res.setdefault("failed_configs", []).append({"config": cfg.to_dict(), "error": repr(e)[:300]})
            continue
        if cfg is not None:  # every timed config (wall, device us): what tuning saw
            dev = None if t_gpu is None else round(t_gpu * 1e6, 2)
            res.setdefault("tried", []).append(
                {"config": cfg.to_dict(), "us": round(t * 1e6, 2), "device_us": dev}
            )
        if best is None or t < best[0]:
            best = (t, cfg, err, t_gpu)
    if best is None:
        res["error"] = "no config compiled"
        return res
    t, cfg, err, t_gpu = best
    times = {"kernel": (t, t_gpu)}
    # baselines: XLA bf16 dot, XLA's own quantized formulation, each on the weight as stored
    # ((N, K) for an "_nk" layout: XLA folds the .T into its dot)
    wf = jnp.asarray(codes.T if nk else codes, jnp.bfloat16)
    bf16 = (lambda x, w: x @ w.T) if nk else (lambda x, w: x @ w)
    wfs = [wf + i for i in range(rotations(2 * k * n))]
    times["xla_bf16"] = mode.timed(bf16, [x0], wfs)
    t_bf16 = times["xla_bf16"][0]
    wq = jnp.asarray(codes.T if nk else codes)
    if bits == 4:
        wq = wq.astype(jnp.int4)
    if group is None:
        xla_q = lambda x, w, s: (
            jnp.dot(x, (w.T if nk else w).astype(jnp.bfloat16), preferred_element_type=jnp.float32) * s
        ).astype(jnp.bfloat16)
    else:
        xla_q = lambda x, w, s: kc.xla_weight_only(
            x,
            w.astype(jnp.int8),
            s,
            layout="int8_nk" if nk else "int8",
            group_size=group,
            out_dtype=jnp.bfloat16,
        )
    wqs = [wq] + [wq + jnp.zeros((), wq.dtype) for _ in range(r - 1)]
    try:
        times["xla_quant"] = mode.timed(xla_q, [x0], wqs, (s if group is None else s_w,))
        t_xq = times["xla_quant"][0]
    except Exception as e:
        t_xq = None
        res["xla_quant_error"] = repr(e)[:300]
    if mode.on_gpu:
        res.update(gpu_fields(times))
    nbytes = wbytes + 2 * m * k + 2 * m * n + s.size * 4
    t_roof = max(nbytes / bw, 2 * m * n * k / peak[0]) if peak[0] else nbytes / bw
    res.update(
        {
            "config": cfg.to_dict() if cfg else None,
            "rel_err": err,
            "kernel_us": t * 1e6,
            "xla_bf16_us": t_bf16 * 1e6,
            "xla_quant_us": None if t_xq is None else t_xq * 1e6,
            "speedup_vs_bf16": t_bf16 / t,
            "speedup_vs_xla_quant": None if t_xq is None else t_xq / t,
            "roofline_fraction": t_roof / t,
            # above 1: the baseline read less than its weight (a timing artifact, not a result)
            "xla_bf16_roofline_fraction": max((2 * k * n + 4 * m * k) / bw, 2 * m * n * k / (peak[0] or 1e30))
            / t_bf16,
        }
    )
    return res


def int8_case(rng, mode, m, k, n, tune_cfgs, peak, deadline, b_layout="kn"):
    """W8A8 at ``(m, k, n)``. ``b_layout="nk"``: the kernel reads the weight transposed
    ``(N, K)``; the timed call transposes the ``(K, N)`` weight first (what
    ``qjax.quantized`` pays), ``kernel_only_us`` is the kernel on a stored ``(N, K)``."""
    a = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    b = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    sa = jnp.asarray(rng.uniform(0.5, 1.5, (m, 1)) / 127, jnp.float32)
    sb = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)) / (127 * math.sqrt(k)), jnp.float32)
    ref = (
        (np.asarray(a, np.float64) @ np.asarray(b, np.float64))
        * np.asarray(sa, np.float64)
        * np.asarray(sb, np.float64)
    )
    res = {"kernel": "w8a8", "layout": b_layout, "m": m, "k": k, "n": n, "group_size": None}
    res["engine"] = tune_cfgs[0].engine if tune_cfgs and tune_cfgs[0] is not None else "triton"
    best = None

    def matmul(a, b, sa, sb, cfg, stored=False):
        if b_layout == "nk" and not stored:
            b = b.T
        return api.int8_matmul(
            a, b, sa, sb, b_layout=b_layout, platform=mode.platform, config=cfg, interpret=mode.interpret
        )

    for cfg in tune_cfgs:
        if time.perf_counter() > deadline and best is not None:
            break
        call = lambda a, b, sa, sb, cfg=cfg: matmul(a, b, sa, sb, cfg)
        try:
            out = jax.jit(call)(a, b, sa, sb)
            err = rel_err(out, ref)
            if not err < 1e-2:
                res.setdefault("bad_configs", []).append(
                    {"config": cfg.to_dict() if cfg else None, "rel_err": err}
                )
                continue
            t, t_gpu = mode.timed(call, [a], [b, b + 0, b + 0, b + 0], (sa, sb), min_calls=16)
        except Exception as e:
            res.setdefault("failed_configs", []).append({"config": cfg.to_dict(), "error": repr(e)[:300]})
            continue
        if best is None or t < best[0]:
            best = (t, cfg, err, t_gpu)
    if best is None:
        res["error"] = "no config compiled"
        return res
    t, cfg, err, t_gpu = best
    bs = [b, b + 0, b + 0, b + 0]
    bts = [b.T + 0 for _ in bs]
    af = a.astype(jnp.bfloat16)

    def xla_i8(lo):
        return lambda a, b, sa, sb: kc.xla_int8_matmul(a, b, sa, sb, b_layout=lo)

    # the baselines (and the kernel on a stored weight): (fn, activations, rotated weights, other args)
    programs = {
        "xla_bf16": (lambda x, w: x @ w, [af], [w.astype(jnp.bfloat16) for w in bs]),
        # XLA's int8 dot on the weight as stored (K, N) and pre-transposed (N, K): the goal
        # compares with the faster of the two
        "xla_int8_kn": (xla_i8("kn"), [a], bs, (sa, sb)),
        "xla_int8_nk": (xla_i8("nk"), [a], bts, (sa, sb)),
    }
    if b_layout == "nk":  # the kernel on a stored (N, K) weight: no transpose in the program
        programs["kernel_only"] = (
            lambda a, b, sa, sb: matmul(a, b, sa, sb, cfg, stored=True),
            [a],
            bts,
            (sa, sb),
        )
    # the kernel's times are the tuning loop's measurement of the winner
    times = {"kernel": (t, t_gpu)} | {
        name: mode.timed(*args, min_calls=16) for name, args in programs.items()
    }
    wall = {name: v[0] for name, v in times.items()}
    wall["xla_int8"] = min(wall["xla_int8_kn"], wall["xla_int8_nk"])
    flops = 2 * m * n * k
    res.update({f"{name}_us": v * 1e6 for name, v in wall.items()})
    res.update(
        {
            "config": cfg.to_dict() if cfg else None,
            "rel_err": err,
            "speedup_vs_bf16": wall["xla_bf16"] / t,
            "speedup_vs_xla_int8": wall["xla_int8"] / t,
            "kernel_tops": flops / t / 1e12,
            "roofline_fraction": (flops / peak[1]) / t if peak[1] else None,
        }
    )
    if mode.on_gpu:
        res.update(gpu_fields(times))
        dk = res["device_kernel_us"]
        if dk is not None:
            res["device_kernel_tops"] = flops / (dk * 1e-6) / 1e12
    return res


def small_batch_candidates(tried: list[dict], cands: list, m: int, layout: str, per_engine: int = 3) -> list:
    """Candidates for a batch <= 16 after the first batch of the same kernel was tuned: the
    ``per_engine`` fastest configs of each kernel variant there (the ``gemv`` ones with
    ``block_m`` set to this batch, if they still fit; last, as ``gpu_candidates`` orders them
    above one row), then this batch's own list."""
    ranked = sorted(tried, key=lambda r: r["us"])
    first = []
    tensor_core = ("triton+ptx", "triton", "triton+ptx+ksum", "triton+ksum")
    for engine in ("gemv", *tensor_core) if m == 1 else (*tensor_core, "gemv"):
        picks = [c for c in (BlockConfig.from_dict(r["config"]) for r in ranked) if variant(c) == engine]
        if engine == "gemv":
            bm = kc.pow2_at_least(m, 1)
            picks = [dataclasses.replace(c, block_m=bm) for c in picks]
            picks = [c for c in picks if c in cands]  # still fits (registers) at this batch
        first += picks[:per_engine]
    return list(dict.fromkeys(first + [c for c in cands if c not in first]))


def cap_per_engine(cands: list, cap: int | None) -> list:
    """The first ``cap`` configs of each kernel variant (engine, plus ``+ptx`` for the
    inline-PTX conversion: :func:`qjax.kernels.candidates.variant`; all if ``cap`` is
    ``None``), taken in turns (first of each variant, then second, ...) so that a tuning
    deadline cuts every variant short rather than skipping the last ones."""
    groups: dict = {}
    for c in cands:
        groups.setdefault(variant(c), []).append(c)
    lists = [g if cap is None else g[:cap] for g in groups.values()]
    return [c for row in itertools.zip_longest(*lists) for c in row if c is not None]


def _dry_run_modes(stack: contextlib.ExitStack):
    """``(mode, wgmma_mode, hopper)`` for ``--dry-run`` (:func:`kernel_timing.dry_run_mode`):
    the W8A8 wgmma cases run in JAX's GPU interpreter."""
    mode = dry_run_mode(stack)
    return mode, dataclasses.replace(mode, interpret=mode.wgmma_interpret), True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results/bench_kernels.json")
    p.add_argument(
        "--write-table",
        default=None,
        help="write the tuning table here: qjax/kernels/tuning_gpu.json serves every GPU of the "
        "measured compute capability; tuning.device_table_path('gpu', <device kind>) (e.g. "
        "qjax/kernels/tuning_gpu_nvidia_h100_80gb_hbm3.json) only that GPU model, before the shared one",
    )
    p.add_argument("--budget-s", type=float, default=300, help="stop tuning after this many seconds")
    p.add_argument("--sizes", default="4096,8192")
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument(
        "--layouts",
        default="k_halves,n_pairs,int8",
        help="weight-only layouts to time (n_pairs / k_pairs: what qjax.quantized dispatches; "
        "k_pairs_nk / n_pairs_nk / int8_nk: a weight stored (N, K), as PyTorch's (out, in)); "
        "'none': no weight-only cases (W8A8 only)",
    )
    p.add_argument(
        "--force", action="store_true", help="on CPU, time XLA's fallback formulations (no kernels)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="on CPU, run the GPU path end to end with the kernels interpreted, at small sizes and "
        "with short timing loops (wgmma included): catches script errors before device time is spent",
    )
    p.add_argument(
        "--int4-groups", default="none,128", help="W4A16 scale groups: 'none' (per channel) and/or sizes"
    )
    p.add_argument("--w8a8-size", type=int, default=4096, help="M = K = N of the W8A8 cases")
    p.add_argument(
        "--w8a8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the W8A8 cases in --part main",
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        default=None,
        help="time at most this many configs of each engine per case (a short device session)",
    )
    p.add_argument(
        "--part",
        choices=("all", "main", "wgmma"),
        default="all",
        help="main: everything but the Hopper wgmma kernel; wgmma: only its checks and W8A8 case "
        "(run it in its own process, so a Mosaic GPU crash cannot cost the main results); all: both, "
        "wgmma last",
    )
    p.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSON",
        help="no run: rebuild the --write-table table from these saved reports (e.g. after a change "
        "to how entries are chosen); reports from older runs without a compute_capability field "
        "need --compute-capability",
    )
    p.add_argument("--compute-capability", default=None, help="with --table-from: fill in a missing one")
    p.add_argument(
        "--markdown", default=None, help="with --table-from: also write the reports' tables here (Markdown)"
    )
    args = p.parse_args(argv)
    if args.table_from:
        if not (args.write_table or args.markdown):
            p.error("--table-from needs --write-table and/or --markdown")
        if args.write_table:
            table_from_reports(args.table_from, Path(args.write_table), args.compute_capability)
        if args.markdown:
            reports = [json.loads(Path(f).read_text()) for f in args.table_from]
            Path(args.markdown).write_text(markdown(reports))
        return
    with contextlib.ExitStack() as stack:
        _run(args, stack)


def _run(args, stack: contextlib.ExitStack) -> None:
    rng = np.random.default_rng(0)
    platform, name, peak = device_info()
    kplat = {"gpu": "gpu", "tpu": "tpu"}.get(platform)
    log(f"device: {name} ({platform}), jax {jax.__version__}")
    report = {
        "device": name,
        "platform": platform,
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "compute_capability": tuning.gpu_compute_capability(),
        "checks": [],
        "cases": [],
    }
    mode, wgmma_mode, hopper = Mode(kplat), Mode("gpu"), kplat == "gpu" and gpu_wgmma.available()
    if args.dry_run:
        mode, wgmma_mode, hopper = _dry_run_modes(stack)
        name = report["device"] = f"dry run on {name}"
    elif kplat is None and not args.force:
        report["checks"] = exactness_checks(rng, "gpu", interpret=True)
        log(json.dumps(report["checks"], indent=1))
        Path(args.out).write_text(json.dumps(report, indent=1))
        return
    weight_only_layouts = [] if args.layouts == "none" else args.layouts.split(",")
    main_part, wgmma_part = args.part in ("all", "main"), args.part in ("all", "wgmma") and hopper
    if main_part:
        layouts = set(weight_only_layouts)
        report["checks"] = exactness_checks(
            rng, mode.platform, mode.interpret, layouts, args.w8a8, quick=args.dry_run
        )
        log("checks:", all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]])
    bw = copy_bandwidth(2**20 if args.dry_run else 2**30)
    report["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    t0 = time.perf_counter()
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    int4_groups = [None if g == "none" else int(g) for g in args.int4_groups.split(",")]
    plan = []
    if main_part:
        if args.w8a8:
            plan += [("w8a8", args.w8a8_size, None, "kn"), ("w8a8", args.w8a8_size, None, "nk")]
        for size in sizes:
            for layout in weight_only_layouts:
                bits, groups = (8, (None,)) if layout.startswith("int8") else (4, int4_groups)
                for group, m in ((g, m) for g in groups for m in batches):
                    plan.append((bits, size, m, layout, group))
        # the goals first (W8A8 4096^3, W4A16 at batch <= 16), so a run cut short by
        # its time limit has measured those; the order within each part is kept
        plan.sort(key=lambda it: it[0] != "w8a8" and (it[2] > 16 or it[3].startswith("int8")))
    if wgmma_part:  # last: a Mosaic GPU failure costs nothing else
        plan.append(("w8a8", args.w8a8_size, None, "nk", "wgmma"))

    def save():
        Path(args.out).write_text(json.dumps(report, indent=1))
        if args.write_table:
            merge_table(
                Path(args.write_table),
                name,
                report["date"],
                table_entries(report["cases"]),
                report["compute_capability"],
            )

    # which cases tune: all but the batches <= 16 after the first of their kernel, which
    # mostly re-time the first one's fastest configs (small_batch_candidates)
    seen, tunes = set(), []
    for item in plan:
        key = None if item[0] == "w8a8" or item[2] > 16 else (item[0], item[1], item[3], item[4])
        tunes.append(key is None or key not in seen)
        seen.add(key)

    best_small, dry_wgmma_done = {}, False
    for n_done, item in enumerate(plan):
        started = time.perf_counter()
        # the tuning time left is shared evenly by the cases still to tune
        deadline = time.perf_counter() + max(
            3.0, (args.budget_s - (time.perf_counter() - t0)) / max(1, sum(tunes[n_done:]))
        )
        try:
            if item[0] == "w8a8":
                _, size, _, b_layout, *engine = item
                case_mode = wgmma_mode if engine else mode
                if engine:
                    report["checks"] += wgmma_checks(rng, wgmma_mode.interpret)
                    log("wgmma checks:", [c for c in report["checks"] if "wgmma" in c["check"]])
                    save()
                    cands = [c for c in gpu_wgmma.CONFIGS if size % c.block_n == 0]
                elif mode.platform == "gpu":
                    cands = gpu_candidates("w8a8", size, size, size, None, b_layout)
                else:
                    cands = [None]
                if args.dry_run:
                    cands = cands[:2]
                res = int8_case(rng, case_mode, size, size, size, cands, peak, deadline, b_layout)
            else:
                bits, size, m, layout, group = item
                kind = "w4a16" if bits == 4 else "w8a16"
                key = (bits, size, layout, group)
                cands = (
                    gpu_candidates(kind, m, size, size, group, layout) if mode.platform == "gpu" else [None]
                )
                if m <= 16 and key in best_small:  # later small batches: the winners so far first
                    cands = small_batch_candidates(best_small[key], cands, m, layout)
                if args.dry_run:  # the GPU interpreter takes ~1 min per wgmma case: one is enough
                    cands = [c for c in cands if not (c and c.engine == "wgmma" and dry_wgmma_done)][:2]
                    dry_wgmma_done |= any(c and c.engine == "wgmma" for c in cands)
                else:
                    cands = cap_per_engine(cands, args.max_candidates)
                res = weight_only_case(
                    rng, mode, bits, m, size, size, group, layout, cands, bw, peak, deadline
                )
                if m <= 16 and res.get("tried"):
                    best_small[key] = res["tried"]
        except Exception:
            res = {"case": repr(item), "error": traceback.format_exc()[-800:]}
        res["case_s"] = time.perf_counter() - started  # compiles, tuning and baselines
        report["cases"].append(res)
        short = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in res.items()
            if k not in ("failed_configs", "bad_configs")
        }
        log(json.dumps(short))
        save()  # after every case: a crash or timeout keeps what was measured
    log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
