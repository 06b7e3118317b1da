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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import math
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qjax.kernels import BlockConfig, api, gpu_wgmma, pack_int4, tuning
from qjax.kernels import _common as kc
from qjax.kernels.candidates import gpu_candidates, variant
from qjax.numerics import packing

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
    run = jax.jit(
        lambda xs, ws, rest: [fn(*jax.lax.optimization_barrier((x, w)), *rest) for x in xs for w in ws]
    )
    return run, xs, len(xs) * len(ws)


def time_calls(fn, xs, ws, rest=(), reps=5, min_calls=96, device=False):
    """Seconds per call of ``fn(x, w, *rest)`` in one compiled program (see ``_program``):
    ``(wall, gpu)``. ``wall``: median wall clock, the kernel plus the launch gaps a model pays
    between calls. ``gpu`` (with ``device=True``): median device time from CUPTI's kernel
    records, no launch gaps; ``None`` where CUPTI is unavailable."""
    run, xs, calls = _program(fn, xs, ws, min_calls)
    jax.block_until_ready(run(xs, ws, rest))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(xs, ws, rest))
        ts.append(time.perf_counter() - t)
    gpu = None
    if device and (profiler := _cupti()) is not None:
        try:
            _, ms = profiler.measure(run, aggregate=True, iterations=reps)(xs, ws, rest)
            gpu = float(np.median(ms)) / 1e3 / calls if ms else None
        except Exception as e:
            log(f"device timing failed: {e!r:.200}")
    return float(np.median(ts)) / calls, gpu


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


# -- cases ----------------------------------------------------------------------------------------


def make_weight_only(rng, bits, k, n, group):
    """Random codes ``(K, N)`` and scales (per channel or per group)."""
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    codes = rng.integers(lo, hi + 1, (k, n)).astype(np.int8)
    s = rng.uniform(0.5, 1.5, (1 if group is None else k // group, n)).astype(np.float32) / (
        hi * math.sqrt(k)
    )
    return codes, jnp.asarray(s)


def weight_in_layout(codes, layout, pack_block=None):
    """The codes as a kernel operand: int8, the kernel-native int4 halves, or the pair
    layouts ``qjax.quantize`` stores (``k_pairs``: packed along K, ``n_pairs``: along N);
    with ``"_nk"`` appended, the weight stored ``(N, K)`` (PyTorch's ``(out, in)``)."""
    base, nk = kc.split_layout(layout)
    if nk:
        stored = jnp.asarray(codes.T)
        return stored if base == "int8" else packing.pack(stored, 4, axis=1 if base == "k_pairs" else 0)
    if layout == "int8":
        return jnp.asarray(codes)
    if layout == "k_halves":
        return pack_int4(jnp.asarray(codes), pack_block=pack_block)
    return packing.pack(jnp.asarray(codes), 4, axis=0 if layout == "k_pairs" else 1)


def reference_weight_only(x, codes, s, group):
    k = codes.shape[0]
    rows = k if group is None else group
    w = (
        codes.reshape(k // rows, rows, -1).astype(np.float64) * np.asarray(s, np.float64)[:, None, :]
    ).reshape(k, -1)
    return np.asarray(x, np.float64) @ w


def rel_err(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / max(1e-30, np.max(np.abs(ref))))


@dataclasses.dataclass(frozen=True)
class Mode:
    """How the cases run: the kernel platform (``None``: XLA's fallback), and for a dry run
    the kernels in the Pallas interpreter with short timing loops."""

    platform: str | None
    interpret: object = False
    reps: int = 5
    max_calls: int | None = None

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
            x, w, s_w, group_size=group, platform=mode.platform, config=cfg, interpret=mode.interpret, **kw
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


def exactness_checks(rng, platform, interpret=False, layouts=None, w8a8=True):
    """int8 kernel bit-exact (K small enough that float32 holds the sums exactly) and each
    weight-only layout within bf16 tolerance, odd M; only the ``layouts`` (all if ``None``)
    and W8A8 cases that will be timed."""
    out = []
    for m in (1, 7, 130) if w8a8 else ():
        a = jnp.asarray(rng.integers(-128, 128, (m, 512)), jnp.int8)
        b = jnp.asarray(rng.integers(-128, 128, (512, 256)), jnp.int8)
        exact = np.asarray(a, np.int64) @ np.asarray(b, np.int64)
        for b_layout, bl in (("kn", b), ("nk", b.T + 0)):
            kw = dict(out_dtype=jnp.float32, b_layout=b_layout, platform=platform, interpret=interpret)
            y = api.int8_matmul(a, bl, 1.0, 1.0, **kw)
            ok = bool(np.array_equal(np.asarray(y).astype(np.int64), exact))
            out.append({"check": f"int8 exact m={m} b_layout={b_layout}", "ok": ok})
    for bits, layout, group in [
        (4, "k_halves", None),
        (4, "k_halves", 128),
        (4, "n_pairs", None),
        (4, "n_pairs", 64),
        (4, "k_pairs", 128),
        (8, "int8", None),
        (8, "int8", 128),
        (4, "k_pairs_nk", None),
        (4, "k_pairs_nk", 128),
        (4, "n_pairs_nk", 64),
        (8, "int8_nk", 128),
    ]:
        if layouts is not None and layout not in layouts:
            continue
        base, nk = kc.split_layout(layout)
        runs = [(1, "triton"), (13, "triton"), (70, "triton"), (1, "gemv"), (13, "gemv")]
        runs += [(1, "ptx"), (13, "ptx"), (70, "ptx")]  # the inline PTX: only hardware runs it
        for m, engine in runs:
            k, n = 512, 256
            codes, s = make_weight_only(rng, bits, k, n, group)
            w = weight_in_layout(codes, layout, 128)
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            ref = reference_weight_only(np.asarray(x, np.float32), codes, s, group)
            cfg = None  # the default (tensor-core) config, or a CUDA-core one
            if engine == "gemv":
                cfg = BlockConfig(
                    kc.pow2_at_least(m, 1), 64, 128 if layout == "k_halves" else 64, 2, engine="gemv"
                )
            elif engine == "ptx":
                cfg = BlockConfig(
                    16 if m <= 16 else 64, 64, 128 if layout == "k_halves" else 64, 2, dequant="ptx"
                )
            kw = dict(
                group_size=group,
                platform=platform,
                interpret=interpret,
                out_dtype=jnp.float32,
                config=cfg,
                b_layout="nk" if nk else "kn",
            )
            s_w = s.T if nk else s
            check = {"check": f"{layout} g={group} m={m}" + ("" if engine == "triton" else f" {engine}")}
            try:
                if bits == 4:
                    y = api.w4a16_matmul(x, w, s_w, layout=base, **kw)
                else:
                    y = api.w8a16_matmul(x, w, s_w, **kw)
                e = rel_err(y, ref)
                check.update(ok=e < 1e-2, rel_err=e)
            except Exception as exc:  # a compile failure is a finding, not a crash
                check.update(ok=False, error=repr(exc)[:500])
            out.append(check)
    return out


def wgmma_checks(rng, interpret=False):
    """The Hopper ``wgmma`` W8A8 kernel bit-exact at odd M, each shipped config (a compile
    failure is recorded, not raised)."""
    out = []
    for m in (1, 7, 130):
        a = jnp.asarray(rng.integers(-128, 128, (m, 512)), jnp.int8)
        b_nk = jnp.asarray(rng.integers(-128, 128, (256, 512)), jnp.int8)
        exact = np.asarray(a, np.int64) @ np.asarray(b_nk, np.int64).T
        for cfg in gpu_wgmma.CONFIGS:
            tile = f"{cfg.block_m}x{cfg.block_n}{' persistent' * cfg.persistent}"
            check = {"check": f"int8 exact m={m} wgmma {tile}"}
            try:
                y = api.int8_matmul(
                    a,
                    b_nk,
                    1.0,
                    1.0,
                    out_dtype=jnp.float32,
                    b_layout="nk",
                    platform="gpu",
                    config=cfg,
                    interpret=interpret,
                )
                check["ok"] = bool(np.array_equal(np.asarray(y).astype(np.int64), exact))
            except Exception as e:  # a Mosaic GPU compile failure is a finding, not a crash
                check.update(ok=False, error=repr(e)[:500])
            out.append(check)
    return out


def small_batch_candidates(tried: list[dict], cands: list, m: int, layout: str, per_engine: int = 3) -> list:
    """Candidates for a batch <= 16 after the first batch of the same kernel was tuned: the
    ``per_engine`` fastest configs of each kernel variant there (the ``gemv`` ones with
    ``block_m`` set to this batch, if they still fit), then this batch's own list."""
    ranked = sorted(tried, key=lambda r: r["us"])
    first = []
    for engine in ("gemv", "triton", "triton+ptx"):
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


def fallback_us(case: dict) -> float | None:
    """The time of the XLA formulation ``qjax.quantized`` runs when it does not take the
    kernel, on the same stored weight: XLA's int8 dot on the ``(K, N)`` codes for W8A8
    (every W8A8 kernel entry, the transposing ``(N, K)`` ones included, replaces it), XLA's
    dequantize-and-dot for weight-only. Not the bfloat16 dot: that needs a float weight the
    quantized model no longer has (the speed goals compare against it; dispatch cannot)."""
    return case.get("xla_int8_kn_us") if case["kernel"] == "w8a8" else case.get("xla_quant_us")


def table_entries(cases) -> list[tuning.TunedEntry]:
    """Tuning-table entries for the cases that found a config and timed their fallback: the
    best config and its time next to the fallback's (:func:`fallback_us`), both wall clock
    per call in the same run. A W8A8 ``(N, K)`` case also gives the entry for a weight
    *stored* ``(N, K)`` (``"w8a8_nk_stored"``): the kernel without the transpose
    (``kernel_only_us``) against XLA's int8 dot on that stored weight (``xla_int8_nk_us``)."""

    def entry(r, layout, kernel_us, xla_us):
        return tuning.TunedEntry(
            kernel=tuning.kernel_name(r["kernel"], layout, r["config"].get("engine", "triton")),
            m=r["m"],
            k=r["k"],
            n=r["n"],
            group_size=r["group_size"],
            config=BlockConfig.from_dict(r["config"]),
            kernel_us=kernel_us,
            xla_us=xla_us,
        )

    out = []
    for r in cases:
        if not r.get("config"):
            continue
        if fallback_us(r):
            out.append(entry(r, r["layout"], r["kernel_us"], fallback_us(r)))
        if (
            r["kernel"] == "w8a8"
            and r["layout"] == "nk"
            and r.get("kernel_only_us")
            and r.get("xla_int8_nk_us")
        ):
            out.append(entry(r, "nk_stored", r["kernel_only_us"], r["xla_int8_nk_us"]))
    return out


def merge_table(
    path: Path, device: str, date: str, new: list[tuning.TunedEntry], compute_capability: str | None
) -> None:
    """Write ``new`` into the table at ``path``, keeping the entries it holds for other
    kernels / shapes (so separate runs, e.g. ``--part wgmma``, add up)."""
    key = lambda e: (e.kernel, e.m, e.k, e.n, e.group_size)
    old = tuning.read_table(path) if path.exists() else ()
    fresh = {key(e) for e in new}
    entries = [e for e in old if key(e) not in fresh] + list(new)
    tuning.write_table(path, device, date, entries, compute_capability)


def table_from_reports(paths: list[str], table: Path, compute_capability: str | None = None) -> None:
    """Rebuild a tuning table from saved benchmark JSONs (later reports win per shape);
    every report must come from one device. ``compute_capability`` fills in reports that do
    not record it (runs before 2026-11-26 07:30 UTC)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    devices = {(r["device"], r.get("compute_capability") or compute_capability) for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"--table-from: reports from more than one device: {sorted(devices, key=str)}")
    (device, cc), date = devices.pop(), max(r["date"] for r in reports)
    if cc is None:
        raise SystemExit("--table-from: the reports do not record the GPU's compute capability")
    for r in reports:
        merge_table(table, device, date, table_entries(r["cases"]), cc)


def _f(v, spec=".1f", unit=""):
    return "—" if v is None else f"{v:{spec}}{unit}"


def markdown(reports: list[dict]) -> str:
    """Markdown tables of saved reports (one device): W8A8 rows (the ``(N, K)`` cases also
    as the kernel alone) and weight-only rows, device and wall time, ratios to XLA."""
    head = reports[0]
    out = [
        f"# Kernels on {head['device']}, {head['date']} (jax {head['jax']}, `experiments/bench_kernels.py`)",
        "",
        f"Copy bandwidth probe: {_f(head.get('copy_bandwidth_GBps'), '.0f')} GB/s. Device time: CUPTI, "
        "per call. Wall: per call in a program of >= 96 calls. `vs quant`: XLA's formulation on "
        'the same stored weight (what `backend="xla"` runs).',
        "",
        "## W8A8",
        "",
        "| kernel | weight | M=K=N | config | device µs | TOP/s | vs bf16 | vs XLA int8 (K,N) "
        "| vs XLA int8 (N,K) | XLA device µs bf16 / int8 (K,N) / (N,K) | wall µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = [c for r in reports for c in r["cases"] if c.get("config")]
    for c in (c for c in cases if c["kernel"] == "w8a8"):
        cf = c["config"]
        cfg = f"{cf['block_m']}×{cf['block_n']}×{cf['block_k']} w{cf['num_warps']} s{cf['num_stages']}"
        cfg += " persistent" * bool(cf.get("persistent"))
        rows = [("(K, N)" if c["layout"] == "kn" else "(K, N) transposed per call", "kernel")]
        rows += [("(N, K) stored", "kernel_only")] if c["layout"] == "nk" else []
        for label, key in rows:
            d = c.get(f"device_{key}_us")
            tops = None if d is None else 2 * c["m"] * c["k"] * c["n"] / (d * 1e-6) / 1e12
            bases = [c.get(f"device_xla_{b}_us") for b in ("bf16", "int8_kn", "int8_nk")]
            ratios = [_f(None if d is None or b is None else b / d, ".2f", "×") for b in bases]
            out.append(
                f"| {c['engine']} | {label} | {c['m']} | {cfg} | {_f(d)} | {_f(tops, '.0f')} "
                f"| {' | '.join(ratios)} | {' / '.join(_f(b) for b in bases)} | {_f(c.get(f'{key}_us'))} |"
            )
    out += [
        "",
        "## Weight-only",
        "",
        "| kernel | layout | M | K=N | group | config: engine bm×bn×bk split warps "
        "| device µs kernel / bf16 / quant | vs bf16 | vs quant | wall µs kernel / bf16 / quant "
        "| HBM roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (c for c in cases if c["kernel"] != "w8a8"):
        cf = c["config"]
        dev = " / ".join(_f(c.get(f"device_{k}_us")) for k in ("kernel", "xla_bf16", "xla_quant"))
        wall = " / ".join(_f(c.get(f"{k}_us")) for k in ("kernel", "xla_bf16", "xla_quant"))
        out.append(
            f"| {c['kernel']} | {c['layout']} | {c['m']} | {c['k']} | {c['group_size'] or '—'} "
            f"| {variant(BlockConfig.from_dict(cf))} {cf['block_m']}×{cf['block_n']}×{cf['block_k']} "
            f"s{cf['split_k']} w{cf['num_warps']}{' swap' * bool(cf.get('swap'))} | {dev} "
            f"| {_f(c.get('device_speedup_vs_xla_bf16'), '.2f', '×')} "
            f"| {_f(c.get('device_speedup_vs_xla_quant'), '.2f', '×')} | {wall} "
            f"| {_f(c.get('roofline_fraction'), '.2f')} |"
        )
    return "\n".join(out) + "\n"


def _dry_run_modes(stack: contextlib.ExitStack):
    """``(mode, wgmma_mode, hopper)`` for ``--dry-run``: Triton kernels in the Pallas
    interpreter, the wgmma kernel in JAX's GPU interpreter (with the tests' patch for
    transposed operands, on until ``stack`` closes), one rep of at most two calls."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernels.mgpu_interpret import interpret_params, transposed_wgmma_operands

    stack.enter_context(transposed_wgmma_operands(watchdog_s=3600))
    quick = dict(reps=1, max_calls=2)
    return Mode("gpu", True, **quick), Mode("gpu", interpret_params(), **quick), True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results/bench_kernels.json")
    p.add_argument("--write-table", default=None, help="write the tuning table here")
    p.add_argument("--budget-s", type=float, default=300, help="stop tuning after this many seconds")
    p.add_argument("--sizes", default="4096,8192")
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument(
        "--layouts",
        default="k_halves,n_pairs,int8",
        help="weight-only layouts to time (n_pairs / k_pairs: what qjax.quantized dispatches; "
        "k_pairs_nk / n_pairs_nk / int8_nk: a weight stored (N, K), as PyTorch's (out, in))",
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
    main_part, wgmma_part = args.part in ("all", "main"), args.part in ("all", "wgmma") and hopper
    if main_part:
        layouts = set(args.layouts.split(","))
        report["checks"] = exactness_checks(rng, mode.platform, mode.interpret, layouts, args.w8a8)
        log("checks:", all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]])
    bw = copy_bandwidth(2**20 if args.dry_run else 2**30)
    report["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    t0 = time.perf_counter()
    sizes = [int(v) for v in args.sizes.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    plan = []
    if main_part:
        if args.w8a8:
            plan += [("w8a8", args.w8a8_size, None, "kn"), ("w8a8", args.w8a8_size, None, "nk")]
        for size in sizes:
            for layout in args.layouts.split(","):
                bits, groups = (8, (None,)) if layout.startswith("int8") else (4, (None, 128))
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

    best_small = {}
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
                cands = cands[:2] if args.dry_run else cap_per_engine(cands, args.max_candidates)
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
