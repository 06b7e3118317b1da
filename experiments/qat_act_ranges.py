"""Static activation scales in quantization-aware training: frozen calibration vs running
averages (``qjax.fake_quantized(..., act_stats_momentum=m)``) vs delayed scaling
(``act_stats_momentum=qjax.DelayedScaling(h)``) on scikit-learn digits.

A static (per-tensor, calibrated) activation scale is fixed before QAT starts. When the
weights move far during QAT, the activations' ranges move with them and the frozen scales
no longer fit. This script trains an MLP (64 -> 128 -> 64 -> 10, ReLU) from its random
initialisation with 4-bit weights (int4, per output channel) and 4-bit static activations
(uint4, asymmetric, per tensor) at the input of every layer, and deploys it with integer
execution (``qjax.quantize_params(..., act_stats=...)`` + ``qjax.quantized``):

* ``dynamic``: per-batch activation scales in training and serving (the reference);
* ``frozen``: calibrated at initialisation (``qjax.calibrate`` on 4 training batches),
  trained and served with those scales;
* ``frozen + recalibrated``: trained with the initial scales, served with scales
  calibrated on the trained weights;
* ``running m``: trained with running-average ranges (momentum ``m``) started from the
  initial calibration, served with the final ones;
* ``delayed h``: trained with delayed scaling (each step's scale from the ranges of the
  last ``h`` steps), started from the initial calibration, served with the final window's.

Every variant of a seed starts from the same initialisation and sees the same batches.
Also times one jitted training step of each (an update costs one reduction per op).
Writes ``experiments/results/qat_act_ranges.{json,md}``.

Usage::

    python experiments/qat_act_ranges.py            # ~2 minutes on 2 CPU cores
    python experiments/qat_act_ranges.py --quick    # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_models import MLP
from distill_common import fmt, fmt_paired, load, paired, summary
from report import machine, write

import qjax

W4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))


def policy(calibration: str) -> qjax.Policy:
    """W4A4 with the activation range from ``"minmax"`` or ``"mse"`` (clip search)."""
    cal = qjax.calib.mse() if calibration == "mse" else None
    act = qjax.QuantSpec(qjax.uint4, symmetric=False, calibration=cal)
    return qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=W4, act=act)])


DYNAMIC = "dynamic"
FROZEN = "frozen"
RECAL = "frozen + recalibrated"


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(model, tx, pol: qjax.Policy, momentum):
    """One jitted Adam step of QAT: ``step(params, opt, stats, x, y) -> (params, opt, stats, loss)``."""
    if momentum is None:  # stats: fixed static scales, or None for dynamic ones

        def loss(p, stats, x, y):
            return xent(qjax.fake_quantized(model.apply, pol, act_stats=stats)(p, x), y), stats

    else:
        qat = qjax.fake_quantized(model.apply, pol, act_stats_momentum=momentum)

        def loss(p, stats, x, y):
            logits, new = qat(p, stats, x)
            return xent(logits, y), new

    @jax.jit
    def step(p, opt, stats, x, y):
        (value, stats), g = jax.value_and_grad(loss, has_aux=True)(p, stats, x, y)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, stats, value

    return step


def step_time_us(step, args, repeats: int = 200) -> float:
    """Median wall time of one call (after a warm-up), in microseconds."""
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def run(args, data, calibration: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Every variant over the seeds with activation ranges by ``calibration``: results per
    variant and the step times."""
    pol = policy(calibration)
    model, tx = MLP(hidden=(128, 64)), optax.adam(args.lr)
    momenta = [float(m) for m in args.momenta.split(",")]
    running: dict[str, Any] = {f"running m={m:g}": m for m in momenta}
    running |= {f"delayed h={h}": qjax.DelayedScaling(int(h)) for h in args.histories.split(",") if h}

    def start(m, stats):  # the running state a variant starts from
        return m.init(stats) if isinstance(m, qjax.DelayedScaling) else stats

    def served(m, stats):  # the ranges a variant is served with
        return m.ranges(stats) if isinstance(m, qjax.DelayedScaling) else stats

    steps = {None: make_step(model, tx, pol, None)} | {
        m: make_step(model, tx, pol, m) for m in running.values()
    }
    serve = jax.jit(qjax.quantized(model.apply, pol))
    x_test = jnp.asarray(data.x_test)

    def deployed_acc(params, stats) -> float:
        qparams = qjax.quantize_params(params, pol, act_stats=stats)
        return float(np.mean(np.argmax(np.asarray(serve(qparams, x_test)), -1) == data.y_test))

    accs: dict[str, list[float]] = {name: [] for name in (DYNAMIC, FROZEN, RECAL, *running)}
    drift: dict[str, list[float]] = {name: [] for name in (FROZEN, *running)}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        order = rng.integers(0, len(data.x_train), size=(args.steps, args.batch))
        calib = [jnp.asarray(data.x_train[order[i]]) for i in range(4)]
        init = model.init(jax.random.key(seed), calib[0][:1])
        stats0 = qjax.calibrate(model.apply, pol, init, calib)
        trained = {}
        for name, (momentum, stats) in {
            DYNAMIC: (None, None),
            FROZEN: (None, stats0),
            **{n: (m, start(m, stats0)) for n, m in running.items()},
        }.items():
            p, opt = init, tx.init(init)
            for idx in order:
                p, opt, stats, _ = steps[momentum](p, opt, stats, data.x_train[idx], data.y_train[idx])
            trained[name] = (p, stats)
        accs[DYNAMIC].append(deployed_acc(*trained[DYNAMIC]))
        accs[FROZEN].append(deployed_acc(*trained[FROZEN]))
        recal = qjax.calibrate(model.apply, pol, trained[FROZEN][0], calib)
        accs[RECAL].append(deployed_acc(trained[FROZEN][0], recal))
        for name, m in running.items():
            accs[name].append(deployed_acc(trained[name][0], served(m, trained[name][1])))
        # how far the calibrated ranges moved in training: final calibration / initial, per op
        for name in (FROZEN, *running):
            final = qjax.calibrate(model.apply, pol, trained[name][0], calib)
            drift[name].append(float(np.mean([float(final[k].hi / stats0[k].hi) for k in stats0])))
        print(
            f"{calibration} seed {seed}: " + ", ".join(f"{n} {100 * a[-1]:.1f}" for n, a in accs.items()),
            flush=True,
        )

    x0, y0 = jnp.asarray(data.x_train[: args.batch]), jnp.asarray(data.y_train[: args.batch])
    p0 = model.init(jax.random.key(0), x0[:1])
    s0 = qjax.calibrate(model.apply, pol, p0, [x0])
    times = {
        name: step_time_us(steps[m], (p0, tx.init(p0), start(m, s0), x0, y0)) for name, m in running.items()
    }
    times[FROZEN] = step_time_us(steps[None], (p0, tx.init(p0), s0, x0, y0))
    times[DYNAMIC] = step_time_us(steps[None], (p0, tx.init(p0), None, x0, y0))
    results: dict[str, Any] = {name: summary(a) for name, a in accs.items()}
    for name in (*running, DYNAMIC, FROZEN):
        results[name]["paired_vs_recalibrated"] = paired(results[name], results[RECAL])
    for name, d in drift.items():
        results[name]["range_growth"] = float(np.mean(d))
    return results, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--momenta", default="0.9,0.99")
    ap.add_argument("--histories", default="1,16", help="delayed-scaling window lengths (empty: none)")
    ap.add_argument("--calibrations", default="minmax,mse")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 60, 2
    t0 = time.time()
    info = machine()
    data = load(0)
    runs = {cal: run(args, data, cal) for cal in args.calibrations.split(",")}
    info["runtime_s"] = round(time.time() - t0, 1)
    out = {
        **info,
        "setting": {
            "model": "MLP 64-128-64-10 (ReLU), random init",
            "quantization": "int4 per-output-channel weights, uint4 asymmetric per-tensor static activations "
            "at every layer's input (dynamic: per batch)",
            "training": f"{args.steps} Adam steps (lr {args.lr}), batch {args.batch}, all 1257 training "
            "images",
            "calibration": "qjax.calibrate on the first 4 training batches of the seed; activation ranges by "
            "minmax or MSE clip search (qjax.calib.mse()), for calibration and running averages alike",
            "seeds": args.seeds,
        },
        "results": {cal: r for cal, (r, _) in runs.items()},
        "step_time_us": {cal: t for cal, (_, t) in runs.items()},
    }
    lines = [
        "# qat_act_ranges: frozen vs running-average vs delayed static activation scales (digits, W4A4)",
        "",
        f"- date: {info['date']}; machine: {info['processor']}, {info['cpu_count']} CPU cores, backend "
        f"{info['backend']}; jax {info['jax']}, qjax {info['qjax']}; run time {info['runtime_s']} s "
        f"(load average at start {info['load_avg_1min_start']:.2f})",
        f"- {out['setting']['model']}; {out['setting']['quantization']}",
        f"- {out['setting']['training']}; {out['setting']['calibration']}; {args.seeds} seeds (init and "
        "batch order), every variant of a seed from the same init and batches",
        "- accuracy: the trained model served with integer execution (`quantize_params(..., act_stats=)` + "
        "`quantized`) on the 540 test images, mean ± std over seeds",
        "- range growth: mean over ops of (calibrated max of the trained model / at initialisation)",
    ]
    for cal, (results, times) in runs.items():
        lines += [
            "",
            f"## activation ranges by {cal}",
            "",
            "| variant | served accuracy % | Δ points vs frozen + recalibrated, paired (better on) "
            "| range growth | per seed % |",
            "|---|---:|---:|---:|---|",
        ]
        for name, r in results.items():
            delta = fmt_paired(r["paired_vs_recalibrated"]) if "paired_vs_recalibrated" in r else "—"
            growth = f"{r['range_growth']:.2f}×" if "range_growth" in r else "—"
            seeds = ", ".join(f"{100 * a:.1f}" for a in r["accs"])
            lines.append(f"| {name} | {fmt(r)} | {delta} | {growth} | {seeds} |")
        lines += ["", "| jitted training step | µs (median of 200) |", "|---|---:|"]
        lines += [f"| {name} | {t:.0f} |" for name, t in times.items()]
    if not args.no_write:
        write("qat_act_ranges_quick" if args.quick else "qat_act_ranges", out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
