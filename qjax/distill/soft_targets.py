"""Soft-target knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge
in a Neural Network", 2015).

With student logits ``z_s``, teacher logits ``z_t``, temperature ``T`` and
``p = softmax(z_s/T)``, ``q = softmax(z_t/T)``:

    L = (1 − α) · CE(y, softmax(z_s)) + α · T² · L_soft(p, q)

    L_soft = KL(q ‖ p) = Σ_c q_c (log q_c − log p_c)          (soft="kl")
    L_soft = H(q, p)   = −Σ_c q_c log p_c                      (soft="ce")

The two forms differ by the teacher's entropy ``H(q)``, a constant for the student, so
they have the same gradient. The ``T²`` factor keeps the gradient of the soft term the
same size for every ``T``: ``∂L_soft/∂z_s = (p − q)/T``, which for large ``T`` and
zero-mean logits is ``≈ (z_s − z_t)/(C·T²)``. The hard term uses ``T = 1`` and may use
label smoothing (Szegedy et al. 2016): ``y ← (1 − ε)·y + ε/C``.

Numerics: everything is computed from ``log_softmax`` / ``logsumexp`` (finite for any
finite logits and temperature), and the KL in a cancellation-free form
(:func:`kl_tempered`): at high ``T`` the naive ``Σ q (log q − log p)`` subtracts two
numbers ``≈ −log C`` to get an ``O(1/T²)`` result, which in float32 loses most digits
(50% error at ``T = 1000``); :func:`kl_tempered` keeps ~1e-4 relative error there.
Inputs in bf16/fp16 are promoted to float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.distill.topk import TopKTeacher, as_float, standardize_logits, teacher_scaled_logits

REDUCTIONS = ("mean", "sum", "none")


def reduce(per_example: jax.Array, reduction: str) -> jax.Array:
    """``"mean"`` (over every example axis), ``"sum"`` or ``"none"``."""
    if reduction == "mean":
        return jnp.mean(per_example)
    if reduction == "sum":
        return jnp.sum(per_example)
    if reduction == "none":
        return per_example
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def label_validity(labels: jax.Array, num_classes: int, what: str = "labels") -> jax.Array:
    """Which integer ``labels`` lie in ``[0, num_classes)``. Concrete labels outside it
    (e.g. PyTorch's ignore index -100) are refused; traced ones cannot be, and the losses
    give NaN for their examples instead of a silently wrong value. To leave examples out
    (padding tokens), give them any valid class and mask or weight the per-example losses
    of ``reduction="none"``.

    Raises:
      ValueError: naming ``what`` (default ``labels``) and the first out-of-range values.
    """
    labels = jnp.asarray(labels)
    if not isinstance(labels, jax.core.Tracer):
        a = np.asarray(labels)
        bad = (a < 0) | (a >= num_classes)
        if bad.any() and what != "labels":
            raise ValueError(f"{what} must lie in [0, {num_classes}), got {a[bad][:4].tolist()}")
        if bad.any():
            raise ValueError(
                f"labels must be class indices in [0, {num_classes}), got {a[bad][:4].tolist()}; "
                "to ignore examples (e.g. padding labelled -100), give them any valid class and mask "
                'the per-example losses of reduction="none"'
            )
    return (labels >= 0) & (labels < num_classes)


def target_distribution(
    labels: jax.Array, num_classes: int, label_smoothing: float = 0.0, dtype: Any = jnp.float32
) -> jax.Array:
    """Integer labels ``[...]`` or a distribution ``[..., C]`` -> a distribution
    ``(1 − ε)·y + ε/C`` (an out-of-range traced integer label gives a row of NaN, see
    :func:`label_validity`)."""
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        valid = label_validity(labels, num_classes)
        y = jnp.where(valid[..., None], jax.nn.one_hot(labels, num_classes, dtype=dtype), jnp.nan)
    else:
        if labels.shape[-1] != num_classes:
            raise ValueError(f"soft labels have {labels.shape[-1]} classes, the logits {num_classes}")
        y = labels.astype(dtype)
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + label_smoothing / num_classes
    return y


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example ``CE(y, softmax(z)) = −Σ_c y_c log softmax(z)_c`` with ``y`` from
    integer or soft ``labels``, label-smoothed by ``ε``. Shape: ``logits.shape[:-1]``."""
    log_p = jax.nn.log_softmax(as_float(logits), axis=-1)
    y = target_distribution(labels, log_p.shape[-1], label_smoothing, log_p.dtype)
    return -_weighted_log_probs(y, log_p)


def soft_target_loss(
    student_logits: jax.Array,
    teacher: jax.Array | TopKTeacher,
    temperature: Any = 4.0,
    *,
    soft: str = "kl",
    standardize: bool = False,
    reduction: str = "mean",
) -> jax.Array:
    """``T² · L_soft(softmax(z_s/T), softmax(z_t/T))`` (see the module docstring).

    Args:
      student_logits: ``[..., C]``.
      teacher: teacher logits ``[..., C]`` or a :class:`TopKTeacher` cache.
      temperature: ``T`` (> 0; a concrete non-positive one raises).
      soft: ``"kl"`` (``KL(q‖p)``) or ``"ce"`` (``H(q, p)``).
      standardize: logit standardization of both sides (Sun et al. 2024, see
        :func:`qjax.distill.standardize_logits`) before the temperature.
      reduction: ``"mean"`` over examples, ``"sum"`` or ``"none"``.
    """
    if soft not in ("kl", "ce"):
        raise ValueError(f"soft must be 'kl' or 'ce', got {soft!r}")
    zs = as_float(student_logits)
    if standardize:
        zs = standardize_logits(zs)
    a = teacher_scaled_logits(teacher, temperature, standardize)
    if a.shape != zs.shape:
        raise ValueError(f"student logits {zs.shape} and teacher {a.shape} differ in shape")
    b = zs / temperature
    if soft == "kl":
        per = kl_tempered(a, b)
    else:
        per = -_weighted_log_probs(jax.nn.softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1))
    return reduce(per * jnp.square(temperature), reduction)


def kl_tempered(a: jax.Array, b: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """``KL(softmax(a) ‖ softmax(b))`` along the last axis (over the classes in
    ``where``), accurate also when ``a`` and ``b`` are close (high temperature), where
    ``Σ q (log q − log p)`` cancels catastrophically (``log q ≈ log p ≈ −log C`` while the
    KL is ``O(‖a − b‖²)``).

    With ``d = a − b`` (each side shifted by its max) and ``D = lse(a) − lse(b) = log Σ_c
    p_c e^{d_c}``: ``KL = Σ_c q_c d_c − D``; ``D`` is computed as ``log1p(Σ_c p_c
    expm1(d_c))`` when ``max|d| ≤ 1`` over the classes either side gives mass and as
    ``lse(a) − lse(b)`` otherwise (then the KL is not small). Classes masked on both sides
    with ``-inf`` or a huge negative logit (``-1e9``: padded vocabularies, invalid actions)
    have probability 0 and drop out; a class the teacher gives mass and the student ``-inf``
    makes the KL ``+inf`` (a row the teacher masks entirely: 0). Entries outside ``where`` have
    probability 0 on both sides and may hold any value.
    """
    if where is not None:
        a, b = jnp.where(where, a, -jnp.inf), jnp.where(where, b, -jnp.inf)
    # rows where a side masks every class: 0 if the teacher's does (nothing to match), else +inf
    a_any = jnp.any(a > -jnp.inf, axis=-1, keepdims=True)
    b_any = jnp.any(b > -jnp.inf, axis=-1, keepdims=True)
    a, b = jnp.where(a_any, a, 0.0), jnp.where(b_any, b, 0.0)
    # shift by the max (not the mean: one -1e9 entry would move a mean-centred float32
    # logit by ~3e8 and wipe out every other digit)
    a = a - jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))
    b = b - jax.lax.stop_gradient(jnp.max(b, axis=-1, keepdims=True))
    p = jax.nn.softmax(b, axis=-1)
    q = jax.nn.softmax(a, axis=-1)
    live = (p > 0) | (q > 0)  # classes with mass on either side; elsewhere d is 0 (or -inf - -inf)
    d = jnp.where(live, a - b, 0.0)
    small = jnp.max(jnp.abs(d), axis=-1) <= 1.0
    # d itself where the row is small (not clip(d, -1, 1): its gradient at |d| = 1 is not 1),
    # 0 in the other rows (their d_small is discarded; this keeps it finite)
    d_small = jnp.log1p(jnp.sum(p * jnp.expm1(jnp.where(small[..., None], d, 0.0)), axis=-1))
    d_big = jax.nn.logsumexp(a, axis=-1) - jax.nn.logsumexp(b, axis=-1)
    kl = jnp.sum(jnp.where(q > 0, q * d, 0.0), axis=-1) - jnp.where(small, d_small, d_big)
    return jnp.where(a_any[..., 0], jnp.where(b_any[..., 0], jnp.maximum(kl, 0.0), jnp.inf), 0.0)


def _weighted_log_probs(weights: jax.Array, log_p: jax.Array) -> jax.Array:
    """``Σ_c w_c log p_c`` with ``0 · log 0 = 0`` (a class masked with ``-inf`` and no weight
    contributes nothing instead of NaN); a NaN weight gives NaN."""
    return jnp.sum(jnp.where(weights != 0, weights * log_p, 0.0), axis=-1)


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | TopKTeacher,
    labels: jax.Array | None,
    temperature: Any = 4.0,
    alpha: Any = 0.9,
    *,
    soft: str = "kl",
    label_smoothing: float = 0.0,
    standardize: bool = False,
    reduction: str = "mean",
) -> jax.Array:
    """The combined KD loss ``(1 − α)·CE(y, softmax(z_s)) + α·T²·L_soft(p, q)``
    (Hinton et al. 2015; see the module docstring for the formulas).

    Args:
      student_logits: ``[..., C]`` student logits.
      teacher_logits: ``[..., C]`` teacher logits, or a :class:`TopKTeacher` cache. The
        gradient does flow into teacher logits given as an array (for online
        distillation); a frozen teacher's logits should be ``jax.lax.stop_gradient``-ed
        (:func:`qjax.distill.distill_step` does).
      labels: integer labels ``[...]`` in ``[0, C)`` or a target distribution ``[..., C]``;
        ``None`` only with ``alpha=1`` (pure soft targets, e.g. unlabeled transfer data).
        Concrete out-of-range labels (e.g. -100) raise, traced ones give NaN (see
        :func:`label_validity`).
      temperature: ``T`` (> 0) of both softmaxes of the soft term.
      alpha: weight of the soft term.
      soft: ``"kl"`` or ``"ce"`` form of the soft term.
      label_smoothing: ``ε`` of the hard term.
      standardize: logit standardization (Sun et al. 2024) in the soft term.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per example).

    Example:
      >>> loss = qjax.distill.kd_loss(s_logits, t_logits, y, temperature=4.0, alpha=0.9)
    """
    soft_term = soft_target_loss(
        student_logits, teacher_logits, temperature, soft=soft, standardize=standardize, reduction="none"
    )
    if labels is None:
        if not (isinstance(alpha, (int, float)) and float(alpha) == 1.0):
            raise ValueError("kd_loss: labels=None needs alpha=1 (no hard-label term)")
        return reduce(soft_term, reduction)
    hard = cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return reduce((1.0 - alpha) * hard + alpha * soft_term, reduction)
