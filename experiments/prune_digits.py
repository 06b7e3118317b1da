"""Accuracy vs sparsity on scikit-learn's digits: an MLP and a small CNN, pruned with
qjax.prune (magnitude, random, global, gradual, 2:4, channel + shrink).

Protocol (same budget for every method): train the dense model (``DENSE_STEPS`` Adam
steps), then fine-tune ``FT_STEPS`` steps with ``qjax.prune.sparsify``:

* ``magnitude`` / ``random`` / ``global``: one-shot masks at the first fine-tune step
  (layer-wise magnitude, layer-wise random, global magnitude);
* ``gradual``: polynomial schedule (Zhu & Gupta) from 0 to the target over the first
  60% of the fine-tune steps, masks updated every 5% (``gradual global``: the same with
  global magnitude ranking);
* ``2:4``: N:M along the kernels' input axis (50% by construction);
* ``channel``: whole output channels of hidden layers (the classifier's outputs kept),
  then ``qjax.prune.shrink`` removes them physically; the shrunk model's accuracy and
  parameter count are reported (it must equal the masked model's accuracy).

Every kernel is pruned (biases are not); sparsity is over the pruned kernels. Mean ± std
over the seeds (data split and init).

Run: ``.venv/bin/python experiments/prune_digits.py [--fast] [--models mlp|cnn] [--seeds N]
[--sparsities 0.5,0.9] [--ft-steps N]``; writes experiments/results/prune_digits_{models}.{json,md}.
(XLA:CPU's convolution backward pass is slow: a 1000-step CNN fine-tune takes ~1-2 min.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_models import CNN, MLP
from distill_common import load
from report import machine, write

from qjax import prune

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
SEEDS = (0, 1, 2)
DENSE_STEPS = 1500
FT_STEPS = 1000
BATCH = 64
LR = 1e-3
FT_LR = 5e-4


MODELS = {"mlp": MLP, "cnn": CNN}
KEEP_HEAD = [(r"params/head/kernel", None)]  # channel pruning: the class axis is the output


def method(name: str, sparsity: float, ft_steps: int, model: str):
    """``(pruner, schedule)`` of a method at a target sparsity."""
    if name == "magnitude":
        return prune.Magnitude(sparsity), prune.one_shot(0)
    if name == "random":
        return prune.Random(sparsity), prune.one_shot(0)
    if name == "global":
        return prune.Magnitude(sparsity, scope="global"), prune.one_shot(0)
    if name == "gradual":
        end = int(0.6 * ft_steps)
        return prune.Magnitude(sparsity), prune.polynomial(sparsity, 0, end, every=max(1, ft_steps // 20))
    if name == "gradual global":
        end = int(0.6 * ft_steps)
        pruner = prune.Magnitude(sparsity, scope="global")
        return pruner, prune.polynomial(sparsity, 0, end, every=max(1, ft_steps // 20))
    if name == "2:4":
        # The first conv has one input channel: nothing to group along its input axis.
        skip = [(r"params/conv1/kernel", None)] if model == "cnn" else []
        return prune.Magnitude(0.5, sparsity_type=prune.NM(2, 4, axis=-2), rules=skip), prune.one_shot(0)
    if name == "channel":
        return prune.Magnitude(sparsity, sparsity_type=prune.Channel(-1), rules=KEEP_HEAD), prune.one_shot(0)
    raise ValueError(name)


def train(apply: Any, variables: Any, tx: optax.GradientTransformation, data, steps: int, seed: int):
    """``steps`` optimizer steps of ``apply`` in one jitted scan; returns (variables, opt_state)."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def loss(v, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(apply(v, xb), yb).mean()

    @jax.jit
    def run(v, idx):
        def body(carry, i):
            v, st = carry
            g = jax.grad(loss)(v, x[i], y[i])
            upd, st = tx.update(g, st, v)
            return (optax.apply_updates(v, upd), st), None

        return jax.lax.scan(body, (v, tx.init(v)), idx)[0]

    idx = np.random.default_rng(seed + 1000).integers(0, len(x), size=(steps, BATCH))
    return run(variables, idx)


def accuracy(apply: Any, variables: Any, data) -> float:
    logits = jax.jit(apply)(variables, jnp.asarray(data.x_test))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data.y_test)))


def run_model(name: str, methods: list[str], sparsities, seeds, dense_steps: int, ft_steps: int) -> dict:
    model = MODELS[name]()
    rows: dict[str, dict[str, list]] = {}
    dense_accs, dense_ft_accs = [], []
    for seed in seeds:
        data = load(split_seed=seed)
        v0 = model.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))
        dense, _ = train(model.apply, v0, optax.adam(LR), data, dense_steps, seed)
        dense_accs.append(accuracy(model.apply, dense, data))
        # The fair reference: the dense model fine-tuned with the same budget, unpruned.
        dense_ft, _ = train(model.apply, dense, optax.adam(FT_LR), data, ft_steps, seed)
        dense_ft_accs.append(accuracy(model.apply, dense_ft, data))
        for m in methods:
            for s in (0.5,) if m == "2:4" else sparsities:
                pruner, schedule = method(m, s, ft_steps, name)
                t = time.perf_counter()
                if m == "channel":
                    entry = channel_run(model, dense, pruner, data, ft_steps, seed)
                else:
                    tx = prune.sparsify(optax.adam(FT_LR), pruner, schedule, key=seed)
                    v, st = train(model.apply, dense, tx, data, ft_steps, seed)
                    entry = {
                        "acc": accuracy(model.apply, v, data),
                        "sparsity": prune.summary(prune.get_masks(st)).sparsity,
                    }
                entry["seconds"] = round(time.perf_counter() - t, 2)
                print(
                    f"{name} seed {seed} {m} {s:.2f}: acc {entry['acc']:.4f} ({entry['seconds']} s)",
                    flush=True,
                )
                rows.setdefault(m, {}).setdefault(f"{s:.2f}", []).append(entry)
    return {"dense": dense_accs, "dense_finetuned": dense_ft_accs, "methods": rows}


def channel_run(model: nn.Module, dense: Any, pruner: Any, data, ft_steps: int, seed: int) -> dict:
    """Prune output channels by magnitude, shrink the model physically, fine-tune the small one."""
    masks = pruner.masks(dense)
    x = jnp.asarray(data.x_test)
    # Channel masks are per-layer output channels: a channel goes when its producer's
    # mask drops it (vote="any"); the plan removes it from every member of its group.
    small, plan = prune.shrink(model.apply, dense, masks, x[:2], vote="any")
    apply_small = prune.linen_apply(model)
    group_masked = prune.apply_masks(dense, plan.group_masks(dense))
    diff = float(jnp.max(jnp.abs(apply_small(small, x) - model.apply(group_masked, x))))
    acc_before = accuracy(apply_small, small, data)
    small, _ = train(apply_small, small, optax.adam(FT_LR), data, ft_steps, seed)
    return {
        "acc": accuracy(apply_small, small, data),
        "acc_before_finetune": acc_before,
        "max_diff_shrunk_vs_masked": diff,
        "params_dense": _count(dense["params"]),
        "params_shrunk": _count(small["params"]),
    }


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _ms(values) -> str:
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def markdown(results: dict, meta: dict) -> str:
    lines = [
        "# Pruning on digits: accuracy (%) vs sparsity",
        "",
        f"Machine: {meta['machine']}. Date: {meta['date']}. Seeds: {meta['seeds']}; dense "
        f"{meta['dense_steps']} steps, fine-tune {meta['ft_steps']} steps (same for every method).",
        "",
    ]
    for model, res in results.items():
        lines += [
            f"## {model}",
            "",
            f"Dense: {_ms(res['dense'])}; dense fine-tuned with the same budget (the reference): "
            f"{_ms(res['dense_finetuned'])}",
            "",
        ]
        sparsities = sorted({s for m in res["methods"].values() for s in m})
        lines.append("| method | " + " | ".join(f"{float(s):.0%}" for s in sparsities) + " |")
        lines.append("|---" * (len(sparsities) + 1) + "|")
        for name, by_s in res["methods"].items():
            cells = [_ms([e["acc"] for e in by_s[s]]) if s in by_s else "" for s in sparsities]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        ch = res["methods"].get("channel")
        if ch:
            lines += [
                "",
                "Channel pruning: masks → `qjax.prune.shrink` (physically smaller model) → "
                "fine-tune the small model. `max diff` is |shrunk − group-masked dense| before "
                "fine-tuning (must be ~0).",
                "",
            ]
            lines.append("| target | acc before fine-tune | acc after | params dense → shrunk | max diff |")
            lines.append("|---|---|---|---|---|")
            for s, es in ch.items():
                lines.append(
                    f"| {float(s):.0%} | {_ms([e['acc_before_finetune'] for e in es])} | "
                    f"{_ms([e['acc'] for e in es])} | {es[0]['params_dense']} → {es[0]['params_shrunk']} | "
                    f"{max(e['max_diff_shrunk_vs_masked'] for e in es):.1e} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="one seed, few steps (smoke test)")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="how many seeds")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--ft-steps", type=int, default=FT_STEPS)
    args = ap.parse_args()
    seeds = SEEDS[:1] if args.fast else SEEDS[: args.seeds]
    dense_steps, ft_steps = (100, 60) if args.fast else (DENSE_STEPS, args.ft_steps)
    sparsities = (0.9,) if args.fast else tuple(float(x) for x in args.sparsities.split(","))
    methods = ["magnitude", "random", "global", "gradual", "gradual global", "2:4", "channel"]
    t = time.perf_counter()
    results = {
        m: run_model(m, methods, sparsities, seeds, dense_steps, ft_steps) for m in args.models.split(",")
    }
    meta = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "seeds": list(seeds),
        "dense_steps": dense_steps,
        "ft_steps": ft_steps,
        "seconds": round(time.perf_counter() - t, 1),
    }
    mach = meta["machine"]
    where = f"{mach['processor']}, {mach['cpu_count']} cores, {mach['backend']}"
    md = markdown(results, {**meta, "machine": where})
    print(md)
    if not args.fast:
        write("prune_digits_" + "_".join(args.models.split(",")), {"meta": meta, "results": results}, md)


if __name__ == "__main__":
    main()
