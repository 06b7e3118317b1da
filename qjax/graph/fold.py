"""Where a per-input-channel factor of a matmul can be folded into params.

Smoothing (AWQ, SmoothQuant) rewrites ``x @ W`` as ``(x / s) @ (diag(s) W)``; ``x / s`` is
free when the division can be pushed into the params that produce ``x``.
:func:`fold_groups` reads ``f(params, *args)`` as a jaxpr (``jit``, custom derivatives and
``remat`` inlined) and finds, for every matmul that reads a params leaf, whether it can:

* **Producers** (fold points): an elementwise product with a params leaf broadcast along
  the channel axes (the ``z * gamma`` of LayerNorm/RMSNorm), or a matmul reading a
  weight whose output (free) axes are the channel axes (a previous linear layer).
* **Channel-preserving ops** between producer and consumer, through which a per-channel
  division commutes: layout ops (reshape/transpose/broadcast/squeeze/slice/rev, dtype
  casts) tracked by channel *identity* (an index array follows every channel, so heads
  split and merged back into ``H*D`` keep their identity); elementwise ``mul``/``div`` by
  any other activation (the ``(x - mean) * rsqrt(var)`` of a norm); ``max(x, 0)`` (ReLU is
  positively homogeneous, ``s > 0``); sums/maxima over non-channel axes; ``add``/``sub`` of
  a params leaf (a bias: divided too, e.g. LayerNorm's ``beta`` or the producer's bias);
  and a matmul with another *activation* that keeps the channel axes as batch or free
  axes, e.g. the attention-weighted sum ``probs @ V`` (``V``'s channel passes through;
  the product is linear in ``V`` and ``V``'s bias is divided together with its weight, so
  this is exact for any ``probs``: rows summing to 1 is not needed).
* **Consumers**: matmuls reading a weight that contract exactly the channel-carrying axes.
  All consumers reached from one producer form a group sharing one factor (``q, k, v``
  after one LayerNorm).

Any other use of a scaled channel (a nonlinearity such as GELU, a residual ``add`` with an
activation, a reduction over the channel, the function's output) makes the group not
foldable; so do a producer leaf used elsewhere and a consumer weight read by several
matmuls. Such factors are applied at run time (``qjax.quant.smoothing.with_input_scales``).
The analysis is per channel: a fused ``qkv`` projection whose ``v`` slice alone reaches the
output projection is foldable even though its ``q``/``k`` slices flow into ``q @ kᵀ``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
from jax.extend import core as jcore

from qjax.graph._fold_ids import _Lit, _Node, _to_rank, _transfer, _View
from qjax.graph.layout import IDENTITY_LAYOUT, LAYOUT_PRIMITIVES
from qjax.graph.ops import weight_ops
from qjax.graph.trace import trace
from qjax.graph.weight_ref import RAGGED_DIMS

# Higher-order primitives read through (their body is inlined), by the param holding it.
_INLINE = dict.fromkeys(("jit", "pjit", "remat2", "checkpoint"), "jaxpr") | {
    "custom_vjp_call_jaxpr": "fun_jaxpr"
}
_INLINE |= dict.fromkeys(("closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"), "call_jaxpr")
# lax.ragged_dot in its standard form (RAGGED_DIMS), (M, K) rows sorted by expert x (G, K, N)
# experts: every expert contracts K with the same activation channels, so a factor on K is
# shared by all of them
_TARGETS = ("dot_general", "conv_general_dilated", "ragged_dot_general")


@dataclasses.dataclass(frozen=True, eq=False)
class FoldGroup:
    """Matmuls whose activation input comes from one producer.

    Attributes:
      paths: the weight paths of the consumer matmuls, in evaluation order; with
        ``foldable`` they must share one input-channel factor.
      foldable: whether ``x / s`` can be folded into the producer's params.
      reason: why not (names the op or leaf), else ``None``.
      producer: a description of the producer (``"mul by 'params/ln/scale'"``,
        ``"matmul 'params/v/kernel'"``), ``None`` when there is none.
      targets: ``(leaf path, ids)`` of every params leaf to divide when folding: ``ids``
        broadcasts to the leaf and gives each element's producer channel (``-1``: not
        scaled).
      channel_ids: ``[K]``, the producer channel of each consumer input row (``K`` in the
        consumer weight's contracted axes, leaf order, flattened).
      num_channels: how many producer channels ``ids`` index.
    """

    paths: tuple[str, ...]
    foldable: bool
    reason: str | None = None
    producer: str | None = None
    targets: tuple[tuple[str, np.ndarray], ...] = ()
    channel_ids: np.ndarray | None = None
    num_channels: int = 0

    @property
    def producer_paths(self) -> tuple[str, ...]:
        """The params leaves divided when folding."""
        return tuple(p for p, _ in self.targets)

    def __repr__(self) -> str:
        how = f"folds into {list(self.producer_paths)}" if self.foldable else f"not foldable: {self.reason}"
        return f"FoldGroup({list(self.paths)}, {how})"


@dataclasses.dataclass
class _Reach:
    """What one producer's scaled channels reach."""

    terminals: list = dataclasses.field(default_factory=list)  # (path, [K] ids, node index)
    forbidden: list = dataclasses.field(default_factory=list)  # (ids, why)
    absorbed: list = dataclasses.field(default_factory=list)  # (path, leaf ids)
    binary: list = dataclasses.field(default_factory=list)  # (node index, other operand key)
    chain: set = dataclasses.field(default_factory=set)


def meet(vids: np.ndarray, leaf_shape: tuple[int, ...], ids: np.ndarray) -> np.ndarray | None:
    """Where a params view (``vids``: the leaf's flat index at each view position) meets
    channels ``ids`` elementwise: the channel of each leaf element (``-1``: none), or
    ``None`` if an element meets two channels."""
    a, b = np.broadcast_arrays(_to_rank(vids, ids.ndim), _to_rank(ids, vids.ndim))
    leaf_ids = np.full(math.prod(leaf_shape), -1)
    leaf_ids[a.ravel()] = b.ravel()
    if not (leaf_ids[a.ravel()] == b.ravel()).all():
        return None
    return leaf_ids.reshape(leaf_shape)


class _Graph:
    """The jaxpr of ``f`` flattened into nodes over integer value keys."""

    def __init__(self, traced):
        self.nodes: list[_Node] = []
        self._keys = itertools.count()
        self.uses: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.views: dict[int, _View] = {}
        self.producer: dict[int, int] = {}  # value key -> index of the node computing it
        self._ids: dict[int, np.ndarray | None] = {}
        closed = traced.jaxpr
        args = [next(self._keys) for _ in closed.jaxpr.invars]
        for key, path, leaf in zip(args, traced.param_paths, traced.param_leaves):
            shape = tuple(np.shape(leaf))
            self.views[key] = _View(path, shape, None, None, list(range(len(shape))))
        outs = self._flatten(closed.jaxpr, [_Lit(c) for c in closed.consts], args)
        self.outputs = {o for o in outs if isinstance(o, int)}
        self.reads: dict[str, list[int]] = defaultdict(list)  # path -> non-layout nodes reading it
        self.matmul_inputs: dict[str, Any] = {}  # path -> activation operand of a top-level matmul
        self.other_reads: dict[str, list[str]] = defaultdict(list)  # path -> ops reading it otherwise
        for i, node in enumerate(self.nodes):
            wi = self.weight_operand(node)
            if wi is not None:
                self.matmul_inputs[self.views[node.ins[wi]].path] = node.ins[1 - wi]
            for pos, x in enumerate(node.ins):
                if isinstance(x, int) and x in self.views and not (node.outs and node.outs[0] in self.views):
                    self.reads[self.views[x].path].append(i)
                    if pos != wi:
                        self.other_reads[self.views[x].path].append(node.prim)
        for o in self.outputs:
            if o in self.views:
                self.reads[self.views[o].path].append(-1)

    def _flatten(self, jaxpr, consts, args) -> list:
        env: dict = {}

        def read(v):
            return _Lit(v.val) if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            name = eqn.primitive.name
            if name in _INLINE:
                sub = eqn.params[_INLINE[name]]
                inner, sub_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, [])
                outs = self._flatten(inner, [_Lit(c) for c in sub_consts], ins)
            else:
                outs = [next(self._keys) for _ in eqn.outvars]
                node = _Node(
                    name,
                    dict(eqn.params),
                    ins,
                    outs,
                    [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars],
                    [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars],
                )
                idx = len(self.nodes)
                self.nodes.append(node)
                for pos, x in enumerate(ins):
                    if isinstance(x, int):
                        self.uses[x].append((idx, pos))
                self.producer.update((o, idx) for o in outs)
                src = ins[0] if ins else None
                if (
                    name in LAYOUT_PRIMITIVES
                    and isinstance(src, int)
                    and src in self.views
                    and not any(isinstance(x, int) for x in ins[1:])
                ):
                    parent = self.views[src]
                    axes = parent.leaf_axes
                    if axes is not None and name == "transpose":
                        axes = [axes[d] for d in node.params["permutation"]]
                    elif name not in IDENTITY_LAYOUT:
                        axes = None
                    self.views[outs[0]] = _View(parent.path, parent.leaf_shape, src, node, axes)
            env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
        return [read(v) for v in jaxpr.outvars]

    def ids(self, key: int) -> np.ndarray | None:
        """For a params view: the leaf's flat index at each view position (size 1 on axes
        it is broadcast along), or ``None`` if untrackable."""
        if key not in self._ids:
            v = self.views[key]
            if v.parent is None:
                self._ids[key] = np.arange(math.prod(v.leaf_shape)).reshape(v.leaf_shape)
            else:
                parent = self.ids(v.parent)
                self._ids[key] = None if parent is None else _transfer(v.node, parent)
        return self._ids[key]

    def weight_operand(self, node: _Node) -> int | None:
        if node.prim not in _TARGETS:
            return None
        if node.prim == "ragged_dot_general":
            return 1 if _standard_ragged(node) and self.view_of(node.ins[1]) is not None else None
        refs = [i for i in (0, 1) if isinstance(node.ins[i], int) and node.ins[i] in self.views]
        return refs[0] if len(refs) == 1 else None

    def view_of(self, x) -> _View | None:
        return self.views.get(x) if isinstance(x, int) else None

    # -- producers ---------------------------------------------------------------------

    def fold_mul(self, node: _Node) -> tuple[int, np.ndarray] | None:
        """``(params operand, ids)`` if ``node`` multiplies an activation by a params leaf
        that varies along some axis (a norm's ``gamma``)."""
        if node.prim != "mul":
            return None
        views = [i for i in (0, 1) if self.view_of(node.ins[i]) is not None]
        if len(views) != 1:
            return None
        ids = self.ids(node.ins[views[0]])
        if ids is None or ids.size < 2:
            return None
        return views[0], ids

    def producers(self):
        """Yield ``(node index, description, start ids, [(leaf path, leaf ids)], n channels)``."""
        for idx, node in enumerate(self.nodes):
            found = self.fold_mul(node)
            if found is not None:
                pos, ids = found
                view = self.views[node.ins[pos]]
                size = math.prod(view.leaf_shape)
                leaf_ids = np.full(size, -1)
                leaf_ids[ids.ravel()] = ids.ravel()
                start, targets = (
                    _to_rank(ids, len(node.out_shapes[0])),
                    [(view.path, leaf_ids.reshape(view.leaf_shape))],
                )
                yield idx, f"mul by {view.path!r}", start, targets, size
                continue
            found = self.matmul_channels(node) if node.prim == "dot_general" else None
            if found is not None:
                path, start, leaf_ids, n = found
                yield idx, f"matmul {path!r}", start, [(path, leaf_ids)], n

    def matmul_channels(self, node: _Node) -> tuple[str, np.ndarray, np.ndarray, int] | None:
        """``(weight path, output ids, leaf ids, n)`` for a ``dot_general`` reading one weight:
        its output channels (the weight's free axes, flattened in leaf-axis order) as ids
        over the output (size 1 on the activation's axes) and over the weight leaf (size 1
        on its contracted axes); ``None`` when the weight has batch axes or reaches the
        matmul through reshapes, or it reads none."""
        wi = self.weight_operand(node)
        if wi is None:
            return None
        view = self.views[node.ins[wi]]
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        wc, wb = (rc, rb) if wi == 1 else (lc, lb)
        if view.leaf_axes is None or wb:
            return None
        free = [d for d in range(len(node.in_shapes[wi])) if d not in wc]
        leaf_free = [view.leaf_axes[d] for d in free]
        order = sorted(leaf_free)
        grid = np.arange(math.prod(view.leaf_shape[a] for a in order))
        grid = grid.reshape([view.leaf_shape[a] for a in order])
        in_view = grid.transpose([order.index(a) for a in leaf_free])
        n_act = len(node.out_shapes[0]) - len(free)
        start = in_view.reshape((1,) * n_act + in_view.shape if wi == 1 else in_view.shape + (1,) * n_act)
        leaf_ids = grid.reshape([s if a in order else 1 for a, s in enumerate(view.leaf_shape)])
        return view.path, start, leaf_ids, grid.size

    # -- forward propagation -------------------------------------------------------------

    def reach(self, start: int, ids: np.ndarray, blocked: set[int]) -> _Reach:
        r = _Reach()
        work = [(start, ids)]
        while work:
            key, ids = work.pop()
            if key in r.chain:
                r.forbidden.append((ids, "a value reached along two paths"))
                continue
            r.chain.add(key)
            if key in self.outputs:
                r.forbidden.append((ids, "the function's output"))
            for idx, pos in self.uses[key]:
                if idx in blocked:
                    r.forbidden.append((ids, f"{self.nodes[idx].prim!r} of two scaled values"))
                    continue
                node = self.nodes[idx]
                if node.prim == "split":  # several outputs: slice the channel ids alike
                    axis, bounds = node.params["axis"], np.cumsum([0, *node.params["sizes"]])
                    for o, lo, hi in zip(node.outs, bounds[:-1], bounds[1:]):
                        part = ids if ids.shape[axis] == 1 else np.take(ids, np.arange(lo, hi), axis)
                        work.append((o, part))
                    continue
                out = self._step(idx, pos, ids, r)
                if out is not None:
                    work.append((node.outs[0], out))
        return r

    def _step(self, idx: int, pos: int, ids: np.ndarray, r: _Reach) -> np.ndarray | None:
        node = self.nodes[idx]
        name = node.prim

        def forbid(why: str) -> None:
            r.forbidden.append((ids, why))

        other = node.ins[1 - pos] if len(node.ins) == 2 else None
        out_ndim = len(node.out_shapes[0]) if node.out_shapes else 0
        wi = self.weight_operand(node)
        if wi is not None:
            return self._consume(idx, node, wi, ids, r)
        if name == "dot_general":
            return self._through_dot(idx, node, pos, ids, r)
        if name == "mul" or (name == "div" and pos == 0):
            if self.fold_mul(node) is not None:
                return forbid(f"a per-channel 'mul' by params leaf {self.views[other].path!r}")
            if isinstance(other, int):
                r.binary.append((idx, other))
            return _to_rank(ids, out_ndim)
        if name in ("add", "sub"):
            view = self.view_of(other)
            leaf_ids = None if view is None else self._absorb(other, view, ids)
            if leaf_ids is None:
                return forbid(f"{name!r} with an activation (e.g. a residual)")
            r.absorbed.append((view.path, leaf_ids))
            return _to_rank(ids, out_ndim)
        if name == "max" and isinstance(other, _Lit) and np.all(np.asarray(other.val) == 0):
            return ids  # ReLU: max(x/s, 0) = max(x, 0)/s for s > 0
        out = _transfer(node, ids) if len(node.ins) == 1 or (name == "dynamic_slice" and pos == 0) else None
        if out is None:
            return forbid(repr(name))
        return out

    def _absorb(self, key: int, view: _View, ids: np.ndarray) -> np.ndarray | None:
        """Leaf ids for a params leaf added to scaled channels (a bias), if each of its
        elements is added to one channel only."""
        vids = self.ids(key)
        return None if vids is None else meet(vids, view.leaf_shape, ids)

    def _through_dot(self, idx: int, node: _Node, pos: int, ids: np.ndarray, r: _Reach):
        (lc, rc), (lb, rb) = node.params["dimension_numbers"]
        cc, cb = (lc, lb) if pos == 0 else (rc, rb)
        if any(ids.shape[d] > 1 for d in cc):
            r.forbidden.append((ids, "a matmul with another activation over the channels"))
            return None
        other = node.ins[1 - pos]
        if isinstance(other, int):
            r.binary.append((idx, other))
        free = [d for d in range(ids.ndim) if d not in cc and d not in cb]
        kept = ids.transpose([*cb, *free, *cc]).reshape([ids.shape[d] for d in (*cb, *free)])
        n_other = len(node.in_shapes[1 - pos]) - len(cc) - len(cb)
        nb = len(cb)
        if pos == 0:
            return kept.reshape(kept.shape + (1,) * n_other)
        return kept.reshape(kept.shape[:nb] + (1,) * n_other + kept.shape[nb:])

    def _consume(self, idx: int, node: _Node, wi: int, ids: np.ndarray, r: _Reach) -> None:
        view = self.views[node.ins[wi]]
        if node.prim == "conv_general_dilated":
            r.forbidden.append((ids, f"convolution {view.path!r}"))
            return None
        if node.prim == "ragged_dot_general":
            if wi != 1 or self.view_of(node.ins[0]) is not None:
                r.forbidden.append((ids, f"ragged dot {view.path!r}, read as its rows"))
                return None
            wc, ac, wb = (1,), (1,), ()  # each expert's K rows; the experts are not batch axes of x
        else:
            (lc, rc), (lb, rb) = node.params["dimension_numbers"]
            wc, ac, wb = (rc, lc, rb) if wi == 1 else (lc, rc, lb)
        why = None
        if len(self.reads[view.path]) > 1:
            why = f"{view.path!r}, a weight read by several matmuls"
        elif view.leaf_axes is None or wb:
            why = f"{view.path!r}, a weight reaching its matmul through reshapes or batch axes"
        elif any(ids.shape[d] > 1 for d in range(ids.ndim) if d not in ac):
            why = f"matmul {view.path!r}, which does not contract all of the channels"
        if why is not None:
            r.forbidden.append((ids, why))
            return None
        leaf = [view.leaf_axes[d] for d in wc]
        act = [ac[i] for i in np.argsort(leaf)]
        rest = [d for d in range(ids.ndim) if d not in act]
        k_ids = ids.transpose([*act, *rest]).reshape([ids.shape[d] for d in act])
        k_ids = np.broadcast_to(k_ids, [node.in_shapes[1 - wi][d] for d in act]).reshape(-1)
        r.terminals.append((view.path, k_ids, idx))
        return None


def _standard_ragged(node: _Node) -> bool:
    d = node.params.get("ragged_dot_dimension_numbers")
    if d is None or len(node.ins) != 3 or node.params.get("group_offset") is not None:
        return False
    dims = (d.dot_dimension_numbers, tuple(d.lhs_ragged_dimensions), tuple(d.rhs_group_dimensions))
    return dims == RAGGED_DIMS and len(node.in_shapes[1]) == 3


def _reach_fixed(g: _Graph, start: int, ids: np.ndarray) -> _Reach:
    """Reach, re-run with binary ops whose both operands are scaled marked as forbidden
    (``(a/s)·(b/s) ≠ (a·b)/s``)."""
    blocked: set[int] = set()
    while True:
        r = g.reach(start, ids, blocked)
        bad = {idx for idx, other in r.binary if other in r.chain} - blocked
        if not bad:
            return r
        blocked |= bad


def non_matmul_reads(f, params: Any, *args, **kwargs) -> dict[str, list[str]]:
    """``{path: [primitive, ...]}``: the ops other than a matmul/conv weight operand that
    read each params leaf (at the top level of ``f``'s jaxpr, ``jit`` and custom
    derivatives inlined; ``scan``/``cond``/``while`` bodies appear as that primitive)."""
    return dict(_Graph(trace(f, params, *args, **kwargs)).other_reads)


def _source(g: _Graph, path: str) -> str:
    """Why a matmul reached by no producer is not foldable: what computes its input."""
    if path not in g.matmul_inputs:
        return "it is read inside a scan/cond/while/shard_map"
    if len(g.reads[path]) > 1:
        return "the weight is read by several matmuls or other ops"
    key = g.matmul_inputs[path]
    while isinstance(key, int) and key in g.producer:
        node = g.nodes[g.producer[key]]
        if node.prim not in LAYOUT_PRIMITIVES or node.prim in ("slice", "dynamic_slice"):
            return f"its input comes from {node.prim!r}, not from a norm's scale or a linear layer"
        key = node.ins[0]
    return "its input is an argument or constant of the function"


def fold_groups(f, params: Any, *args, **kwargs) -> list[FoldGroup]:
    """Consumer groups of the matmuls of ``f(params, *args, **kwargs)`` and whether an
    input-channel factor of each group can be folded into params (see the module doc).

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, plain).
      params: the params pytree (float).
      *args: example positional arguments (arrays; only shapes and dtypes matter).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      One :class:`FoldGroup` per producer whose channels reach a weight-reading matmul
      (its ``paths`` share a factor when ``foldable``), then one non-foldable group per
      remaining matmul weight (e.g. reading a function argument, or inside a ``scan``),
      every weight path in exactly one group.

    Example:
      >>> for g in fold_groups(model.apply, variables, x):
      ...     print(g)   # FoldGroup(['params/q/kernel', 'params/k/kernel', ...], folds into [...])
    """
    traced = trace(f, params, *args, **kwargs)
    g = _Graph(traced)
    found = []
    for idx, desc, start_ids, targets, n in g.producers():
        r = _reach_fixed(g, g.nodes[idx].outs[0], start_ids)
        if r.terminals:
            found.append((idx, desc, targets, n, r))
    claims: dict[str, int] = defaultdict(int)
    for *_, r in found:
        for path, _, _ in r.terminals:
            claims[path] += 1
    groups: list[tuple[int, FoldGroup]] = []
    for idx, desc, targets, n, r in found:
        r.terminals.sort(key=lambda t: t[2])  # evaluation order
        keep = [t for t in r.terminals if claims[t[0]] == 1]
        r.forbidden += [
            (t[1], f"{t[0]!r}, also scaled by another producer") for t in r.terminals if claims[t[0]] > 1
        ]
        paths = tuple(dict.fromkeys(t[0] for t in r.terminals))
        if not keep:
            groups.append((idx, FoldGroup(paths, False, r.forbidden[-1][1], desc)))
            continue
        touched = np.unique(np.concatenate([t[1] for t in keep]))
        hit = [why for ids, why in r.forbidden if np.intersect1d(np.unique(ids), touched).size]
        reason = f"a scaled channel also flows into {hit[0]}" if hit else None
        all_targets = targets + r.absorbed
        leaves = [p for p, _ in all_targets]
        if reason is None and any(not np.array_equal(t[1], keep[0][1]) for t in keep):
            reason = "the consumers read the channels in different orders"
        if reason is None and len(np.unique(keep[0][1])) != len(keep[0][1]):
            reason = "a consumer reads a channel more than once"
        if reason is None:
            shared = [p for p in leaves if leaves.count(p) > 1 or len(g.reads[p]) > 1]
            if shared:
                reason = f"params leaf {shared[0]!r} is also used elsewhere"
        if reason is not None:
            groups.append((idx, FoldGroup(paths, False, reason, desc)))
        else:
            groups.append((idx, FoldGroup(paths, True, None, desc, tuple(all_targets), keep[0][1], n)))
    groups.sort(key=lambda t: t[0])
    out = [grp for _, grp in groups]
    covered = {p for grp in out for p in grp.paths}
    for op in weight_ops(f, params, args, kwargs, ragged=True):
        if op.path not in covered:
            covered.add(op.path)
            out.append(FoldGroup((op.path,), False, _source(g, op.path)))
    return out
