"""Batch norms in inference form and the conv/dense output channels they normalize.

:func:`batchnorm_sites` reads ``f(params, *args)`` with the graph of :mod:`qjax.graph.fold`
(the same flattened jaxpr, params views through layout ops, and channel identities carried
by index arrays) and finds every normalization of the form of Flax's batch norm (Linen
``nn.BatchNorm``, NNX ``nnx.BatchNorm``)::

    (x - mean) * (rsqrt(var + eps) [* scale]) [+ bias]

It is a batch norm **in inference form** when ``mean`` and ``var`` are params leaves
(running statistics) and ``eps`` is a literal of the program. It **folds** into the op that
computes ``x`` when that op is a ``conv_general_dilated`` (kernel as right operand) or a
``dot_general`` reading a params kernel, and only layout ops (transpose, reshape, cast,
broadcast...) and per-channel params biases (the conv's own bias) lie between them, every
intermediate value used once (so no residual, no nonlinearity, no other reader of the
conv's output), the kernel read by that op only, and the batch norm's leaves each read once
and matching the kernel's output channels one to one. Grouped and depthwise convolutions
fold like any other (the factor is per output channel).

A normalization whose statistics are computed by a reduction over the batch axis (axis 0)
is a batch norm in training mode: it is reported as not foldable. Other normalizations
(LayerNorm, RMSNorm, GroupNorm: statistics per example) are not batch norms and are not
reported. Ops inside ``scan``/``cond``/``while``/``shard_map`` bodies are not seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from qjax.graph._fold_ids import _Lit, _to_rank, _transfer
from qjax.graph.fold import _Graph, meet
from qjax.graph.layout import LAYOUT_PRIMITIVES
from qjax.graph.trace import trace

_FORM = "not of the form (x - mean) * (rsqrt(var + eps) [* scale]) [+ bias] with params leaves"
_TRAINING = (
    "a batch norm in training mode (statistics of the batch, not running averages): trace "
    "apply_fn in inference mode (use_running_average=True / train=False / model.eval())"
)

_KERNEL = "a conv/dense reading a params kernel"
Leaf = tuple[str, np.ndarray]  # (leaf path, the channel of each leaf element)


@dataclasses.dataclass(frozen=True, eq=False)
class BatchNormSite:
    """One batch norm of ``f`` and the conv/dense it folds into.

    Attributes:
      name: the batch norm's module path: the parent of its ``mean`` leaf
        (``"batch_stats/BatchNorm_0"``, ``"bn"``), else of its ``scale``/``bias`` leaf.
      foldable: whether it folds into ``kernel``.
      reason: why not (names the op or leaf), else ``None``.
      kernel: ``(path, ids)``: ``ids`` broadcasts to the kernel leaf and gives the output
        channel of each element.
      mean, var, scale, bias: ``(path, ids)`` of the batch norm's leaves (``ids``: the
        kernel output channel of each element, leaf-shaped); ``scale``/``bias`` are
        ``None`` when it has none.
      conv_biases: ``(path, ids)`` of params added between the kernel's op and the batch
        norm (the conv's bias).
      eps: the literal added to ``var``, in the dtype the program adds it in.
      num_channels: the kernel's output channels.
    """

    name: str
    foldable: bool
    reason: str | None = None
    kernel: Leaf | None = None
    mean: Leaf | None = None
    var: Leaf | None = None
    scale: Leaf | None = None
    bias: Leaf | None = None
    conv_biases: tuple[Leaf, ...] = ()
    eps: np.ndarray | None = None
    num_channels: int = 0

    def __repr__(self) -> str:
        how = f"folds into {self.kernel[0]!r}" if self.foldable else f"not foldable: {self.reason}"
        return f"BatchNormSite({self.name!r}, {how})"


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else path


def _meet(g: _Graph, key: int, ids: np.ndarray, vids: np.ndarray | None = None) -> np.ndarray | None:
    """The channel of each element of the params leaf viewed by ``key`` (``vids``: its ids
    where it meets ``ids``, default the view's own), or ``None`` if untrackable."""
    vids = g.ids(key) if vids is None else vids
    return None if vids is None else meet(vids, g.views[key].leaf_shape, ids)


def _one_to_one(leaf_ids: np.ndarray | None, n: int) -> bool:
    """Every element meets one channel and every channel one element."""
    if leaf_ids is None or (leaf_ids < 0).any():
        return False
    return bool((np.bincount(leaf_ids.ravel(), minlength=n) == 1).all())


def _batch_reduced(g: _Graph, key) -> bool:
    """Whether ``key`` is computed from a reduction over axis 0 of a rank >= 2 value that
    keeps some axis (a batch statistic, not a per-example one)."""
    seen, work = set(), [key]
    while work:
        k = work.pop()
        if not isinstance(k, int) or k in seen or k not in g.producer:
            continue
        seen.add(k)
        node = g.nodes[g.producer[k]]
        if node.prim in ("reduce_sum", "reduce_max", "reduce_min"):
            rank, axes = len(node.in_shapes[0]), set(node.params["axes"])
            if rank >= 2 and 0 in axes and len(axes) < rank:
                return True
            continue
        work.extend(node.ins)
    return False


def _multiplier(g: _Graph, key: int, ids: dict):
    """From the output of ``rsqrt``: follow its single uses through layout ops and ``mul``
    by params leaves (the scale) to the ``mul`` with an activation. Returns ``(apply node
    index, activation operand, {role: ids at the multiplier}, [scale view keys])`` or the
    reason it has another form."""
    scales = []
    while True:
        if len(g.uses[key]) != 1 or key in g.outputs:
            return "its multiplier rsqrt(var + eps) is also used elsewhere"
        idx, pos = g.uses[key][0]
        node = g.nodes[idx]
        other = node.ins[1 - pos] if len(node.ins) == 2 else None
        if node.prim in LAYOUT_PRIMITIVES and pos == 0:
            ids = {r: _transfer(node, v) for r, v in ids.items()}
            if any(v is None for v in ids.values()):
                return f"{node.prim!r} mixes the channels of its multiplier"
        elif node.prim == "mul" and isinstance(other, int) and other in g.views:
            vids = g.ids(other)
            if vids is None or scales:
                return _FORM
            scales.append(other)
            ndim = len(node.out_shapes[0])
            ids = {r: _to_rank(v, ndim) for r, v in ids.items()} | {"scale": _to_rank(vids, ndim)}
        elif node.prim == "mul" and isinstance(other, int):
            return idx, other, ids, scales
        else:
            return _FORM
        key = node.outs[0]


def _chain(g: _Graph, key: int):
    """Back from the batch norm's input to the op reading a kernel: ``(op index, [node
    indices from that op's output to ``key``])`` or the reason there is none."""
    steps = []
    while True:
        if len(g.uses[key]) != 1 or key in g.outputs:
            return "the conv/dense output is also used elsewhere (folding would change that use)"
        if key in g.views or key not in g.producer:
            return "its input is a params leaf or an argument of the function, not a conv/dense output"
        idx = g.producer[key]
        node = g.nodes[idx]
        if g.weight_operand(node) is not None:
            return idx, steps[::-1]
        acts = [x for x in node.ins if isinstance(x, int) and x not in g.views]
        if node.prim in LAYOUT_PRIMITIVES and node.ins[0] in acts:
            key = node.ins[0]
        elif node.prim == "add" and len(acts) == 1 and all(isinstance(x, int) for x in node.ins):
            key = acts[0]  # + a params leaf: the conv's bias
        else:
            what = " (e.g. a residual)" if node.prim in ("add", "sub") else ""
            return f"its input comes from {node.prim!r}{what}, not directly from {_KERNEL}"
        steps.append(idx)


def _kernel_channels(g: _Graph, node):
    """``(path, output ids, kernel leaf ids, n)`` of the op reading a kernel, or a reason."""
    wi = g.weight_operand(node)
    view = g.views[node.ins[wi]]
    if node.prim == "dot_general":
        found = g.matmul_channels(node)
        return found or f"kernel {view.path!r} reaches its matmul through reshapes or batch axes"
    if wi != 1 or view.leaf_axes is None:
        return f"kernel {view.path!r} is not the convolution's plain right operand"
    dn = node.params["dimension_numbers"]
    axis = view.leaf_axes[dn.rhs_spec[0]]
    n = view.leaf_shape[axis]
    out = np.arange(n).reshape([n if d == dn.out_spec[1] else 1 for d in range(len(node.out_shapes[0]))])
    leaf = np.arange(n).reshape([n if d == axis else 1 for d in range(len(view.leaf_shape))])
    return view.path, out, leaf, n


def _added_leaf(g: _Graph, apply_idx: int) -> int | None:
    """The params view added to the normalized value (the batch norm's bias, if any) when
    that value's only use is that ``add``, else ``None``."""
    out = g.nodes[apply_idx].outs[0]
    if len(g.uses[out]) != 1 or out in g.outputs:
        return None
    idx, pos = g.uses[out][0]
    other = g.nodes[idx].ins[1 - pos] if len(g.nodes[idx].ins) == 2 else None
    ok = g.nodes[idx].prim == "add" and isinstance(other, int) and other in g.views
    return other if ok else None


def _inference_site(g: _Graph, var_key: int, eps: np.ndarray, rsqrt_idx: int) -> BatchNormSite:
    name = _parent(g.views[var_key].path)
    rsqrt = g.nodes[rsqrt_idx]
    if g.ids(var_key) is None:
        return BatchNormSite(name, False, _FORM)
    found = _multiplier(g, rsqrt.outs[0], {"var": _to_rank(g.ids(var_key), len(rsqrt.out_shapes[0]))})
    if isinstance(found, str):
        return BatchNormSite(name, False, found)
    apply_idx, centered, m_ids, scales = found
    sub = g.nodes[g.producer[centered]] if centered in g.producer else None
    if sub is None or sub.prim != "sub" or not isinstance(sub.ins[1], int) or sub.ins[1] not in g.views:
        return BatchNormSite(name, False, _FORM)
    mean_key = sub.ins[1]
    name = _parent(g.views[mean_key].path)
    if len(g.uses[centered]) != 1 or centered in g.outputs:
        return BatchNormSite(name, False, "its centred input x - mean is also used elsewhere")
    chain = _chain(g, sub.ins[0])
    if isinstance(chain, str):
        return BatchNormSite(name, False, chain)
    op_idx, steps = chain
    found = _kernel_channels(g, g.nodes[op_idx])
    if isinstance(found, str):
        return BatchNormSite(name, False, found)
    kpath, ids, kernel_ids, n = found
    if len(g.reads[kpath]) > 1:
        return BatchNormSite(name, False, f"kernel {kpath!r} is read by several ops (a shared kernel)")
    leaves: dict[str, list[tuple[int, np.ndarray | None]]] = {"conv_biases": []}
    for s in steps:  # forward from the kernel's op to the batch norm's input
        node = g.nodes[s]
        if node.prim == "add":
            vk = next(x for x in node.ins if x in g.views)
            leaves["conv_biases"].append((vk, _meet(g, vk, ids)))
            ids = _to_rank(ids, len(node.out_shapes[0]))
        else:
            ids = _transfer(node, ids)
            if ids is None:
                return BatchNormSite(
                    name, False, f"{node.prim!r} between {kpath!r} and the batch norm mixes channels"
                )
    leaves["mean"] = [(mean_key, _meet(g, mean_key, ids))]
    leaves["var"] = [(var_key, _meet(g, var_key, ids, m_ids["var"]))]
    if scales:
        leaves["scale"] = [(scales[0], _meet(g, scales[0], ids, m_ids["scale"]))]
    bias = _added_leaf(g, apply_idx)
    if bias is not None:
        bias_ids = _meet(g, bias, ids)
        if _one_to_one(bias_ids, n):  # else a later add, not the batch norm's own bias
            leaves["bias"] = [(bias, bias_ids)]
    resolved: dict[str, list[Leaf]] = {}
    for role, entries in leaves.items():
        for key, leaf_ids in entries:
            path = g.views[key].path
            if not _one_to_one(leaf_ids, n):
                why = f"params leaf {path!r} does not match the output channels of {kpath!r} one to one"
                return BatchNormSite(name, False, why)
            if len(g.reads[path]) > 1:
                return BatchNormSite(name, False, f"params leaf {path!r} is also used elsewhere")
            resolved.setdefault(role, []).append((path, leaf_ids))
    one = {r: v[0] for r, v in resolved.items() if r != "conv_biases"}
    biases = tuple(resolved.get("conv_biases", ()))
    kernel = (kpath, kernel_ids)
    return BatchNormSite(name, True, None, kernel, conv_biases=biases, eps=eps, num_channels=n, **one)


def _site(g: _Graph, rsqrt_idx: int) -> BatchNormSite | None:
    key = g.nodes[rsqrt_idx].ins[0]
    add = g.nodes[g.producer[key]] if isinstance(key, int) and key in g.producer else None
    if add is None or add.prim != "add":
        return None
    lits = [x for x in add.ins if isinstance(x, _Lit)]
    others = [x for x in add.ins if isinstance(x, int)]
    if len(lits) != 1 or len(others) != 1 or np.size(lits[0].val) != 1:
        return None
    eps, var = np.asarray(lits[0].val).reshape(()), others[0]
    if var in g.views:
        return _inference_site(g, var, eps, rsqrt_idx)
    if not _batch_reduced(g, var):
        return None  # a per-example norm (LayerNorm, RMSNorm, GroupNorm)
    found = _multiplier(g, g.nodes[rsqrt_idx].outs[0], {})
    name = f"a normalization (op {rsqrt_idx})"
    if not isinstance(found, str):  # named by its scale leaf, else its bias leaf
        leaf = found[3][0] if found[3] else _added_leaf(g, found[0])
        name = name if leaf is None else _parent(g.views[leaf].path)
    return BatchNormSite(name, False, _TRAINING)


def batchnorm_sites(f, params: Any, *args, **kwargs) -> list[BatchNormSite]:
    """The batch norms of ``f(params, *args, **kwargs)`` and whether each folds into the
    conv/dense that computes its input (see the module doc).

    Args:
      f: ``f(params, *args, **kwargs)`` (Linen ``apply``, ``qjax.nnx_apply``, plain).
      params: the params pytree (Linen variables with ``batch_stats``, an NNX state).
      *args: example positional arguments (only shapes and dtypes matter).
      **kwargs: static keyword arguments of ``f`` (e.g. ``train=False``).

    Returns:
      One :class:`BatchNormSite` per batch norm, in evaluation order.

    Example:
      >>> batchnorm_sites(model.apply, variables, x)
      [BatchNormSite('batch_stats/BatchNorm_0', folds into 'params/Conv_0/kernel')]
    """
    g = _Graph(trace(f, params, *args, **kwargs))
    sites = [_site(g, i) for i, node in enumerate(g.nodes) if node.prim == "rsqrt"]
    return [s for s in sites if s is not None]
