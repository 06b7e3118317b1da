"""Knowledge distillation: losses as pure functions, feature capture by param path,
and teacher–student training steps.

Logit losses (``[..., C]`` logits; the teacher may be a :class:`TopKTeacher` cache):

* :func:`kd_loss` / :func:`soft_target_loss`: Hinton et al. 2015, KL or CE form, ``T²``
  scaling, label smoothing, logit standardization (Sun et al. 2024).
* :func:`dkd_loss`: decoupled KD (Zhao et al. 2022).
* :func:`dist_loss`: DIST correlation matching (Huang et al. 2022).

Feature losses: :func:`hint_loss` (FitNets, with :func:`init_adapter` regressors),
:func:`vid_loss` (variational information distillation, Ahn et al. 2019),
:func:`fsp_loss` (Yim et al. 2017), :func:`nst_loss` (Huang & Wang 2017),
:func:`cc_loss` (correlation congruence, Peng et al. 2019),
:func:`attention_transfer_loss` (Zagoruyko & Komodakis 2017), :func:`rkd_loss` (Park et
al. 2019), :func:`sp_loss` (Tung & Mori 2019), :func:`pkt_loss` (Passalis & Tefas 2018),
:func:`crd_loss` (contrastive representation distillation, Tian et al. 2020: memory banks in
:class:`CRDState`, carried by ``distill_step(..., stateful_loss=True)``).

Features: :func:`capture` (graph layer; Linen, NNX, plain functions),
:func:`capture_linen` (Flax ``capture_intermediates``).

Training: :func:`distill_step` (frozen teacher, optax student + adapters, optional
fake-quantized student, optional cached top-k teacher from :func:`cache_teacher`).
"""

from qjax.distill.attention import attention_map, attention_transfer_loss
from qjax.distill.capture import Features, capture, capture_linen
from qjax.distill.crd import CRDState, class_negatives, crd_init, crd_loss, uniform_negatives
from qjax.distill.dist import dist_loss, pearson
from qjax.distill.dkd import dkd_loss
from qjax.distill.feature_maps import fsp_loss, fsp_matrix, nst_loss
from qjax.distill.hint import apply_adapter, hint_loss, init_adapter, vid_log_scale, vid_loss
from qjax.distill.relational import (
    cc_loss,
    correlation_matrix,
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
    "CRDState",
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
    "class_negatives",
    "cc_loss",
    "correlation_matrix",
    "crd_init",
    "crd_loss",
    "cross_entropy",
    "dense_log_probs",
    "dist_loss",
    "distill_step",
    "dkd_loss",
    "fsp_loss",
    "fsp_matrix",
    "hint_loss",
    "init_adapter",
    "kd_loss",
    "kd_objective",
    "nst_loss",
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
    "uniform_negatives",
    "vid_log_scale",
    "vid_loss",
]
