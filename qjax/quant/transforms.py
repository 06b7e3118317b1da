"""Pytree transforms: quantize, dequantize and fake-quantize the leaves a policy selects."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.numerics.fake_quant import fake_quant, lsq_init_scale
from qjax.numerics.qarray import QArray
from qjax.numerics.quantize import quantize
from qjax.numerics.scaling import scale_from_range
from qjax.numerics.spec import PER_TOKEN, QuantSpec
from qjax.numerics.transposed import TransposedQArray, is_quantized, transpose_storage
from qjax.quant import op_stats
from qjax.quant.lsq_params import LSQParams, reject_lsq_params, split_scales
from qjax.quant.policy import Policy, Rule, check_policy
from qjax.rules import Match, RuleSet, fold_in_path, leaves_with_paths, map_matched, map_with_path


def _leaf_error(path: str, m: Match[Rule], e: Exception) -> Exception:
    return type(e)(f"leaf {path!r} (matched rule {m.index} {m.pattern!r}): {e}")


def _weight_matches(policy: Policy):
    """Visitor factory: call ``fn(path, leaf, spec, match)`` for leaves with a weight spec."""

    def wrap(fn):
        def visit(path, leaf, m):
            spec = m.value.weight
            if spec is None:
                return leaf
            if is_quantized(leaf):
                raise ValueError(f"leaf {path!r} is already quantized (matched rule {m.index} {m.pattern!r})")
            try:
                return fn(path, leaf, spec)
            except (TypeError, ValueError) as e:
                raise _leaf_error(path, m, e) from e

        return visit

    return wrap


def require_float_params(params: Any, what: str) -> None:
    """Raise for a quantized leaf in ``params`` given to a transform that reads float
    weights (GPTQ, AWQ, SmoothQuant).

    Raises:
      ValueError: naming the first quantized leaf.
      TypeError: an :class:`LSQParams` (its learned scales would be dropped silently).
    """
    reject_lsq_params(
        params,
        what,
        "it sets its own weight scales; pass trained.params to start from the trained weights, "
        "or export with qjax.quantize_params(trained, policy) to keep the learned scales",
    )
    found = next((p for p, leaf in leaves_with_paths(params) if is_quantized(leaf)), None)
    if found is not None:
        raise ValueError(f"{what}: leaf {found!r} is already quantized; pass the float params")


def _check_paths(params: Any, by_path: dict, what: str) -> None:
    unknown = set(by_path) - {p for p, _ in leaves_with_paths(params)}
    if unknown:
        raise ValueError(f"{what} given for paths that are not leaves of params: {sorted(unknown)}")


def _check_scales(params: Any, scales: dict[str, jax.Array] | None) -> tuple[Any, dict[str, jax.Array]]:
    """``(params, scales)``: an :class:`LSQParams` unpacked; every scale path must be a leaf."""
    params, scales = split_scales(params, scales)
    _check_paths(params, scales, "scales")
    return params, scales


def _given_scale(scales: dict[str, jax.Array], path: str, spec: QuantSpec):
    """The scale given for ``path``, if any; refused for an asymmetric spec, which would
    also need a zero point (these transforms take none)."""
    scale = scales.get(path)
    if scale is not None and not spec.symmetric:
        raise ValueError(
            "a scale is given for it in scales=..., but its weight spec is asymmetric: given "
            "scales need a symmetric spec (no zero points are taken); drop its scale to calibrate it"
        )
    return scale


def quantize_params(
    params: Any,
    policy: Policy,
    *,
    act_stats: dict[str, Any] | None = None,
    scales: dict[str, jax.Array] | None = None,
    key: jax.Array | None = None,
) -> Any:
    """Replace every leaf whose rule has a ``weight`` spec by its :class:`QArray`.

    Args:
      params: any pytree (Linen variables, NNX ``State``, dicts of arrays).
      policy: the :class:`Policy`.
      act_stats: ``{path: ActStats}`` from :func:`qjax.calibrate`: the static scale of the
        activations of the ops reading each leaf, computed with the rule's ``act`` spec,
        is stored in the weight's ``QArray`` (``act_scale``/``act_zero_point``).
      scales: ``{path: scale}`` to use instead of calibrating, e.g. the LSQ scales
        learned during QAT (:func:`lsq_scales`), so the exported model equals the
        fake-quantized one. Required for leaves whose spec has ``ste="lsq"``; only for
        leaves with a symmetric spec (no zero points are taken).
      key: PRNG key, needed when a spec uses stochastic rounding (one key per leaf is
        derived from the leaf path).

    Returns:
      A pytree of the same structure; matched leaves are ``QArray`` (boxes kept).

    Raises:
      ValueError / TypeError: a spec does not fit a leaf (axis out of range, group size,
        non-float leaf), a scale is given for a leaf with an asymmetric spec, or an
        ``act_stats`` entry does not fit (see :func:`static_act_scales`); the message
        names the leaf path and the rule.

    Example:
      >>> qparams = qjax.quantize_params(variables, policy)
    """
    check_policy(policy)
    params, scales = _check_scales(params, scales)
    static = static_act_scales(params, policy, act_stats)

    @_weight_matches(policy)
    def q(path, leaf, spec):
        scale = _given_scale(scales, path, spec)
        if spec.ste == "lsq" and scale is None:
            raise ValueError(
                "ste='lsq' learns the scale: pass the trained scales=... (from qjax.lsq_scales) so "
                "the quantized model matches the QAT one"
            )
        if scale is None and path in static:
            _warn_shared_stack_scale(path, leaf, spec, act_stats[path])
        q = quantize(leaf, spec, scale=scale, key=fold_in_path(key, path))
        return q if path not in static else q.with_act_scale(*static[path])

    return map_matched(q, params, policy.ruleset)


def _warn_shared_stack_scale(path: str, leaf, spec: QuantSpec, stats) -> None:
    """Warn when per-layer activation stats show ``leaf`` is an ``nn.scan`` stack but its
    weight spec shares scales across the layers: the transforms scale each layer's slice, so
    the exported model would not be the one trained or calibrated."""
    layers = jnp.shape(stats.lo)
    if (
        len(layers) != 1
        or not jnp.ndim(leaf)
        or jnp.shape(leaf)[0] != layers[0]
        or spec.channel_axes is PER_TOKEN
    ):
        return
    if any(a % jnp.ndim(leaf) == 0 for a in spec.channel_axes):
        return
    warnings.warn(
        f"leaf {path!r}: its act_stats are per layer ({layers[0]}), so it is an nn.scan stack, but "
        f"its weight spec (channel_axes={spec.channel_axes}) shares each scale across the layers while "
        "fake_quantized and quantized scale every layer on its own: the exported model differs from "
        "the one trained; add axis 0 to channel_axes (e.g. (0, -1))",
        stacklevel=3,
    )


def static_act_scales(params: Any, policy: Policy, act_stats: dict[str, Any] | None) -> dict[str, tuple]:
    """The static activation scales ``{path: (scale, zero_point or None)}`` that
    ``act_stats`` (``{path: ActStats}`` from :func:`qjax.calibrate`) give the ops reading
    each leaf, by the rule's ``act`` spec: what :func:`quantize_params` stores with the
    weight, ``quantized`` serves and ``fake_quantized(..., act_stats=...)`` trains with.

    Entries of matmuls between two activations (``"op:..."`` keys, see
    :mod:`qjax.quant.op_stats`) belong to no weight and are skipped.

    Raises:
      ValueError: a path that is not a leaf of ``params``, or whose rule has no weight spec,
        no ``act`` spec or one that is not per-tensor, or a NaN range (the message names
        the leaf and its rule).
    """
    act_stats = {k: v for k, v in (act_stats or {}).items() if not op_stats.is_op_key(k)}
    _check_paths(params, act_stats, "act_stats")
    out = {}
    for path, stats in act_stats.items():
        m = policy.match(path)
        if m is None or m.value is None or m.value.weight is None:
            raise ValueError(
                f"act_stats for leaf {path!r}, whose weight the policy keeps in float: static "
                "activation scales are stored with a quantized weight"
            )
        try:
            out[path] = _static_act_scale(stats, m.value.act)
        except ValueError as e:
            raise _leaf_error(path, m, e) from e
    return out


def _static_act_scale(stats, act: QuantSpec | None) -> tuple:
    """``(scale, zero_point or None)`` of one op's calibrated range by its ``act`` spec."""
    from qjax.quant.act_delayed import ActHistory  # imports this module

    if isinstance(stats, ActHistory):
        raise ValueError(
            "act_stats holds an ActHistory (delayed scaling's running state): give "
            "DelayedScaling.ranges(histories), the ranges its scales come from"
        )
    if act is None:
        raise ValueError("act_stats given but the rule has no act spec")
    if act.channel_axes is PER_TOKEN or act.channel_axes or act.group_size is not None:
        raise ValueError(
            f"act_stats given but the rule's act spec (channel_axes={act.channel_axes}, group_size="
            f"{act.group_size}) is not per-tensor: static activation scales are per-tensor "
            "(channel_axes=()); drop its act_stats entry to keep its activations dynamic"
        )
    _check_range(stats)
    lo, hi = (jnp.asarray(v, jnp.float32) for v in (stats.lo, stats.hi))
    return scale_from_range(lo, hi, act.format, act.symmetric)


def _check_range(stats) -> None:
    """Refuse a non-finite calibration range, which would make every output of the op NaN:
    NaN (the op never ran on the calibration data: an untaken ``cond`` branch) or infinite
    (the calibration data held infinities). Traced ranges pass."""
    try:
        lo, hi = np.asarray(stats.lo, np.float64), np.asarray(stats.hi, np.float64)
    except jax.errors.TracerArrayConversionError:
        return
    if np.isnan(lo).any() or np.isnan(hi).any():
        raise ValueError(
            "its activation range is NaN: the op never ran on the calibration data (e.g. an "
            "untaken cond branch); calibrate with inputs that reach it, or drop its act_stats "
            "entry to quantize its activation dynamically"
        )
    if np.isinf(lo).any() or np.isinf(hi).any():
        raise ValueError(
            "its activation range is infinite: the calibration data held infinities (an overflow, "
            "or a mask value of -inf reaching a quantized operand); calibrate on finite activations, "
            "or drop its entry to quantize the activation dynamically"
        )


def dequantize_params(tree: Any) -> Any:
    """Replace every :class:`QArray` (and ``TransposedQArray``) leaf by its dequantized
    float array, in the layout the model reads."""
    return map_with_path(lambda _, leaf: leaf.dequantize() if is_quantized(leaf) else leaf, tree)


def store_transposed(tree: Any, patterns: str | Sequence[str]) -> Any:
    """Store the matched quantized leaves with their last two axes swapped.

    A Flax ``Dense`` kernel is ``(K, N)``; the 8-bit matmul kernels (and XLA:GPU's int8
    dot) are fastest on the weight stored ``(N, K)``. ``qjax.quantized`` on a
    :class:`~qjax.numerics.transposed.TransposedQArray` folds the swap into the matmul, so
    no transpose of the codes runs per call. Do it once, after ``quantize_params``, for the
    W8A8 weights that will be served. Weight-only (W8A16/W4A16) weights gain nothing on
    XLA:CPU, whose grouped / converted weight-only dots ran 0.66-1.1x as fast on ``(N, K)``
    (``experiments/bench_stored_transposed.py``); on an H100, int4 per-channel weights
    stored ``(N, K)`` ran the fastest W4A16 tile (2.81-2.84x the bf16 dot at 8192^2 and
    batch <= 16, against 2.38-2.41x on ``(K, N)``; BUILD_NOTES, eighteenth session), and
    the Hopper TMA-fed weight-only kernel (``qjax.kernels.gpu_wgmma_weight_only``) reads only
    weights stored ``(N, K)``. Exact; leaves already stored transposed are kept as they are
    (idempotent).

    Args:
      tree: a params pytree holding ``QArray`` leaves.
      patterns: a regular expression, or several, matched in full against each leaf's path
        (as policy rules are).

    Returns:
      The tree with each matched ``QArray`` replaced by a ``TransposedQArray``.

    Raises:
      ValueError: a pattern matches no leaf, or a matched leaf is not a ``QArray`` of rank
        >= 2 (the message names the leaf and the pattern).

    Example:
      >>> qparams = qjax.quantize_params(variables, policy, act_stats=stats)
      >>> qparams = qjax.store_transposed(qparams, r"params/.*/kernel")
      >>> y = jax.jit(qjax.quantized(model.apply, policy))(qparams, x)
    """
    rules = RuleSet([(p, True) for p in ([patterns] if isinstance(patterns, str) else patterns)])
    unused = rules.unused(tree)
    if unused:
        raise ValueError(f"store_transposed: patterns {unused} match no leaf")

    def visit(path, leaf, m):
        if isinstance(leaf, TransposedQArray):
            return leaf
        if not isinstance(leaf, QArray) or leaf.ndim < 2:
            what = repr(leaf) if isinstance(leaf, QArray) else f"a {type(leaf).__name__} (quantize it first)"
            raise ValueError(
                f"leaf {path!r} (matched pattern {m.pattern!r}) is {what}: only QArrays of rank >= 2 "
                "can be stored transposed"
            )
        return transpose_storage(leaf)

    return map_matched(visit, tree, rules)


def lsq_scales(params: Any, policy: Policy) -> dict[str, jax.Array]:
    """Initial learnable scales for leaves whose weight spec has ``ste="lsq"``.

    Returns:
      ``{path: scale}`` (a pytree an optax optimizer can train beside the params),
      initialised with :func:`qjax.lsq_init_scale`.
    """
    check_policy(policy)
    out = {}
    for path, leaf in leaves_with_paths(params):
        spec = policy.weight_spec(path)
        if spec is not None and spec.ste == "lsq":
            m = policy.match(path)
            try:
                out[path] = lsq_init_scale(leaf, spec)
            except (TypeError, ValueError) as e:
                raise _leaf_error(path, m, e) from e
    return out


def lsq_params(params: Any, policy: Policy) -> LSQParams:
    """``params`` with initial learnable scales for every ``ste="lsq"`` weight
    (:func:`qjax.lsq_scales`), to train with any step.

    Example:
      >>> trained = qjax.lsq_params(variables, policy)   # train it as the params
      >>> qparams = qjax.quantize_params(trained, policy)  # export with the learned scales
    """
    return LSQParams(params, lsq_scales(params, policy))


def fake_quant_params(
    params: Any,
    policy: Policy,
    *,
    scales: dict[str, jax.Array] | None = None,
    key: jax.Array | None = None,
) -> Any:
    """Fake-quantize (quantize-dequantize) every leaf whose rule has a ``weight`` spec,
    differentiably: gradients follow each spec's ``ste`` rule (QAT on weights).

    Args:
      params: pytree of float arrays.
      policy: the :class:`Policy`.
      scales: learnable scales ``{path: scale}`` from :func:`lsq_scales`, required for
        leaves whose spec has ``ste="lsq"`` (their gradient flows to these scales); only
        for leaves with a symmetric spec (no zero points are taken).
      key: PRNG key for stochastic rounding (one key per leaf, derived from its path).

    Returns:
      A pytree of the same structure and dtypes.

    Raises:
      ValueError / TypeError: as :func:`quantize_params`; also an lsq leaf with no scale,
        or a scale given for a leaf with an asymmetric spec.
    """
    check_policy(policy)
    params, scales = _check_scales(params, scales)

    @_weight_matches(policy)
    def fq(path, leaf, spec: QuantSpec):
        scale = _given_scale(scales, path, spec)
        if spec.ste == "lsq" and scale is None:
            raise ValueError("ste='lsq' needs a learnable scale: pass scales=qjax.lsq_scales(params, policy)")
        return fake_quant(leaf, spec, scale=scale, key=fold_in_path(key, path))

    return map_matched(fq, params, policy.ruleset)


def quantized_leaves(tree: Any) -> dict[str, QArray | TransposedQArray]:
    """``{path: QArray or TransposedQArray}`` for every quantized leaf of ``tree``."""
    return {p: leaf for p, leaf in leaves_with_paths(tree) if is_quantized(leaf)}
