"""Contrastive Representation Distillation (Tian, Krishnan & Isola, "Contrastive
Representation Distillation", ICLR 2020), as in the authors' code (``CRDLoss``).

Student and teacher features go through trained embedding heads (adapters,
:func:`qjax.distill.init_adapter`) and are L2-normalised: ``s_i``, ``t_i`` (``dim``, 128 in
the paper). Two memory banks hold one embedding per training example: ``M_s`` (student) and
``M_t`` (teacher). For example ``i`` of the batch (dataset index ``n_i``) and ``K`` negatives
``j`` drawn uniformly from the other examples:

    p_t(i, j) = exp(⟨M_s[j], t_i⟩ / τ) / Z_t,     p_s(i, j) = exp(⟨M_t[j], s_i⟩ / τ) / Z_s
    L_NCE(p) = −Σ_i [ log(p(i, n_i) / (p(i, n_i) + K/N))
                      + Σ_j log((K/N) / (p(i, j) + K/N)) ] / B
    L_CRD = L_NCE(p_s) + L_NCE(p_t)

with ``N`` examples in the dataset, ``Z`` fixed at the first batch to ``mean(exp(·/τ))·N``
(the reference's normalisation constant), and ``ε = 1e-7`` in both denominators. After the
loss, each bank row of the batch moves to its new embedding with momentum ``m`` and is
renormalised: ``M[n_i] ← normalise(m·M[n_i] + (1 − m)·e_i)``. Gradients reach both embedding
heads (and the student), never the banks.

Negatives: by default drawn uniformly, with replacement, from the other ``N − 1`` examples
(:func:`uniform_negatives`; the reference's fallback without a sampler draws from all
``N``). The authors' training runs draw them from the *other classes* (their dataset's
``"exact"`` mode): pass ``negatives=class_negatives(key, index, labels, K)`` for that, which
draws with replacement (the reference without, unless ``K`` exceeds the other classes'
examples), or any ``[B, K]`` indices of your own.

The state (:class:`CRDState`) lives in :class:`qjax.distill.DistillState` ``.loss_state``
with ``distill_step(..., stateful_loss=True)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qjax.distill.soft_targets import label_validity


class CRDState(NamedTuple):
    """The memory banks of CRD and their normalisation constants.

    Attributes:
      student_memory: ``[N, dim]``, one student embedding per training example.
      teacher_memory: ``[N, dim]``, the same for the teacher.
      z_student / z_teacher: the normalisation constants (float32 scalars), negative until
        the first batch sets them.
    """

    student_memory: jax.Array
    teacher_memory: jax.Array
    z_student: jax.Array
    z_teacher: jax.Array


def crd_init(key: jax.Array, num_examples: int, dim: int = 128, *, dtype=jnp.float32) -> CRDState:
    """Fresh memory banks, uniform in ``±1/sqrt(dim/3)`` as in the reference code.

    Args:
      key: a PRNG key.
      num_examples: ``N``, the size of the training set (dataset indices run over ``[0, N)``).
      dim: the embedding width.
      dtype: the banks' dtype.

    Raises:
      ValueError: ``num_examples < 2`` or ``dim < 1``.
    """
    if int(num_examples) < 2 or int(dim) < 1:
        raise ValueError(f"crd_init needs num_examples >= 2 and dim >= 1, got {num_examples} and {dim}")
    bound = 1.0 / math.sqrt(dim / 3)
    k_s, k_t = jax.random.split(key)
    bank = lambda k: jax.random.uniform(k, (num_examples, dim), dtype, -bound, bound)
    unset = jnp.full((), -1.0, jnp.float32)
    return CRDState(bank(k_s), bank(k_t), unset, unset)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def uniform_negatives(key: jax.Array, index: jax.Array, num_examples: int, k: int) -> jax.Array:
    """``[B, k]`` dataset indices drawn uniformly with replacement from ``[0, N)`` without
    each row's own ``index``."""
    draw = jax.random.randint(key, (index.shape[0], k), 0, num_examples - 1)
    return draw + (draw >= index[:, None])


def class_negatives(key: jax.Array, index: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """``[B, k]`` dataset indices drawn uniformly with replacement from the examples whose
    class differs from each row's (the authors' ``"exact"`` sampling, with replacement).

    Args:
      key: a PRNG key.
      index: ``[B]`` dataset indices of the batch.
      labels: ``[N]`` int class of every training example.
      k: negatives per row.

    Raises:
      ValueError: ``labels`` is not 1-D.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"class_negatives: labels must be [N], one class per example, got {labels.shape}")
    n = labels.shape[0]
    order = jnp.argsort(labels, stable=True)  # the examples grouped by class
    sorted_labels = labels[order]
    own = labels[jnp.clip(index, 0, n - 1)]
    start = jnp.searchsorted(sorted_labels, own, side="left")
    count = jnp.searchsorted(sorted_labels, own, side="right") - start  # the row's class size
    others = jnp.maximum(n - count, 1)[:, None]
    j = jnp.minimum((jax.random.uniform(key, (index.shape[0], k)) * others).astype(jnp.int32), others - 1)
    j = j + jnp.where(j >= start[:, None], count[:, None], 0)  # skip the row's class block
    return order[jnp.minimum(j, n - 1)]


def _scores(memory: jax.Array, rows: jax.Array, embed: jax.Array) -> jax.Array:
    """``⟨memory[rows[i, j]], embed[i]⟩`` as ``[B, k + 1]``: a gather of ``[B, k + 1, dim]``
    rows, or every bank row's score (``[B, N]``, twice with its gradient, and ``N / (k + 1)``
    times the flops) then a gather of the scores, when that takes less memory and at most 32
    times the flops (a small dataset)."""
    memory = jax.lax.stop_gradient(memory).astype(jnp.float32)
    n, dim = memory.shape
    if 2 * n <= rows.shape[1] * dim and n <= 32 * rows.shape[1]:
        every = jnp.einsum("nd,bd->bn", memory, embed, precision=jax.lax.Precision.HIGHEST)
        return jnp.take_along_axis(every, rows, axis=1)
    return jnp.einsum("bkd,bd->bk", memory[rows], embed, precision=jax.lax.Precision.HIGHEST)


def _nce(p: jax.Array, num_examples: int, eps: float) -> jax.Array:
    """The reference's ``ContrastLoss`` of ``[B, k + 1]`` probabilities (positive first)."""
    noise = (p.shape[1] - 1) / num_examples  # K · P_n
    log_pos = jnp.log(p[:, 0] / (p[:, 0] + noise + eps))
    log_neg = jnp.log(noise / (p[:, 1:] + noise + eps))
    return -(jnp.sum(log_pos) + jnp.sum(log_neg)) / p.shape[0]


def _moved(
    memory: jax.Array, index: jax.Array, embed: jax.Array, momentum: float, ok: jax.Array
) -> jax.Array:
    """The bank with the batch's rows moved toward ``embed``; unchanged unless ``ok``."""
    rows = memory[index] * momentum + jax.lax.stop_gradient(embed).astype(memory.dtype) * (1 - momentum)
    target = jnp.where(ok, index, memory.shape[0])  # out of bounds: dropped
    return memory.at[target].set(_normalize(rows).astype(memory.dtype), mode="drop")


def crd_loss(
    student_embed: jax.Array,
    teacher_embed: jax.Array,
    index: jax.Array,
    state: CRDState,
    key: jax.Array | None,
    *,
    negatives: jax.Array | None = None,
    num_negatives: int = 16384,
    temperature: float = 0.07,
    momentum: float = 0.5,
    eps: float = 1e-7,
) -> tuple[jax.Array, CRDState]:
    """CRD's loss of one batch and the memory banks moved by it.

    Args:
      student_embed: ``[B, dim]`` the student's embedding head output (normalised here).
      teacher_embed: ``[B, dim]`` the teacher's (its head trains; the teacher does not).
      index: ``[B]`` int dataset indices of the batch's examples, in ``[0, N)``.
      state: the :class:`CRDState` (from :func:`crd_init`, then from the previous step).
      key: a PRNG key for the negatives (a fresh one every step); may be ``None`` with
        ``negatives``.
      negatives: ``[B, K]`` dataset indices of each row's negatives (e.g.
        :func:`class_negatives`); default: ``num_negatives`` drawn by
        :func:`uniform_negatives`.
      num_negatives: ``K`` (the paper's 16384) when ``negatives`` is not given.
      temperature: ``τ`` (0.07).
      momentum: of the bank update (0.5).
      eps: in the NCE denominators (1e-7).

    Returns:
      ``(loss, new_state)``: the scalar float32 ``L_NCE(p_s) + L_NCE(p_t)`` and the state
      with ``Z`` set (first batch) and the batch's bank rows moved (no gradient).

    Raises:
      ValueError: no key (nor ``negatives``); embeddings that are not ``[B, dim]`` of the
        banks' width, an ``index`` that is not ``[B]``, ``negatives`` that are not
        ``[B, K]``; concrete indices outside ``[0, N)`` (traced ones give a NaN loss and NaN
        gradients instead, and leave the state as it was); ``num_negatives < 1``,
        ``temperature <= 0`` or ``momentum`` outside ``[0, 1)``.

    An index repeated within a batch moves its bank rows once (one of its updates is kept).

    Example:
      >>> s = apply_adapter(adapters["embed_s"], student.features[p]["input"])
      >>> t = apply_adapter(adapters["embed_t"], teacher.features[q]["input"])
      >>> value, crd_state = crd_loss(s, t, batch["index"], crd_state, key)
    """
    n, dim = state.student_memory.shape
    if key is None and negatives is None:
        raise ValueError("crd_loss draws negatives: pass a PRNG key (distill_step passes the step's key=)")
    for name, e in (("student_embed", student_embed), ("teacher_embed", teacher_embed)):
        if jnp.ndim(e) != 2 or jnp.shape(e)[1] != dim:
            raise ValueError(
                f"crd_loss: {name} must be [batch, {dim}] (the banks' width), got {jnp.shape(e)}"
            )
    b = jnp.shape(student_embed)[0]
    if jnp.shape(teacher_embed)[0] != b or jnp.shape(index) != (b,):
        raise ValueError(
            f"crd_loss: student_embed {jnp.shape(student_embed)}, teacher_embed {jnp.shape(teacher_embed)} "
            f"and index {jnp.shape(index)} must share the batch size"
        )
    if int(num_negatives) < 1 or not 0 <= momentum < 1 or not temperature > 0:
        raise ValueError(
            "crd_loss: num_negatives >= 1, temperature > 0 and 0 <= momentum < 1, got "
            f"{num_negatives}, {temperature}, {momentum}"
        )
    if negatives is not None and (jnp.ndim(negatives) != 2 or jnp.shape(negatives)[0] != b):
        raise ValueError(
            f"crd_loss: negatives must be [batch={b}, K] dataset indices, got {jnp.shape(negatives)}"
        )
    ok = jnp.all(label_validity(index, n, "index (dataset indices)"))
    if negatives is None:
        negatives = uniform_negatives(
            key, jnp.clip(jnp.asarray(index, jnp.int32), 0, n - 1), n, int(num_negatives)
        )
    else:
        ok = ok & jnp.all(label_validity(negatives, n, "negatives (dataset indices)"))
    index = jnp.clip(jnp.asarray(index, jnp.int32), 0, n - 1)
    s = _normalize(jnp.asarray(student_embed, jnp.float32))
    t = _normalize(jnp.asarray(teacher_embed, jnp.float32))
    rows = jnp.concatenate([index[:, None], jnp.clip(jnp.asarray(negatives, jnp.int32), 0, n - 1)], axis=1)
    exp_s = jnp.exp(_scores(state.teacher_memory, rows, s) / temperature)  # student vs teacher bank
    exp_t = jnp.exp(_scores(state.student_memory, rows, t) / temperature)  # teacher vs student bank
    fix = lambda z, e: jax.lax.stop_gradient(jnp.where(z < 0, jnp.mean(e) * n, z))  # a constant
    z_s, z_t = fix(state.z_student, exp_s), fix(state.z_teacher, exp_t)
    loss = _nce(exp_s / z_s, n, eps) + _nce(exp_t / z_t, n, eps)
    loss = loss * jnp.where(ok, 1.0, jnp.nan)  # bad indices: NaN, in the gradients too
    new = CRDState(
        _moved(state.student_memory, index, s, momentum, ok),
        _moved(state.teacher_memory, index, t, momentum, ok),
        jnp.where(ok, z_s, state.z_student),
        jnp.where(ok, z_t, state.z_teacher),
    )
    return loss, jax.lax.stop_gradient(new)
