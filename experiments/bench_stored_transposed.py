"""``qjax.store_transposed``: Flax-layout ``(K, N)`` weights stored ``(N, K)``: a benchmark,
not a test.

A Flax ``Dense`` reads its kernel ``(K, N)`` as ``x @ w``. ``qjax.store_transposed`` stores
the quantized codes ``(N, K)`` once, outside the program, while the model still sees a
``(K, N)`` array; ``qjax.quantized`` folds the swap into the matmul. On a GPU that is the
layout the 8-bit kernels and XLA's int8 dot want (H200, 4096^3: XLA int8 115.7 us on
``(N, K)`` against 222.1 us on ``(K, N)``; the W8A8 kernels otherwise transpose the codes
in every call). This script times, on the local backend, a ``Dense`` layer for each format
and batch:

* ``float32``: the float layer (the reference of the ratios);
* ``plain``: ``qjax.quantized`` on the ``QArray`` params as ``quantize_params`` gives them;
* ``stored``: the same params after ``qjax.store_transposed``.

The outputs of ``plain`` and ``stored`` are compared (W8A8: integer sums, equal up to the
rescale's rounding, else the script fails).
Formats: W8A8 (int8 per channel, int8 per-token activations), W8A16, W4A16 g128. K = N =
``--size``; ``--backend`` is passed to ``qjax.quantized``. Timing:
``timing.time_interleaved`` (interleaved rounds, paired ratios to float32). Writes
``bench_stored_transposed.json`` and ``.md`` to ``--out``.

Usage::

    .venv/bin/python experiments/bench_stored_transposed.py          # ~2 minutes on 2 cores
    .venv/bin/python experiments/bench_stored_transposed.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn
import jax
import numpy as np
from report import write
from timing import cell, report_header, time_interleaved

import qjax

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = {
    "W8A8": (
        qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
        qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
    ),
    "W8A16": (qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), None),
    "W4A16 g128": (qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=128), None),
}


def run_case(name: str, size: int, m: int, backend: str, repeats: int, target_s: float) -> dict:
    wspec, aspec = FORMATS[name]
    layer = nn.Dense(size, use_bias=False)
    x = jax.random.normal(jax.random.key(1), (m, size))
    v = layer.init(jax.random.key(0), x)
    policy = qjax.Policy([qjax.Rule(".*kernel", weight=wspec, act=aspec)])
    plain = qjax.quantize_params(v, policy)
    stored = qjax.store_transposed(plain, ".*kernel")
    serve = jax.jit(qjax.quantized(layer.apply, policy, backend=backend))
    report = qjax.dispatch_report(layer.apply, policy, backend=backend)
    runs = {k: report(p, x)[0].runs for k, p in (("plain", plain), ("stored", stored))}
    fns = {
        "float32": (jax.jit(layer.apply), v),
        "plain": (serve, plain),
        "stored": (serve, stored),
    }
    outs = {k: np.asarray(fn(p, x), np.float64) for k, (fn, p) in fns.items()}
    diff = float(np.max(np.abs(outs["stored"] - outs["plain"])) / max(np.max(np.abs(outs["plain"])), 1e-30))
    timed = time_interleaved(
        {k: (lambda fn=fn, p=p: fn(p, x)) for k, (fn, p) in fns.items()},
        repeats=repeats,
        target_s=target_s,
        reference="float32",
    )
    return {
        "format": name,
        "m": m,
        "k": size,
        "n": size,
        "stored_vs_plain_rel_diff": diff,
        "runs": runs,  # what dispatch chose for each (qjax.dispatch_report)
        "variants": {k: {"median_us": t["median_s"] * 1e6, "x_f32": t["ratio"]} for k, t in timed.items()},
    }


def markdown(report: dict) -> str:
    lines = [
        f"# Flax (K, N) weights stored (N, K) by qjax.store_transposed ({report['date']}, "
        f"{report['machine']}, jax {report['jax']}, backend={report['backend']})",
        "",
        "Median µs per call; in brackets the paired ratio to float32 (below 1: faster). "
        "Diff: max |stored - plain| / max |plain|.",
        "",
        "| format | M×K×N | float32 | plain (K, N) | stored (N, K) | plain / stored | diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        v = c["variants"]
        gain = v["plain"]["x_f32"] / v["stored"]["x_f32"]  # paired ratios: robust to load
        lines.append(
            f"| {c['format']} | {c['m']}×{c['k']}×{c['n']} | {cell(v['float32'])} | {cell(v['plain'])} | "
            f"{cell(v['stored'])} | {gain:.2f}× | {c['stored_vs_plain_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--backend", default="auto", choices=qjax.kernels.dispatch.BACKENDS)
    p.add_argument("--quick", action="store_true", help="a smoke run: size 256, few rounds")
    args = p.parse_args(argv)
    size, repeats, target = (256, 3, 0.01) if args.quick else (args.size, 7, 0.2)
    report = {**report_header(), "backend": args.backend, "cases": []}
    for name in FORMATS:
        for m in (int(b) for b in args.batches.split(",")):
            case = run_case(name, size, m, args.backend, repeats, target)
            print(
                name,
                m,
                {k: round(v["median_us"]) for k, v in case["variants"].items()},
                case["runs"],
                flush=True,
            )
            report["cases"].append(case)
    # W8A8 sums integers: equal up to the float rescale's rounding (XLA vs a kernel's epilogue)
    bad = [c for c in report["cases"] if c["format"] == "W8A8" and c["stored_vs_plain_rel_diff"] > 1e-6]
    write(
        "bench_stored_transposed" + ("_quick" if args.quick else ""), report, markdown(report), Path(args.out)
    )
    if bad:
        raise SystemExit(f"W8A8 outputs differ between stored and plain weights: {bad}")


if __name__ == "__main__":
    main()
