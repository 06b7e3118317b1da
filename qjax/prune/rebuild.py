"""Running and rebuilding shrunk Flax models (the params come from :func:`qjax.prune.shrink.shrink`).

* Linen modules check stored param shapes against their hyperparameters on ``apply``
  (``nn.Dense(64)`` with a ``(in, 40)`` kernel raises ``ScopeParamShapeError``).
  :func:`linen_apply` runs a module under ``flax.linen.intercept_methods``: a ``Dense``,
  ``DenseGeneral``, ``Conv`` or ``ConvTranspose`` whose stored kernel disagrees with its
  ``features`` runs as a clone (bound to the same scope) with the stored sizes. Norm layers
  infer their size from the input; a ``GroupNorm(num_groups=...)`` keeps its unshrunk group
  size (pruning removes whole groups), which ``linen_apply(model, plan=plan)`` reads from
  the plan. :func:`feature_counts` gives the new sizes per module for users who rebuild
  modules from a config instead.
* NNX modules hold arrays and sizes: :func:`shrink_nnx` updates the state in place and fixes
  ``in_features``/``out_features``/``num_features``/``kernel_shape``/``feature_group_count``
  of ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv``, ``nnx.ConvTranspose``,
  ``nnx.BatchNorm``, ``nnx.LayerNorm``, ``nnx.RMSNorm`` (and ``num_groups`` of
  ``nnx.GroupNorm``, keeping its group size) so the module stays consistent.

Attention: ``nn.MultiHeadDotProductAttention`` shrinks exactly under :func:`linen_apply`
(its ``DenseGeneral`` projections take heads from the stored kernels). ``shrink_nnx`` updates
``nnx.MultiHeadAttention``'s ``num_heads``/``qkv_features`` when whole heads go, and refuses a
plan that narrows value heads (its attention needs them as wide as query/key heads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flax import linen as nn
from flax import nnx

from qjax.prune.shrink import ShrinkPlan


def _group_size(mod: nn.GroupNorm, channels: int, plan: ShrinkPlan | None) -> int | None:
    """The unshrunk group size of a ``GroupNorm(num_groups=...)``, ``None`` when unchanged."""
    name = "/".join(mod.scope.path) or type(mod).__name__
    if plan is None:
        raise ValueError(
            f"GroupNorm {name!r} has num_groups={mod.num_groups}: its group size depends on the "
            "unshrunk channel count; pass linen_apply(model, plan=plan) (or build it with group_size=)"
        )
    paths = [f"{c}{'/'.join(mod.scope.path)}/{leaf}" for c in ("params/", "") for leaf in ("scale", "bias")]
    before = next((plan.shapes[p][-1] for p in paths if p in plan.shapes), None)
    if before is None:
        raise ValueError(
            f"GroupNorm {name!r} has num_groups={mod.num_groups} and no scale or bias in the plan, so "
            "its unshrunk channel count is unknown; build it with group_size= instead"
        )
    size = before // mod.num_groups
    if channels == before:
        return None
    if channels % size:
        raise ValueError(
            f"GroupNorm {name!r}: {channels} channels after shrinking are not whole groups of {size} "
            f"({before} channels in {mod.num_groups} groups before); the plan does not fit this model"
        )
    return size


def _attention_sizes(mod: nn.MultiHeadDotProductAttention, args) -> dict[str, Any]:
    """``qkv_features`` / ``out_features`` from the stored projections where Flax would infer
    them from the (shrunk) input width instead."""
    params = mod.variables.get("params", {})
    if "query" not in params or "out" not in params or not args:
        return {}
    heads, head_dim = np.shape(params["query"]["kernel"])[-2:]
    width, out = np.shape(args[0])[-1], np.shape(params["out"]["kernel"])[-1]
    updates: dict[str, Any] = {}
    if (mod.qkv_features or width) != heads * head_dim:
        updates["qkv_features"] = int(heads * head_dim)
    if (mod.out_features or width) != out:
        updates["out_features"] = int(out)
    return updates


def _resize(mod: nn.Module, args, plan: ShrinkPlan | None) -> dict[str, Any]:
    """Hyperparameter updates that make ``mod`` fit its stored (shrunk) variables."""
    if isinstance(mod, nn.GroupNorm):
        if mod.num_groups is None or mod.num_groups == 1 or not args:
            return {}
        size = _group_size(mod, np.shape(args[0])[-1], plan)
        return {} if size is None else {"num_groups": None, "group_size": size}
    if isinstance(mod, nn.Embed) and mod.has_variable("params", "embedding"):
        vocab, feats = np.shape(mod.get_variable("params", "embedding"))
        return (
            {}
            if (vocab, feats) == (mod.num_embeddings, mod.features)
            else {"num_embeddings": vocab, "features": feats}
        )
    if isinstance(mod, nn.MultiHeadDotProductAttention):
        return _attention_sizes(mod, args)
    if not isinstance(mod, (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose)):
        return {}
    if not mod.has_variable("params", "kernel"):
        return {}
    kernel = np.shape(mod.get_variable("params", "kernel"))
    updates: dict[str, Any] = {}
    if isinstance(mod, nn.DenseGeneral):
        feats = mod.features if isinstance(mod.features, tuple) else (mod.features,)
        stored = tuple(kernel[len(kernel) - len(feats) :])
        if stored != feats:
            updates["features"] = stored if isinstance(mod.features, tuple) else stored[0]
    else:
        out = kernel[-2] if getattr(mod, "transpose_kernel", False) else kernel[-1]
        if out != mod.features:
            updates["features"] = out
    if isinstance(mod, nn.Conv) and mod.feature_group_count > 1 and args:
        groups = np.shape(args[0])[-1] // kernel[-2]
        if groups != mod.feature_group_count:
            updates["feature_group_count"] = groups
    return updates


def _interceptor(plan: ShrinkPlan | None):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Embed) and context.method_name == "setup":
            # its table is made in setup, which every method (__call__, attend) runs first on
            # this per-apply instance: give it the stored sizes there
            for name, value in _resize(mod, args, plan).items():
                object.__setattr__(mod, name, value)
            return next_fun(*args, **kwargs)
        updates = _resize(mod, args, plan) if context.method_name == "__call__" else {}
        if not updates:
            return next_fun(*args, **kwargs)
        return mod.clone(parent=mod.scope, **updates)(*args, **kwargs)

    return intercept


def linen_apply(
    module: nn.Module, method: str | Callable | None = None, *, plan: ShrinkPlan | None = None
) -> Callable[..., Any]:
    """``module.apply`` that accepts shrunk variables.

    Args:
      module: the Linen module as configured for the unshrunk model.
      method: passed to ``module.apply`` (default ``__call__``).
      plan: the :class:`~qjax.prune.shrink.ShrinkPlan`; needed when the model has a
        ``GroupNorm(num_groups=...)`` (its group size comes from the unshrunk channel count).

    Returns:
      ``apply(variables, *args, **kwargs)``, the same as ``module.apply`` but ``Dense``,
      ``DenseGeneral``, ``Conv`` and ``ConvTranspose`` submodules take their output size (and
      a grouped conv its ``feature_group_count``) from the stored kernel, and a
      ``GroupNorm`` keeps its unshrunk group size. Jit-safe.

    Raises:
      ValueError: (on apply) a ``GroupNorm(num_groups=...)`` without ``plan``, or whose
        channels are not whole groups of the plan's group size (names the module).

    Example:
      >>> small, plan = shrink(partial(model.apply, train=False), variables, masks, x)
      >>> y = jax.jit(linen_apply(model, plan=plan))(small, x, train=False)
    """

    def apply(variables, *args, **kwargs):
        with nn.intercept_methods(_interceptor(plan)):
            return module.apply(variables, *args, method=method, **kwargs)

    return apply


def feature_counts(plan: ShrinkPlan) -> dict[str, int]:
    """New output sizes per module path, for rebuilding modules from a config.

    A module's output size is its kernel's last axis (``Dense``/``Conv`` ``features``) or,
    for modules without a kernel (norms), the length of their 1-D leaves. Only modules
    whose output size changes are listed; a collection prefix (``params/``,
    ``batch_stats/``) is dropped.

    Args:
      plan: a :class:`~qjax.prune.shrink.ShrinkPlan`.

    Returns:
      ``{module path: new size}``, e.g. ``{"Dense_0": 40, "BatchNorm_0": 12}``.

    Example:
      >>> counts = feature_counts(plan)
      >>> model = MLP(hidden=counts["Dense_0"])
    """
    new = plan.new_shapes()
    out: dict[str, int] = {}
    for path, shape in new.items():
        parts = path.split("/")
        if parts[0] in ("params", "batch_stats"):
            parts = parts[1:]
        module, leaf = "/".join(parts[:-1]), parts[-1]
        old = plan.shapes[path]
        if leaf == "kernel" and shape[-1] != old[-1]:
            out[module] = shape[-1]
        elif (
            len(shape) == 1 and shape != old and not any(k.endswith("/kernel") for k in _siblings(plan, path))
        ):
            out.setdefault(module, shape[0])
    return out


def _siblings(plan: ShrinkPlan, path: str) -> list[str]:
    prefix = path.rsplit("/", 1)[0] + "/"
    return [p for p in plan.shapes if p.startswith(prefix) and "/" not in p[len(prefix) :]]


def shrink_nnx(model: nnx.Module, plan: ShrinkPlan) -> nnx.Module:
    """Shrink an NNX model in place with a plan made on ``nnx.split(model)``'s state.

    Args:
      model: the NNX module (its state must still have the unshrunk shapes).
      plan: from ``shrink(qjax.graph.nnx_apply(graphdef), state, masks, x)``.

    Returns:
      ``model`` itself, updated: every planned variable sliced and the size attributes
      of ``Linear``, ``LinearGeneral``, ``Conv``, ``ConvTranspose``, ``BatchNorm``, ``LayerNorm``,
      ``RMSNorm`` and ``GroupNorm``
      submodules set from their new arrays.

    Raises:
      KeyError, ValueError: the plan does not fit the model's state (names the path).

    Example:
      >>> graphdef, state = nnx.split(model)
      >>> _, plan = shrink(qjax.graph.nnx_apply(graphdef), state, masks, x)
      >>> shrink_nnx(model, plan)
      >>> model(x)  # runs with the smaller arrays
    """
    groups = {}
    for path, mod in nnx.iter_modules(model):
        if isinstance(mod, nnx.MultiHeadAttention):
            _check_value_head_dim(mod, "/".join(map(str, path)), plan)
        if isinstance(mod, nnx.Conv):
            kernel = plan._resolve("/".join(map(str, (*path, "kernel"))))
            kept = plan.leaves.get(kernel, {}).get(len(mod.kernel_shape) - 1)
            groups[id(mod)] = _kept_groups(mod.feature_group_count, mod.out_features, kept)
    nnx.update(model, plan.apply(nnx.state(model)))
    for path, mod in nnx.iter_modules(model):
        _fix_sizes(mod, groups.get(id(mod)), "/".join(map(str, path)))
    return model


def _check_value_head_dim(mod: nnx.MultiHeadAttention, name: str, plan: ShrinkPlan) -> None:
    """Refuse a plan that narrows value heads: ``attention_fn`` needs them as wide as q/k heads."""
    value = plan._resolve(f"{name}/value/kernel" if name else "value/kernel")
    kept = plan.leaves.get(value, {}).get(mod.value.kernel.ndim - 1)
    if kept is not None:
        raise ValueError(
            f"shrink_nnx: nnx.MultiHeadAttention {name!r} would keep {len(kept)} of {mod.head_dim} value "
            f"channels per head, but its attention_fn needs value heads as wide as query/key heads; "
            f"mask {name}/value/kernel and {name}/out/kernel by whole heads (or leave them unmasked)"
        )


def _kept_groups(groups: int, out_before: int, kept_out) -> int:
    """Feature groups left in a grouped conv that keeps output channels ``kept_out``.

    Pruning removes whole groups or the same channels of every group, so a group stays when
    one of its ``out_before // groups`` output channels does (``kept_out=None``: all stay).
    Equal to the new input channel count over the kernel's in-axis (what Linen reads).
    """
    if groups == 1 or kept_out is None:
        return groups
    per_group = out_before // groups
    return len({o // per_group for o in kept_out})


def _fix_group_norm(mod: nnx.GroupNorm, name: str) -> None:
    """Keep the group size: the kept channels are whole groups (``num_groups`` shrinks)."""
    arrays = [v.get_value() for v in (mod.scale, mod.bias) if isinstance(v, nnx.Variable)]
    if not arrays:
        return  # no scale or bias: the plan did not touch it
    channels = np.shape(arrays[0])[-1]
    if channels % mod.group_size:
        raise ValueError(
            f"GroupNorm {name!r}: {channels} channels after shrinking are not whole groups of "
            f"{mod.group_size}; the plan does not fit this model"
        )
    mod.num_features, mod.num_groups = channels, channels // mod.group_size


def _fix_sizes(mod: nnx.Module, groups: int | None, name: str) -> None:
    if isinstance(mod, nnx.Conv):
        shape = tuple(mod.kernel.shape)
        mod.feature_group_count = groups
        mod.kernel_shape = shape
        mod.in_features, mod.out_features = shape[-2] * groups, shape[-1]
    elif isinstance(mod, nnx.LinearGeneral):
        shape = tuple(mod.kernel.shape)
        n_in = len(mod.in_features)
        mod.in_features, mod.out_features = shape[:n_in], shape[n_in:]
        if hasattr(mod, "kernel_shape"):
            mod.kernel_shape = shape
    elif isinstance(mod, nnx.Linear):
        mod.in_features, mod.out_features = tuple(mod.kernel.shape)
    elif isinstance(mod, nnx.MultiHeadAttention):
        mod.num_heads = mod.query.kernel.shape[-2]
        mod.qkv_features = mod.num_heads * mod.head_dim
        mod.in_features, mod.in_kv_features = mod.query.kernel.shape[0], mod.key.kernel.shape[0]
        mod.out_features = mod.out.kernel.shape[-1]
        if hasattr(mod, "num_kv_heads"):
            mod.num_kv_heads = mod.key.kernel.shape[-2]
    elif isinstance(mod, nnx.ConvTranspose):
        shape = tuple(mod.kernel.shape)
        mod.kernel_shape = shape
        mod.in_features, mod.out_features = shape[-2:][:: -1 if mod.transpose_kernel else 1]
    elif isinstance(mod, nnx.Embed):
        mod.num_embeddings, mod.features = np.shape(mod.embedding.get_value())
    elif isinstance(mod, nnx.GroupNorm):
        _fix_group_norm(mod, name)
    elif isinstance(mod, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
        for name in ("scale", "bias", "mean", "var"):
            v = getattr(mod, name, None)
            if isinstance(v, nnx.Variable) and v.get_value() is not None:
                mod.num_features = np.shape(v.get_value())[-1]
                break
