"""Shared pieces of the distillation experiments on scikit-learn's digits (8x8 images):
data, the teacher and student CNNs, a scanned training loop around
``qjax.distill.distill_step``, evaluation and result writing.

Only the public qjax API is used.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from report import machine, write  # noqa: F401  (re-exported for the experiment scripts)

import qjax
from qjax import distill

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = 10


class Data(NamedTuple):
    x_train: np.ndarray  # [N, 8, 8, 1] float32 in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(split_seed: int = 0, test_size: float = 0.3) -> Data:
    """Digits, pixels scaled to [0, 1], stratified split with ``split_seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    return Data(x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32))


def subset(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of ``per_class`` random examples of every class."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(CLASSES)]
    )


def patches3x3(x: jax.Array) -> jax.Array:
    """``[N, H, W, C] -> [N, H, W, 9C]``: the 3x3 neighbourhoods (zero "SAME" padding) by
    slicing, so a 3x3 convolution is ``Dense(patches3x3(x))``. The teacher is written this
    way because XLA:CPU's convolution backward pass is slow (training the nn.Conv version
    of the teacher took ~4 minutes on 2 cores; this one takes seconds)."""
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)


class Teacher(nn.Module):
    """3x3 conv 32 -> 3x3 conv 64 (the hint layer) -> avg-pool -> dense 128 -> dense 10
    (~151k params); convolutions as patches + Dense (see :func:`patches3x3`)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32, name="conv1")(patches3x3(x)))
        x = nn.relu(nn.Dense(64, name="conv2")(patches3x3(x)))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="fc")(x))
        return nn.Dense(CLASSES, name="head")(x)


class Student(nn.Module):
    """3x3 ``nn.Conv`` 8 (the guided layer) -> avg-pool -> dense 10 (~1.4k params)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        return nn.Dense(CLASSES, name="head")(x)


TEACHER_HINT = "params/conv2/kernel"
STUDENT_GUIDED = "params/conv/kernel"


# -- objectives (``loss_fn(student, teacher, batch, adapters)`` of distill_step) -----------

HINT_WEIGHT = 1.0


def ce(student, teacher, batch, adapters):
    """The student alone: cross-entropy with the labels."""
    return distill.cross_entropy(student.logits, batch["y"]).mean()


def ce_smooth(eps: float):
    """The student alone with label smoothing (a regularization control for KD)."""
    return lambda s, tch, batch, adapters: distill.cross_entropy(
        s.logits, batch["y"], label_smoothing=eps
    ).mean()


def kd(t: float, a: float):
    """Hinton KD."""
    return lambda s, tch, batch, adapters: distill.kd_loss(s.logits, tch.logits, batch["y"], t, a)


def _hint(s, tch, adapters):
    return distill.hint_loss(
        s.features[STUDENT_GUIDED]["output"], tch.features[TEACHER_HINT]["output"], adapters["hint"]
    )


def kd_hint(t: float, a: float, weight: float = HINT_WEIGHT):
    """Hinton KD + weight · FitNets hint (student conv -> adapter -> teacher conv2)."""
    return lambda s, tch, batch, adapters: (
        kd(t, a)(s, tch, batch, adapters) + weight * _hint(s, tch, adapters)
    )


def ce_hint(weight: float = HINT_WEIGHT):
    """Cross-entropy + weight · FitNets hint."""
    return lambda s, tch, batch, adapters: ce(s, tch, batch, adapters) + weight * _hint(s, tch, adapters)


def n_params(variables: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))


def make_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, policy: qjax.Policy | None = None):
    apply = model.apply if policy is None else qjax.fake_quantized(model.apply, policy)
    x, y = jnp.asarray(x), jnp.asarray(y)
    correct = jax.jit(lambda v: jnp.mean(jnp.argmax(apply(v, x), -1) == y))
    return lambda v: float(correct(v))


def train_plain(model: nn.Module, data_x, data_y, *, steps: int, batch: int, lr: float, seed: int):
    """Cross-entropy training of ``model`` (used for the teacher)."""
    v = model.init(jax.random.key(seed), data_x[:1])
    data_x, data_y = jnp.asarray(data_x), jnp.asarray(data_y)
    tx = optax.adam(lr)
    loss = lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y).mean()

    @jax.jit
    def run(v, idx):
        def body(carry, i):
            v, st = carry
            g = jax.grad(loss)(v, data_x[i], data_y[i])
            upd, st = tx.update(g, st, v)
            return (optax.apply_updates(v, upd), st), None

        return jax.lax.scan(body, (v, tx.init(v)), idx)[0][0]

    idx = np.random.default_rng(seed).integers(0, len(data_x), size=(steps, batch))
    return run(v, idx)


def distill_train(
    ds: distill.DistillStep,
    state: distill.DistillState,
    teacher_vars: Any,
    x: np.ndarray,
    y: np.ndarray,
    idx: np.ndarray,
    cache: distill.TopKTeacher | None = None,
    key: jax.Array | None = None,
) -> distill.DistillState:
    """All steps of ``ds`` (built with ``jit=False``) in one jitted ``lax.scan``;
    ``idx[step]`` are the example indices of that step's batch (also ``batch["index"]``, for
    CRD's memory banks, with every example's label in ``batch["dataset_y"]``). With ``key``,
    step ``i`` gets ``fold_in(key, i)``."""
    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx), cache, key)
    return _scan(ds.step)(state, teacher_vars, *args)


_SCANS: dict[int, Callable] = {}


def _scan(step: Callable) -> Callable:
    if id(step) not in _SCANS:

        @jax.jit
        def run(state, teacher_vars, x, y, idx, cache, key):
            def body(state, i):
                batch = {"x": x[i], "y": y[i], "index": i.astype(jnp.int32), "dataset_y": y}
                if cache is not None:
                    batch["teacher"] = cache[i]
                step_key = None if key is None else jax.random.fold_in(key, state.step)
                return step(state, teacher_vars, batch, step_key)[0], None

            return jax.lax.scan(body, state, idx)[0]

        _SCANS[id(step)] = (step, run)  # keep step alive so its id is not reused
    return _SCANS[id(step)][1]


def summary(accs: Sequence[float]) -> dict[str, Any]:
    return {
        "accs": [round(a, 4) for a in accs],
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
    }


def paired(variant: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Per-seed differences ``variant − base`` (same seed = same subset, init and batch
    order): mean ± std in points, and on how many seeds the variant is better."""
    d = [100 * (a - b) for a, b in zip(variant["accs"], base["accs"])]
    return {
        "delta_points": d,
        "mean": statistics.mean(d),
        "std": statistics.stdev(d) if len(d) > 1 else 0.0,
        "better_on": sum(x > 0 for x in d),
        "seeds": len(d),
    }


def fmt_paired(p: dict[str, Any]) -> str:
    return f"{p['mean']:+.2f} ± {p['std']:.2f} ({p['better_on']}/{p['seeds']})"


def fmt(s: dict[str, Any]) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
