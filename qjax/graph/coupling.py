"""Channel-coupling groups for structured pruning: which param axes must lose the same channels.

:func:`channel_groups` reads ``f(params, *args)`` as a jaxpr (:func:`qjax.graph.trace`) and
runs a union-find over *atoms*: every axis of every value is a product of atoms (a reshape
``(..., H*D) -> (..., H, D)`` refines the ``H*D`` atom into ``H`` and ``D``; a flatten
``(B, 8, 8, C) -> (B, 512)`` makes ``512`` the product ``8 x 8 x C``), and an atom can also be
a sum of parts (a ``concatenate`` along it). Per-primitive rules unite corresponding atoms:
elementwise ops (with size-1 broadcasting: biases, norm parameters), ``dot_general``
(contracting dims of both operands are one group: the producer's channel is the consumer's
in-axis; batch and free dims pass through), ``conv_general_dilated`` (input feature <->
kernel in-feature, kernel out-feature <-> output feature; ``feature_group_count`` splits the
features into ``[groups][per-group]``, so a depthwise conv couples its input and output),
reshapes, transposes, ``concatenate``/``split``, reductions over other axes, pooling
(``reduce_window_*``: the axes without a window pass through), and the bodies of
``jit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``cond``, ``scan`` and ``while``.

A group is every param axis (or sub-axis) holding one atom class; channel ``j`` of the group
is a set of positions along each member's axis (``unit`` positions each: ``D`` for a head of
an ``(E, H*D)`` kernel). A group is prunable unless one of its atoms

* is an input or output axis of the function, or a closed-over constant;
* is reduced by a non-contracting reduction (LayerNorm's mean over channels, softmax,
  cumsum, argmax...) — masked would differ from shrunk;
* is sliced, padded, reversed, pooled over (a ``reduce_window`` window along it), gathered
  or scattered, or goes through a primitive this module does not model (``shard_map``,
  ``gather``, ``sort``...);
* was created with a size baked into the model (``iota``, a non-leading sub-axis of a
  reshape split such as ``head_dim``); axes added by ``broadcast_in_dim`` (a scalar fill, a
  causal mask over heads) follow what they meet;
* is the scanned axis of a ``scan``, a convolution's spatial axis or whole feature groups
  of a grouped (non-depthwise) convolution;
* is contracted in a ``dot_general``/``conv`` where neither operand is known to be zero on
  masked channels (e.g. ``sigmoid(x @ w1) . sigmoid(x @ w2)``: masking would leave 0.25);
* is contracted in a ``dot_general`` between two activations (neither operand a weight):
  attention's ``q·kᵀ`` over ``head_dim``, which models scale by ``1/sqrt(head_dim)``, a
  constant computed from the shape that shrinking would change. A weight is a params leaf
  through layout ops and elementwise ops it spans, and a ``concatenate`` of weights (fused
  gate kernels such as Flax's ``OptimizedLSTMCell``: each part keeps its slice).

The reasons are kept per group, so users see why a group cannot be pruned.

With ``inexact_norms=True`` a ``reduce_sum`` over a channel axis (the mean and variance of a
LayerNorm / RMSNorm over the hidden dimension, as Torch-Pruning prunes it) no longer blocks
its group: the group is prunable and lists the approximation in ``inexact``. Shrinking such
a group is not the masked model: the shrunk norm averages over the kept channels, the masked
one over all of them (zeros included). Fine-tune after shrinking.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qjax.graph._atoms import occurrences, positions
from qjax.graph._coupling_rules import INEXACT, Val, Walker
from qjax.graph.trace import trace


@dataclasses.dataclass(frozen=True)
class Member:
    """One param axis of a :class:`ChannelGroup`.

    Attributes:
      path: the params leaf path.
      axis: the leaf axis (non-negative).
      unit: positions along ``axis`` per channel of the group (``head_dim`` for heads).
      positions: ``(group size, unit)`` int array: the positions of each channel.
    """

    path: str
    axis: int
    unit: int
    positions: np.ndarray = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together.

    Attributes:
      name: ``"path:axis"`` of the first kernel (>= 2-D) member, else of the first member;
        ``[k]`` is appended when that axis holds several groups (``heads`` and
        ``head_dim`` of an ``(E, H*D)`` kernel).
      size: the number of channels.
      members: the param axes holding the group.
      prunable: whether removing channels keeps the masked model's function (or, with
        ``inexact_norms``, keeps it up to the approximations in ``inexact``).
      reasons: why not (empty when prunable).
      inexact: the approximations shrinking the group makes (``channel_groups(...,
        inexact_norms=True)``: a norm's statistics over the channels); empty when shrinking
        is exact.
    """

    name: str
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reasons: tuple[str, ...] = ()
    inexact: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The reasons joined with ``"; "`` (``""`` when prunable)."""
        return "; ".join(self.reasons)


def channel_groups(f, params: Any, *args, inexact_norms: bool = False, **kwargs) -> list[ChannelGroup]:
    """Channel-coupling groups of ``f(params, *args, **kwargs)``.

    Args:
      f: a function of a params pytree (``model.apply``, ``qjax.graph.nnx_apply(graphdef)``,
        a plain function). Linen batch norms should run in inference mode (``train=False``:
        training mode returns the running statistics, which makes their axis an output).
      params: the params pytree (variables for Linen, an ``nnx.State`` for NNX).
      *args: example inputs (arrays; only shapes matter).
      inexact_norms: let a ``reduce_sum`` over channels (LayerNorm / RMSNorm statistics
        over a transformer's hidden dimension; also a mean over channels) leave its group
        prunable, noted in ``ChannelGroup.inexact``: shrinking then changes the kept
        channels' values (the norm averages over fewer channels), as in Torch-Pruning.
        Default ``False``: such groups are not prunable.
      **kwargs: static keyword arguments of ``f`` (e.g. ``train=False``).

    Returns:
      The groups, ordered by their first member (params flatten order, then axis); only
      atoms held by at least one param axis form a group.

    Raises:
      TypeError: from ``f`` when it cannot be traced.

    Example:
      >>> groups = channel_groups(model.apply, variables, x)
      >>> [(g.name, g.size, g.prunable) for g in groups]
      [('params/Dense_0/kernel:0', 32, False), ('params/Dense_0/kernel:1', 64, True),
       ('params/Dense_1/kernel:1', 10, False)]
    """
    traced = trace(f, params, *args, **kwargs)
    jaxpr = traced.jaxpr
    w = Walker(inexact_norms)
    invars = jaxpr.jaxpr.invars
    n = len(traced.param_paths)
    param_vals = [Val(tuple(v.aval.shape), tuple(w.A.new(s) for s in v.aval.shape), (True,) * v.aval.ndim,
                      param=True) for v in invars[:n]]  # fmt: skip
    arg_vals = [w.fresh(v.aval.shape, "an input axis of the function") for v in invars[n:]]
    consts = [w.fresh(np.shape(c), "a closed-over constant") for c in jaxpr.consts]
    for out in w.run(jaxpr.jaxpr, consts, [*param_vals, *arg_vals]):
        w.flag(out, "an output axis of the function")
    A = w.A
    for parts in w.splits:
        exprs = [tuple(A.leaves(A.expand(a))) for a in parts]
        if any(e != exprs[0] for e in exprs):
            for a in parts:
                A.flag(A.expand(a), "split into parts that would shrink unevenly (split sizes are fixed)")
    order: dict[int, list] = {}
    names: dict[int, str] = {}  # the first >= 2-D member (a kernel), else the first member
    from_kernel: set[int] = set()
    for path, val in zip(traced.param_paths, param_vals):
        for axis, atom in enumerate(val.atoms):
            expr = A.expand(atom)
            roots = list(dict.fromkeys(A.leaves(expr)))
            for k, r in enumerate(roots):
                pos = np.concatenate(positions(A, expr, r), axis=1)
                order.setdefault(r, []).append(Member(path, axis, pos.shape[1], pos))
                if r not in names or (r not in from_kernel and len(val.shape) >= 2):
                    names[r] = f"{path}:{axis}" + (f"[{k}]" if len(roots) > 1 else "")
                    if len(val.shape) >= 2:
                        from_kernel.add(r)
                if occurrences(A, expr, r) > 1:
                    A.flags[r][f"appears twice in one axis of {path}"] = None
    groups = []
    for r, members in order.items():
        reasons = tuple(x for x in A.flags[r] if not x.startswith(INEXACT))
        inexact = tuple(x[len(INEXACT) :] for x in A.flags[r] if x.startswith(INEXACT))
        groups.append(ChannelGroup(names[r], A.size[r], tuple(members), not reasons, reasons, inexact))
    return groups


def format_groups(groups: list[ChannelGroup]) -> str:
    """A plain-text table of groups: name, size, prunable or the reason, members.

    Example:
      >>> print(format_groups(channel_groups(model.apply, variables, x)))
    """
    lines = []
    for g in groups:
        status = "prunable" if g.prunable else f"NOT prunable: {g.reason}"
        if g.prunable and g.inexact:
            status += f" (inexact: {'; '.join(g.inexact)})"
        lines.append(f"{g.name} (size {g.size}): {status}")
        for m in g.members:
            unit = f" x{m.unit}" if m.unit > 1 else ""
            lines.append(f"    {m.path} axis {m.axis}{unit}")
    return "\n".join(lines)
