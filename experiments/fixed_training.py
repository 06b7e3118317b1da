"""Fixed-point training vs float training on scikit-learn digits.

For each model (MLP, CNN) a float baseline is trained with adam. Fixed-point training
then starts from the same initialization with the same batches and steps:

* forward: ``qjax.fixed.fake_fixed_point`` — weights, layer inputs and layer outputs
  rounded onto ``W``-bit formats (clipped STE);
* backward: each layer's output gradient rounded onto a ``W``-bit gradient format with
  stochastic rounding, so both backward matmuls see fixed-point operands;
* updates: ``qjax.fixed.fixed_updates(adam)`` keeps every weight and bias on a
  ``min(W + 8, 23)``-bit accumulator format (stochastic rounding of the update onto the
  accumulator grid, saturating sum);
* formats: activation/weight integer bits from profiling the float baseline of the first
  seed (``collect_ranges``, as hls4ml profiling does), gradient integer bits from the
  gradients at its initialization (``collect_grad_ranges``); the same formats for every
  seed.

Reported: test accuracy of the float model, of the fixed-point-trained model evaluated
with integer inference (``qjax.fixed.fixed_point``, the trained accumulator weights
rounded to ``W`` bits) and of the float model quantized after training to the same
formats (post-training fixed point).

Writes ``experiments/results/fixed_training.{json,md}``.

Usage::

    python experiments/fixed_training.py          # ~1-2 minutes on 2 CPU cores
    python experiments/fixed_training.py --quick  # a smoke test
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from fixed_common import (
    MODELS,
    accuracy,
    batches,
    describe,
    fixed_evaluator,
    fixed_rules,
    init,
    load,
    machine,
    train_float,
    write,
    xent,
)

from qjax import fixed as qf

WIDTHS = [4, 6, 8, 16]
STEPS = {"mlp": 500, "cnn": 800}
LR = {"mlp": 3e-3, "cnn": 1e-2}
SEEDS = [0, 1]


def accumulator_rules(rules, width: int):
    """Weight/bias accumulator formats: the weight's integer bits, ``min(W + 8, 23)`` wide."""
    acc_w = min(width + 8, 23)
    out = []
    for pattern, v in rules:
        integer = v.weight.integer if isinstance(v, qf.LayerFormats) else v.integer
        out.append((pattern, qf.Format(acc_w, integer, rounding="STOCHASTIC", overflow="SAT")))
    return out


def fixed_trainer(model, rules, acc_rules, *, lr: float):
    """``(data, steps, seed) -> params``: fixed-point training with one compiled step."""
    tx = qf.fixed_updates(optax.adam(lr), acc_rules, jax.random.key(0))

    @jax.jit
    def step(params, state, x, y, key):
        def loss(p):
            return xent(qf.fake_fixed_point(model.apply, rules, key=key)(p, x), y)

        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    def train(data, steps: int, seed: int):
        params = init(model, seed)
        state = tx.init(params)._replace(key=jax.random.key(seed + 10))
        for i, (x, y) in enumerate(batches(data, steps, 64, seed + 1)):
            params, state = step(params, state, x, y, jax.random.key(1000 * seed + i))
        return params

    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps and widths (smoke test)")
    args = ap.parse_args()
    t0 = time.time()
    data = load()
    widths = [8] if args.quick else WIDTHS
    seeds = [0] if args.quick else SEEDS
    result = {"machine": machine(), "widths": widths, "seeds": seeds, "lr": LR, "models": {}}
    for name, cls in MODELS.items():
        model = cls()
        steps, lr = (20 if args.quick else STEPS[name]), LR[name]
        entry = {"steps": steps, "float": [], "fixed_trained": {w: [] for w in widths}, "formats": {}}
        entry["post_training"] = {w: [] for w in widths}
        floats = [train_float(model, data, steps=steps, lr=lr, seed=seed) for seed in seeds]
        entry["float"] = [accuracy(model.apply, p, data) for p in floats]
        # Formats from profiling the first seed's float model; gradient formats from the
        # gradients at its initialization. The same formats serve every seed.
        ranges = qf.collect_ranges(model.apply, floats[0], [data.x_train])
        probe = list(batches(data, 4, 64, 123))
        grad_ranges = qf.collect_grad_ranges(model.apply, init(model, seeds[0]), probe, xent)
        for w in widths:
            rules = fixed_rules(ranges, w, floats[0], grad_ranges=grad_ranges, grad_width=w)
            entry["formats"][w] = describe(rules)
            evaluate = fixed_evaluator(model, rules, data, w)
            train = fixed_trainer(model, rules, accumulator_rules(rules, w), lr=lr)
            for seed, float_params in zip(seeds, floats):
                entry["fixed_trained"][w].append(evaluate(train(data, steps, seed)))
                entry["post_training"][w].append(evaluate(float_params))
                print(name, seed, w, entry["fixed_trained"][w][-1], entry["post_training"][w][-1], flush=True)
        print(name, "float", entry["float"], flush=True)
        result["models"][name] = entry
    result["seconds"] = round(time.time() - t0, 1)
    write("fixed_training" + ("_quick" if args.quick else ""), result, markdown(result))
    print(f"done in {result['seconds']} s")


def markdown(r) -> str:
    m = r["machine"]
    lrs = ", ".join(f"{k} {v}" for k, v in r["lr"].items())
    lines = [
        "# Fixed-point training vs float training on digits",
        "",
        f"Date {m['date']}; {m['processor']}, {m['cpu_count']} cores, {m['backend']}; jax {m['jax']}; "
        f"run took {r['seconds']} s. Test set: 540 images. Produced by `experiments/fixed_training.py`.",
        "",
        "Fixed-point training: fake-fixed forward (weights, inputs, outputs `W` bits), layer output",
        "gradients rounded stochastically onto `W`-bit formats, adam updates accumulated in",
        "`min(W + 8, 23)`-bit fixed point (stochastic rounding). Same init, batches and steps as float;",
        f"adam lr {lrs}, batch 64. Evaluated with integer inference at `W` bits. 'post-training' =",
        f"the float model rounded to the same formats after training. Seeds {r['seeds']} (init and",
        "batch order); cells are the mean test accuracy with the per-seed values in brackets. Formats",
        "come from profiling the first seed's float model (and its gradients at initialization).",
        "",
    ]

    def cell(v):
        return f"{100 * np.mean(v):.2f} [" + ", ".join(f"{100 * a:.2f}" for a in v) + "]"

    for name, e in r["models"].items():
        lines += [f"## {name.upper()}: float training {cell(e['float'])} ({e['steps']} steps)", ""]
        lines += ["| width | fixed-point training | float training + post-training fixed point |"]
        lines += ["|---|---|---|"]
        for w in r["widths"]:
            lines.append(f"| {w} | {cell(e['fixed_trained'][w])} | {cell(e['post_training'][w])} |")
        lines.append("")
        w0 = r["widths"][len(r["widths"]) // 2]
        lines += [f"Formats at W={w0} (seed {r['seeds'][0]}):", ""]
        lines += [f"- `{p}`: {d}" for p, d in e["formats"][w0].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    np.set_printoptions(precision=4)
    main()
