"""Peer quantization libraries (Google's Qwix and AQT) as benchmark variants, plus the
registry that qjax's own variants join.

A *variant* turns a ``models.Workload`` (a float Linen module, its float params and an
input batch) into something the harness can time and check:

* an **inference** variant returns ``InferSpec(apply, state)``: ``apply(state, x) -> y``
  (pure, jit-able; the harness jits it) and the ``state`` pytree it runs on (quantized
  weights, frozen AQT tensors, ...). Everything the variant needs at run time must be in
  ``state``, passed as an argument, never closed over: a closed-over array becomes an XLA
  constant and weight quantization would be constant-folded away at compile time.
* a **training** variant returns ``TrainSpec(apply, params)``: ``apply(params, x, rng) ->
  y`` differentiable w.r.t. the *float* ``params``; the harness builds the same optax Adam
  step (``make_train_step``) and the gradient function around every variant's ``apply``,
  so only the forward/backward differs between variants.

Registering (``register_variant``) puts a ``Variant`` into ``INFER_VARIANTS`` or
``TRAIN_VARIANTS`` (name -> Variant). Adding qjax later is one call per variant, e.g.::

    import peers, qjax
    def build_qjax_w8a8(wl):
        qparams = ...                            # quantize wl.params with qjax
        def apply(state, x):
            return ...                           # run wl.model with qjax's int8 execution
        return peers.InferSpec(apply, qparams)
    peers.register_variant("qjax_w8a8", "infer", build_qjax_w8a8, library="qjax",
                           description="...", expect="int_dot")

``expect`` says how the harness proves a variant is not silently running float (besides a
nonzero output error): ``"int_dot"`` = the compiled HLO must contain an integer-accumulating
dot (``s32[...] dot(``); ``"int_weights"`` = ``state`` must hold int8/int4 arrays (weight-only
schemes dequantize to float before a float dot); ``"fake_quant"`` = simulated quantization
(QAT with float dots): only the generic check that the output / gradients differ from
float; ``None`` = no check (the float reference).

Peer settings (all symmetric absmax, no calibration data needed):

=================  ==========================================================================
qwix_w8a8          Qwix PTQ (``PtqProvider``): int8 weights per output channel, int8 activations
                   quantized dynamically per token (absmax), int8 x int8 -> int32 dot.
qwix_w8            Qwix PTQ weight-only int8 per channel (dequantized, then a float dot).
qwix_w4g128        Qwix PTQ weight-only int4, groups of 128 along the contraction axis
                   (``tile_size=128``) x per output channel; the encoder's attention-output
                   einsum contracts over (heads, 64) whose innermost axis is 64 < 128, so that
                   one layer is int4 per channel.
aqt_w8a8           AQT v2 serving: ``AqtDotGeneral`` / ``AqtEinsum`` injected through
                   ``dot_general_cls=`` / ``einsum_cls``, config ``fully_quantized(8, 8)``;
                   weights frozen to int8 per channel by a CONVERT pass (``'aqt'`` collection),
                   SERVE mode reads them; activations quantized per token at run time.
qwix_qat_w8a8      Qwix QAT (``QtProvider``, ``bwd_qtype=None``): forward int8 W8A8 as above,
                   backward in float (straight-through). Qwix's QAT computes the forward with
                   a real int8 dot rather than fake quant ("same numerics, faster").
qwix_qt_int8       Qwix quantized training (``QtRule(bwd_qtype='int8')``): int8 forward and
                   int8 backward dots.
aqt_fqt_int8       AQT v2 "fully quantized training" ``fully_quantized(fwd_bits=8,
                   bwd_bits=8)`` (int8 forward and both backward dots, stochastic rounding of
                   the gradients, the default), injected as above in TRAIN mode.
=================  ==========================================================================

Only weight matmuls are quantized: the attention-score and attention-value einsums
(activation x activation, in the ``attention_core`` submodule) stay float in every
variant (Qwix: a leading rule for module path ``attention_core`` with no qtype; AQT: not
injected there).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import models
import numpy as np
import optax

Kind = Literal["infer", "train"]
Expect = Literal["int_dot", "int_weights", "fake_quant"] | None

LEARNING_RATE = 1e-3


@dataclasses.dataclass
class InferSpec:
    apply: Callable[[Any, jax.Array], jax.Array]  # (state, x) -> y
    state: Any


@dataclasses.dataclass
class TrainSpec:
    apply: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (float params, x, rng) -> y
    params: Any


@dataclasses.dataclass
class Variant:
    name: str
    kind: Kind
    build: Callable[[models.Workload], InferSpec | TrainSpec]
    library: str
    description: str = ""
    expect: Expect = None
    model_names: tuple[str, ...] = models.MODEL_NAMES  # workloads it supports


INFER_VARIANTS: dict[str, Variant] = {}
TRAIN_VARIANTS: dict[str, Variant] = {}


def register_variant(
    name: str,
    kind: Kind,
    build: Callable[[models.Workload], InferSpec | TrainSpec],
    *,
    library: str,
    description: str = "",
    expect: Expect = None,
    model_names: tuple[str, ...] = models.MODEL_NAMES,
    replace: bool = False,
) -> Variant:
    """Adds a variant to ``INFER_VARIANTS`` / ``TRAIN_VARIANTS`` (see the module doc)."""
    registry = {"infer": INFER_VARIANTS, "train": TRAIN_VARIANTS}[kind]
    if name in registry and not replace:
        raise ValueError(f"{kind} variant {name!r} is already registered")
    v = Variant(name, kind, build, library, description, expect, tuple(model_names))
    registry[name] = v
    return v


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries involved (None when one is not importable)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "qwix", "aqtp", "qjax"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# -- float reference -------------------------------------------------------------------------


def build_float_infer(wl: models.Workload) -> InferSpec:
    return InferSpec(lambda state, x: wl.model.apply(state, x), wl.variables)


def build_float_train(wl: models.Workload) -> TrainSpec:
    return TrainSpec(lambda p, x, rng: wl.model.apply({"params": p}, x), wl.params)


register_variant("float32", "infer", build_float_infer, library="jax", description="float32 reference")
register_variant("float32", "train", build_float_train, library="jax", description="float32 reference")


# -- Qwix ----------------------------------------------------------------------------------


def _qwix_rules(rule_cls=None, **quant) -> list:
    """Rules quantizing every weight matmul with ``quant`` (attention_core kept float)."""
    import qwix

    rule_cls = rule_cls or qwix.QuantizationRule
    return [
        rule_cls(module_path=r"(.*/)?attention_core"),  # activation x activation einsums
        rule_cls(module_path=".*", **quant),
    ]


def _qwix_ptq(wl: models.Workload, rules: list) -> InferSpec:
    import qwix

    provider = qwix.PtqProvider(rules)
    qmodel = qwix.quantize_model(wl.model, provider)
    abstract = jax.eval_shape(qmodel.init, jax.random.key(0), wl.x)["params"]
    qparams = qwix.quantize_params(wl.params, abstract)
    return InferSpec(lambda p, x: qmodel.apply({"params": p}, x), qparams)


def build_qwix_w8a8(wl: models.Workload) -> InferSpec:
    return _qwix_ptq(wl, _qwix_rules(weight_qtype="int8", act_qtype="int8"))


def build_qwix_w8(wl: models.Workload) -> InferSpec:
    return _qwix_ptq(wl, _qwix_rules(weight_qtype="int8"))


def build_qwix_w4g128(wl: models.Workload) -> InferSpec:
    import qwix

    rules = _qwix_rules(weight_qtype="int4", tile_size=128)
    # The attention-output einsum contracts over (heads, 64): innermost axis < 128.
    rules.insert(1, qwix.QuantizationRule(module_path=r"(.*/)?attention_out", weight_qtype="int4"))
    return _qwix_ptq(wl, rules)


def _qwix_train(wl: models.Workload, rules: list) -> TrainSpec:
    import qwix

    qmodel = qwix.quantize_model(wl.model, qwix.QtProvider(rules))
    return TrainSpec(lambda p, x, rng: qmodel.apply({"params": p}, x), wl.params)


def build_qwix_qat_w8a8(wl: models.Workload) -> TrainSpec:
    return _qwix_train(wl, _qwix_rules(weight_qtype="int8", act_qtype="int8"))


def build_qwix_qt_int8(wl: models.Workload) -> TrainSpec:
    import qwix

    return _qwix_train(wl, _qwix_rules(qwix.QtRule, weight_qtype="int8", act_qtype="int8", bwd_qtype="int8"))


# -- AQT -----------------------------------------------------------------------------------


def _aqt_injected_model(wl: models.Workload, cfg, weight_mode, act_mode, *, freeze: bool):
    """``wl``'s model with AqtDotGeneral / AqtEinsum in every weight matmul.

    Serving (``freeze``) needs no randomness (stochastic rounding is for gradients only), so
    ``prng_name=None``; training draws from the ``'params'`` rng stream.
    """
    from aqt.jax.v2.flax import aqt_flax

    extra: dict[str, Any] = {"prng_name": None} if freeze else {}
    if freeze:  # the new (non-legacy) freezer, storing int8 values + scales of the weights
        extra.update(
            use_legacy_freezer=False,
            rhs_freeze_mode=aqt_flax.FreezerMode.CALIBRATION_AND_VALUE,
            lhs_freeze_mode=aqt_flax.FreezerMode.NONE,
        )
    # Dense / DenseGeneral / einsum(x, kernel): the kernel is the rhs, the activation the lhs.
    dg = functools.partial(
        aqt_flax.AqtDotGeneral, cfg, rhs_quant_mode=weight_mode, lhs_quant_mode=act_mode, **extra
    )
    es = functools.partial(
        aqt_flax.AqtEinsum, cfg, rhs_quant_mode=weight_mode, lhs_quant_mode=act_mode, **extra
    )
    kw = {"einsum_cls": es} if wl.model_name == "encoder" else {}
    return models.make_model(wl.model_name, dot_general_cls=dg, **kw)


def build_aqt_w8a8(wl: models.Workload) -> InferSpec:
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.utils import QuantMode

    cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)
    convert = _aqt_injected_model(wl, cfg, QuantMode.CONVERT, QuantMode.TRAIN, freeze=True)
    _, frozen = convert.apply(wl.variables, wl.x, mutable=True)
    serve = _aqt_injected_model(wl, cfg, QuantMode.SERVE, QuantMode.TRAIN, freeze=True)
    # SERVE reads the int8 kernels from 'aqt'; the float kernels are still arguments (Linen
    # asks for them) but unused, so XLA drops them (check_aqt_uses_frozen proves it).
    state = {"params": wl.params, "aqt": frozen["aqt"]}
    return InferSpec(lambda s, x: serve.apply(s, x), state)


def build_aqt_fqt_int8(wl: models.Workload) -> TrainSpec:
    from aqt.jax.v2 import config as aqt_config
    from aqt.jax.v2.utils import QuantMode

    cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)
    model = _aqt_injected_model(wl, cfg, QuantMode.TRAIN, QuantMode.TRAIN, freeze=False)
    # stochastic rounding of gradients draws from the 'params' rng stream
    return TrainSpec(lambda p, x, rng: model.apply({"params": p}, x, rngs={"params": rng}), wl.params)


def check_aqt_uses_frozen(wl: models.Workload, spec: InferSpec) -> float:
    """Relative change of the AQT SERVE output when the float kernels are zeroed (0 = the
    float kernels are not used, the frozen int8 weights are)."""
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if "kernel" in jax.tree_util.keystr(path) else a,
        spec.state["params"],
    )
    y = spec.apply(spec.state, wl.x)
    y0 = spec.apply({**spec.state, "params": zeroed}, wl.x)
    return rel_err(y0, y)


def _peers_available() -> dict[str, bool]:
    out = {}
    for mod in ("qwix", "aqt.jax.v2.flax.aqt_flax"):
        try:
            __import__(mod)
            out[mod.split(".")[0]] = True
        except ImportError:
            out[mod.split(".")[0]] = False
    return out


PEERS_AVAILABLE = _peers_available()

if PEERS_AVAILABLE["qwix"]:
    register_variant(
        "qwix_w8a8",
        "infer",
        build_qwix_w8a8,
        library="qwix",
        expect="int_dot",
        description="PTQ int8 weights per channel + dynamic int8 activations per token",
    )
    register_variant(
        "qwix_w8",
        "infer",
        build_qwix_w8,
        library="qwix",
        expect="int_weights",
        description="PTQ weight-only int8 per channel",
    )
    register_variant(
        "qwix_w4g128",
        "infer",
        build_qwix_w4g128,
        library="qwix",
        expect="int_weights",
        description="PTQ weight-only int4, groups of 128 x per channel",
    )
    register_variant(
        "qwix_qat_w8a8",
        "train",
        build_qwix_qat_w8a8,
        library="qwix",
        expect="int_dot",
        description="QAT: int8 W8A8 forward, float straight-through backward",
    )
    register_variant(
        "qwix_qt_int8",
        "train",
        build_qwix_qt_int8,
        library="qwix",
        expect="int_dot",
        description="quantized training: int8 forward and backward",
    )
if PEERS_AVAILABLE["aqt"]:
    register_variant(
        "aqt_w8a8",
        "infer",
        build_aqt_w8a8,
        library="aqtp",
        expect="int_dot",
        description="serving: frozen int8 weights per channel, int8 activations per token",
    )
    register_variant(
        "aqt_fqt_int8",
        "train",
        build_aqt_fqt_int8,
        library="aqtp",
        expect="int_dot",
        description="fully_quantized(8, 8): int8 fwd + bwd, stochastic rounding",
    )


# -- harness helpers: jitting, train step, checks ----------------------------------------------


def rel_err(y: jax.Array, ref: jax.Array) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def tree_rel_err(a: Any, ref: Any) -> float:
    la, lr = jax.tree.leaves(a), jax.tree.leaves(ref)
    f64 = lambda t: np.asarray(t, np.float64)
    num = sum(float(np.sum((f64(x) - f64(y)) ** 2)) for x, y in zip(la, lr))
    den = sum(float(np.sum(f64(y) ** 2)) for y in lr)
    return float(np.sqrt(num / den))


@dataclasses.dataclass
class Prepared:
    """A built variant, ready to time: ``fn(*args)`` (jitted)."""

    variant: Variant
    fn: Callable[..., Any]
    args: tuple
    spec: InferSpec | TrainSpec
    grad_fn: Callable[..., Any] | None = None  # training only: (params, x, y, rng) -> (loss, grads)


def make_train_step(apply: Callable, optimizer: optax.GradientTransformation):
    """One optax step on ``mse(apply(params, x, rng), y)``: (params, opt_state, x, y, rng) ->
    (params, opt_state, loss)."""

    def loss_fn(params, x, y, rng):
        return models.mse_loss(apply(params, x, rng), y)

    def step(params, opt_state, x, y, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, jax.value_and_grad(loss_fn)


def prepare(variant: Variant, wl: models.Workload) -> Prepared:
    spec = variant.build(wl)
    if variant.kind == "infer":
        assert isinstance(spec, InferSpec)
        return Prepared(variant, jax.jit(spec.apply), (spec.state, wl.x), spec)
    assert isinstance(spec, TrainSpec)
    optimizer = optax.adam(LEARNING_RATE)
    step, grad = make_train_step(spec.apply, optimizer)
    args = (spec.params, optimizer.init(spec.params), wl.x, wl.y_target, jax.random.key(7))
    return Prepared(variant, jax.jit(step), args, spec, grad_fn=jax.jit(grad))


def dot_counts(prepared: Prepared) -> dict[str, int]:
    """Dots in the compiled HLO by accumulator type (``s32`` = integer dot)."""
    import re

    hlo = prepared.fn.lower(*prepared.args).compile().as_text()
    counts: dict[str, int] = {}
    for m in re.finditer(r"=\s*([a-z]+\d*)\[[^\]]*\][^ ]*\s+dot\(", hlo):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    counts["onednn_matmul"] = hlo.count("__onednn$matmul")
    return counts


def int_leaf_bytes(tree: Any) -> tuple[int, int]:
    """(bytes in integer leaves, bytes in all leaves) of a pytree (int4 counted as 1/2 byte)."""
    ints = total = 0
    for leaf in jax.tree.leaves(tree):
        a = jnp.asarray(leaf) if not hasattr(leaf, "dtype") else leaf
        bits = jnp.dtype(a.dtype).itemsize * 8
        if a.dtype in (jnp.int4, jnp.uint4):
            bits = 4
        nbytes = int(np.prod(a.shape)) * bits // 8
        total += nbytes
        if jnp.issubdtype(a.dtype, jnp.integer):
            ints += nbytes
    return ints, total


def check(prepared: Prepared, wl: models.Workload, reference: Prepared | None) -> dict[str, Any]:
    """Correctness and 'not silently float' checks of a prepared variant.

    Inference: ``rel_err`` = ||y_q - y|| / ||y|| against float32. Training: ``loss_rel_err``
    and ``grad_rel_err`` (global over the param tree) of the first step's loss and gradients
    against the float32 step's. ``ok`` is False when an expected quantization is absent (zero
    error, no integer dot, no integer weights) or the error is implausibly large.
    """
    v = prepared.variant
    out: dict[str, Any] = {"variant": v.name, "library": v.library, "expect": v.expect}
    counts = dot_counts(prepared)
    out["dots"] = counts
    problems = []
    if v.kind == "infer":
        y = prepared.fn(*prepared.args)
        ref = reference.fn(*reference.args) if reference is not None else y
        out["rel_err"] = rel_err(y, ref)
        ints, total = int_leaf_bytes(prepared.spec.state)
        out["state_bytes"], out["state_int_bytes"] = total, ints
        if v.expect is not None and out["rel_err"] < 1e-6:
            problems.append("output identical to float")
        if v.expect == "int_weights" and ints == 0:
            problems.append("no integer weights in state")
        if v.library == "aqtp":
            out["frozen_weights_check"] = check_aqt_uses_frozen(wl, prepared.spec)
            if out["frozen_weights_check"] > 1e-6:
                problems.append("AQT serve output depends on float kernels")
        max_err = 0.5
        if out["rel_err"] > max_err:
            problems.append(f"rel_err > {max_err}")
    else:
        params, _, x, y_t, rng = prepared.args
        loss, grads = prepared.grad_fn(params, x, y_t, rng)
        if reference is not None:
            rp = reference.args
            rloss, rgrads = reference.grad_fn(rp[0], rp[2], rp[3], rp[4])
        else:
            rloss, rgrads = loss, grads
        out["loss"] = float(loss)
        out["loss_rel_err"] = abs(float(loss) - float(rloss)) / abs(float(rloss))
        out["grad_rel_err"] = tree_rel_err(grads, rgrads)
        new_params, _, step_loss = prepared.fn(*prepared.args)
        leaves = jax.tree.leaves(new_params)
        out["step_finite"] = bool(np.isfinite(float(step_loss))) and all(
            bool(jnp.all(jnp.isfinite(p))) for p in leaves
        )
        if not out["step_finite"]:
            problems.append("non-finite step")
        if v.expect is not None and out["grad_rel_err"] < 1e-7:
            problems.append("gradients identical to float")
        if out["grad_rel_err"] > 0.5:
            problems.append("grad_rel_err > 0.5")
    if v.expect == "int_dot" and counts.get("s32", 0) == 0:
        problems.append("no integer (s32) dot in the compiled HLO")
    out["problems"] = problems
    out["ok"] = not problems
    return out
