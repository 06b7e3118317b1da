"""Shared pieces of the fixed-point experiments on scikit-learn digits (no download).

Data: ``load_digits`` (1797 8×8 images, pixels scaled to [0, 1]), stratified 70/30 split
(seed 0): 1257 training and 540 test images. Models (Flax Linen):

* ``MLP``: 64 -> 64 -> 32 -> 10, ReLU (6.5k params);
* ``CNN``: conv 3×3×8 -> ReLU -> max-pool 2 -> conv 3×3×16 -> ReLU -> max-pool 2 -> dense 10
  (1.9k params).

Fixed-point formats are chosen per layer by calibration on the training images
(``qjax.fixed.collect_ranges`` + ``calibrate_formats``): integer bits from the observed
range, fraction bits from the width; biases get a format of the same width from their own
range.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from report import machine, write  # noqa: F401  (re-exported for the experiment scripts)

from qjax import fixed as qf

RESULTS = Path(__file__).parent / "results"
CLASSES = 10
BIAS = [r".*/bias"]


@dataclasses.dataclass(frozen=True)
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load(split_seed: int = 0, test_size: float = 0.3) -> Data:
    """Digits, pixels in [0, 1], NHWC, stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=split_seed, stratify=y)
    return Data(x_tr, y_tr.astype(np.int32), x_te, y_te.astype(np.int32))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(CLASSES)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))


MODELS = {"mlp": MLP, "cnn": CNN}


def n_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def init(model: nn.Module, seed: int = 0):
    return model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))


def batches(data: Data, steps: int, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(data.y_train), batch, replace=False)
        yield data.x_train[idx], data.y_train[idx]


def train_float(model: nn.Module, data: Data, *, steps: int, batch: int = 64, lr: float = 1e-2, seed=0):
    """Adam on cross-entropy; returns the params."""
    params = init(model, seed)
    tx = optax.adam(lr)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        g = jax.grad(lambda p: xent(model.apply(p, x), y))(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for x, y in batches(data, steps, batch, seed + 1):
        params, state = step(params, state, x, y)
    return params


def accuracy(apply_fn, params, data: Data) -> float:
    logits = jax.jit(apply_fn)(params, data.x_test)
    return float((np.asarray(logits).argmax(-1) == data.y_test).mean())


def needs_x64(width: int) -> bool:
    """Whether a width-bit layer of these models needs an int64 accumulator: the widest
    contraction is K = 64 (MLP) or 72 (CNN), so 2W + 7 > 31 from W = 13."""
    return 2 * width + 7 > 31


def fixed_rules(ranges, width: int, params, **kw) -> list[tuple[str, Any]]:
    """Per-layer formats of ``width`` bits from calibration ranges, biases included."""
    return qf.calibrate_formats(ranges, width, params=params, leaf_patterns=BIAS, **kw)


def fixed_evaluator(model: nn.Module, rules, data: Data, width: int):
    """``params -> test accuracy`` of integer fixed-point inference, compiled once (an int64
    accumulator where needed)."""
    fn = jax.jit(qf.fixed_point(model.apply, rules))

    def evaluate(params) -> float:
        if needs_x64(width):
            with jax.enable_x64(True):
                logits = fn(params, data.x_test)
        else:
            logits = fn(params, data.x_test)
        return float((np.asarray(logits).argmax(-1) == data.y_test).mean())

    return evaluate


def fixed_accuracy(model: nn.Module, params, rules, data: Data, width: int) -> float:
    """Test accuracy of integer fixed-point inference (an int64 accumulator where needed)."""
    return fixed_evaluator(model, rules, data, width)(params)


def describe(rules) -> dict[str, str]:
    """``{path pattern: 'w=... in=... out=...'}`` for the results files."""
    out = {}
    for pattern, v in rules:
        if isinstance(v, qf.LayerFormats):
            g = f" grad={v.grad}" if v.grad is not None else ""
            out[pattern] = f"w={v.weight} in={v.input} out={v.output}{g}"
        else:
            out[pattern] = str(v)
    return out
