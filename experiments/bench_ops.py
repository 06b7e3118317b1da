"""Benchmark of the quantized ops (``qjax.quant.ops``) on the local backend: which
formulation of a quantized matmul / conv is fastest (a benchmark, not a test).

a) One MLP layer, ``x (batch, K) @ w (K, N)``, K = N = ``--size`` (1024), batch 1, 4, 16 and 256:

   * baselines: float32 ``x @ w``, bfloat16 ``x @ w``, and "dequantize then dot"
     (``x @ qjax.dequantize(q)``, the naive weight-only form);
   * weights int8 per-channel (W8), int4 per-channel packed (W4), int4 per-channel in
     groups of 128 along K packed (W4 g128), each with
     - a float32 activation (weight-only, W8A16/W4A16 with float32 activations),
     - a bfloat16 activation (weight-only, the usual "A16"),
     - an int8 per-token activation quantized on the fly (W8A8 / W4A8),
     and every applicable ``method=`` of ``quantized_dot_general`` (``"int"``,
     ``"split"``, ``"convert"``, ``"dequant"``); the row marked ``auto`` is what
     ``method="auto"`` picks.
b) A 3x3 conv (NHWC 8x32x32x64 -> 64) and a depthwise 3x3 stride 2 conv: float32 vs
   W8A8 (``"int"``, ``"convert"``) vs W8 weight-only (``"convert"``, ``"dequant"``).

Every variant is a jitted function of its inputs. Each row also reports the relative
error ``max|y - ref| / max|ref|`` against a float64 reference computed from the
dequantized operands, so "fastest" is only among correct formulations.

Timing: compile and warm up, then rounds of interleaved samples (rotated order), each
sample ``inner`` back-to-back calls blocked on, lasting at least ``--target-ms``; the
median sample is reported and ``x f32`` is the median over rounds of the paired ratio
to the float32 baseline of the same round (robust to load from other processes).

Writes ``bench_ops.json`` and ``bench_ops.md`` (``bench_ops_quick.*`` with
``--quick``; ``_gpu`` appended off the CPU) to ``--out`` (default ``experiments/results``).

Usage::

    python experiments/bench_ops.py            # ~2-4 minutes on 2 CPU cores
    python experiments/bench_ops.py --quick    # a smoke test of the script
    python experiments/bench_ops.py --size 4096 --skip-conv --out "$OUT"   # on a GPU: which
        # formulation of a float32-activation weight-only dot "auto" should pick there
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from timing import time_interleaved

import qjax
from qjax.quant.ops import quantized_conv_general_dilated, quantized_dot_general

RESULTS = Path(__file__).resolve().parent / "results"
DN = (((1,), (0,)), ((), ()))


def rel_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))


def weight_specs() -> dict[str, qjax.QuantSpec]:
    Q = qjax.QuantSpec
    return {
        "W8": Q(qjax.int8, channel_axes=(-1,)),
        "W4": Q(qjax.int4, channel_axes=(-1,)),
        "W4 g128": Q(qjax.int4, channel_axes=(-1,), group_size=128, group_axis=0),
    }


A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)


def auto_method(x, q, spec) -> str:
    """What method='auto' resolves to (the rule ``quantized_dot_general`` applies)."""
    from qjax.quant import ops_dot

    kinds = ("int" if spec is not None else "float", "int")
    rows = (x.shape[0], q.shape[1])
    packed = (False, q.packed_axis is not None)
    groups = (None, q.group_size if q.group_axis is not None else None)
    return ops_dot._choose("auto", kinds, rows, (x.dtype, q.dtype), packed, groups)


def bench_dot(batches: list[int], k: int, n: int, *, repeats: int, target_s: float) -> list[dict[str, Any]]:
    rows = []
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32) / math.sqrt(k)
    wb = w.astype(jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    for m in batches:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32)
        xb = x.astype(jnp.bfloat16)
        xd = np.asarray(x, np.float64)
        variants: dict[str, Callable[[], Any]] = {
            "float32": lambda x=x: mm(x, w),
            "bfloat16": lambda xb=xb: mm(xb, wb),
        }
        info: dict[str, dict[str, Any]] = {
            "float32": {
                "weights": "-",
                "act": "float32",
                "method": "float32 x @ w",
                "err": rel_err(mm(x, w), xd @ np.asarray(w, np.float64)),
            },
            "bfloat16": {
                "weights": "-",
                "act": "bfloat16",
                "method": "bfloat16 x @ w",
                "err": rel_err(mm(xb, wb), xd @ np.asarray(w, np.float64)),
            },
        }
        for wname, spec in weight_specs().items():
            q = jax.block_until_ready(qjax.quantize(w, spec))
            wq = np.asarray(q.dequantize(), np.float64)
            naive = jax.jit(lambda a, q: a @ qjax.dequantize(q))
            name = f"{wname} | float32 | dequantize(q) then x @ w"
            variants[name] = lambda f=naive, x=x, q=q: f(x, q)
            info[name] = {
                "weights": wname,
                "act": "float32",
                "method": "dequantize then dot",
                "err": rel_err(naive(x, q), xd @ wq),
            }
            for aname, act, aspec, methods in (
                ("float32", x, None, ("split", "convert", "dequant")),
                ("bfloat16", xb, None, ("split", "convert", "dequant")),
                ("int8 per-token", x, A8, ("int", "convert", "dequant")),
            ):
                if aspec is None:
                    ref = np.asarray(act.astype(jnp.float32), np.float64) @ wq
                else:
                    qa = qjax.quantize(act, aspec.replace(channel_axes=(0,)))
                    ref = np.asarray(qa.dequantize(), np.float64) @ wq
                chosen = auto_method(act, q, aspec)
                for meth in methods:
                    f = jax.jit(
                        lambda a, q, meth=meth, aspec=aspec: quantized_dot_general(
                            a, q, DN, lhs_spec=aspec, method=meth
                        )
                    )
                    name = f"{wname} | {aname} | {meth}"
                    variants[name] = lambda f=f, a=act, q=q: f(a, q)
                    info[name] = {
                        "weights": wname,
                        "act": aname,
                        "method": meth + (" (auto)" if meth == chosen else ""),
                        "err": rel_err(f(act, q), ref),
                    }
        timings = time_interleaved(variants, repeats=repeats, target_s=target_s, reference="float32")
        for name, t in timings.items():
            rows.append(
                {
                    "batch": m,
                    **info[name],
                    "ms": 1e3 * t["median_s"],
                    "x_f32": t["ratio"],
                    "min_ms": 1e3 * t["min_s"],
                    "inner": t["inner"],
                }
            )
    return rows


def conv_cases(quick: bool) -> dict[str, dict[str, Any]]:
    b = 2 if quick else 8
    return {
        "3x3 conv 64->64": dict(x=(b, 32, 32, 64), w=(3, 3, 64, 64), strides=(1, 1), groups=1),
        "depthwise 3x3 s2 (64 ch)": dict(x=(b, 32, 32, 64), w=(3, 3, 1, 64), strides=(2, 2), groups=64),
    }


def conv_variants(c: dict[str, Any]):
    """Zero-argument variants and their info for one conv case."""
    cdn = ("NHWC", "HWIO", "NHWC")
    w8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    at = qjax.QuantSpec(qjax.int8)
    x = jax.random.normal(jax.random.key(0), c["x"], jnp.float32)
    w = jax.random.normal(jax.random.key(1), c["w"], jnp.float32)
    q = qjax.quantize(w, w8)
    kw = dict(
        window_strides=c["strides"],
        padding="SAME",
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=cdn,
        feature_group_count=c["groups"],
    )
    lax_kw = dict(dimension_numbers=cdn, feature_group_count=c["groups"])
    fconv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, c["strides"], "SAME", **lax_kw))
    hi = lambda a, b: jax.lax.conv_general_dilated(
        a, b, c["strides"], "SAME", **lax_kw, precision=jax.lax.Precision.HIGHEST
    )
    variants = {"float32": lambda: fconv(x, w)}
    info = {"float32": {"method": "float32 lax.conv", "act": "float32", "err": 0.0}}
    wq = q.dequantize()
    xa = qjax.quantize(x, at).dequantize()
    for aname, aspec, methods in (
        ("int8 per-tensor", at, ("int", "convert", "dequant")),
        ("float32", None, ("convert", "dequant")),
    ):
        ref = np.asarray(hi(xa if aspec is not None else x, wq), np.float64)
        for meth in methods:
            f = jax.jit(
                lambda a, b, meth=meth, aspec=aspec: quantized_conv_general_dilated(
                    a, b, lhs_spec=aspec, method=meth, **kw
                )
            )
            name = f"{aname} | {meth}"
            variants[name] = lambda f=f: f(x, q)
            info[name] = {"method": meth, "act": aname, "err": rel_err(f(x, q), ref)}
    return variants, info


def bench_conv(*, repeats: int, target_s: float, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for cname, c in conv_cases(quick).items():
        variants, info = conv_variants(c)
        timings = time_interleaved(variants, repeats=repeats, target_s=target_s, reference="float32")
        for name, t in timings.items():
            rows.append({"case": cname, **info[name], "ms": 1e3 * t["median_s"], "x_f32": t["ratio"]})
    return rows


def write_markdown(path: Path, meta: dict[str, Any], dot_rows, conv_rows) -> None:
    lines = [
        "# bench_ops",
        "",
        f"- date: {meta['date']}; machine: {meta['machine']}; cpu count: {meta['cpu_count']}; backend: "
        f"{meta['backend']}; jax {meta['jax']}; total run time {meta['run_s']:.0f} s",
        f"- load average (1 min) at start / end: {meta['load_start']} / {meta['load_end']}",
        f"- timing: median of {meta['repeats']} interleaved samples per variant, each >= "
        f"{meta['target_ms']} ms of back-to-back calls; `x f32` is the paired ratio to float32 "
        "(median over rounds of variant sample / float32 sample of the same round)",
        "- `err`: max |y - ref| / max |ref|; matmul: ref in float64 from the dequantized operands "
        "(for int8 activations, the dequantized per-token int8 activation); conv: ref is "
        "`lax.conv_general_dilated` at precision HIGHEST (float32) on the dequantized operands",
        "",
        f"## a) MLP layer x (batch, {meta.get('size', 1024)}) @ w ({meta.get('size', 1024)}, "
        f"{meta.get('size', 1024)})",
        "",
        "| batch | weights | activation | method | ms | x f32 | err |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for r in dot_rows:
        lines.append(
            f"| {r['batch']} | {r['weights']} | {r['act']} | {r['method']} | {r['ms']:.3f} | "
            f"{r['x_f32']:.2f} | {r['err']:.1e} |"
        )
    lines += [
        "",
        "## b) conv, NHWC / HWIO, padding SAME, W8 per output channel",
        "",
        "| case | activation | method | ms | x f32 | err |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in conv_rows:
        lines.append(
            f"| {r['case']} | {r['act']} | {r['method']} | {r['ms']:.3f} | {r['x_f32']:.2f} | "
            f"{r['err']:.1e} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--target-ms", type=float, default=None)
    p.add_argument("--size", type=int, default=1024, help="K = N of the MLP layer (a)")
    p.add_argument("--skip-conv", action="store_true", help="the MLP layer (a) only")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    target_ms = args.target_ms or (2.0 if args.quick else 25.0)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.quick:
        dot_rows = bench_dot([1, 16], 256, 256, repeats=repeats, target_s=target_ms / 1e3)
    else:
        dot_rows = bench_dot([1, 4, 16, 256], args.size, args.size, repeats=repeats, target_s=target_ms / 1e3)
    conv_rows = (
        [] if args.skip_conv else bench_conv(repeats=repeats, target_s=target_ms / 1e3, quick=args.quick)
    )
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "repeats": repeats,
        "target_ms": target_ms,
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "run_s": time.perf_counter() - t0,
        "quick": args.quick,
        "size": 256 if args.quick else args.size,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = ("bench_ops_quick" if args.quick else "bench_ops") + (
        "" if meta["backend"] == "cpu" else f"_{meta['backend']}"
    )
    (args.out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "dot": dot_rows, "conv": conv_rows}, indent=1)
    )
    write_markdown(args.out / f"{stem}.md", meta, dot_rows, conv_rows)
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
