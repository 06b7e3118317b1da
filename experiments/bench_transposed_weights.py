"""``qjax.quantized`` on weights stored ``(N, K)`` and read as ``x @ w.T`` (PyTorch's
``(out, in)`` layout, models converted from it): a benchmark, not a test.

``qjax.quantized`` folds the transposes between a weight and its matmul into the matmul's
dimension numbers, so the stored codes are read in place. Before that change each call
transposed the codes (and unpacked int4 codes to one per byte, since a transpose moves
the packed axis). One run times, on the local backend, for each weight format and batch:

* ``float32``: ``x @ w.T`` on the float weight (the reference of the ratios);
* ``folded``: ``qjax.quantized(x @ w.T)`` as it runs now;
* ``einsum``: ``qjax.quantized(einsum("mk,nk->mn"))``, a program with no transpose at all
  (what ``folded`` should match);
* ``replayed``: the previous behaviour, reproduced by a copy after the ``.T``
  (``jnp.array(w.T, copy=True)``): the trailing op is then a copy, so the transpose is
  replayed on the codes.

Formats: W8A16 (int8 per channel), W4A16 (int4 per channel, packed along K), W4A16 g128,
W8A8 (int8 per-token activations). K = N = ``--size``. Timing: ``timing.time_interleaved``
(interleaved rounds, paired ratios to float32). Writes ``bench_transposed_weights.json``
and ``.md`` to ``--out``.

Usage::

    .venv/bin/python experiments/bench_transposed_weights.py          # ~2 minutes on 2 cores
    .venv/bin/python experiments/bench_transposed_weights.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from report import write
from timing import cell, rel_err, report_header, time_interleaved

import qjax

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = {
    "W8A16": (qjax.QuantSpec(qjax.int8, channel_axes=(0,)), None),
    "W4A16": (qjax.QuantSpec(qjax.int4, channel_axes=(0,)), None),
    "W4A16 g128": (qjax.QuantSpec(qjax.int4, channel_axes=(0,), group_axis=1, group_size=128), None),
    "W8A8": (
        qjax.QuantSpec(qjax.int8, channel_axes=(0,)),
        qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
    ),
}
PROGRAMS = {
    "folded": lambda p, x: x @ p["w"].T,
    "einsum": lambda p, x: jnp.einsum("mk,nk->mn", x, p["w"]),
    "replayed": lambda p, x: x @ jnp.array(p["w"].T, copy=True),
}


def run_case(name: str, size: int, m: int, repeats: int, target_s: float) -> dict:
    wspec, aspec = FORMATS[name]
    w = jax.random.normal(jax.random.key(0), (size, size)) / np.sqrt(size)  # (N, K)
    x = jax.random.normal(jax.random.key(1), (m, size))
    pol = qjax.Policy([qjax.Rule("w", weight=wspec, act=aspec)])
    qp = qjax.quantize_params({"w": w}, pol)
    fns = {"float32": jax.jit(lambda w, x: x @ w.T)}
    fns.update({k: jax.jit(qjax.quantized(f, pol)) for k, f in PROGRAMS.items()})
    args = {"float32": (w, x), **{k: (qp, x) for k in PROGRAMS}}
    outs = {k: fn(*args[k]) for k, fn in fns.items()}
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    timed = time_interleaved(
        {k: (lambda fn=fn, a=args[k]: fn(*a)) for k, fn in fns.items()},
        repeats=repeats,
        target_s=target_s,
        reference="float32",
    )
    return {
        "format": name,
        "m": m,
        "k": size,
        "n": size,
        "folded_equals_einsum": bool(np.array_equal(np.asarray(outs["folded"]), np.asarray(outs["einsum"]))),
        "variants": {
            k: {
                "median_us": timed[k]["median_s"] * 1e6,
                "x_f32": timed[k]["ratio"],
                "rel_err_vs_float64": rel_err(outs[k], ref),
            }
            for k in fns
        },
    }


def markdown(report: dict) -> str:
    lines = [
        f"# `x @ w.T` on quantized (N, K) weights ({report['date']}, {report['machine']}, "
        f"jax {report['jax']})",
        "",
        "Median µs per call; in brackets the paired ratio to float32 (below 1: faster).",
        "",
        "| format | M | K=N | float32 | folded (now) | einsum (no transpose) | replayed (before) "
        "| replayed / folded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        v = c["variants"]
        gain = v["replayed"]["x_f32"] / v["folded"]["x_f32"]  # paired ratios: robust to load
        lines.append(
            f"| {c['format']} | {c['m']} | {c['k']} | {cell(v['float32'])} | {cell(v['folded'])} | "
            f"{cell(v['einsum'])} | {cell(v['replayed'])} | {gain:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--batches", default="1,16,256")
    p.add_argument("--quick", action="store_true", help="a smoke run: size 256, few rounds")
    args = p.parse_args(argv)
    size, repeats, target = (256, 3, 0.01) if args.quick else (args.size, 7, 0.2)
    report = {**report_header(), "cases": []}
    for name in FORMATS:
        for m in (int(b) for b in args.batches.split(",")):
            case = run_case(name, size, m, repeats, target)
            print(
                json.dumps({k: case[k] for k in ("format", "m")}),
                {k: round(v["median_us"]) for k, v in case["variants"].items()},
                flush=True,
            )
            report["cases"].append(case)
    write(
        "bench_transposed_weights" + ("_quick" if args.quick else ""),
        report,
        markdown(report),
        Path(args.out),
    )


if __name__ == "__main__":
    main()
