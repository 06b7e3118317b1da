"""Quantized pointwise (1x1) convs: run as a dot (now) vs as an integer conv (before).

``quantized_conv_general_dilated`` runs a conv whose kernel is 1x1 (no padding, no
dilation, no groups) as a ``quantized_dot_general`` over the feature axis
(``qjax.quant.ops_conv_pointwise``): the same sums, with XLA's integer GEMM and, on a GPU or
TPU, the Pallas matmul kernels. A benchmark, not a test. One run times, on the local
backend, the 1x1 convs of a ResNet-50 (NHWC, batch ``--batch``), for each format:

* ``float32``: ``lax.conv_general_dilated`` on the float weight (the reference of ratios);
* ``dot``: ``quantized_conv_general_dilated`` as it runs now;
* ``conv``: the previous behaviour, the same op run through its conv formulation
  (``ops_conv._qconv`` with the conv's own method: ``"int"`` for W8A8, ``"convert"`` for
  weight-only), which every conv took before.

Formats: W8A8 (int8 per-channel weight, int8 per-tensor dynamic activation), W8A16,
W4A16 (int4 per channel). Timing: ``timing.time_interleaved`` (interleaved rounds, paired
ratios to float32). Writes ``bench_pointwise_conv.json`` and ``.md`` to ``--out``.

Usage::

    .venv/bin/python experiments/bench_pointwise_conv.py          # ~3 minutes on 2 cores
    .venv/bin/python experiments/bench_pointwise_conv.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from report import write
from timing import cell, rel_err, report_header, time_interleaved

import qjax
from qjax.quant import ops_common, ops_conv
from qjax.quant.ops import quantized_conv_general_dilated

RESULTS = Path(__file__).resolve().parent / "results"
DN = ("NHWC", "HWIO", "NHWC")
# (spatial size, input features, output features): ResNet-50's 1x1 convs, one per stage
SHAPES = ((56, 64, 256), (28, 512, 128), (14, 256, 1024), (7, 2048, 512))
FORMATS = {
    "W8A8": (qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), qjax.QuantSpec(qjax.int8)),
    "W8A16": (qjax.QuantSpec(qjax.int8, channel_axes=(-1,)), None),
    "W4A16": (qjax.QuantSpec(qjax.int4, channel_axes=(-1,)), None),
}


def _as_conv(x, qw, aspec):
    """The conv formulation every conv ran before pointwise convs became dots."""
    cdn = lax.conv_dimension_numbers(x.shape, qw.shape, DN)
    lspec = None if aspec is None else ops_common.resolve_spec(aspec, (cdn.lhs_spec[0],))
    cfg = ops_conv._Config(
        (1, 1), ((0, 0), (0, 0)), (1, 1), (1, 1), cdn, 1, 1, lspec, None,
        "int" if aspec is not None else "convert", jnp.dtype(jnp.float32),
    )  # fmt: skip
    return ops_conv._qconv(cfg, x, qw, None, None, None, None, None)


def run_case(name: str, batch: int, hw: int, cin: int, cout: int, repeats: int, target_s: float) -> dict:
    wspec, aspec = FORMATS[name]
    x = jax.random.normal(jax.random.key(1), (batch, hw, hw, cin))
    w = jax.random.normal(jax.random.key(0), (1, 1, cin, cout)) / np.sqrt(cin)
    qw = qjax.quantize(w, wspec)
    kw = dict(window_strides=(1, 1), padding="VALID", dimension_numbers=DN)
    fns = {
        "float32": (jax.jit(lambda x, w: lax.conv_general_dilated(x, w, **kw)), (x, w)),
        "dot": (jax.jit(lambda x, qw: quantized_conv_general_dilated(x, qw, lhs_spec=aspec, **kw)), (x, qw)),
        "conv": (jax.jit(lambda x, qw: _as_conv(x, qw, aspec)), (x, qw)),
    }
    outs = {k: fn(*a) for k, (fn, a) in fns.items()}
    xr = np.asarray(x if aspec is None else qjax.quantize(x, aspec).dequantize(), np.float64)
    ref = xr @ np.asarray(qw.dequantize(), np.float64)[0, 0]
    timed = time_interleaved(
        {k: (lambda fn=fn, a=a: fn(*a)) for k, (fn, a) in fns.items()},
        repeats=repeats,
        target_s=target_s,
        reference="float32",
    )
    return {
        "format": name,
        "shape": [batch, hw, hw, cin, cout],
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
        f"# Quantized 1x1 convs: dot vs conv formulation ({report['date']}, {report['machine']}, "
        f"jax {report['jax']})",
        "",
        "Median µs per call; in brackets the paired ratio to float32 (below 1: faster). "
        "Error: max |y - ref| / max |ref| against float64 on the same quantized operands.",
        "",
        "| format | N×H×W×Cin→Cout | float32 | dot (now) | conv (before) | conv / dot | error dot / conv |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        v = c["variants"]
        b, h, w, ci, co = c["shape"]
        gain = v["conv"]["x_f32"] / v["dot"]["x_f32"]  # paired ratios: robust to load
        lines.append(
            f"| {c['format']} | {b}×{h}×{w}×{ci}→{co} | {cell(v['float32'])} | {cell(v['dot'])} | "
            f"{cell(v['conv'])} | {gain:.2f}× | {v['dot']['rel_err_vs_float64']:.1e} / "
            f"{v['conv']['rel_err_vs_float64']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="a smoke run: batch 1, two shapes, few rounds")
    args = p.parse_args(argv)
    batch, shapes, repeats, target = (1, SHAPES[2:], 3, 0.01) if args.quick else (args.batch, SHAPES, 7, 0.2)
    report = {**report_header(), "cases": []}
    for name in FORMATS:
        for hw, cin, cout in shapes:
            case = run_case(name, batch, hw, cin, cout, repeats, target)
            print(
                name,
                case["shape"],
                {k: round(v["median_us"]) for k, v in case["variants"].items()},
                flush=True,
            )
            report["cases"].append(case)
    write("bench_pointwise_conv" + ("_quick" if args.quick else ""), report, markdown(report), Path(args.out))


if __name__ == "__main__":
    main()
