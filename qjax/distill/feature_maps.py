"""Feature-map relation losses: what a network's channels share across its spatial
positions, matched between student and teacher (channel counts may differ; spatial sizes
must agree). Feature maps are channels-last ``[B, *spatial, C]`` (``[B, C]`` has one
position).

* FSP (Yim, Joo, Bae & Kim, "A Gift from Knowledge Distillation: Fast Optimization, Network
  Minimization and Transfer Learning", CVPR 2017). The flow of a section of the network
  between its first map ``F¹ ∈ R^{P×C₁}`` and its last ``F² ∈ R^{P×C₂}`` (``P`` positions):

      G = F¹ᵀ F² / P                                   ([C₁, C₂] per example)
      L_FSP = mean_b Σ_pairs λ ‖G_s − G_t‖²_F

  as in the paper (a squared Frobenius norm per example, averaged over the batch). Student
  and teacher sections must have the same channel counts (``C₁``, ``C₂``), which FSP's
  design assumes (the student's section mirrors the teacher's), and the two maps of a
  section the same spatial size. torchdistill's ``FSPLoss`` differs: it sums the L2 norms
  of the difference's columns (not squared) and max-pools maps of different sizes to the
  smaller; its weights do not transfer.

* NST (Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity
  Transfer", 2017). Each channel's spatial pattern ``f_k ∈ R^P`` is L2-normalised; the
  squared MMD between the student's and the teacher's sets of channels with the
  polynomial kernel ``k(x, y) = (xᵀy + c)^d`` (``d = 2``, ``c = 0`` in the paper):

      L_NST = mean_b [ mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j')
                        − 2 mean_{i,j} k(t_i, s_j) ]

  as the reference implementations compute it (``RepDistiller``'s ``NSTLoss``: the means
  over channel pairs, then over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from qjax.distill.relational import safe_norm
from qjax.distill.topk import as_float


def _positions(name: str, features: jax.Array) -> jax.Array:
    """``[B, P, C]``: channels-last feature maps with their spatial axes flattened."""
    f = as_float(features)
    if f.ndim < 2 or f.size == 0:
        raise ValueError(
            f"{name}: feature maps must be non-empty [batch, *spatial, channels], got shape {f.shape}"
        )
    return f.reshape(f.shape[0], -1, f.shape[-1])


def fsp_matrix(first: jax.Array, second: jax.Array) -> jax.Array:
    """``G = F¹ᵀ F² / P`` per example: ``[B, C₁, C₂]`` of two channels-last maps with the
    same batch and spatial sizes.

    Raises:
      ValueError: the maps' batch or spatial sizes differ.
    """
    a, b = _positions("fsp_matrix", first), _positions("fsp_matrix", second)
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"fsp_matrix: the two maps must share batch and spatial sizes, got {jnp.shape(first)} and "
            f"{jnp.shape(second)}"
        )
    return jnp.einsum("bpi,bpj->bij", a, b, precision=jax.lax.Precision.HIGHEST) / a.shape[1]


def fsp_loss(
    student_pairs: Sequence[tuple[jax.Array, jax.Array]],
    teacher_pairs: Sequence[tuple[jax.Array, jax.Array]],
    weights: Sequence[float] | None = None,
) -> jax.Array:
    """``mean_b Σ_pairs λ ‖G_s − G_t‖²_F`` (FSP; see the module docstring).

    Args:
      student_pairs: ``[(first map, last map), ...]`` of the student's sections.
      teacher_pairs: the teacher's, in the same order.
      weights: ``λ`` per pair (default 1 each).

    Raises:
      ValueError: different pair counts, no pair, or FSP matrices of different shapes (the
        sections' channel counts must agree).
    """
    if not student_pairs or len(student_pairs) != len(teacher_pairs):
        raise ValueError(
            f"fsp_loss: needs as many student as teacher pairs, at least one; got {len(student_pairs)} "
            f"and {len(teacher_pairs)}"
        )
    weights = [1.0] * len(student_pairs) if weights is None else list(weights)
    if len(weights) != len(student_pairs):
        raise ValueError(f"fsp_loss: {len(weights)} weights for {len(student_pairs)} pairs")
    total = 0.0
    for i, ((s1, s2), (t1, t2), w) in enumerate(zip(student_pairs, teacher_pairs, weights)):
        gs, gt = fsp_matrix(s1, s2), fsp_matrix(t1, t2)
        if gs.shape != gt.shape:
            raise ValueError(
                f"fsp_loss: pair {i}: student FSP matrix {gs.shape[1:]} and teacher's {gt.shape[1:]} differ "
                "(FSP needs the same channel counts in both sections)"
            )
        total = total + w * jnp.mean(jnp.sum(jnp.square(gs - gt), axis=(1, 2)))
    return jnp.asarray(total)


def _channel_patterns(name: str, features: jax.Array, eps: float) -> jax.Array:
    """``[B, C, P]``: each channel's spatial pattern, L2-normalised (``F.normalize``)."""
    f = jnp.swapaxes(_positions(name, features), 1, 2)
    return f / jnp.maximum(safe_norm(f, axis=2, keepdims=True), eps)


def nst_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    degree: int = 2,
    bias: float = 0.0,
    eps: float = 1e-12,
) -> jax.Array:
    """The squared MMD between the student's and the teacher's normalised channel
    patterns with the kernel ``(xᵀy + bias)^degree`` (NST; see the module docstring).

    Args:
      student_features, teacher_features: channels-last maps ``[B, *spatial, C]``; spatial
        sizes must agree, channel counts may differ.
      degree, bias: of the polynomial kernel (the paper: 2 and 0).
      eps: floor of the normalisation.

    Raises:
      ValueError: batch or spatial sizes differ.
    """
    s = _channel_patterns("nst_loss", student_features, eps)
    t = _channel_patterns("nst_loss", teacher_features, eps)
    if s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
        raise ValueError(
            f"nst_loss: batch and spatial sizes must agree, got {jnp.shape(student_features)} and "
            f"{jnp.shape(teacher_features)}"
        )
    hi = jax.lax.Precision.HIGHEST
    k = lambda a, b: jnp.mean((jnp.einsum("bip,bjp->bij", a, b, precision=hi) + bias) ** degree, axis=(1, 2))
    return jnp.mean(k(t, t) + k(s, s) - 2.0 * k(s, t))
