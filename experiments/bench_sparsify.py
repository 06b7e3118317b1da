"""Overhead of ``qjax.prune.sparsify`` in a training step vs the bare optimizer.

One jitted Adam step of an MLP (cross-entropy, batch 256), timed from a fixed state with
the shared interleaved paired timing (``experiments/timing.py``):

* ``adam``: the bare optimizer;
* ``sparsify, no mask update``: a step the schedule does not update masks on (masking the
  gradients and the updates only: the steady-state cost);
* ``sparsify, mask update (layer)`` / ``(global)``: a step that recomputes the masks
  (magnitude ranking of every kernel, exact counts) inside the step.

Run: ``.venv/bin/python experiments/bench_sparsify.py``; writes
experiments/results/bench_sparsify.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from report import RESULTS, machine, write
from timing import time_interleaved

from qjax import prune

BATCH = 256


class MLP(nn.Module):
    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for w in self.widths:
            x = nn.relu(nn.Dense(w)(x))
        return nn.Dense(10)(x)


CONFIGS = {"mlp 64-256-256-10": (64, (256, 256)), "mlp 1024-2048-2048-10": (1024, (2048, 2048))}


def make_step(model, tx):
    def loss(v, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

    @jax.jit
    def step(v, st, x, y):
        g = jax.grad(loss)(v, x, y)
        upd, st = tx.update(g, st, v)
        return optax.apply_updates(v, upd), st

    return step


def bench(name: str, d_in: int, widths, repeats: int, target_s: float) -> dict:
    model = MLP(widths)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(BATCH, d_in)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=BATCH))
    v = model.init(jax.random.key(0), x)
    variants = {}
    adam = optax.adam(1e-3)
    step = make_step(model, adam)
    st = adam.init(v)
    variants["adam"] = lambda: step(v, st, x, y)
    for label, pruner, schedule in [
        ("sparsify, no mask update", prune.Magnitude(0.9), prune.periodic(1000, start=1000)),
        ("sparsify, mask update (layer)", prune.Magnitude(0.9), prune.one_shot(0)),
        ("sparsify, mask update (global)", prune.Magnitude(0.9, scope="global"), prune.one_shot(0)),
    ]:
        tx = prune.sparsify(optax.adam(1e-3), pruner, schedule)
        s = make_step(model, tx)
        state = tx.init(v)
        variants[label] = lambda s=s, state=state: s(v, state, x, y)
    res = time_interleaved(variants, repeats=repeats, target_s=target_s, reference="adam")
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(v)))
    timings = {k: {"ms": 1e3 * r["median_s"], "ratio": r["ratio"]} for k, r in res.items()}
    return {"params": n_params, "variants": timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default %(default)s)")
    args = ap.parse_args()
    repeats, target = (3, 0.1) if args.fast else (9, 0.5)
    results = {name: bench(name, d, w, repeats, target) for name, (d, w) in CONFIGS.items()}
    mach = machine()
    lines = [
        "# sparsify overhead per training step",
        "",
        f"{mach['date']}, {mach['processor']}, {mach['cpu_count']} cores, jax {mach['jax']}; "
        f"batch {BATCH}; ratio = paired median vs the bare Adam step in the same run.",
        "",
        "| model (params) | variant | ms/step | × adam |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        for k, v in r["variants"].items():
            lines.append(f"| {name} ({r['params']:,}) | {k} | {v['ms']:.3f} | {v['ratio']:.2f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.fast:
        write("bench_sparsify", {"machine": mach, "results": results}, md, args.out)


if __name__ == "__main__":
    main()
