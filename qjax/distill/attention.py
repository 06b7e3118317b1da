"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer",
ICLR 2017).

An activation-based spatial attention map summarises a feature map ``A`` of shape
``[B, H, W, C]`` over its channels and is L2-normalised per example:

    Q(A) = Σ_c |A_c|^p           (p = 2 in the paper; the mean over c is equivalent
                                  after normalisation, as in the authors' code)
    q = vec(Q) / ‖vec(Q)‖₂

    L_AT = mean_{i, positions} (q_s − q_t)²

``L_AT`` is the mean as in the authors' code (``(at(x) − at(y)).pow(2).mean()``); the
paper adds ``β/2 · L_AT`` per layer pair with ``β = 1000``. Channel counts of student and
teacher may differ; spatial sizes must agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.distill.relational import safe_norm
from qjax.distill.topk import as_float


def attention_map(features: jax.Array, p: float = 2.0, *, channel_axis: int = -1, eps: float = 1e-12):
    """``q = vec(mean_c |A_c|^p) / ‖·‖₂`` per example: ``[B, positions]``.

    Args:
      features: ``[B, ..., C]`` (channels last by default).
      p: the exponent.
      channel_axis: the channel axis.
      eps: floor of the norm (``F.normalize`` semantics: divide by ``max(‖·‖, eps)``).
    """
    a = as_float(features)
    if a.ndim < 3:
        raise ValueError(f"attention_map needs [B, spatial..., C] feature maps, got shape {a.shape}")
    q = jnp.mean(jnp.abs(a) ** p, axis=channel_axis).reshape(a.shape[0], -1)
    return q / jnp.maximum(safe_norm(q, axis=1, keepdims=True), eps)


def attention_transfer_loss(
    student_features: jax.Array, teacher_features: jax.Array, p: float = 2.0, *, channel_axis: int = -1
) -> jax.Array:
    """``mean((q_s − q_t)²)`` over examples and positions (see the module docstring).

    Raises:
      ValueError: the spatial sizes differ.
    """
    qs = attention_map(student_features, p, channel_axis=channel_axis)
    qt = attention_map(teacher_features, p, channel_axis=channel_axis)
    if qs.shape != qt.shape:
        raise ValueError(
            f"attention_transfer_loss: spatial sizes differ: student {jnp.shape(student_features)}, "
            f"teacher {jnp.shape(teacher_features)}"
        )
    return jnp.mean(jnp.square(qs - qt))
