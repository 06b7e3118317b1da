"""Per-primitive coupling rules for :mod:`qjax.graph.coupling`: a walk over a jaxpr that
unites the atoms of corresponding axes and flags atoms that cannot be pruned."""

from __future__ import annotations

import dataclasses

import numpy as np
from jax.extend import core as jcore

from qjax.graph._atoms import Atoms, Sum
from qjax.graph._primitives import scan_counts


@dataclasses.dataclass(frozen=True)
class Val:
    shape: tuple[int, ...]
    atoms: tuple[int, ...]
    z: tuple[bool, ...]  # masked channels along the axis are zero when the group is masked
    zero: bool = False  # the value is known to be all zeros (a literal 0)
    param: bool = False  # a params leaf, through layout ops and elementwise ops it spans


_ALL_ZERO = {"add", "sub", "add_any", "max", "min"}
_ANY_ZERO = {"mul", "and"}
_FIRST_ZERO = {"div", "rem"}
_UNARY_ZERO = {
    "neg", "abs", "sign", "sin", "tan", "tanh", "sqrt", "cbrt", "asin", "atan", "asinh",
    "atanh", "sinh", "erf", "expm1", "log1p", "round", "floor", "ceil", "square",
    "convert_element_type", "copy", "copy_p", "reduce_precision", "real", "imag", "conj",
    "stop_gradient", "pvary", "sharding_constraint", "mesh_cast", "reshard",
}  # fmt: skip
_NONZERO = {
    "exp", "exp2", "log", "logistic", "cos", "cosh", "rsqrt", "erfc", "erf_inv", "is_finite",
    "not", "acos", "acosh", "lgamma", "digamma", "pow", "atan2", "or", "xor", "eq", "ne", "lt",
    "le", "gt", "ge", "nextafter", "shift_left", "shift_right_logical",
    "shift_right_arithmetic", "clamp", "population_count", "clz", "tan", "igamma", "random_gamma_grad",
}  # fmt: skip
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
           "reduce_xor", "argmax", "argmin"}  # fmt: skip
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat2": "jaxpr", "checkpoint": "jaxpr"}  # fmt: skip
_RULES = {"transpose", "squeeze", "broadcast_in_dim", "reshape", "concatenate", "split", "slice",
          "dynamic_slice", "pad", "rev", "dynamic_update_slice", "iota", "optimization_barrier", "device_put",
          "dot_general", "conv_general_dilated", "scan", "while", "cond", "reduce_window_sum",
          "reduce_window_max", "reduce_window_min", "gather"}  # fmt: skip
_SPLIT_INNER = (
    "a non-leading sub-axis of a reshape split (its size is hard-coded in the model, e.g. "
    "head_dim; only the leading one, e.g. heads, shrinks)"
)
_FILLED_PART = (
    "a concatenated block filled from a constant (jnp.ones((B, k)), a broadcast): its size is "
    "fixed in the model and no producer's channels can be sliced"
)
_GROUPED = "whole feature groups of a grouped convolution (feature_group_count is fixed)"
_NOT_ZERO_CONTRACTED = "contracted where neither operand is zero on masked channels (masked != shrunk)"
_BETWEEN_ACTIVATIONS = (
    "contracted between two activations (attention scores q·kᵀ over head_dim): models scale "
    "such products by the axis's size (1/sqrt(head_dim)), which shrinking would change"
)


def _chunks(shape_in, shape_out):
    """Reshape chunks ``[(in_axes, out_axes)]`` with equal products (size-1 axes dropped)."""
    if 0 in shape_in or 0 in shape_out:
        return []
    ins = [i for i, s in enumerate(shape_in) if s != 1]
    outs = [i for i, s in enumerate(shape_out) if s != 1]
    chunks, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        ci, co = [ins[i]], [outs[j]]
        pi, po = shape_in[ins[i]], shape_out[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                ci.append(ins[i])
                pi, i = pi * shape_in[ins[i]], i + 1
            else:
                co.append(outs[j])
                po, j = po * shape_out[outs[j]], j + 1
        chunks.append((ci, co))
    return chunks


def _where(eqn) -> str:
    """`` at file:line`` of the user code that wrote ``eqn`` (empty when unknown)."""
    try:
        from jax._src import source_info_util  # private: the location is a courtesy

        frame = source_info_util.user_frame(eqn.source_info.traceback)
        where = f"{frame.file_name.rsplit('/', 1)[-1]}:{frame.start_line}"
        scope = str(eqn.source_info.name_stack)  # the module path (Linen / NNX scopes)
        return f" in {scope} ({where})" if scope else f" at {where}"
    except Exception:
        return ""


INEXACT = "inexact: "  # a flag that notes an approximation instead of blocking the group


class Walker:
    def __init__(self, inexact_norms: bool = False):
        self.inexact_norms = inexact_norms
        self.A = Atoms()
        self.splits: list[list[int]] = []  # atoms of the parts of each `split` primitive
        self.filled: set[int] = set()  # atoms a broadcast created (a fill: jnp.ones((B, 2)))

    def fresh(self, shape, *flags, z=False) -> Val:
        return Val(tuple(shape), tuple(self.A.new(s, *flags) for s in shape), (z,) * len(shape))

    def link(self, x: int, y: int) -> None:
        if x >= 0 and y >= 0:
            self.A.unify(self.A.expand(x), self.A.expand(y))

    def flag(self, val: Val, reason: str, axes=None) -> None:
        for k in range(len(val.shape)) if axes is None else axes:
            self.A.flag(self.A.expand(val.atoms[k]), reason)

    def read(self, env, v) -> Val:
        if isinstance(v, jcore.Literal):
            arr = np.asarray(v.val)
            zero = arr.dtype != object and bool(np.all(arr == 0))
            atoms = tuple(self.A.new(s, "a literal array") for s in arr.shape)
            return Val(arr.shape, atoms, (zero,) * arr.ndim, zero)
        return env[v]

    def run(self, jaxpr, consts, args) -> list[Val]:
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, val in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = val
        return [self.read(env, v) for v in jaxpr.outvars]

    def closed(self, sub, args) -> list[Val]:
        if hasattr(sub, "consts"):
            consts = [self.fresh(np.shape(c), "a closed-over constant") for c in sub.consts]
            return self.run(sub.jaxpr, consts, args)
        return self.run(sub, [], args)

    def eqn(self, eqn, ins) -> list[Val]:
        name = eqn.primitive.name
        shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        if name in _ALL_ZERO or name in _UNARY_ZERO or name == "select_n":
            return [self.elementwise(ins, shapes[0], "cases" if name == "select_n" else "all")]
        if name in _ANY_ZERO or name in _FIRST_ZERO:
            return [self.elementwise(ins, shapes[0], "any" if name in _ANY_ZERO else "first")]
        if name == "integer_pow":
            return [self.elementwise(ins, shapes[0], "all" if eqn.params["y"] > 0 else "none")]
        if name in _NONZERO:
            return [self.elementwise(ins, shapes[0], "none")]
        if name in _CALLS:
            return self.closed(eqn.params[_CALLS[name]], ins)
        rule = getattr(self, "p_" + name, None) if name in _RULES else None
        if rule is not None:
            return rule(eqn, ins, shapes)
        if name in _REDUCE:
            return [self.reduce(ins[0], eqn.params["axes"], name, shapes[0], _where(eqn))]
        if name in _CUMULATIVE:
            self.flag(ins[0], f"accumulated along by {name}", [eqn.params["axis"]])
            return [ins[0]]
        return self.unmodeled(name, ins, shapes)

    def unmodeled(self, name, ins, shapes) -> list[Val]:
        reason = f"passes through {name!r}, which channel coupling does not model"
        for v in ins:
            self.flag(v, reason)
        return [self.fresh(s, reason) for s in shapes]

    def elementwise(self, ins, shape, mode) -> Val:
        atoms, zs = [], []
        for k, size in enumerate(shape):
            part = [v for v in ins if len(v.shape) == len(shape) and v.shape[k] == size and size > 1]
            if not part:
                atoms.append(-1)
                zs.append(False)
                continue
            for v in part[1:]:
                self.link(part[0].atoms[k], v.atoms[k])
            atoms.append(part[0].atoms[k])
            bcast = [v for v in ins if all(v is not p for p in part)]
            if mode == "all":
                z = all(v.z[k] for v in part) and all(v.zero for v in bcast)
            elif mode == "cases":
                z = all(v.z[k] if any(v is p for p in part) else v.zero for v in ins[1:])
            elif mode == "any":
                z = any(v.z[k] for v in part) or any(v.zero for v in bcast)
            elif mode == "first":
                z = ins[0].z[k] if any(ins[0] is p for p in part) else ins[0].zero
            else:
                z = False
            zs.append(z)
        zero = all(v.zero for v in ins) if mode == "all" else mode == "any" and any(v.zero for v in ins)
        # a weight stays a weight through casts and elementwise ops it spans (w * mask,
        # w / norm(w), W + A @ B), not through ops it is broadcast into (a bias add)
        param = any(v.param and v.shape == tuple(shape) for v in ins)
        return Val(tuple(shape), tuple(atoms), tuple(zs), zero, param)

    def reduce(self, x: Val, axes, name, shape, where: str = "") -> Val:
        if self.inexact_norms and name == "reduce_sum":
            reason = (
                f"{INEXACT}summed over by reduce_sum{where}: shrunk, the sum runs over the kept channels only"
            )
        else:
            reason = f"reduced over by {name} (e.g. a norm's mean or a softmax over channels)"
        self.flag(x, reason, axes)
        keep = [k for k in range(len(x.shape)) if k not in axes]
        z = name not in ("argmax", "argmin")
        return Val(tuple(shape), tuple(x.atoms[k] for k in keep), tuple(x.z[k] and z for k in keep))

    # -- layout ---------------------------------------------------------------------------
    def p_transpose(self, eqn, ins, shapes):
        (x,), perm = ins, eqn.params["permutation"]
        return [Val(shapes[0], tuple(x.atoms[p] for p in perm), tuple(x.z[p] for p in perm), x.zero, x.param)]

    def p_squeeze(self, eqn, ins, shapes):
        x, dims = ins[0], {d % len(ins[0].shape) for d in eqn.params["dimensions"]}
        keep = [k for k in range(len(x.shape)) if k not in dims]
        return [Val(shapes[0], tuple(x.atoms[k] for k in keep), tuple(x.z[k] for k in keep), x.zero, x.param)]

    def p_broadcast_in_dim(self, eqn, ins, shapes):
        """New and stretched axes follow what they meet: implicit broadcasting takes its
        shape from the partner (a scalar in ``jnp.where(h > 0, h, 0.)``, a ``(B, 1, T, T)``
        causal mask over heads). A size hard-coded in the model fails loudly after shrinking
        (a shape mismatch where it meets the shrunk axis), never silently."""
        x, shape, dims = ins[0], shapes[0], eqn.params["broadcast_dimensions"]
        out = self.fresh(shape, z=x.zero)
        atoms, zs = list(out.atoms), list(out.z)
        self.filled.update(a for a in atoms if a >= 0)
        for i, d in enumerate(dims):
            if x.shape[i] == shape[d]:
                atoms[d], zs[d] = x.atoms[i], x.z[i]
        return [Val(shape, tuple(atoms), tuple(zs), x.zero)]

    def _only_filled(self, atom: int) -> bool:
        """Whether ``atom``'s class so far holds only broadcast-created atoms: a block whose
        size the model hard-codes, with no producer that shrinking could slice."""
        if atom < 0 or atom not in self.filled:  # the class holds atom itself: a quick no
            return False
        r = self.A.find(atom)
        if self.A.split[r] is not None:
            return False
        return all(i in self.filled for i in range(len(self.A.parent)) if self.A.find(i) == r)

    def p_reshape(self, eqn, ins, shapes):
        x, shape = ins[0], shapes[0]
        if eqn.params.get("dimensions") is not None:
            return self.unmodeled("reshape with dimensions", ins, shapes)
        out = self.fresh(shape)
        A = self.A
        A.unify(*(tuple(f for a in v.atoms for f in A.expand(a)) for v in (x, out)))
        zs = [x.zero] * len(shape)
        for ci, co in _chunks(x.shape, shape):
            for n, k in enumerate(co):
                zs[k] = all(x.z[i] for i in ci)
                if n > 0:
                    A.flag(A.expand(out.atoms[k]), _SPLIT_INNER)
        return [Val(shape, out.atoms, tuple(zs), x.zero, x.param)]

    def p_concatenate(self, eqn, ins, shapes):
        d, shape = eqn.params["dimension"], shapes[0]
        for v in ins:  # a part broadcast from a constant keeps its size however the rest shrinks
            if self._only_filled(v.atoms[d]):
                self.flag(v, _FILLED_PART, [d])
        out = self.elementwise([self._drop(v, d) for v in ins], (*shape[:d], 1, *shape[d + 1 :]), "all")
        atom = self.A.new(shape[d])
        parts = Sum(self.A.expand(v.atoms[d]) for v in ins if v.shape[d] > 0)
        if atom >= 0:
            self.A.unify(self.A.expand(atom), (parts,))
        z = all(v.z[d] for v in ins)
        # a concatenation of weights (fused gates ``concatenate([w_i, w_f, w_g, w_o], 1)``) is a
        # weight: each part's channels keep their slice of the concatenated axis (the Sum atom)
        param = all(v.param for v in ins if v.shape[d] > 0)
        return [dataclasses.replace(out, atoms=_put(out.atoms, d, atom), z=_put(out.z, d, z), shape=shape,
                                    param=param)]  # fmt: skip

    def p_split(self, eqn, ins, shapes):
        x, d = ins[0], eqn.params["axis"]
        outs = [self.fresh(s) for s in shapes]
        if x.atoms[d] >= 0:
            self.A.unify(self.A.expand(x.atoms[d]), (Sum(self.A.expand(o.atoms[d]) for o in outs),))
        self.splits.append([o.atoms[d] for o in outs])
        return [dataclasses.replace(o, atoms=_put(x.atoms, d, o.atoms[d]), z=x.z) for o in outs]

    @staticmethod
    def _drop(v: Val, d: int) -> Val:
        return Val((*v.shape[:d], 1, *v.shape[d + 1 :]), _put(v.atoms, d, -1), v.z, v.zero)

    def _passthrough(self, ins, shapes, full, what):
        x, out = ins[0], self.fresh(shapes[0], f"{what} along it")
        atoms = list(out.atoms)
        for k, keep in enumerate(full):
            if keep:
                atoms[k] = x.atoms[k]
            else:
                self.flag(x, f"{what} along it", [k])
        return [Val(shapes[0], tuple(atoms), x.z, x.zero)]

    def p_slice(self, eqn, ins, shapes):
        p, shape = eqn.params, ins[0].shape
        strides = p["strides"] or (1,) * len(shape)
        bounds = zip(p["start_indices"], p["limit_indices"], shape, strides)
        full = [s == 0 and e == n and st == 1 for s, e, n, st in bounds]
        return self._passthrough(ins, shapes, full, "sliced")

    def p_gather(self, eqn, ins, shapes):
        """A lookup of whole slices (``jnp.take(table, ids, axis=0)``, an embedding): the
        operand axes sliced whole pass through to the output's offset axes; the indexed or
        partly sliced ones are gathered (flagged), the output's batch axes follow the
        indices'."""
        x, idx = ins[0], ins[1]
        dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
        taken = {*dn.collapsed_slice_dims, *dn.start_index_map, *dn.operand_batching_dims}
        whole = [k for k in range(len(x.shape)) if k not in taken and sizes[k] == x.shape[k]]
        self.flag(
            x,
            "gathered along (indexed or sliced by a gather)",
            [k for k in range(len(x.shape)) if k not in whole],
        )
        kept = [
            k
            for k in range(len(x.shape))
            if k not in dn.collapsed_slice_dims and k not in dn.operand_batching_dims
        ]
        out = self.fresh(shapes[0])
        atoms, zs = list(out.atoms), [False] * len(shapes[0])
        for pos, k in zip(dn.offset_dims, kept):
            if k in whole:
                atoms[pos], zs[pos] = x.atoms[k], x.z[k]
        batch = [pos for pos in range(len(shapes[0])) if pos not in dn.offset_dims]
        for pos, k in zip(batch, range(len(idx.shape) - 1)):  # the index vector is the last axis
            self.link(atoms[pos], idx.atoms[k])
        return [Val(shapes[0], tuple(atoms), tuple(zs), x.zero)]

    def p_dynamic_slice(self, eqn, ins, shapes):
        full = [a == b for a, b in zip(ins[0].shape, shapes[0])]
        return self._passthrough(ins, shapes, full, "dynamically sliced")

    def p_pad(self, eqn, ins, shapes):
        full = [tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]]
        return self._passthrough(ins, shapes, full, "padded")

    def p_rev(self, eqn, ins, shapes):
        dims = eqn.params["dimensions"]
        return self._passthrough(ins, shapes, [k not in dims for k in range(len(shapes[0]))], "reversed")

    def p_dynamic_update_slice(self, eqn, ins, shapes):
        x, upd = ins[0], ins[1]
        for k, (a, b) in enumerate(zip(x.shape, upd.shape)):
            if a == b:
                self.link(x.atoms[k], upd.atoms[k])
            else:
                self.flag(x, "updated in a slice along it", [k])
                self.flag(upd, "updated in a slice along it", [k])
        return [Val(x.shape, x.atoms, tuple(False for _ in x.z))]

    def p_reduce_window_sum(self, eqn, ins, shapes):
        """Pooling: channel axes (window 1, stride 1, no padding or dilation) pass through."""
        p = eqn.params
        per_axis = zip(p["window_dimensions"], p["window_strides"], p["padding"], p["base_dilation"],
                       p["window_dilation"])  # fmt: skip
        full = [(w, s, tuple(pad), b, d) == (1, 1, (0, 0), 1, 1) for w, s, pad, b, d in per_axis]
        return self._passthrough(ins, shapes, full, f"pooled by {eqn.primitive.name}")

    p_reduce_window_max = p_reduce_window_min = p_reduce_window_sum

    def p_iota(self, eqn, ins, shapes):
        return [self.fresh(shapes[0], "created with a fixed size by iota")]

    def p_optimization_barrier(self, eqn, ins, shapes):
        return list(ins)

    p_device_put = p_optimization_barrier

    # -- contractions ---------------------------------------------------------------------
    def p_dot_general(self, eqn, ins, shapes):
        lhs, rhs = ins[0], ins[1]
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for i, j in zip(lc, rc):
            self.link(lhs.atoms[i], rhs.atoms[j])
            if not (lhs.z[i] or rhs.z[j] or lhs.zero or rhs.zero):
                self.flag(lhs, _NOT_ZERO_CONTRACTED, [i])
            if not (lhs.param or rhs.param):
                self.flag(lhs, _BETWEEN_ACTIVATIONS, [i])
        atoms, zs = [], []
        for i, j in zip(lb, rb):
            self.link(lhs.atoms[i], rhs.atoms[j])
            atoms.append(lhs.atoms[i] if lhs.atoms[i] >= 0 else rhs.atoms[j])
            zs.append(lhs.z[i] or rhs.z[j])
        for v, skip in ((lhs, (*lc, *lb)), (rhs, (*rc, *rb))):
            for k in range(len(v.shape)):
                if k not in skip:
                    atoms.append(v.atoms[k])
                    zs.append(v.z[k])
        return [Val(shapes[0], tuple(atoms), tuple(zs), lhs.zero or rhs.zero)]

    def p_conv_general_dilated(self, eqn, ins, shapes):
        lhs, rhs, p = ins[0], ins[1], eqn.params
        dn = p["dimension_numbers"]
        out = self.fresh(shapes[0])
        (ln, lf, *lsp), (ro, ri, *rsp), (on, of, *osp) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        if p["batch_group_count"] != 1:
            return self.unmodeled("conv_general_dilated with batch_group_count > 1", ins, shapes)
        spatial = "a convolution's spatial/window axis"
        self.flag(lhs, spatial, lsp)
        self.flag(rhs, spatial, rsp)
        self.flag(out, spatial, osp)
        A, g = self.A, p["feature_group_count"]
        per_in, n_out = rhs.shape[ri], rhs.shape[ro]
        if g == 1:
            gin, gout, grp = rhs.atoms[ri], rhs.atoms[ro], -1
        else:
            grp, gin, gout = A.new(g), A.new(per_in), A.new(n_out // g)
            A.unify(A.expand(lhs.atoms[lf]), (*A.expand(grp), *A.expand(gin)))
            A.unify(A.expand(rhs.atoms[ro]), (*A.expand(grp), *A.expand(gout)))
            self.link(gin, rhs.atoms[ri])
            if per_in > 1:
                A.flag(A.expand(grp), _GROUPED)
        if g == 1:
            self.link(lhs.atoms[lf], gin)
        if per_in > 1 and not (lhs.z[lf] or rhs.z[ri]):
            self.flag(rhs, _NOT_ZERO_CONTRACTED, [ri])
        self.link(out.atoms[of], rhs.atoms[ro])
        self.link(out.atoms[on], lhs.atoms[ln])
        zs = [False] * len(shapes[0])
        zs[of] = rhs.z[ro] or (g > 1 and lhs.z[lf])
        return [Val(shapes[0], out.atoms, tuple(zs))]

    # -- control flow ---------------------------------------------------------------------
    def _carry_loop(self, body, consts, init, xs=()):
        carry = [dataclasses.replace(v, z=(False,) * len(v.shape), zero=False) for v in init]
        outs = self.closed(body, [*consts, *carry, *xs])
        for a, b in zip(carry, outs):
            for k in range(len(a.shape)):
                self.link(a.atoms[k], b.atoms[k])
        return carry, outs[len(carry) :]

    def p_scan(self, eqn, ins, shapes):
        p = eqn.params
        nc, nk = scan_counts(p)
        consts, init, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]
        scanned = "the scanned (stacked-layer) axis of a scan"
        for v in xs:
            self.flag(v, scanned, [0])
        x_slices = [Val(v.shape[1:], v.atoms[1:], v.z[1:], v.zero, v.param) for v in xs]
        carry, ys = self._carry_loop(p["jaxpr"], consts, init, x_slices)
        outs = []
        for y, s in zip(ys, shapes[nk:]):
            outs.append(Val(s, (self.A.new(s[0], scanned), *y.atoms), (False, *y.z)))
        return [*carry, *outs]

    def p_while(self, eqn, ins, shapes):
        p = eqn.params
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, init = ins[:nc], ins[nc : nc + nb], ins[nc + nb :]
        carry, _ = self._carry_loop(p["body_jaxpr"], body_consts, init)
        self.closed(p["cond_jaxpr"], [*cond_consts, *carry])
        return carry

    def p_cond(self, eqn, ins, shapes):
        branches = [self.closed(b, ins[1:]) for b in eqn.params["branches"]]
        outs = []
        for vals in zip(*branches):
            for v in vals[1:]:
                for k in range(len(v.shape)):
                    self.link(vals[0].atoms[k], v.atoms[k])
            z = tuple(all(v.z[k] for v in vals) for k in range(len(vals[0].shape)))
            outs.append(Val(vals[0].shape, vals[0].atoms, z))
        return outs


def _put(t: tuple, i: int, value) -> tuple:
    return (*t[:i], value, *t[i + 1 :])
