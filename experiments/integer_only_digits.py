"""Integer-only inference (``qjax.integer_only``, HAWQ-V3's dyadic requantization) on
scikit-learn digits: test accuracy and CPU latency, side by side with the float model and
with ``qjax.quantized`` (the same integer matmuls, rescaled in float).

The float MLP and CNN of the fixed-point studies (``fixed_common``) are trained as there.
Each is quantized with ``bits``-bit per-channel weights and int8 per-tensor activations
whose static scales are calibrated on the training images. Three programs then classify
the 540 test images:

* ``float``: the float model;
* ``quantized``: ``qjax.quantized`` (integer matmuls, float rescale, float bias);
* ``integer_only``: every op from the input's quantization to the logits' dequantization
  on integers (int32 biases, dyadic requantization, ReLU and pooling on integers).

It also reports how often the two quantized programs disagree on the label, and the
largest logit difference relative to the largest logit. Latency: the median of
interleaved samples of one jitted call on the whole test set (``timing.time_interleaved``).

Writes ``experiments/results/integer_only_digits.{json,md}``.

Usage::

    python experiments/integer_only_digits.py          # ~1 minute on 2 CPU cores
    python experiments/integer_only_digits.py --quick  # a smoke test
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from fixed_common import MODELS, load, machine, train_float, write
from timing import time_interleaved

import qjax

STEPS = {"mlp": 500, "cnn": 800}
LR = {"mlp": 3e-3, "cnn": 1e-2}
WEIGHT_FORMATS = {8: qjax.int8, 4: qjax.int4}


def run_model(name: str, data, quick: bool) -> dict:
    model = MODELS[name]()
    params = train_float(model, data, steps=20 if quick else STEPS[name], lr=LR[name])
    x, y = data.x_test, data.y_test
    entry = {"float": {}, "weights": {}}
    f_float = jax.jit(model.apply)
    entry["float"]["accuracy"] = float((np.asarray(f_float(params, x)).argmax(-1) == y).mean())
    for bits, fmt in WEIGHT_FORMATS.items():
        policy = qjax.Policy(
            [
                qjax.Rule(
                    r".*/kernel",
                    weight=qjax.QuantSpec(fmt, channel_axes=(-1,)),
                    act=qjax.QuantSpec(qjax.int8),
                )
            ]
        )
        stats = qjax.calibrate(model.apply, policy, params, [data.x_train])
        qparams = qjax.quantize_params(params, policy, act_stats=stats)
        served = jax.jit(qjax.quantized(model.apply, policy))
        integer = qjax.integer_only(model.apply, policy, qparams)
        ys, yi = np.asarray(served(qparams, x)), np.asarray(integer(x))
        timing = time_interleaved(
            {
                "float": lambda: f_float(params, x),
                "quantized": lambda s=served, q=qparams: s(q, x),
                "integer_only": lambda g=integer: g(x),
            },
            repeats=3 if quick else 9,
            target_s=0.02 if quick else 0.2,
            reference="float",
        )
        entry["weights"][f"int{bits}"] = {
            "quantized_accuracy": float((ys.argmax(-1) == y).mean()),
            "integer_only_accuracy": float((yi.argmax(-1) == y).mean()),
            "label_disagreement": float((ys.argmax(-1) != yi.argmax(-1)).mean()),
            "max_logit_diff_rel": float(np.abs(ys - yi).max() / np.abs(ys).max()),
            "latency_ms": {k: v["median_s"] * 1e3 for k, v in timing.items()},
            "latency_x_float": {k: v["ratio"] for k, v in timing.items()},
        }
    return entry


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Integer-only inference on digits",
        "",
        f"{m['date']}, {m['processor']}, {m['cpu_count']} cores, jax {m['jax']}, "
        f"{result['seconds']:.0f} s. Test set: 540 images; int8 per-tensor activations.",
        "",
        "| model | weights | float acc | quantized acc | integer-only acc | labels differing | "
        "max logit diff | ms float / quantized / integer-only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["models"].items():
        for w, r in e["weights"].items():
            ms = r["latency_ms"]
            lines.append(
                f"| {name} | {w} | {e['float']['accuracy']:.4f} | {r['quantized_accuracy']:.4f} | "
                f"{r['integer_only_accuracy']:.4f} | {r['label_disagreement']:.4f} | "
                f"{r['max_logit_diff_rel']:.2e} | {ms['float']:.3f} / {ms['quantized']:.3f} / "
                f"{ms['integer_only']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few training steps (smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    data = load()
    result = {"machine": machine(), "models": {n: run_model(n, data, args.quick) for n in MODELS}}
    result["seconds"] = time.time() - t0
    write("integer_only_digits" + ("_quick" if args.quick else ""), result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
