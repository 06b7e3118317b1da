"""Importance scores of one weight leaf, and a registry of them by name.

A score function has the signature
``fn(w, *, path="", grad=None, state=None, key=None, act_norm=None) -> scores`` (same
shape as ``w``, float32; higher = more important, kept longer) and ignores the keyword
arguments it does not need. Built-ins: ``"magnitude"`` ``|w|``, ``"random"``,
``"saliency"`` ``|w * g|``, ``"movement"`` ``-w * sum(g)`` (Sanh et al. 2020) and
``"wanda"`` ``|w| * ||x||`` (Sun et al. 2023). The pruners in
:mod:`qjax.prune.pruners` call them per targeted leaf (``path`` is used in errors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "SCORES",
    "get_score",
    "magnitude_score",
    "movement_score",
    "random_score",
    "register_score",
    "saliency_score",
    "wanda_score",
]

ScoreFn = Callable[..., jax.Array]


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def _need(value: Any, what: str, path: str, score: str) -> Any:
    if value is None:
        raise ValueError(f"{score} score of {path!r} needs {what}, none was given")
    return value


def magnitude_score(w: jax.Array, **_: Any) -> jax.Array:
    """``|w|`` in float32.

    Example:
      >>> magnitude_score(jnp.array([[-2.0, 1.0]]))
      Array([[2., 1.]], dtype=float32)
    """
    return jnp.abs(_f32(w))


def random_score(w: jax.Array, *, key: jax.Array | None = None, path: str = "", **_: Any) -> jax.Array:
    """Uniform random scores in [0, 1) of ``w``'s shape from ``key`` (the pruners fold the
    leaf path into the key with :func:`qjax.rules.fold_in_path`, so leaves are independent).

    Raises:
      ValueError: no ``key`` (names the path).

    Example:
      >>> random_score(w, key=jax.random.key(0), path="params/Dense_0/kernel")
    """
    key = _need(key, "a PRNG key (key=...)", path, "random")
    return jax.random.uniform(key, jnp.shape(w), jnp.float32)


def saliency_score(w: jax.Array, *, grad: jax.Array | None = None, path: str = "", **_: Any) -> jax.Array:
    """First-order saliency ``|w * g|`` (the Taylor estimate of the loss change when ``w``
    is zeroed, as in SNIP).

    Raises:
      ValueError: no ``grad`` (names the path).

    Example:
      >>> saliency_score(jnp.array([2.0, -1.0]), grad=jnp.array([0.5, 3.0]))
      Array([1., 3.], dtype=float32)
    """
    g = _need(grad, "the gradient (grads=...)", path, "saliency")
    return jnp.abs(_f32(w) * _f32(g))


def movement_score(
    w: jax.Array, *, state: jax.Array | None = None, grad: jax.Array | None = None, path: str = "", **_: Any
) -> jax.Array:
    """Movement score ``-w * sum_t(g_t)``: weights moving away from zero score high.

    ``state`` is the sum of gradients accumulated over steps (``Movement.update_state``);
    without it the single ``grad`` is used.

    Raises:
      ValueError: neither ``state`` nor ``grad`` (names the path).

    Example:
      >>> movement_score(jnp.array([2.0, -1.0]), state=jnp.array([-0.5, -3.0]))
      Array([ 1., -3.], dtype=float32)
    """
    g = state if state is not None else grad
    g = _need(g, "accumulated gradients (state=...) or grads=...", path, "movement")
    return -_f32(w) * _f32(g)


def wanda_score(w: jax.Array, *, act_norm: jax.Array | None = None, path: str = "", **_: Any) -> jax.Array:
    """Wanda score ``|w| * ||x||``: ``act_norm`` holds, for every input feature, the L2
    norm of the layer input over all tokens of the calibration data, broadcastable to
    ``w`` along its contracted axes (as :func:`qjax.prune.activations.activation_norms`
    returns it, e.g. shape ``(in, 1)`` for a Dense kernel ``(in, out)``).

    Raises:
      ValueError: no ``act_norm``, or one that does not broadcast to ``w`` (names the path).

    Example:
      >>> wanda_score(jnp.ones((2, 3)), act_norm=jnp.array([[1.0], [2.0]]))   # rows scaled 1, 2
    """
    a = _f32(_need(act_norm, "activation norms (act_norms=...)", path, "wanda"))
    try:
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(w))
    except ValueError:
        shape = None
    if shape != tuple(jnp.shape(w)):
        raise ValueError(
            f"activation norm of {path!r} has shape {jnp.shape(a)}, not broadcastable to {jnp.shape(w)}"
        )
    return jnp.abs(_f32(w)) * a


SCORES: dict[str, ScoreFn] = {
    "magnitude": magnitude_score,
    "random": random_score,
    "saliency": saliency_score,
    "movement": movement_score,
    "wanda": wanda_score,
}


def register_score(name: str, fn: ScoreFn, *, overwrite: bool = False) -> ScoreFn:
    """Register a score function under ``name`` (see the module docstring for the
    signature); returns ``fn``.

    Raises:
      ValueError: ``name`` is taken (pass ``overwrite=True`` to replace it).
      TypeError: ``fn`` is not callable.

    Example:
      >>> register_score("sq", lambda w, **_: jnp.square(w.astype(jnp.float32)))
      >>> class Squared(qjax.prune.pruners.Pruner): score_name = "sq"
    """
    if not callable(fn):
        raise TypeError(f"score {name!r} must be callable, got {fn!r}")
    if name in SCORES and not overwrite:
        raise ValueError(f"score {name!r} is already registered (overwrite=True replaces it)")
    SCORES[name] = fn
    return fn


def get_score(name: str) -> ScoreFn:
    """The score function registered under ``name``.

    Raises:
      ValueError: unknown name (the message lists the known ones).

    Example:
      >>> get_score("magnitude")(jnp.array([-2.0]))
      Array([2.], dtype=float32)
    """
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; known: {sorted(SCORES)}") from None
