"""DIST: distillation by correlation (Huang, You, Wang, Qian & Xu, "Knowledge Distillation
from A Stronger Teacher", NeurIPS 2022).

Exact matching of probabilities (KL) is replaced by matching their *relations* with the
Pearson correlation ``ρ``, which is invariant to shifting and positively scaling either
side. With ``Y^s = softmax(z_s/T)``, ``Y^t = softmax(z_t/T)`` of shape ``[B, C]``:

    inter = 1 − (1/B) Σ_i ρ(Y^s_{i,:}, Y^t_{i,:})      (relations between classes, per example)
    intra = 1 − (1/C) Σ_c ρ(Y^s_{:,c}, Y^t_{:,c})      (relations between examples, per class)
    L_DIST = T² · (β · inter + γ · intra)               (paper: β = γ = 1, T = 1; 4 on ImageNet)

    ρ(u, v) = ⟨u − ū, v − v̄⟩ / (‖u − ū‖ ‖v − v̄‖ + ε)

The intra-class term uses batch statistics (the mean over the batch of each class). All
reductions are ``jnp`` reductions over the whole batch axis, so under ``jax.jit`` with a
batch sharded over devices they are global (XLA inserts the collectives).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qjax.distill.topk import TopKTeacher, as_float, standardize_logits, teacher_log_probs


def pearson(u: jax.Array, v: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """Pearson correlation of ``u`` and ``v`` along ``axis`` (``ε`` in the denominator)."""
    u = u - jnp.mean(u, axis=axis, keepdims=True)
    v = v - jnp.mean(v, axis=axis, keepdims=True)
    num = jnp.sum(u * v, axis=axis)
    den = jnp.sqrt(jnp.sum(u * u, axis=axis)) * jnp.sqrt(jnp.sum(v * v, axis=axis))
    return num / (den + eps)


def dist_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array | TopKTeacher,
    temperature: Any = 1.0,
    beta: Any = 1.0,
    gamma: Any = 1.0,
    *,
    standardize: bool = False,
    eps: float = 1e-8,
) -> jax.Array:
    """``T²·(β·inter + γ·intra)`` (see the module docstring); a scalar.

    Args:
      student_logits: ``[..., C]``; every leading axis is an example axis (flattened).
      teacher_logits: ``[..., C]`` or a :class:`TopKTeacher` cache.
      temperature: ``T`` (> 0; a concrete non-positive one raises).
      beta: weight of the inter-class (per example) term.
      gamma: weight of the intra-class (per class, over the batch) term.
      standardize: logit standardization (Sun et al. 2024) of both sides.
      eps: added to the correlation's denominator.
    """
    zs = as_float(student_logits)
    if standardize:
        zs = standardize_logits(zs)
    ys = jax.nn.softmax(zs / temperature, axis=-1)
    yt = jnp.exp(teacher_log_probs(teacher_logits, temperature, standardize))
    if ys.shape != yt.shape:
        raise ValueError(f"student logits {ys.shape} and teacher {yt.shape} differ in shape")
    c = ys.shape[-1]
    ys, yt = ys.reshape(-1, c), yt.reshape(-1, c)
    inter = 1.0 - jnp.mean(pearson(ys, yt, axis=1, eps=eps))
    intra = 1.0 - jnp.mean(pearson(ys, yt, axis=0, eps=eps))
    return jnp.square(temperature) * (beta * inter + gamma * intra)
