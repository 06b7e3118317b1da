"""Folding inference-form batch norms into the conv/dense kernels before them.

Deployment flows (HAWQ-V3, hls4ml, TensorRT...) quantize the *folded* weight
``kernel * gamma / sqrt(var + eps)`` per output channel, so a model must be folded before
:func:`qjax.quantize_params` for its integer weights to be the ones its target runs.
:func:`fold_batchnorm` finds the pairs with :func:`qjax.graph.batchnorm.batchnorm_sites`
and returns new variables (same tree, shapes and dtypes) on which the *same* function
computes the same output, the batch norm reduced to an identity scale plus a bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.graph.batchnorm import BatchNormSite, batchnorm_sites
from qjax.numerics.transposed import is_quantized
from qjax.rules import leaves_with_paths, map_with_path


@dataclasses.dataclass(frozen=True)
class BatchNormFoldReport:
    """What :func:`fold_batchnorm` did.

    Attributes:
      folded: ``(kernel path, batch norm path)`` of every folded pair.
      skipped: ``(batch norm path, reason)`` of every batch norm left as it was.
      sites: the :class:`qjax.graph.batchnorm.BatchNormSite` of each (leaves, eps).
    """

    folded: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]
    sites: tuple[BatchNormSite, ...] = dataclasses.field(default=(), repr=False)

    def __str__(self) -> str:
        lines = [f"folded {bn!r} into {kernel!r}" for kernel, bn in self.folded]
        lines += [f"skipped {bn!r}: {why}" for bn, why in self.skipped]
        return "\n".join(lines) or "no batch norms found"


def _unit_var(eps: np.ndarray, var_dtype) -> np.ndarray:
    """A ``var`` in ``var_dtype`` with ``var + eps == 1`` exactly in ``eps``'s dtype (the
    dtype the program adds them in), so ``rsqrt(var + eps)`` is exactly 1."""
    add_dtype = eps.dtype
    v = np.asarray(1.0 - float(eps), var_dtype)
    for _ in range(16):
        total = np.asarray(v, add_dtype) + eps
        if total == 1:
            return v
        v = np.nextafter(v, np.asarray(0.0 if total > 1 else 2.0, var_dtype))
    raise ValueError(
        f"no {np.dtype(var_dtype).name} variance v with v + {float(eps)} == 1 exactly"
    )  # pragma: no cover


def _fold_site(site: BatchNormSite, leaves: dict[str, Any]) -> dict[str, np.ndarray]:
    """New float64 values of the site's leaves (kernel, conv biases, batch norm)."""
    n = site.num_channels

    def per_channel(leaf) -> np.ndarray:
        path, ids = leaf
        out = np.empty(n)
        out[ids.ravel()] = np.asarray(leaves[path], np.float64).ravel()
        return out

    mean, var = per_channel(site.mean), per_channel(site.var)
    gamma = per_channel(site.scale) if site.scale else np.ones(n)
    beta = per_channel(site.bias) if site.bias else np.zeros(n)
    s = gamma / np.sqrt(var + float(site.eps))
    offset = beta - mean * s
    kpath, kids = site.kernel
    new = {kpath: np.asarray(leaves[kpath], np.float64) * s[kids]}
    for path, ids in site.conv_biases:
        new[path] = np.asarray(leaves[path], np.float64) * s[ids]
    var_path, var_ids = site.var
    new[var_path] = np.broadcast_to(_unit_var(site.eps, leaves[var_path].dtype), var_ids.shape)
    if site.scale:
        new[site.scale[0]] = np.ones(site.scale[1].shape)
    if site.bias:  # (y - 0) * 1 + (beta - mean * s)
        new[site.bias[0]], new[site.mean[0]] = offset[site.bias[1]], np.zeros(site.mean[1].shape)
    else:  # no bias leaf: (y - mean * s) * 1
        new[site.mean[0]] = -offset[site.mean[1]]
    return new


def fold_batchnorm(
    apply_fn, variables: Any, *example_args, strict: bool = False, **kwargs
) -> tuple[Any, BatchNormFoldReport]:
    """Fold every inference-form batch norm into the conv/dense kernel that feeds it.

    For each batch norm ``(y - mean) * gamma / sqrt(var + eps) + beta`` whose input ``y``
    is directly (through layout ops and the conv's own bias only) the output channels of a
    ``conv_general_dilated``/``dot_general`` reading a params kernel (plain, grouped and
    depthwise convolutions, ``Dense``), with ``s = gamma / sqrt(var + eps)`` per output
    channel (``eps`` read from the traced program): ``kernel' = kernel * s``, a conv bias
    ``b' = b * s``, and the batch norm becomes an exact identity scale (``scale = 1``,
    ``var = 1 - eps`` rounded so that ``var + eps == 1`` in the program's dtype) plus the
    offset: ``bias = beta - mean * s`` and ``mean = 0`` (without a bias leaf: ``mean =
    mean * s``). Which leaves pair up is found by dataflow
    (:func:`qjax.graph.batchnorm.batchnorm_sites`), never by name. Arithmetic is float64 on
    the host; every leaf keeps its dtype (and sharding). Not traceable under ``jit`` (it reads values).

    Args:
      apply_fn: ``apply_fn(variables, *example_args, **kwargs)`` in inference mode (Linen
        ``model.apply`` with ``use_running_average=True``/``train=False``,
        ``qjax.nnx_apply(graphdef)`` after ``model.eval()``, or a plain function).
      variables: float variables (Linen ``{"params", "batch_stats"}``, an NNX state...).
      *example_args: example inputs (only shapes and dtypes matter).
      strict: raise instead of reporting batch norms that cannot fold.
      **kwargs: static keyword arguments of ``apply_fn``.

    Returns:
      ``(folded variables, report)``: the same tree structure, shapes and dtypes; the
      report lists folded ``(kernel path, batch norm path)`` pairs and skipped batch norms
      with the reason (training mode, a nonlinearity or residual before it, a shared
      kernel, a conv output used elsewhere...).

    Raises:
      ValueError: with ``strict=True``, naming every batch norm that cannot fold; or a
        leaf to fold is already quantized (fold before ``quantize_params``).

    Example:
      >>> folded, report = qjax.fold_batchnorm(model.apply, variables, x)
      >>> qparams = qjax.quantize_params(folded, policy)   # quantizes kernel * s
    """
    sites = batchnorm_sites(apply_fn, variables, *example_args, **kwargs)
    skipped = tuple((s.name, s.reason) for s in sites if not s.foldable)
    if strict and skipped:
        lines = "; ".join(f"{name!r}: {why}" for name, why in skipped)
        raise ValueError(f"fold_batchnorm(strict=True): cannot fold batch norm {lines}")
    leaves = dict(leaves_with_paths(variables))
    new: dict[str, np.ndarray] = {}
    for site in sites:
        if site.foldable:
            paths = [site.kernel[0], site.mean[0], site.var[0], *(p for p, _ in site.conv_biases)]
            paths += [leaf[0] for leaf in (site.scale, site.bias) if leaf]
            bad = [p for p in paths if is_quantized(leaves[p])]
            if bad:
                raise ValueError(
                    f"fold_batchnorm: {bad[0]!r} is already quantized; fold before quantize_params"
                )
            new.update(_fold_site(site, leaves))
    folded = tuple((s.kernel[0], s.name) for s in sites if s.foldable)

    def put(path, leaf):
        if path not in new:
            return leaf
        out = jnp.asarray(new[path], dtype=leaf.dtype)
        return jax.device_put(out, leaf.sharding) if isinstance(leaf, jax.Array) else out

    return map_with_path(put, variables), BatchNormFoldReport(folded, skipped, tuple(sites))
