"""Fixed-point inference on scikit-learn digits: test accuracy against the total width.

A float MLP and a float CNN are trained (adam, batch 64; MLP 500 steps at lr 3e-3, CNN
800 steps at lr 1e-2). Each is then run with
``qjax.fixed.fixed_point``: every Dense/Conv layer's weight, input and output in a
``W``-bit fixed-point format (integer bits calibrated on the training images, fraction
bits from the width), biases ``W``-bit too, integer matmuls/convolutions with the derived
accumulator (int64 from W = 13). Two mode pairs: ``RND_CONV``/``SAT`` and the ``ap_fixed``
defaults ``TRN``/``WRAP``.

A third fixed-point column matches what the integer path quantizes: only weights and
layer inputs in ``W`` bits, the exact accumulator passed on (no output cast) and float
biases (``W <= 8``, where the accumulator fits the float32 carrier exactly).

For comparison, the same float models through the integer-quantized scale-based path
(``qjax.quantized``): ``intN`` weights (per-channel and per-tensor absmax scales) and
``intN`` per-tensor activations with calibrated static scales, int32 accumulation, float
rescale and float biases.

Writes ``experiments/results/fixed_inference.{json,md}``.

Usage::

    python experiments/fixed_inference.py          # ~1 minute on 2 CPU cores
    python experiments/fixed_inference.py --quick  # a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
from fixed_common import (
    MODELS,
    accuracy,
    describe,
    fixed_accuracy,
    fixed_rules,
    load,
    machine,
    n_params,
    train_float,
    write,
)

import qjax
from qjax import fixed as qf

WIDTHS = [4, 5, 6, 7, 8, 10, 12, 14, 16]
INT_FORMATS = {4: qjax.int4, 5: qjax.int5, 6: qjax.int6, 7: qjax.int7, 8: qjax.int8, 16: qjax.int16}
MODES = [("RND_CONV", "SAT"), ("TRN", "WRAP")]
STEPS = {"mlp": 500, "cnn": 800}
LR = {"mlp": 3e-3, "cnn": 1e-2}


def int_path_accuracy(model, params, data, bits: int, per_channel: bool) -> float:
    fmt = INT_FORMATS[bits]
    w = qjax.QuantSpec(fmt, channel_axes=(-1,) if per_channel else ())
    policy = qjax.Policy([qjax.Rule(r".*/kernel", weight=w, act=qjax.QuantSpec(fmt))])
    stats = qjax.calibrate(model.apply, policy, params, [data.x_train])
    qparams = qjax.quantize_params(params, policy, act_stats=stats)
    return accuracy(qjax.quantized(model.apply, policy), qparams, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps and widths (smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    data = load()
    widths = [4, 8, 16] if args.quick else WIDTHS
    result = {"machine": machine(), "widths": widths, "models": {}}
    for name, cls in MODELS.items():
        model = cls()
        params = train_float(model, data, steps=20 if args.quick else STEPS[name], lr=LR[name])
        float_acc = accuracy(model.apply, params, data)
        ranges = qf.collect_ranges(model.apply, params, [data.x_train])
        entry = {"params": n_params(params), "float": float_acc, "fixed": {}, "int": {}, "formats": {}}
        for rounding, overflow in MODES:
            key = f"{rounding}/{overflow}"
            entry["fixed"][key] = {}
            for w in widths:
                rules = fixed_rules(ranges, w, params, rounding=rounding, overflow=overflow)
                entry["fixed"][key][w] = fixed_accuracy(model, params, rules, data, w)
                if key == "RND_CONV/SAT" and w in (4, 8, 16):
                    entry["formats"][w] = describe(rules)
        entry["fixed"]["w+in only"] = {}
        for w in [w for w in widths if w <= 8]:
            rules = [(p, dataclasses.replace(v, output=None)) for p, v in qf.calibrate_formats(ranges, w)]
            entry["fixed"]["w+in only"][w] = fixed_accuracy(model, params, rules, data, w)
        for per_channel in (True, False):
            key = "per-channel" if per_channel else "per-tensor"
            entry["int"][key] = {
                b: int_path_accuracy(model, params, data, b, per_channel) for b in INT_FORMATS if b in widths
            }
        result["models"][name] = entry
        print(name, "float", float_acc, "fixed", entry["fixed"]["RND_CONV/SAT"], flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    write("fixed_inference" + ("_quick" if args.quick else ""), result, markdown(result))
    print(f"done in {result['seconds']} s")


def markdown(r) -> str:
    m = r["machine"]
    lines = [
        "# Fixed-point inference on digits: accuracy vs width",
        "",
        f"Date {m['date']}; {m['processor']}, {m['cpu_count']} cores, {m['backend']}; jax {m['jax']}; "
        f"run took {r['seconds']} s. Test set: 540 images. Produced by `experiments/fixed_inference.py`.",
        "",
        "Fixed point (`qjax.fixed.fixed_point`): weights, layer inputs, layer outputs and biases all",
        "`W` bits, integer bits calibrated per layer on the training images; integer matmul/conv with",
        "the derived accumulator. Integer path (`qjax.quantized`): `intN` weights (absmax, per-channel",
        "or per-tensor) and `intN` per-tensor activations with calibrated static scales, float rescale,",
        "float biases.",
        "Column `fixed w+in only`: fixed-point weights and inputs only, like the integer path (no output",
        "cast, float biases).",
        "",
    ]
    for name, e in r["models"].items():
        lines += [f"## {name.upper()} ({e['params']} params), float accuracy {100 * e['float']:.2f}%", ""]
        fixed_cols = " | ".join(f"fixed {k}" for k in e["fixed"])
        head = f"| width | {fixed_cols} | int per-channel | int per-tensor |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for w in r["widths"]:
            cells = [f"{100 * e['fixed'][k][w]:.2f}" if w in e["fixed"][k] else "—" for k in e["fixed"]]
            for k in ("per-channel", "per-tensor"):
                v = e["int"][k].get(w)
                cells.append("—" if v is None else f"{100 * v:.2f}")
            lines.append(f"| {w} | " + " | ".join(cells) + " |")
        lines += ["", "Calibrated formats (RND_CONV/SAT):", ""]
        for w, fm in e["formats"].items():
            lines.append(f"- W={w}: " + "; ".join(f"`{p}`: {d}" for p, d in fm.items()))
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    main()
