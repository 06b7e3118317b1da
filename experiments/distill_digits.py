"""Knowledge distillation on scikit-learn digits: does a small CNN student learn better
from a large CNN teacher than from the labels alone?

Setting (chosen so the student is data-limited): a teacher CNN (~151k params) is trained
on the whole training split (1257 images); the student CNN (~1.4k params) sees only
``--per-class`` labelled images per class (default 10, i.e. 100 images). Every student
variant gets the same budget (``--steps`` adam steps of ``--batch`` images drawn from its
subset) and is evaluated on the 540 test images. Seeds vary the student's subset, init
and batch order; the teacher and the split are fixed (seed 0).

Variants: the student alone (cross-entropy; and with label smoothing 0.1, a control for
"KD is only a regularizer"); Hinton KD for T in {2, 4, 8} and
alpha in {0.5, 0.9}; FitNets hint (student conv -> 1x1 adapter -> teacher conv2) with
CE and with KD (T = 4, 8); KD from a cached top-3 teacher (the teacher forward skipped);
DKD; DIST; CRD (penultimate features -> 32-d embeddings, memory banks over the student's
100 images, 64 negatives from the other classes, as the authors sample) with CE and with
KD; NST (student conv vs teacher conv2), CC (penultimate features) and VID (student conv ->
1x1 adapter -> teacher conv2) with CE, at RepDistiller's CIFAR weights (50, 0.02, 1). All
variants are reported (no selection).

Writes ``experiments/results/distill_digits.{json,md}``.

Usage::

    python experiments/distill_digits.py            # ~1-2 minutes on 2 CPU cores
    python experiments/distill_digits.py --quick    # seconds; a smoke test
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
    ce_hint,
    ce_smooth,
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

from qjax import distill


def dkd(s, tch, batch, adapters):
    return ce(s, tch, batch, adapters) + distill.dkd_loss(s.logits, tch.logits, batch["y"], 4.0, 1.0, 8.0)


def dist(s, tch, batch, adapters):
    return ce(s, tch, batch, adapters) + distill.dist_loss(s.logits, tch.logits, 4.0, 2.0, 2.0)


PENULTIMATE = "params/head/kernel"  # CRD's features: the head's input, student and teacher
CRD_DIM, CRD_NEGATIVES, CRD_WEIGHT = 32, 64, 0.8


def crd(base):
    """``base`` + CRD_WEIGHT · CRD (a stateful loss: the memory banks ride in the state)."""

    def loss_fn(s, tch, batch, adapters, crd_state, key):
        es = distill.apply_adapter(adapters["embed_s"], s.features[PENULTIMATE]["input"])
        et = distill.apply_adapter(adapters["embed_t"], tch.features[PENULTIMATE]["input"])
        negatives = distill.class_negatives(key, batch["index"], batch["dataset_y"], CRD_NEGATIVES)
        value, crd_state = distill.crd_loss(es, et, batch["index"], crd_state, None, negatives=negatives)
        return base(s, tch, batch, adapters) + CRD_WEIGHT * value, {"crd": value}, crd_state

    return loss_fn


def nst(s, tch, batch, adapters):
    fs, ft = s.features[STUDENT_GUIDED]["output"], tch.features[TEACHER_HINT]["output"]
    return ce(s, tch, batch, adapters) + 50.0 * distill.nst_loss(fs, ft)


def cc(s, tch, batch, adapters):
    fs, ft = s.features[PENULTIMATE]["input"], tch.features[PENULTIMATE]["input"]
    return ce(s, tch, batch, adapters) + 0.02 * distill.cc_loss(fs, ft)


def vid(s, tch, batch, adapters):
    mu = distill.apply_adapter(adapters["hint"], s.features[STUDENT_GUIDED]["output"])
    v = distill.vid_loss(mu, tch.features[TEACHER_HINT]["output"], adapters["vid_scale"])
    return ce(s, tch, batch, adapters) + v


def variants() -> dict[str, dict[str, Any]]:
    v: dict[str, dict[str, Any]] = {"student alone (CE)": {"loss": ce, "teacher": False}}
    v["student alone, label smoothing 0.1 (control)"] = {"loss": ce_smooth(0.1), "teacher": False}
    for t in (2.0, 4.0, 8.0):
        for a in (0.5, 0.9):
            v[f"KD T={t:g} α={a:g}"] = {"loss": kd(t, a)}
    v[f"CE + hint (λ={HINT_WEIGHT:g})"] = {"loss": ce_hint(), "hint": True}
    for t in (4.0, 8.0):
        v[f"KD T={t:g} α=0.9 + hint (λ={HINT_WEIGHT:g})"] = {"loss": kd_hint(t, 0.9), "hint": True}
    v["KD T=4 α=0.9, cached top-3 teacher"] = {"loss": kd(4.0, 0.9), "cache_k": 3}
    v["CE + DKD (T=4, α=1, β=8)"] = {"loss": dkd}
    v["CE + DIST (T=4, β=γ=2)"] = {"loss": dist}
    v["CE + NST (β=50)"] = {"loss": nst, "hint": True}
    v["CE + CC (β=0.02, Gaussian P=2)"] = {"loss": cc, "penultimate": True}
    v["CE + VID (β=1)"] = {"loss": vid, "hint": True, "vid": True}
    v[f"CE + CRD (β={CRD_WEIGHT:g})"] = {"loss": crd(ce), "crd": True}
    v[f"KD T=4 α=0.9 + CRD (β={CRD_WEIGHT:g})"] = {"loss": crd(kd(4.0, 0.9)), "crd": True}
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
    teacher = Teacher()
    t_vars = train_plain(teacher, data.x_train, data.y_train, steps=1500, batch=64, lr=1e-3, seed=0)
    t_acc = make_accuracy(teacher, data.x_test, data.y_test)(t_vars)
    print(f"teacher: {n_params(t_vars)} params, test accuracy {100 * t_acc:.2f}%")
    student = Student()
    s_acc = make_accuracy(student, data.x_test, data.y_test)

    results: dict[str, Any] = {}
    for name, cfg in variants().items():
        penultimate = cfg.get("crd") or cfg.get("penultimate")
        ds = distill.distill_step(
            student.apply,
            teacher.apply if cfg.get("teacher", True) and "cache_k" not in cfg else None,
            cfg["loss"],
            optax.adam(args.lr),
            student_patterns=[STUDENT_GUIDED] if cfg.get("hint") else [PENULTIMATE] if penultimate else None,
            teacher_patterns=[TEACHER_HINT] if cfg.get("hint") else [PENULTIMATE] if penultimate else None,
            stateful_loss=cfg.get("crd", False),
            jit=False,
        )
        accs = []
        for seed in range(args.seeds):
            idx = subset(data.y_train, args.per_class, seed=1000 + seed)
            x, y = data.x_train[idx], data.y_train[idx]
            s_vars = student.init(jax.random.key(seed), x[:1])
            adapters = (
                {"hint": distill.init_adapter(jax.random.key(100 + seed), 8, 64)} if cfg.get("hint") else {}
            )
            steps = np.random.default_rng(seed).integers(0, len(x), size=(args.steps, args.batch))
            cache = None
            if "cache_k" in cfg:
                cache = distill.cache_teacher(teacher.apply, t_vars, x, k=cfg["cache_k"], temperature=4.0)
            if cfg.get("vid"):
                adapters["vid_scale"] = distill.vid_log_scale(64)
            key, loss_state = None, None
            if cfg.get("crd"):
                keys = jax.random.split(jax.random.key(200 + seed), 4)
                features = {"embed_s": 8 * 4 * 4, "embed_t": 128}  # pooled student conv, teacher fc
                adapters = {
                    n: distill.init_adapter(k, d, CRD_DIM) for (n, d), k in zip(features.items(), keys)
                }
                loss_state, key = distill.crd_init(keys[2], len(x), CRD_DIM), keys[3]
            state = distill_train(
                ds, ds.init(s_vars, adapters, loss_state=loss_state), t_vars, x, y, steps, cache, key
            )
            accs.append(s_acc(state.params["student"]))
        results[name] = summary(accs)
        print(f"{name:45s} {fmt(results[name])}  {results[name]['accs']}")

    base = results["student alone (CE)"]
    info["runtime_s"] = round(time.time() - t0, 1)
    out = {
        **info,
        "setting": {
            "data": "sklearn load_digits, 70/30 stratified split (seed 0), pixels/16",
            "teacher": f"CNN conv3x3/32-conv3x3/64-pool-fc128-fc10, {n_params(t_vars)} params, "
            "1500 adam steps (lr 1e-3, batch 64) on all 1257 training images",
            "student": f"CNN conv3x3/8-pool-fc10, {n_params(s_vars)} params",
            "student_data": f"{args.per_class} labelled images per class ({10 * args.per_class} images), "
            "drawn per seed",
            "budget": f"{args.steps} adam steps (lr {args.lr}), batch {args.batch} (with replacement)",
            "seeds": args.seeds,
        },
        "teacher_test_accuracy": t_acc,
        "results": results,
    }
    lines = [
        "# distill_digits: knowledge distillation on scikit-learn digits",
        "",
        f"- date: {info['date']}; machine: {info['processor']}, {info['cpu_count']} CPU cores, backend "
        f"{info['backend']}; jax {info['jax']}, qjax {info['qjax']}; run time {info['runtime_s']} s "
        f"(load average at start {info['load_avg_1min_start']:.2f})",
        f"- teacher: {out['setting']['teacher']}; test accuracy {100 * t_acc:.2f}%",
        f"- student: {out['setting']['student']}; trained on {out['setting']['student_data']}; "
        f"budget {out['setting']['budget']}, identical for every variant",
        f"- test accuracy on 540 images, mean ± std over {args.seeds} seeds "
        "(seed = student subset, init and batch order)",
        "",
        "Δ: per-seed difference to the student alone (same subset, init and batch order), mean ± std in "
        "points, and on how many seeds the variant is better.",
        "",
        "| variant | test accuracy % | Δ vs alone, paired (points) | per seed % |",
        "|---|---:|---:|---|",
    ]
    for name, r in results.items():
        if name != "student alone (CE)":
            r["paired_vs_alone"] = paired(r, base)
        delta = fmt_paired(r["paired_vs_alone"]) if "paired_vs_alone" in r else "—"
        seeds = ", ".join(f"{100 * a:.1f}" for a in r["accs"])
        lines.append(f"| {name} | {fmt(r)} | {delta} | {seeds} |")
    if not args.no_write:
        write("distill_digits_quick" if args.quick else "distill_digits", out, "\n".join(lines) + "\n")
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
