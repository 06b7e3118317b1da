"""Benchmark of structured shrinking (``qjax.prune.shrink``): is a channel-pruned model that
was *physically* shrunk faster than the dense one? (A benchmark, not a test.)

Models (Flax Linen, float32, CPU), digits-sized inputs (8x8x1, batch 256):

* ``mlp``: 64 -> 256 -> 256 -> 10 (``nn.Dense``, relu); ``mlp-wide``: 64 -> 2048 -> 2048 -> 10;
* ``cnn``: Conv 3x3 32 -> BatchNorm -> relu -> Conv 3x3 64 -> relu -> flatten -> Dense 128
  -> Dense 10; ``cnn-wide``: the same with 128 / 256 / 512 channels.

Every hidden layer loses 50% of its output channels (the smallest-L2-norm columns of its
kernel: per-layer ``Channel(axis=-1)``-style masks); ``shrink(..., vote="any")`` removes
them from every member of each coupled group (kernels' out- and in-axes, biases, BatchNorm
scale/bias/mean/var, the flattened Dense rows). The shrunk model runs through
``qjax.prune.rebuild.linen_apply`` (Linen modules take their sizes from the stored kernels).
Each row checks ``max|shrunk - masked|`` (masked = the dense model with the plan's group
masks applied): the shrunk model computes the same function.

Timing: both variants jitted; ``time_interleaved`` (compile, warm up, rotating interleaved
samples of at least ``--target-ms`` each); ``x dense`` is the median paired ratio to the
dense model of the same round. Also reported: parameter counts and bytes.

Writes ``bench_shrink.json`` / ``.md`` to ``experiments/results`` (``bench_shrink_quick.*``
with ``--quick``).

Usage::

    python experiments/bench_shrink.py           # < 1 minute on 2 CPU cores
    python experiments/bench_shrink.py --quick   # a smoke test of the script
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from report import RESULTS, machine, write
from timing import time_interleaved

from qjax.prune.masks import apply_masks
from qjax.prune.rebuild import linen_apply
from qjax.prune.shrink import shrink

BATCH = 256
SPARSITY = 0.5


class MLP(nn.Module):
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    channels: Sequence[int]
    dense: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.channels[0], (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        for c in self.channels[1:]:
            x = nn.relu(nn.Conv(c, (3, 3))(x))
        x = nn.relu(nn.Dense(self.dense)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


CONFIGS = {
    "mlp": lambda: MLP((256, 256)),
    "mlp-wide": lambda: MLP((2048, 2048)),
    "cnn": lambda: CNN((32, 64), 128),
    "cnn-wide": lambda: CNN((128, 256), 512),
}


def channel_masks(params: dict[str, Any], sparsity: float) -> dict[str, Any]:
    """Per-layer output-channel masks: every kernel except the last (logits) loses the
    ``sparsity`` fraction of its out-columns with the smallest L2 norm."""
    kernels = sorted(k for k in params if "kernel" in params[k])
    last = max(kernels, key=lambda k: (k.split("_")[0] == "Dense", int(k.split("_")[1])))
    masks = jax.tree.map(lambda a: None, params)
    for k in kernels:
        if k == last:
            continue
        w = np.asarray(params[k]["kernel"])
        norms = np.sqrt((w.reshape(-1, w.shape[-1]) ** 2).sum(0))
        dead = np.argsort(norms, kind="stable")[: round(sparsity * w.shape[-1])]
        m = np.ones(w.shape, bool)
        m[..., dead] = False
        masks[k]["kernel"] = jnp.asarray(m)
    return masks


def count(tree: Any) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    return sum(int(np.size(x)) for x in leaves), sum(
        int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves
    )


def bench(name: str, *, repeats: int, target_s: float) -> dict[str, Any]:
    model = CONFIGS[name]()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((BATCH, 8, 8, 1)), jnp.float32)
    v = jax.jit(model.init)(jax.random.key(0), x)
    if "batch_stats" in v:  # non-trivial running statistics
        rng = np.random.default_rng(1)
        v = {
            **v,
            "batch_stats": jax.tree.map(
                lambda a: jnp.asarray(rng.uniform(0.5, 2, a.shape), a.dtype), v["batch_stats"]
            ),
        }
    masks = {k: channel_masks(v["params"], SPARSITY) if k == "params" else jax.tree.map(lambda a: None, t)
             for k, t in v.items()}  # fmt: skip
    f = functools.partial(model.apply, train=False)
    small, plan = shrink(f, v, masks, x, vote="any")
    dense_fn, small_fn = jax.jit(f), jax.jit(functools.partial(linen_apply(model), train=False))
    masked = apply_masks(v, plan.group_masks(v))
    err = float(jnp.max(jnp.abs(small_fn(small, x) - dense_fn(masked, x))))
    timings = time_interleaved(
        {"dense": lambda: dense_fn(v, x), "shrunk": lambda: small_fn(small, x)},
        repeats=repeats,
        target_s=target_s,
        reference="dense",
    )
    (n_dense, b_dense), (n_small, b_small) = count(v), count(small)
    return {
        "model": name,
        "groups_shrunk": [{"name": g.name, "size": g.size, "kept": len(g.kept)} for g in plan.groups],
        "params_dense": n_dense,
        "params_shrunk": n_small,
        "bytes_dense": b_dense,
        "bytes_shrunk": b_small,
        "max_abs_diff_vs_masked": err,
        "dense_ms": timings["dense"]["median_s"] * 1e3,
        "shrunk_ms": timings["shrunk"]["median_s"] * 1e3,
        "speedup": 1.0 / timings["shrunk"]["ratio"],
        "timings": timings,
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [
        "# Structured shrinking: dense vs physically shrunk (50% of hidden channels)",
        "",
        f"{meta['date']}, {meta['processor']} ({meta['cpu_count']} cores), backend {meta['backend']}, "
        f"jax {meta['jax']}, batch {BATCH} of 8x8x1, float32. Load average at start: "
        f"{meta['load_avg_1min_start']:.2f}.",
        "",
        "| model | params dense | params shrunk | bytes dense | bytes shrunk | dense ms | shrunk ms "
        "| speed-up | max abs diff vs masked |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['params_dense']:,} | {r['params_shrunk']:,} | {r['bytes_dense']:,} | "
            f"{r['bytes_shrunk']:,} | {r['dense_ms']:.3f} | {r['shrunk_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r['max_abs_diff_vs_masked']:.1e} |"
        )
    out += [
        "",
        "Speed-up = 1 / (median paired ratio shrunk/dense). Groups shrunk per model:",
        "",
    ]
    for r in rows:
        groups = ", ".join(f"{g['name']} {g['size']}->{g['kept']}" for g in r["groups_shrunk"])
        out.append(f"- {r['model']}: {groups}")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small models, few samples (smoke test)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target-ms", type=float, default=100.0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="output directory (default %(default)s)")
    args = ap.parse_args(argv)
    names = ["mlp", "cnn"] if args.quick else list(CONFIGS)
    repeats, target_s = (2, 0.01) if args.quick else (args.repeats, args.target_ms / 1e3)
    meta = machine()
    rows = []
    for name in names:
        r = bench(name, repeats=repeats, target_s=target_s)
        sizes = f"{r['params_dense']:,} -> {r['params_shrunk']:,} params"
        times = f"{r['dense_ms']:.3f} ms -> {r['shrunk_ms']:.3f} ms ({r['speedup']:.2f}x)"
        print(f"{name}: {sizes}, {times}, diff {r['max_abs_diff_vs_masked']:.1e}")
        rows.append(r)
    result = {"meta": meta, "batch": BATCH, "sparsity": SPARSITY, "rows": rows}
    write("bench_shrink_quick" if args.quick else "bench_shrink", result, markdown(rows, meta), args.out)


if __name__ == "__main__":
    main()
