"""Example entry module for ``qjax compress``: a Flax MLP on scikit-learn's 8x8 digits.

Run (from the repository root)::

    .venv/bin/python -m qjax.cli compress --config experiments/compress_example/config.json --out /tmp/x

``config.toml`` is the same config in TOML; ``config_fast.json`` trains less (used by the tests).

An entry function returns a dict:

- ``apply_fn(params, x) -> logits``
- ``params``: the trained variables
- ``batches``: a zero-argument callable returning one pass of ``(x, y)`` training batches
  (a new shuffle each call), also used to calibrate activation ranges
- ``eval_fn(apply_fn, params) -> float`` (higher is better; here test accuracy)
- ``loss_fn(outputs, y) -> scalar`` (needed by qat / prune / distill steps)
- ``module``: the Linen module (needed by channel pruning, which rebuilds a smaller model)

Needs scikit-learn (``pip install qjax[experiments]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qjax import _demo

BATCH = 128


def _data(seed: int) -> _demo.Digits:
    return _demo.load_digits(seed)


def _batches(data: _demo.Digits, seed: int):
    rng = np.random.default_rng(seed)

    def one_pass():
        perm = rng.permutation(len(data.x_train))
        n = len(perm) // BATCH * BATCH
        return [(data.x_train[i], data.y_train[i]) for i in perm[:n].reshape(-1, BATCH)]

    return one_pass


def _eval_fn(data: _demo.Digits):
    x, y = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    def eval_fn(apply_fn, params) -> float:
        return float(jnp.mean(jnp.argmax(apply_fn(params, x), axis=-1) == y))

    return eval_fn


def loss_fn(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def build(seed: int = 0, epochs: int = 20, hidden: tuple[int, ...] = (128, 128)) -> dict:
    """Train the float MLP (64-128-128-10, adam, ``epochs`` passes of 11 batches)."""
    data = _data(seed)
    model = _demo.MLP(hidden=tuple(hidden))
    variables = _demo.train(
        model, _demo.init_variables(model, seed), data, epochs=epochs, lr=1e-3, seed=seed
    )[0]
    return {
        "apply_fn": model.apply,
        "params": jax.device_get(variables),
        "batches": _batches(data, seed + 1),
        "eval_fn": _eval_fn(data),
        "loss_fn": loss_fn,
        "module": model,
    }


def build_student(seed: int = 0, hidden: tuple[int, ...] = (32,)) -> dict:
    """An untrained, much narrower MLP (64-32-10) to distill into."""
    model = _demo.MLP(hidden=tuple(hidden))
    return {"apply_fn": model.apply, "params": _demo.init_variables(model, seed + 7)}
