"""Knowledge distillation: losses as pure functions, feature capture by param path,
and teacher–student training steps.

Logit losses (``[..., C]`` logits; the teacher may be a :class:`TopKTeacher` cache):

* :func:`kd_loss` / :func:`soft_target_loss`: Hinton et al. 2015, KL or CE form, ``T²``
  scaling, label smoothing, logit standardization (Sun et al. 2024).
* :func:`dkd_loss`: decoupled KD (Zhao et al. 2022).
* :func:`dist_loss`: DIST correlation matching (Huang et al. 2022).

Feature losses: :func:`hint_loss` (FitNets, with :func:`init_adapter` regressors),
:func:`attention_transfer_loss` (Zagoruyko & Komodakis 2017), :func:`rkd_loss` (Park et
al. 2019), :func:`sp_loss` (Tung & Mori 2019), :func:`pkt_loss` (Passalis & Tefas 2018).

Features: :func:`capture` (graph layer; Linen, NNX, plain functions),
:func:`capture_linen` (Flax ``capture_intermediates``).

Training: :func:`distill_step` (frozen teacher, optax student + adapters, optional
fake-quantized student, optional cached top-k teacher from :func:`cache_teacher`).
"""

from qjax.distill.attention import attention_map, attention_transfer_loss
from qjax.distill.capture import Features, capture, capture_linen
from qjax.distill.dist import dist_loss, pearson
from qjax.distill.dkd import dkd_loss
from qjax.distill.hint import apply_adapter, hint_loss, init_adapter
from qjax.distill.relational import (
    pairwise_distances,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)
from qjax.distill.soft_targets import cross_entropy, kd_loss, soft_target_loss, target_distribution
from qjax.distill.topk import (
    TopKTeacher,
    dense_log_probs,
    standardize_logits,
    teacher_log_probs,
    topk_teacher,
)
from qjax.distill.train import (
    DistillState,
    DistillStep,
    Outputs,
    cache_teacher,
    distill_step,
    kd_objective,
)

__all__ = [
    "DistillState",
    "DistillStep",
    "Features",
    "Outputs",
    "TopKTeacher",
    "apply_adapter",
    "attention_map",
    "attention_transfer_loss",
    "cache_teacher",
    "capture",
    "capture_linen",
    "cross_entropy",
    "dense_log_probs",
    "dist_loss",
    "distill_step",
    "dkd_loss",
    "hint_loss",
    "init_adapter",
    "kd_loss",
    "kd_objective",
    "pairwise_distances",
    "pearson",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "soft_target_loss",
    "sp_loss",
    "standardize_logits",
    "target_distribution",
    "teacher_log_probs",
    "topk_teacher",
]
