"""qjax's variants for the peer harness (``peers.register_variant``): imported by
``bench_quantized.py`` (or ``bench_peers_baseline.py --extra-module
experiments/qjax_variants.py``), they are timed and checked beside float32, Qwix and AQT
in the same interleaved rounds.

Settings match the peers' (``peers.py``): symmetric absmax everywhere, only the weight
matmuls quantized (the attention-score / attention-value einsums read no parameter, so
qjax's graph layer leaves them float on its own), and weights per *output* channel: every
non-contracting axis of the kernel (``Dense``: ``(-1,)``; the encoder's ``DenseGeneral``
query/key/value kernels ``(d_model, heads, head_dim)``: ``(1, 2)``; the attention-output
einsum kernel ``(heads, head_dim, d_model)``: ``(2,)``).

Inference (``quantize_params`` + ``jax.jit(quantized(model.apply, policy))``; the
quantized variables are the jit argument, nothing is closed over):

=================  ==========================================================================
qjax_w8a8          int8 weights per output channel, int8 activations dynamic per token
                   (``qjax.PER_TOKEN``): int8 x int8 -> int32 dots (as qwix_w8a8 / aqt_w8a8).
qjax_w8a8_static   int8 weights per channel, int8 activations per tensor with static scales
                   from ``qjax.calibrate`` (absmax over ``CALIB_BATCHES`` batches drawn with
                   other seeds than the timed input, same batch size).
qjax_w8            weight-only int8 per channel (as qwix_w8).
qjax_w4            weight-only int4 per channel, packed two per byte (no peer at this setting).
qjax_w4g128        weight-only int4, groups of 128 along the contraction axis x per channel
                   (as qwix_w4g128; its attention-output kernel contracts over (heads, 64),
                   64 < 128, so that layer is int4 per channel, as in qwix_w4g128).
=================  ==========================================================================

Training (the harness's Adam step around ``apply(params, x, rng)``, float params):

=================== ========================================================================
qjax_qat_w8a8       ``fake_quantized``: int8 weights per channel + int8 per-token
                    activations; the forward runs as the int8 x int8 dot (``fake_quantized``'s
                    ``integer_forward=True`` default), the backward is fake quant's clipped
                    straight-through gradient (as qwix_qat_w8a8, whose forward is an int8 dot
                    too; its backward uses the float operands, see ``NOT_SAME_NUMERICS``).
qjax_int8_training  ``Rule(grad=QuantSpec(int8, channel_axes=PER_TOKEN, rounding="stochastic"))``:
                    forward and both backward matmuls as int8 x int8 -> int32 dots, gradients rounded
                    stochastically with the step's key (the harness's ``rng`` argument, so a
                    fresh key per step costs nothing extra; as aqt_fqt_int8).
=================== ========================================================================
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models
import peers

import qjax

CALIB_BATCHES = 4
CALIB_SEED = 100

TOK8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
TENSOR8 = qjax.QuantSpec(qjax.int8)  # per tensor; static scales when calibrated
GRAD8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, rounding="stochastic")

# Output-channel axes of each kernel (everything else is contracted).
_QKV = r"params/(query|key|value)/kernel"
_ATTN_OUT = r"params/attention_out/kernel"
_KERNEL = r"params/.*/kernel"
_OUT_AXES = {_QKV: (1, 2), _ATTN_OUT: (2,), _KERNEL: (-1,)}


def weight_spec(fmt, pattern: str, group: int | None = None) -> qjax.QuantSpec:
    """Per-output-channel weight spec of the kernels ``pattern`` matches; with ``group``,
    also groups along the (first) contraction axis 0."""
    # Qwix maps max|w| to qmax + 1/2 steps; use the same bound for the same settings
    # (the effect is noise-level at int8, ~7% output error at int4).
    calib = qjax.calib.absmax(half_step=True)
    if group is not None and pattern != _ATTN_OUT:
        return qjax.QuantSpec(
            fmt, channel_axes=_OUT_AXES[pattern], group_size=group, group_axis=0, calibration=calib
        )
    return qjax.QuantSpec(fmt, channel_axes=_OUT_AXES[pattern], calibration=calib)


def make_policy(
    fmt=qjax.int8,
    act: qjax.QuantSpec | None = None,
    *,
    group: int | None = None,
    grad: qjax.QuantSpec | None = None,
) -> qjax.Policy:
    """The policy of one variant: every kernel of both models, per output channel."""
    return qjax.Policy(
        [qjax.Rule(p, weight=weight_spec(fmt, p, group), act=act, grad=grad) for p in _OUT_AXES]
    )


POLICIES = {
    "qjax_w8a8": make_policy(qjax.int8, TOK8),
    "qjax_w8a8_static": make_policy(qjax.int8, TENSOR8),
    "qjax_w8": make_policy(qjax.int8),
    "qjax_w4": make_policy(qjax.int4),
    "qjax_w4g128": make_policy(qjax.int4, group=128),
    "qjax_qat_w8a8": make_policy(qjax.int8, TOK8),
    "qjax_int8_training": make_policy(qjax.int8, TOK8, grad=GRAD8),
}


def calibration_batches(wl: models.Workload) -> list:
    return [models.make_inputs(wl.model_name, wl.batch, seed=CALIB_SEED + i) for i in range(CALIB_BATCHES)]


def _ptq(name: str):
    policy = POLICIES[name]

    def build(wl: models.Workload) -> peers.InferSpec:
        stats = None
        if name == "qjax_w8a8_static":
            stats = qjax.calibrate(wl.model.apply, policy, wl.variables, calibration_batches(wl))
        qvars = qjax.quantize_params(wl.variables, policy, act_stats=stats)
        return peers.InferSpec(qjax.quantized(wl.model.apply, policy), qvars)

    return build


def build_qjax_qat_w8a8(wl: models.Workload) -> peers.TrainSpec:
    f = qjax.fake_quantized(wl.model.apply, POLICIES["qjax_qat_w8a8"])
    return peers.TrainSpec(lambda p, x, rng: f({"params": p}, x), wl.params)


def build_qjax_int8_training(wl: models.Workload) -> peers.TrainSpec:
    policy = POLICIES["qjax_int8_training"]

    def apply(p, x, rng):  # rng: the step's key (traced), for the stochastic rounding
        return qjax.fake_quantized(wl.model.apply, policy, key=rng)({"params": p}, x)

    return peers.TrainSpec(apply, wl.params)


INFER = {
    "qjax_w8a8": ("int_dot", "int8 weights per channel + dynamic int8 activations per token"),
    "qjax_w8a8_static": (
        "int_dot",
        f"int8 weights per channel + static per-tensor int8 activations "
        f"(qjax.calibrate, absmax over {CALIB_BATCHES} batches)",
    ),
    "qjax_w8": ("int_weights", "weight-only int8 per channel"),
    "qjax_w4": ("int_weights", "weight-only int4 per channel (packed)"),
    "qjax_w4g128": ("int_weights", "weight-only int4, groups of 128 along the contraction x per channel"),
}

# Peers of each qjax variant: ``x peer`` (paired latency) is against the first; the output /
# gradient error goal against every peer here that runs the same numerics.
PEER_OF = {
    "qjax_w8a8": ("qwix_w8a8", "aqt_w8a8"),
    "qjax_w8": ("qwix_w8",),
    "qjax_w4g128": ("qwix_w4g128",),
    "qjax_qat_w8a8": ("qwix_qat_w8a8",),
    "qjax_int8_training": ("aqt_fqt_int8", "qwix_qt_int8"),
}

# (qjax variant, peer) pairs whose errors measure different things: reported, not judged.
NOT_SAME_NUMERICS = {
    ("qjax_qat_w8a8", "qwix_qat_w8a8"): (
        "different gradient estimator: Qwix's QAT backward contracts the incoming gradient with the "
        "float (unquantized) operands (qwix QtProvider sets use_original_residuals=True when only "
        "the forward is quantized), qjax's STE with the fake-quantized ones (the exact gradient of the "
        "quantized forward); so Qwix's gradient is closer to the float gradient by construction"
    ),
    ("qjax_int8_training", "qwix_qt_int8"): (
        "qwix_qt_int8 rounds the gradients to nearest (QtRule.bwd_stochastic_rounding=None); "
        "qjax_int8_training and aqt_fqt_int8 round them stochastically (unbiased, noisier)"
    ),
}


def register(replace: bool = False) -> None:
    for name, (expect, desc) in INFER.items():
        peers.register_variant(
            name, "infer", _ptq(name), library="qjax", expect=expect, description=desc, replace=replace
        )
    peers.register_variant(
        "qjax_qat_w8a8",
        "train",
        build_qjax_qat_w8a8,
        library="qjax",
        expect="int_dot",
        description="QAT: fake_quantized, int8 weights per channel + int8 per-token activations; forward "
        "as the int8 x int8 dot (fake_quantized's integer_forward default), fake-quant clipped-STE backward",
        replace=replace,
    )
    peers.register_variant(
        "qjax_int8_training",
        "train",
        build_qjax_int8_training,
        library="qjax",
        expect="int_dot",
        description="int8 training: Rule(grad=QuantSpec(int8, PER_TOKEN, rounding='stochastic')), "
        "int8 fwd + bwd, key per step",
        replace=replace,
    )


if "qjax_w8a8" not in peers.INFER_VARIANTS:
    register()
