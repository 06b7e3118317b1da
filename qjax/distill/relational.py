"""Relational feature losses: match how examples of a batch relate to each other, not
the features themselves (so student and teacher widths may differ, no adapter needed).

Features are flattened to ``F ∈ R^{B×D}`` (``B`` examples). Every quantity is built
from the batch Gram matrix ``G = F Fᵀ`` and reduced with ``jnp`` over the whole batch,
so under ``jax.jit`` with a batch sharded across devices the result is the global one
(with explicit-sharding meshes the features are gathered first, see :func:`replicated`).

* RKD (Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019):

      ψ_D(i, j)    = ‖f_i − f_j‖₂ / μ,   μ = mean_{i≠j} ‖f_i − f_j‖₂
      ψ_A(i, j, k) = ⟨e_ji, e_ki⟩,       e_ji = (f_j − f_i)/‖f_j − f_i‖₂  (angle at vertex i)
      L_D = mean_{i≠j} huber(ψ_D^s − ψ_D^t),  L_A = mean_{i,j,k distinct} huber(ψ_A^s − ψ_A^t)
      L_RKD = λ_D·L_D + λ_A·L_A          (huber = smooth-L1 with δ = 1; paper λ_D:λ_A = 1:2)

  Normalisation: the means run over the ``B(B−1)`` pairs and ``B(B−1)(B−2)`` distinct
  triples. The authors' code (and torchdistill) divides the same sums by all ``B²`` and
  ``B³`` entries, so its terms are smaller by ``(B−1)/B`` and ``(B−1)(B−2)/B²`` (0.83 and
  0.56 at ``B = 6``). Its weights 25 and 50 are therefore ``distance_weight = 25·(B−1)/B``
  and ``angle_weight = 50·(B−1)(B−2)/B²`` here (20.8 and 27.8 at ``B = 6``, 24.6 and 47.7
  at ``B = 64``). (Its ``μ`` averages the positive distances only: the same unless two
  examples coincide.)

  Both potentials are invariant to scaling the features (and to translating and
  rotating them).

* SP (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019):

      G̃ = row-normalise(F Fᵀ),   L_SP = ‖G̃_s − G̃_t‖_F² / B²

* PKT (Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
  Transfer", ECCV 2018), with cosine-similarity kernels:

      K_ij = (1 + cos(f_i, f_j)) / 2,    P_ij = K_ij / Σ_j K_ij
      L_PKT = mean_{i,j} P^t_ij · log((P^t_ij + ε) / (P^s_ij + ε))     (ε = 1e-7)

  as in the authors' code (the mean over all ``B²`` entries of the KL terms).

* CC (Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019): the
  correlation between examples by a Gaussian RBF kernel, ``exp(−γ‖x − y‖²)``, expanded to
  order ``P`` for L2-normalised ``x``, ``y`` (so ``‖x − y‖² = 2 − 2xᵀy``):

      C_ij = e^{−2γ} Σ_{p=0}^{P} (2γ)^p / p! · (f̂_iᵀ f̂_j)^p     (f̂: L2-normalised)
      L_CC = ‖C_s − C_t‖²_F / B²

  (``kernel="bilinear"``: ``C = F Fᵀ`` of the features as given), as in the paper. The
  paper applies it to embeddings of both networks (the penultimate features through linear
  heads, :func:`qjax.distill.init_adapter`); any widths work here, since only the ``[B, B]``
  matrices meet. torchdistill's ``CCKDLoss`` differs: it expands the kernel on the raw
  (unnormalised) embeddings and divides the unsquared distance ``‖C_s − C_t‖_F`` by
  ``B²``; its weights do not transfer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from qjax.distill.topk import as_float


def replicated(x: jax.Array) -> jax.Array:
    """``x`` gathered to every device when its type carries an *explicit* sharding
    (``jax.make_mesh(..., axis_types=Explicit)``): a ``[B, B]`` relation of a batch
    sharded on one mesh axis cannot be sharded on that axis twice. With auto sharding
    (or none) ``x`` is returned as is and XLA places the collectives."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is not None and any(s is not None for s in spec):
        return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
    return x


def _flat(features: jax.Array, min_batch: int = 2) -> jax.Array:
    f = as_float(features)
    if f.ndim < 2:
        raise ValueError(f"relational losses need a batch of features [B, ...], got shape {f.shape}")
    if f.shape[0] < min_batch:
        raise ValueError(f"this relational loss needs at least {min_batch} examples, got {f.shape[0]}")
    return replicated(f.reshape(f.shape[0], -1))


def _huber(x: jax.Array) -> jax.Array:
    """Smooth L1 with δ = 1: ``x²/2`` for ``|x| < 1``, else ``|x| − 1/2``."""
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _zero_unless_nan(x: jax.Array) -> jax.Array:
    """0 where ``x`` is finite, NaN where it is NaN, with a zero gradient: the value of a
    safe ``where`` branch, so that NaN inputs still reach the loss."""
    return x * 0.0


def _safe_sqrt(sq: jax.Array, keep: jax.Array) -> jax.Array:
    """``sqrt(max(sq, 0))`` where ``keep``, 0 elsewhere, with finite gradients at 0 (NaN
    stays NaN where ``keep``)."""
    pos = keep & (sq > 0)
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), jnp.where(keep, _zero_unless_nan(sq), 0.0))


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """``‖x‖₂`` along ``axis`` with a zero (not NaN) gradient where the norm is 0 (an
    all-zero feature row: padding, a dead layer), as ``torch.norm``'s backward gives."""
    return _safe_sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdims), jnp.array(True))


def _centred(f: jax.Array) -> jax.Array:
    """``f`` minus its batch mean: distances and angles do not change, and their Gram
    matrix does not cancel catastrophically when the features share a large offset."""
    return f - jnp.mean(f, axis=0, keepdims=True)


def _same_batch(name: str, a: jax.Array, b: jax.Array) -> None:
    if jnp.shape(a)[0] != jnp.shape(b)[0]:
        raise ValueError(f"{name}: batch sizes differ ({jnp.shape(a)[0]} vs {jnp.shape(b)[0]})")


def pairwise_distances(features: jax.Array) -> jax.Array:
    """``D_ij = ‖f_i − f_j‖₂`` (``[B, B]``, zero diagonal) from the Gram matrix of the
    batch-centred features."""
    f = _centred(_flat(features))
    g = f @ f.T
    sq_norm = jnp.diagonal(g)
    sq = sq_norm[:, None] + sq_norm[None, :] - 2.0 * g
    off = ~jnp.eye(f.shape[0], dtype=bool)
    return _safe_sqrt(sq, off)


def rkd_distance_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """``mean_{i≠j} huber(ψ_D^s − ψ_D^t)`` (see the module docstring).

    Raises:
      ValueError: the batch sizes differ.
    """
    _same_batch("rkd_distance_loss", student_features, teacher_features)
    ds, dt = pairwise_distances(student_features), pairwise_distances(teacher_features)
    b = ds.shape[0]
    off = ~jnp.eye(b, dtype=bool)
    n = b * (b - 1)
    psi_s = ds / jnp.maximum(jnp.sum(ds) / n, 1e-12)
    psi_t = dt / jnp.maximum(jnp.sum(dt) / n, 1e-12)
    return jnp.sum(jnp.where(off, _huber(psi_s - psi_t), 0.0)) / n


def _angles(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos[i, j, k] = ⟨f_j − f_i, f_k − f_i⟩ / (‖f_j − f_i‖ ‖f_k − f_i‖)`` and the mask of
    distinct ``(i, j, k)``; from the Gram matrix (no ``[B, B, D]`` tensor)."""
    f = _centred(_flat(features, min_batch=3))
    b = f.shape[0]
    g = f @ f.T
    d = pairwise_distances(f)
    gii = jnp.diagonal(g)
    # <f_j - f_i, f_k - f_i> = G_jk - G_ij - G_ik + G_ii
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + gii[:, None, None]
    eye = jnp.eye(b, dtype=bool)
    distinct = ~eye[:, :, None] & ~eye[:, None, :] & ~eye[None, :, :]
    den = d[:, :, None] * d[:, None, :]
    ok = distinct & (den > 0)
    cos = jnp.where(ok, dot / jnp.where(ok, den, 1.0), jnp.where(distinct, _zero_unless_nan(dot + den), 0.0))
    return cos, distinct


def rkd_angle_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """``mean_{i,j,k distinct} huber(ψ_A^s − ψ_A^t)`` (see the module docstring).

    Raises:
      ValueError: the batch sizes differ.
    """
    _same_batch("rkd_angle_loss", student_features, teacher_features)
    cs, distinct = _angles(student_features)
    ct, _ = _angles(teacher_features)
    b = cs.shape[0]
    n = b * (b - 1) * (b - 2)
    return jnp.sum(jnp.where(distinct, _huber(cs - ct), 0.0)) / n


def rkd_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    distance_weight: Any = 1.0,
    angle_weight: Any = 2.0,
) -> jax.Array:
    """``λ_D·L_D + λ_A·L_A`` (RKD; see the module docstring). Features ``[B, ...]``;
    student and teacher widths may differ. The angle term costs ``O(B³)`` memory.

    The terms are means over pairs / distinct triples: the authors' weights (25, 50, for
    means over all ``B²`` / ``B³`` entries) become ``25·(B−1)/B`` and ``50·(B−1)(B−2)/B²``.
    """
    loss = 0.0
    if not (isinstance(distance_weight, (int, float)) and distance_weight == 0):
        loss = loss + distance_weight * rkd_distance_loss(student_features, teacher_features)
    if not (isinstance(angle_weight, (int, float)) and angle_weight == 0):
        loss = loss + angle_weight * rkd_angle_loss(student_features, teacher_features)
    return jnp.asarray(loss)


def _row_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(safe_norm(x, axis=1, keepdims=True), eps)


def sp_loss(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
    """``‖G̃_s − G̃_t‖_F² / B²`` (similarity-preserving KD; see the module docstring)."""
    fs, ft = _flat(student_features), _flat(teacher_features)
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"sp_loss: batch sizes differ ({fs.shape[0]} vs {ft.shape[0]})")
    gs, gt = _row_normalize(fs @ fs.T), _row_normalize(ft @ ft.T)
    return jnp.sum(jnp.square(gs - gt)) / fs.shape[0] ** 2


def _pkt_probs(features: jax.Array, eps: float) -> jax.Array:
    f = _flat(features)
    f = f / (safe_norm(f, axis=1, keepdims=True) + eps)
    k = (f @ f.T + 1.0) / 2.0
    return k / jnp.sum(k, axis=1, keepdims=True)


def pkt_loss(student_features: jax.Array, teacher_features: jax.Array, *, eps: float = 1e-7) -> jax.Array:
    """``mean_{i,j} P^t_ij log((P^t_ij + ε)/(P^s_ij + ε))`` (PKT; see the module docstring)."""
    ps, pt = _pkt_probs(student_features, eps), _pkt_probs(teacher_features, eps)
    if ps.shape != pt.shape:
        raise ValueError(f"pkt_loss: batch sizes differ ({ps.shape[0]} vs {pt.shape[0]})")
    return jnp.mean(pt * jnp.log((pt + eps) / (ps + eps)))


def correlation_matrix(features: jax.Array, *, kernel: str = "gaussian", gamma: float = 0.4, order: int = 2):
    """``C`` (``[B, B]``) of CC (see the module docstring): the ``order``-term expansion of
    the Gaussian kernel on L2-normalised features, or ``F Fᵀ`` for ``"bilinear"``.

    Raises:
      ValueError: an unknown ``kernel``, or ``order < 0``.
    """
    f = _flat(features, min_batch=1)
    if kernel == "bilinear":
        return f @ f.T
    if kernel != "gaussian" or order < 0:
        raise ValueError(f"correlation_matrix: kernel must be 'gaussian' or 'bilinear' and order >= 0, got "
                         f"{kernel!r}, {order}")  # fmt: skip
    g = _row_normalize(f) @ _row_normalize(f).T
    terms = sum((2 * gamma) ** p / math.factorial(p) * g**p for p in range(order + 1))
    return math.exp(-2 * gamma) * terms


def cc_loss(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    kernel: str = "gaussian",
    gamma: float = 0.4,
    order: int = 2,
) -> jax.Array:
    """``‖C_s − C_t‖²_F / B²`` (correlation congruence; see the module docstring).

    Args:
      student_features, teacher_features: ``[B, ...]`` features (embeddings).
      kernel: ``"gaussian"`` (the expansion) or ``"bilinear"``.
      gamma, order: the Gaussian kernel's ``γ`` and expansion order ``P`` (the paper's
        defaults 0.4 and 2).

    Raises:
      ValueError: the batch sizes differ; a bad ``kernel`` / ``order``.
    """
    _same_batch("cc_loss", student_features, teacher_features)
    for side, f in (("student", student_features), ("teacher", teacher_features)):
        if jnp.size(f) == 0:
            raise ValueError(f"cc_loss: the {side} features are empty (shape {jnp.shape(f)})")
    cs = correlation_matrix(student_features, kernel=kernel, gamma=gamma, order=order)
    ct = correlation_matrix(teacher_features, kernel=kernel, gamma=gamma, order=order)
    return jnp.sum(jnp.square(cs - ct)) / cs.shape[0] ** 2
