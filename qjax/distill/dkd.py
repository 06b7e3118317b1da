"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge
Distillation", CVPR 2022).

The KD term is split at the target class ``t`` into a binary target-class term (TCKD) and
a term over the non-target classes (NCKD), weighted independently. With ``p``/``q`` the
student/teacher ``softmax(z/T)``:

    b^p = [p_t, 1 − p_t],   b^q = [q_t, 1 − q_t]
    p̂_c = p_c / (1 − p_t),  q̂_c = q_c / (1 − q_t)          (c ≠ t)

    TCKD = KL(b^q ‖ b^p),   NCKD = KL(q̂ ‖ p̂)
    L_DKD = T² · (α · TCKD + β · NCKD)                       (paper: α = 1, β = 8, T = 4)

Classical KD is ``TCKD + (1 − q_t)·NCKD``; DKD removes the ``(1 − q_t)`` factor that
suppresses NCKD for confident teachers. Computed in log space: ``log(1 − p_t)`` is the
``logsumexp`` of the non-target log-probabilities and ``log p̂ = log_softmax`` over the
non-target classes, so it is finite for any logits; both KLs use the cancellation-free
form of :func:`qjax.distill.soft_targets.kl_tempered`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qjax.distill.soft_targets import kl_tempered, label_validity, reduce
from qjax.distill.topk import TopKTeacher, as_float, standardize_logits, teacher_scaled_logits


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | TopKTeacher,
    labels: jax.Array,
    temperature: Any = 4.0,
    alpha: Any = 1.0,
    beta: Any = 8.0,
    *,
    standardize: bool = False,
    reduction: str = "mean",
) -> jax.Array:
    """``T²·(α·TCKD + β·NCKD)`` (see the module docstring).

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]`` or a :class:`TopKTeacher` cache.
      labels: integer target classes ``[...]`` in ``[0, C)`` (concrete out-of-range
        labels raise, traced ones give NaN: see :func:`qjax.distill.soft_targets.label_validity`).
      temperature: ``T`` (> 0; a concrete non-positive one raises).
      alpha: TCKD weight.
      beta: NCKD weight.
      standardize: logit standardization (Sun et al. 2024) of both sides.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    zs = as_float(student_logits)
    if standardize:
        zs = standardize_logits(zs)
    a = teacher_scaled_logits(teacher_logits, temperature, standardize)
    b = zs / temperature
    if a.shape != b.shape:
        raise ValueError(f"student logits {b.shape} and teacher {a.shape} differ in shape")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError("dkd_loss needs integer labels (the target class splits the distribution)")
    valid = label_validity(labels, b.shape[-1])
    target = jax.nn.one_hot(labels, b.shape[-1], dtype=jnp.bool_)
    tckd = kl_tempered(_binary(a, target), _binary(b, target))
    nckd = kl_tempered(a, b, where=~target)
    per = jnp.square(temperature) * (alpha * tckd + beta * nckd)
    return reduce(jnp.where(valid, per, jnp.nan), reduction)


def _binary(logits: jax.Array, target: jax.Array) -> jax.Array:
    """Two logits whose softmax is ``[p_t, 1 − p_t]``: the target logit and the
    ``logsumexp`` of the others."""
    z_t = jnp.sum(jnp.where(target, logits, 0.0), axis=-1)
    z_n = jax.nn.logsumexp(logits, axis=-1, where=~target)
    return jnp.stack([z_t, z_n], axis=-1)
