"""Helpers for ``qjax demo``: the scikit-learn digits data, a small Flax MLP, its
training loop (optionally through a weight transform such as ``qjax.fake_quant_params``)
and its evaluation.

scikit-learn is an optional dependency (``pip install qjax[experiments]``); it is
imported only when the data is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

INSTALL_HINT = "pip install qjax[experiments]"


class MissingDependency(RuntimeError):
    """An optional package the demo needs is not installed."""


class Digits(NamedTuple):
    """Standardized digits features (float32, 64 per image) and labels (int32)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(seed: int, test_size: float = 0.2) -> Digits:
    """scikit-learn's bundled 8x8 digits (no download), split stratified with ``seed``
    and standardized with the training set's mean and standard deviation.

    Raises:
      MissingDependency: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise MissingDependency(
            f"the demo needs scikit-learn, which is not installed ({e}); install it with `{INSTALL_HINT}`"
        ) from None
    x, y = sk_load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float64), y, test_size=test_size, random_state=seed, stratify=y
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # some border pixels are always 0
    norm = lambda a: ((a - mean) / std).astype(np.float32)
    return Digits(norm(x_tr), y_tr.astype(np.int32), norm(x_te), y_te.astype(np.int32))


class MLP(nn.Module):
    """``Dense -> relu`` for each hidden width, then a ``Dense`` to the class logits."""

    hidden: Sequence[int] = (256, 256)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.classes)(x)


class CNN(nn.Module):
    """The demo's teacher: ``3x3 conv -> 2x2 avg-pool -> 3x3 conv -> dense -> dense`` on
    the 8x8 digit images (flat 64-feature rows are reshaped to ``(8, 8, 1)``). Small,
    because XLA:CPU's convolution backward pass is slow."""

    features: Sequence[int] = (16, 32)
    hidden: int = 64
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.relu(nn.Conv(self.features[0], (3, 3), name="conv1")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(self.features[1], (3, 3), name="conv2")(x))
        x = nn.relu(nn.Dense(self.hidden, name="fc")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.classes, name="head")(x)


def init_variables(model: nn.Module, seed: int, in_features: int = 64) -> Any:
    """The model's variables (``{"params": ...}``) initialised from ``seed``."""
    return model.init(jax.random.key(seed), jnp.zeros((1, in_features), jnp.float32))


Transform = Callable[[Any, Any], Any]


def _identity(variables, scales):
    del scales
    return variables


def train(
    model: nn.Module,
    variables: Any,
    data: Digits,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 128,
    transform: Transform | None = None,
    scales: Any = None,
    on_epoch: Callable[[float], None] | None = None,
    tx: optax.GradientTransformation | None = None,
    apply: Callable | None = None,
) -> tuple[Any, Any]:
    """Train with optax adam on minibatches (one jitted ``lax.scan`` per epoch).

    Args:
      transform: ``transform(variables, scales)`` -> the variables the model sees, e.g.
        ``lambda v, s: qjax.fake_quant_params(v, policy, scales=s)`` for QAT. Gradients
        flow through it to ``variables`` and ``scales``.
      scales: extra trainable pytree (e.g. LSQ step sizes from ``qjax.lsq_scales``).
      on_epoch: called with the epoch's mean training loss.
      tx: the optimizer (default ``optax.adam(lr)``), e.g. a ``qjax.prune.sparsify`` one.
      apply: the forward function (default ``model.apply``), e.g. for a shrunk model.

    Returns:
      ``(variables, scales)`` after training; with a given ``tx``, ``((variables,
      scales), opt_state)``.
    """
    transform = transform or _identity
    scales = {} if scales is None else scales
    given_tx = tx is not None
    tx = tx if given_tx else optax.adam(lr)
    apply = apply or model.apply
    trainable = (variables, scales)
    opt_state = tx.init(trainable)

    def loss_fn(tr, xb, yb):
        logits = apply(transform(*tr), xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def run_epoch(tr, opt_state, xs, ys):
        def step(carry, batch):
            tr, st = carry
            loss, grads = jax.value_and_grad(loss_fn)(tr, *batch)
            updates, st = tx.update(grads, st, tr)
            return (optax.apply_updates(tr, updates), st), loss

        (tr, opt_state), losses = jax.lax.scan(step, (tr, opt_state), (xs, ys))
        return tr, opt_state, losses.mean()

    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    batches = n // batch_size
    for _ in range(epochs):
        perm = rng.permutation(n)[: batches * batch_size].reshape(batches, batch_size)
        trainable, opt_state, loss = run_epoch(trainable, opt_state, data.x_train[perm], data.y_train[perm])
        if on_epoch is not None:
            on_epoch(float(loss))
    return (trainable, opt_state) if given_tx else trainable


def make_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> Callable[[Any], float]:
    """``accuracy(variables)`` on ``(x, y)``; jitted once, reused for every variant."""
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def correct(variables):
        return jnp.mean(jnp.argmax(model.apply(variables, x), axis=-1) == y)

    return lambda variables: float(correct(variables))
