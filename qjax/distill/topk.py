"""Cached teacher outputs: the top-k classes of the teacher's tempered distribution.

Running the teacher every step is often the dominant cost of distillation. After one
pass over the data the teacher's soft targets can be stored and reused on later epochs.
Storing all ``C`` probabilities per example costs as much as the logits themselves; for
large ``C`` (language models) only the top ``k`` are kept ("sparse" or "top-k" knowledge
distillation, e.g. Raman et al. 2023, "For distillation, tokens are not all you need";
also the logit caching of the MiniLLM / DistiLLM code bases).

:class:`TopKTeacher` keeps, for each example, the log-probabilities
``log q_i = log softmax(z/T)_i`` of the ``k`` most likely classes at the temperature
``T`` they were computed at, and their indices. :func:`dense_log_probs` turns them back
into a full distribution: the ``k`` kept entries are exact, and the remaining mass
``r = 1 − Σ_{i∈topk} q_i`` is spread evenly over the other ``C − k`` classes, so the
reconstruction is a proper distribution (sums to one) that agrees with the teacher on
its top ``k`` classes and on the total mass of the rest. With ``k == C`` it is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_float(x: Any) -> jax.Array:
    """``x`` as an array of at least float32 precision (bf16/fp16/int promoted to
    float32, float64 kept): losses are computed in this precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def standardize_logits(logits: jax.Array, axis: int = -1, eps: float = 1e-7) -> jax.Array:
    """Logit standardization (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024): ``Z(z) = (z − mean(z)) / (std(z) + eps)`` along the class
    axis, with the unbiased standard deviation (as the authors' code). The student then
    only has to match the teacher's logits up to a shift and a scale.
    """
    logits = as_float(logits)
    mean = jnp.mean(logits, axis=axis, keepdims=True)
    std = jnp.std(logits, axis=axis, keepdims=True, ddof=1)
    return (logits - mean) / (std + eps)


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a float64 numpy array, or ``None`` for a traced value (which cannot be checked)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x, np.float64)


def check_temperature(temperature: Any) -> None:
    """Refuse a concrete temperature that is not > 0 (0 gives NaN, a negative one a
    finite wrong loss); a traced temperature is not checked.

    Raises:
      ValueError: naming ``temperature``.
    """
    t = concrete(temperature)
    if t is not None and not np.all(t > 0):  # NaN fails too
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopKTeacher:
    """The teacher's ``k`` most likely classes at temperature ``temperature``.

    Attributes:
      log_probs: ``[..., k]`` teacher log-probabilities ``log softmax(z/T)`` of the kept
        classes (float32).
      indices: ``[..., k]`` their class indices (int32).
      num_classes: ``C``.
      temperature: the ``T`` the log-probabilities were computed at; losses given a
        different temperature refuse the cache.
      standardized: whether the logits were standardized (:func:`standardize_logits`)
        before the temperature was applied.

    Leading axes index examples; ``cache[idx]`` selects examples (a pytree, so it can
    also be an ``xs`` of ``lax.scan``).
    """

    log_probs: jax.Array
    indices: jax.Array
    num_classes: int = dataclasses.field(metadata=dict(static=True), default=0)
    temperature: float = dataclasses.field(metadata=dict(static=True), default=1.0)
    standardized: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def k(self) -> int:
        return self.log_probs.shape[-1]

    def __getitem__(self, idx: Any) -> TopKTeacher:
        return dataclasses.replace(self, log_probs=self.log_probs[idx], indices=self.indices[idx])


def topk_teacher(logits: jax.Array, k: int, temperature: float, *, standardize: bool = False) -> TopKTeacher:
    """Keep the top ``k`` classes of ``softmax(z/T)`` (``z`` standardized first if asked).

    Args:
      logits: ``[..., C]`` teacher logits.
      k: classes to keep, ``1 <= k <= C``.
      temperature: ``T``.
      standardize: apply :func:`standardize_logits` before the temperature.

    Raises:
      ValueError: ``k`` out of range, or ``temperature`` not > 0.
    """
    check_temperature(temperature)
    logits = as_float(logits)
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk_teacher: k={k} must be in [1, {num_classes}]")
    z = standardize_logits(logits) if standardize else logits
    log_probs = jax.nn.log_softmax(z / temperature, axis=-1)
    values, indices = jax.lax.top_k(log_probs, k)
    return TopKTeacher(values, indices.astype(jnp.int32), num_classes, float(temperature), bool(standardize))


def dense_log_probs(cache: TopKTeacher) -> jax.Array:
    """The ``[..., C]`` log-distribution a :class:`TopKTeacher` stands for: kept entries
    exact, the remaining mass ``1 − Σ q_topk`` spread evenly over the other classes (a
    floor of the smallest normal float when that mass underflows)."""
    c, k = cache.num_classes, cache.k
    onehot = jax.nn.one_hot(cache.indices, c, dtype=cache.log_probs.dtype)  # [..., k, C]
    if k == c:
        return jnp.einsum("...k,...kc->...c", cache.log_probs, onehot)
    top_mass = jax.nn.logsumexp(cache.log_probs, axis=-1, keepdims=True)  # log Σ q_topk <= 0
    tiny = jnp.finfo(cache.log_probs.dtype).tiny
    rest = jnp.log(jnp.maximum(-jnp.expm1(jnp.minimum(top_mass, 0.0)), tiny))
    fill = rest - jnp.log(float(c - k))  # [..., 1]
    delta = cache.log_probs - fill  # [..., k]
    return fill + jnp.einsum("...k,...kc->...c", delta, onehot)


def teacher_log_probs(teacher: jax.Array | TopKTeacher, temperature: Any, standardize: bool) -> jax.Array:
    """``log softmax(z_t / T)`` of a teacher given as logits or as a :class:`TopKTeacher`.

    Raises:
      ValueError: ``temperature`` not > 0, or a cache built at another temperature (any
        concrete value is compared, at float32 precision) or standardization.
    """
    check_temperature(temperature)
    if isinstance(teacher, TopKTeacher):
        t = concrete(temperature)
        if t is not None and not np.all(t.astype(np.float32) == np.float32(teacher.temperature)):
            raise ValueError(
                f"cached teacher log-probabilities are at temperature {teacher.temperature}, "
                f"the loss asks for {temperature}: rebuild the cache with topk_teacher(..., temperature=...)"
            )
        if bool(standardize) != teacher.standardized:
            raise ValueError(
                f"cached teacher has standardized={teacher.standardized}, the loss asks for "
                f"standardize={standardize}"
            )
        return dense_log_probs(teacher)
    z = as_float(teacher)
    z = standardize_logits(z) if standardize else z
    return jax.nn.log_softmax(z / temperature, axis=-1)


def teacher_scaled_logits(teacher: jax.Array | TopKTeacher, temperature: Any, standardize: bool) -> jax.Array:
    """Logits whose softmax is the teacher's tempered distribution: ``z_t / T``
    (standardized first if asked) for logits, the dense log-probabilities
    (:func:`dense_log_probs`) for a :class:`TopKTeacher`.

    Raises:
      ValueError: ``temperature`` not > 0, or a cache built at another temperature or
        standardization.
    """
    if isinstance(teacher, TopKTeacher):
        return teacher_log_probs(teacher, temperature, standardize)
    check_temperature(temperature)
    z = as_float(teacher)
    return (standardize_logits(z) if standardize else z) / temperature
