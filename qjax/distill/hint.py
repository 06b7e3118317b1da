"""FitNets hints (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for
Thin Deep Nets", ICLR 2015).

A student feature ``u`` (the "guided" layer) is regressed onto a teacher feature ``v``
(the "hint" layer) through a learnable regressor ``r`` that maps the student's width to
the teacher's:

    L_hint = mean((r(u) − v)²)

(the paper writes ``½‖r(u) − v‖²`` summed; the mean is the common implementation, e.g.
``nn.MSELoss`` in the CRD / torchdistill code, and differs by a constant factor).

The regressor here is an *adapter*: an affine map on the channel (last) axis,
``r(u) = u·W + b``. On ``[B, D]`` features it is a linear layer; on channels-last
feature maps ``[B, H, W, C]`` it is a 1×1 convolution (the paper uses a convolutional
regressor; a 1×1 one is the usual choice when the spatial sizes agree). Adapter params
are a plain pytree ``{"kernel": [C_s, C_t], "bias": [C_t]}`` that is trained together
with the student (see :func:`qjax.distill.distill_step`) and discarded afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qjax.distill.topk import as_float

Adapter = dict[str, jax.Array]


def init_adapter(key: jax.Array, in_features: int, out_features: int, *, dtype: Any = jnp.float32) -> Adapter:
    """A fresh adapter ``{"kernel": [in, out], "bias": [out]}`` (LeCun-normal kernel,
    zero bias, as Flax's ``Dense``)."""
    kernel = jax.nn.initializers.lecun_normal()(key, (in_features, out_features), dtype)
    return {"kernel": kernel, "bias": jnp.zeros((out_features,), dtype)}


def apply_adapter(adapter: Adapter, features: jax.Array) -> jax.Array:
    """``features·W + b`` on the last (channel) axis."""
    return jnp.einsum("...i,io->...o", features, adapter["kernel"]) + adapter["bias"]


def hint_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    adapter: Adapter | Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``mean((r(u) − v)²)`` (see the module docstring).

    Args:
      student_features: ``u``, ``[..., C_s]``.
      teacher_features: ``v``, ``[..., C_t]``.
      adapter: the regressor ``r``: adapter params (:func:`init_adapter`), any callable,
        or ``None`` for the identity (then the shapes must agree).

    Raises:
      ValueError: the (adapted) student and teacher shapes differ.
    """
    u = as_float(student_features)
    if adapter is not None:
        u = adapter(u) if callable(adapter) else apply_adapter(adapter, u)
    v = as_float(teacher_features)
    if u.shape != v.shape:
        hint = "" if adapter is not None else " (pass an adapter: qjax.distill.init_adapter(key, C_s, C_t))"
        raise ValueError(f"hint_loss: student features {u.shape} vs teacher features {v.shape}{hint}")
    return jnp.mean(jnp.square(as_float(u) - v))


def vid_log_scale(
    channels: int, init_variance: float = 5.0, *, eps: float = 1e-5, dtype=jnp.float32
) -> jax.Array:
    """VID's per-channel variance parameter, ``α`` with ``softplus(α) + eps`` equal to
    ``init_variance`` (5, the reference's default): train it with the student (an adapter).

    Raises:
      ValueError: ``init_variance <= eps``.
    """
    if not init_variance > eps:
        raise ValueError(f"vid_log_scale: init_variance must exceed eps={eps}, got {init_variance}")
    v = float(init_variance) - eps
    return jnp.full((channels,), v + math.log(-math.expm1(-v)), dtype)  # softplus⁻¹(v), stable for large v


def vid_loss(prediction: jax.Array, teacher_features: jax.Array, log_scale: jax.Array, *, eps: float = 1e-5):
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, CVPR 2019):
    the Gaussian negative log-likelihood of the teacher's features under the student's
    prediction ``μ`` (a regressor of the student's features, e.g. :func:`apply_adapter` or a
    small 1×1-conv net) with a learned per-channel variance ``σ²_c = softplus(α_c) + eps``:

        L_VID = mean over examples, positions, channels of ½ ((μ − t)² / σ² + log σ²)

    as the authors' code (``VIDLoss``; the constant ``½ log 2π`` dropped).

    Args:
      prediction: ``μ``, ``[B, ..., C]`` channels last.
      teacher_features: ``t``, the same shape.
      log_scale: ``α``, ``[C]`` (:func:`vid_log_scale`).
      eps: the variance floor.

    Raises:
      ValueError: shapes that disagree.
    """
    mu, t = as_float(prediction), as_float(teacher_features)
    if mu.ndim == 0 or mu.size == 0:
        raise ValueError(f"vid_loss: needs a non-empty prediction [..., C], got shape {mu.shape}")
    if mu.shape != t.shape or jnp.shape(log_scale) != mu.shape[-1:]:
        raise ValueError(
            f"vid_loss: prediction {mu.shape}, teacher_features {t.shape} and log_scale "
            f"{jnp.shape(log_scale)} must be [..., C], [..., C] and [C]"
        )
    var = jax.nn.softplus(as_float(log_scale)) + eps
    return jnp.mean(0.5 * (jnp.square(mu - t) / var + jnp.log(var)))
