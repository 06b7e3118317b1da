"""Quantization-aware distillation on scikit-learn digits: a 4-bit QAT student trained
alone vs. the same 4-bit QAT student distilled from a float teacher.

Same data-limited setting as ``distill_digits.py`` (teacher CNN on all 1257 training
images, student CNN on 10 labelled images per class, same budget for every variant,
seeds vary the student's subset, init and batch order). The student is trained through
``qjax.fake_quantized`` with

* W4: int4 weights (symmetric, per output channel) in both layers, float activations;
* W4A4: the same weights and uint4 activations (asymmetric, per tensor, dynamic range)
  at the input of both layers;

and distilled in the same jitted step (``distill_step(..., student_policy=policy)``).
Accuracy is measured twice: with the fake-quantized model, and with real integer
execution (``qjax.quantize_params`` + ``qjax.quantized``). Float students are listed for
reference. KD uses T = 4 (the usual default) and T = 8 (the best T of distill_digits),
alpha = 0.9; the hint variant adds FitNets with weight 1.

Writes ``experiments/results/distill_qat.{json,md}``.

Usage::

    python experiments/distill_qat.py           # ~1-2 minutes on 2 CPU cores
    python experiments/distill_qat.py --quick    # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np
import optax
from distill_common import (
    HINT_WEIGHT,
    STUDENT_GUIDED,
    TEACHER_HINT,
    Student,
    Teacher,
    ce,
    distill_train,
    fmt,
    fmt_paired,
    kd,
    kd_hint,
    load,
    machine,
    make_accuracy,
    n_params,
    paired,
    subset,
    summary,
    train_plain,
    write,
)

import qjax
from qjax import distill

W4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
A4 = qjax.QuantSpec(qjax.uint4, symmetric=False)
POLICIES = {
    "float": None,
    "W4": qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=W4)]),
    "W4A4": qjax.Policy([qjax.Rule(r"params/.*/kernel", weight=W4, act=A4)]),
}


def variants() -> dict[str, dict[str, Any]]:
    v: dict[str, dict[str, Any]] = {}
    for prec in ("float", "W4", "W4A4"):
        v[f"{prec}: alone (CE)"] = {"prec": prec, "loss": ce, "teacher": False}
        for t in (4.0, 8.0):
            v[f"{prec}: KD T={t:g} α=0.9"] = {"prec": prec, "loss": kd(t, 0.9)}
        if prec != "float":
            v[f"{prec}: KD T=8 α=0.9 + hint (λ={HINT_WEIGHT:g})"] = {
                "prec": prec,
                "loss": kd_hint(8.0, 0.9),
                "hint": True,
            }
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 50, 2
    t0 = time.time()
    info = machine()
    data = load(0)
    teacher, student = Teacher(), Student()
    t_vars = train_plain(teacher, data.x_train, data.y_train, steps=1500, batch=64, lr=1e-3, seed=0)
    t_acc = make_accuracy(teacher, data.x_test, data.y_test)(t_vars)
    print(f"teacher: {n_params(t_vars)} params, test accuracy {100 * t_acc:.2f}%")
    fake_acc = {p: make_accuracy(student, data.x_test, data.y_test, pol) for p, pol in POLICIES.items()}
    x_test = jax.numpy.asarray(data.x_test)
    int_apply = {
        p: jax.jit(qjax.quantized(student.apply, pol)) for p, pol in POLICIES.items() if pol is not None
    }

    def int_acc(prec: str, variables) -> float:
        qv = qjax.quantize_params(variables, POLICIES[prec])
        return float(np.mean(np.argmax(np.asarray(int_apply[prec](qv, x_test)), -1) == data.y_test))

    results: dict[str, Any] = {}
    for name, cfg in variants().items():
        prec = cfg["prec"]
        ds = distill.distill_step(
            student.apply,
            teacher.apply if cfg.get("teacher", True) else None,
            cfg["loss"],
            optax.adam(args.lr),
            student_patterns=[STUDENT_GUIDED] if cfg.get("hint") else None,
            teacher_patterns=[TEACHER_HINT] if cfg.get("hint") else None,
            student_policy=POLICIES[prec],
            jit=False,
        )
        accs, ints = [], []
        for seed in range(args.seeds):
            idx = subset(data.y_train, args.per_class, seed=1000 + seed)
            x, y = data.x_train[idx], data.y_train[idx]
            s_vars = student.init(jax.random.key(seed), x[:1])
            adapters = (
                {"hint": distill.init_adapter(jax.random.key(100 + seed), 8, 64)} if cfg.get("hint") else {}
            )
            steps = np.random.default_rng(seed).integers(0, len(x), size=(args.steps, args.batch))
            state = distill_train(ds, ds.init(s_vars, adapters), t_vars, x, y, steps)
            accs.append(fake_acc[prec](state.params["student"]))
            if prec != "float":
                ints.append(int_acc(prec, state.params["student"]))
        results[name] = summary(accs)
        if ints:
            results[name]["integer_execution"] = summary(ints)
        extra = f"  integer {fmt(results[name]['integer_execution'])}" if ints else ""
        print(f"{name:40s} {fmt(results[name])}{extra}  {results[name]['accs']}")

    info["runtime_s"] = round(time.time() - t0, 1)
    out = {
        **info,
        "setting": {
            "data": "sklearn load_digits, 70/30 stratified split (seed 0), pixels/16",
            "teacher": f"float CNN, {n_params(t_vars)} params (as distill_digits)",
            "student": f"CNN conv3x3/8-pool-fc10, {n_params(s_vars)} params",
            "student_data": f"{args.per_class} labelled images per class, drawn per seed",
            "budget": f"{args.steps} adam steps (lr {args.lr}), batch {args.batch}",
            "quantization": {
                "W4": "int4 symmetric per-output-channel weights (both layers), float activations",
                "W4A4": "W4 + uint4 asymmetric per-tensor dynamic activations at both layers' inputs",
            },
            "seeds": args.seeds,
        },
        "teacher_test_accuracy": t_acc,
        "results": results,
    }
    lines = [
        "# distill_qat: 4-bit QAT student, alone vs distilled (scikit-learn digits)",
        "",
        f"- date: {info['date']}; machine: {info['processor']}, {info['cpu_count']} CPU cores, backend "
        f"{info['backend']}; jax {info['jax']}, qjax {info['qjax']}; run time {info['runtime_s']} s "
        f"(load average at start {info['load_avg_1min_start']:.2f})",
        f"- teacher: {out['setting']['teacher']}, float, test accuracy {100 * t_acc:.2f}%",
        f"- student: {out['setting']['student']}, trained on {out['setting']['student_data']}; "
        f"{out['setting']['budget']}, identical for every variant; QAT through `qjax.fake_quantized` "
        "inside `distill_step(..., student_policy=...)` (one jitted step)",
        f"- W4: {out['setting']['quantization']['W4']}; W4A4: {out['setting']['quantization']['W4A4']}",
        f"- test accuracy on 540 images, mean ± std over {args.seeds} seeds; 'integer' = the trained "
        "student quantized with `qjax.quantize_params` and run with `qjax.quantized` (integer execution)",
        "",
        "- Δ: per-seed difference to the same-precision student trained alone (same subset, init and "
        "batch order), mean ± std in points, and on how many seeds the variant is better",
        "",
        "| variant | fake-quant accuracy % | Δ vs same precision alone, paired | integer execution % "
        "| per seed % |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        base_name = f"{name.split(':')[0]}: alone (CE)"
        if name != base_name:
            r["paired_vs_alone"] = paired(r, results[base_name])
        delta = fmt_paired(r["paired_vs_alone"]) if "paired_vs_alone" in r else "—"
        integer = fmt(r["integer_execution"]) if "integer_execution" in r else "—"
        seeds = ", ".join(f"{100 * a:.1f}" for a in r["accs"])
        lines.append(f"| {name} | {fmt(r)} | {delta} | {integer} | {seeds} |")
    if not args.no_write:
        write("distill_qat_quick" if args.quick else "distill_qat", out, "\n".join(lines) + "\n")
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
