"""Fixed-point inference of whole functions: ``fixed_point(f, rules)(params, x)``.

Rules (the qjax rule engine: ``re.fullmatch`` on leaf paths, first match wins) map a
params leaf to

* a :class:`LayerFormats` — the leaf is the weight of the matmuls/convolutions that read
  it (found by dataflow, :mod:`qjax.graph`): the weight is held in ``weight`` format, the
  other operand is cast to ``input``, the product is accumulated exactly in the derived
  integer accumulator (:func:`qjax.fixed.accumulator_format`) or, with ``accum``, in that
  format as hls4ml's ``accum_t`` (``nnet::dense_latency``: products cast to ``accum``, the
  accumulator initialised with the bias, partial sums cast to ``accum``), and cast to
  ``output``. With ``bias_in_accumulator`` (the default when ``accum`` is given) the
  params leaf an ``add`` adds to the op's result (a bias) is added inside the accumulator,
  before the one cast to ``output``; otherwise it is added to the cast result;
* a :class:`Format` — the leaf (a bias, a scale) is rounded onto that format and used
  where the function uses it;
* ``None`` or no match — the leaf and the ops reading it stay in float ("floats at the
  critical places").

``ops=`` rules (:class:`qjax.fixed.OpFormats`, matched against an op's name stack and
primitive, :mod:`qjax.fixed.elementwise`) give the layers that read no weight their hls4ml
types: merges (a residual ``add``, ``sub``, ``mul`` of two activations) compute exactly in
their input format and cast to ``output``; ``jax.nn.sigmoid`` / ``tanh`` become lookup
tables.

Between the ops the graph layer carries values as the function's float dtype. Every
value a fixed-point op emits is ``mantissa · 2^-F`` of a format of at most 24 bits
(checked), which float32 represents exactly, and every rounding happens in an integer
cast; so elementwise code between layers (bias add, ReLU, max pooling, reshapes) acts on
exact fixed-point values, and the next layer's ``input`` cast rounds their result exactly
as an integer pipeline would (bit-exactness against an integer reference is tested).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qjax.fixed import elementwise
from qjax.fixed.arith import add
from qjax.fixed.array import FixedArray, is_fixed, to_float
from qjax.fixed.cast import cast, from_float
from qjax.fixed.format import Format
from qjax.fixed.linalg import conv_general_dilated, dot_general
from qjax.graph.interpret import Handler, WeightRef, materialize, run, weight_operand
from qjax.graph.trace import trace
from qjax.rules import RuleSet, fold_in_path, is_box, leaves_with_paths, map_matched, path_str

FLOAT_MANTISSA_BITS = {  # significand bits (with the implicit one): integers this wide are exact
    jnp.dtype(jnp.bfloat16): 8,
    jnp.dtype(jnp.float16): 11,
    jnp.dtype(jnp.float32): 24,
    jnp.dtype(jnp.float64): 53,
}


@dataclasses.dataclass(frozen=True)
class LayerFormats:
    """The formats of one layer (the ops that read a params leaf as their weight).

    Args:
      weight: the weight's format.
      input: the format the other operand (the activation) is cast to.
      output: the format the exact accumulator is cast to; ``None`` keeps the accumulator
        (then it must fit the float carrier: at most 24 bits for float32).
      grad: training only (:func:`qjax.fixed.fake_fixed_point`): the format the gradient
        of the op's output is rounded to in the backward pass (use ``STOCHASTIC``
        rounding); ``None`` keeps float gradients.
      accum: inference only, ``dot_general`` (dense) layers only: the accumulator format
        (hls4ml's ``accum_t``, with its own rounding and overflow); ``None`` keeps the
        exact derived accumulator.
      bias_in_accumulator: add the bias (a params leaf that an ``add`` adds to the op's
        result) inside the accumulator, before the cast to ``output``, as hls4ml does;
        ``None`` means ``accum is not None``. With the exact accumulator the bias is
        added exactly (the bias leaf then needs a ``Format`` rule or a ``FixedArray``).

    Raises:
      TypeError: a field is not a :class:`Format` (or ``None`` where allowed), or
        ``bias_in_accumulator`` is not a bool or ``None``.
    """

    weight: Format
    input: Format
    output: Format | None = None
    grad: Format | None = None
    accum: Format | None = None
    bias_in_accumulator: bool | None = None

    def __post_init__(self):
        for name in ("weight", "input", "output", "grad", "accum"):
            v = getattr(self, name)
            if v is None and name in ("output", "grad", "accum"):
                continue
            if not isinstance(v, Format):
                raise TypeError(f"LayerFormats.{name} must be a qjax.fixed.Format, got {v!r}")
        if self.bias_in_accumulator not in (None, True, False):
            raise TypeError(
                f"LayerFormats.bias_in_accumulator must be a bool or None, got {self.bias_in_accumulator!r}"
            )

    @property
    def bias_inside(self) -> bool:
        """Whether the bias is added inside the accumulator (the resolved default)."""
        return self.accum is not None if self.bias_in_accumulator is None else self.bias_in_accumulator


def as_rules(rules) -> RuleSet:
    """A :class:`qjax.rules.RuleSet` from a ``RuleSet`` or ``(pattern, value)`` pairs,
    values checked.

    Raises:
      TypeError: a value is not a ``LayerFormats``, ``Format`` or ``None``.
    """
    rs = rules if isinstance(rules, RuleSet) else RuleSet(list(rules))
    for pattern, value in rs:
        if value is not None and not isinstance(value, (LayerFormats, Format)):
            raise TypeError(
                f"fixed-point rule {pattern!r}: the value must be a LayerFormats, a Format or None, "
                f"got {value!r}"
            )
    return rs


def fixed_params(params: Any, rules) -> Any:
    """Round the matched leaves of ``params`` onto their formats, as ``FixedArray``s.

    ``LayerFormats`` leaves get their ``weight`` format, ``Format`` leaves that format;
    the rest is unchanged. Deterministic rounding only (a ``STOCHASTIC`` format needs
    a key: use :func:`qjax.fixed.from_float` yourself).

    Returns:
      The same structure with ``FixedArray`` leaves (integer mantissas, no float copy).
    """
    rs = as_rules(rules)

    def visit(path, leaf, m):
        fmt = m.value.weight if isinstance(m.value, LayerFormats) else m.value
        return from_float(leaf, fmt) if not is_fixed(leaf) else cast(leaf, fmt)

    return map_matched(visit, params, rs)


def _carriers(params: Any, rs: RuleSet) -> tuple[Any, dict[str, FixedArray]]:
    """Float carriers for ``FixedArray`` leaves (their exact values) and ``Format``-matched
    float leaves rounded onto their format; ``{path: FixedArray}`` of the stored ones."""
    stored: dict[str, FixedArray] = {}

    def unit(kp, x):
        path = path_str(kp)
        if is_box(x):
            return jax.tree.map(lambda leaf: one(path, leaf), x, is_leaf=is_fixed)
        return one(path, x)

    def one(path, leaf):
        m = rs.match(path)
        value = None if m is None else m.value
        if is_fixed(leaf):
            if isinstance(value, Format) and leaf.format != value:
                leaf = cast(leaf, value)
            stored[path] = leaf
            dtype = jnp.float64 if leaf.format.width > 24 and jax.config.jax_enable_x64 else jnp.float32
            return to_float(leaf, dtype)
        if isinstance(value, Format):
            return to_float(from_float(leaf, value), jnp.asarray(leaf).dtype)
        return leaf

    tree = jax.tree_util.tree_map_with_path(unit, params, is_leaf=lambda x: is_fixed(x) or is_box(x))
    return tree, stored


def _carrier_check(fmt: Format, dtype, what: str) -> None:
    bits = FLOAT_MANTISSA_BITS.get(jnp.dtype(dtype))
    if bits is None or fmt.width > bits:
        raise ValueError(
            f"{what}: {fmt} is carried between ops as {jnp.dtype(dtype).name}, which holds at most "
            f"{bits or 0} bits exactly; choose an output format of at most {bits or 0} bits"
        )


def layer_rule(rs: RuleSet, path: str):
    """``(LayerFormats, match)`` for a weight path, or ``(None, match)``."""
    m = rs.match(path)
    if m is None or not isinstance(m.value, LayerFormats):
        return None, m
    return m.value, m


def where(path: str, m) -> str:
    rule = "" if m is None else f" (rule {m.index} {m.pattern!r})"
    return f"leaf {path!r}{rule}"


class OpsHandler(Handler):
    """The ``ops=`` rules of a fixed-point transform: which merges / activations they match
    (by ``"<name stack>/<primitive>"``), and the ops seen; :meth:`run_op` says what a
    matched op becomes (:func:`fixed_point`: exact, :func:`qjax.fixed.fake_fixed_point`:
    the same values with straight-through gradients)."""

    activation_primitives = elementwise.PRIMITIVES

    def __init__(self, ops: RuleSet, key):
        self.ops, self.key = ops, key
        self.op_names: list[str] = []  # the name stacks of the ops ``ops`` could match

    @property
    def visits_activation_ops(self) -> bool:
        return len(self.ops) > 0

    def run_op(self, primitive: str, fmts: elementwise.OpFormats, invals: list, dtype, key):
        return elementwise.apply(primitive, fmts, invals, dtype, key)

    def activation_op(self, eqn, invals, scope, emit):
        """A merge or an activation with an ``ops`` rule, in fixed point."""
        dtype = eqn.outvars[0].aval.dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            return None  # integer arithmetic (positions, indices) is not a layer
        name = f"{scope}/{eqn.primitive.name}" if scope else eqn.primitive.name
        self.op_names.append(name)
        m = self.ops.match(name)
        if m is None or m.value is None:
            return None
        _carrier_check(m.value.output, dtype, f"op {name!r} (ops rule {m.index} {m.pattern!r})")
        key = fold_in_path(self.key, f"{name}#{len(self.op_names)}")
        try:
            return [self.run_op(eqn.primitive.name, m.value, list(invals), dtype, key)]
        except ValueError as e:
            raise ValueError(f"op {name!r} (ops rule {m.index} {m.pattern!r}): {e}") from e

    def check_ops_used(self, what: str) -> None:
        """Refuse ``ops`` patterns that matched no op, listing the ops seen."""
        unused = self.ops.unused(self.op_names)
        if unused:
            seen = sorted(set(self.op_names))
            raise ValueError(f"{what}: ops pattern(s) {unused} match no op; the ops seen: {seen[:40]}")


class _FixedServe(OpsHandler):
    def __init__(self, rs: RuleSet, stored: dict[str, FixedArray], key, ops: RuleSet):
        super().__init__(ops, key)
        self.rs, self.stored = rs, stored
        self.pending: dict[int, tuple] = {}  # id(carrier) -> (carrier, finish, lf, what)

    def _weight(self, ref: WeightRef, fmt: Format) -> FixedArray | None:
        stored = self.stored.get(ref.path)
        if stored is not None and ref.depth == 0:
            w = stored if stored.format == fmt else cast(stored, fmt, key=fold_in_path(self.key, ref.path))
        else:
            if stored is not None and stored.format.width > FLOAT_MANTISSA_BITS[jnp.dtype(ref.leaf.dtype)]:
                raise ValueError(f"a stored {stored.format} scan slice is not exact in float")
            w = from_float(ref.float_leaf(), fmt, key=fold_in_path(self.key, ref.path))
        mant = w.mantissa
        for op in ref.ops:
            if op.primitive.name == "convert_element_type":
                if not jnp.issubdtype(op.params["new_dtype"], jnp.floating):
                    return None
                continue  # a float dtype change of the weight: the fixed value is kept
            mant = op.apply(mant)
        return FixedArray(mant, fmt)

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        lf, m = layer_rule(self.rs, ref.path)
        if lf is None:
            return None
        what = f"{where(ref.path, m)}, {eqn.primitive.name}"
        out_dtype = eqn.outvars[0].aval.dtype
        if lf.output is not None:
            _carrier_check(lf.output, out_dtype, what)
        p = eqn.params
        okey = fold_in_path(self.key, ref.path + ":out")
        try:
            w = self._weight(ref, lf.weight)
            if w is None:
                return None
            in_key = fold_in_path(self.key, ref.path + ":in")
            x = from_float(materialize(invals[1 - wi]), lf.input, key=in_key)
            ops = [x, w] if wi == 1 else [w, x]
            finish = self._contraction(eqn.primitive.name, ops, p, lf, okey)
            y = finish(None)
        except ValueError as e:
            named = str(e).startswith(eqn.primitive.name)  # accumulator errors name the op
            raise ValueError(f"{where(ref.path, m) if named else what}: {e}") from e
        if lf.output is None:
            _carrier_check(y.format, out_dtype, what + " (output=None keeps the accumulator)")
        carrier = to_float(y, out_dtype)
        if lf.bias_inside:
            self.pending[id(carrier)] = (carrier, finish, lf, what)
        return [carrier]

    @staticmethod
    def _contraction(name: str, ops, p, lf: LayerFormats, okey) -> Callable:
        """``finish(init)``: the op's result in ``lf.output``, the accumulator started at
        ``init`` (a bias ``FixedArray``, or ``None``)."""
        if name == "dot_general":
            return lambda init: dot_general(
                ops[0], ops[1], p["dimension_numbers"], lf.output, accum=lf.accum, init=init, key=okey
            )
        if lf.accum is not None:
            raise ValueError(
                "conv_general_dilated: LayerFormats.accum is implemented for dot_general (dense) "
                "layers only; leave accum=None (the exact accumulator) for convolutions"
            )
        keep = lf.bias_inside or lf.output is None
        acc = conv_general_dilated(
            ops[0],
            ops[1],
            p["window_strides"],
            p["padding"],
            p["lhs_dilation"],
            p["rhs_dilation"],
            p["dimension_numbers"],
            p["feature_group_count"],
            p["batch_group_count"],
            None if keep else lf.output,
            key=okey,
        )
        if not keep:
            return lambda init: acc
        return lambda init: _add_cast(acc, init, lf.output, okey)

    def other(self, eqn, invals, emit):
        """An ``add`` of a params leaf (a bias) to the result of an op whose
        ``LayerFormats`` puts the bias in the accumulator: the op's result recomputed with
        the accumulator started at the bias."""
        if eqn.primitive.name != "add" or len(invals) != 2:
            return None
        for bias, y in (invals, invals[::-1]):
            entry = self.pending.get(id(y))
            if isinstance(bias, WeightRef) and entry is not None and entry[0] is y:
                return [self._with_bias(bias, *entry[1:], eqn.outvars[0].aval.dtype)]
        return None

    def _with_bias(self, bias: WeightRef, finish, lf: LayerFormats, what: str, dtype):
        m = self.rs.match(bias.path)
        value = None if m is None else m.value
        stored = self.stored.get(bias.path)
        fmt = value if isinstance(value, Format) else (None if stored is None else stored.format)
        if fmt is None and lf.accum is None:
            raise ValueError(
                f"{what}: bias_in_accumulator adds the bias {where(bias.path, m)} exactly to the "
                "accumulator, so it needs a format: give that leaf a Format rule (or a FixedArray), "
                "or pass LayerFormats.accum"
            )
        b = self.materialize(bias)  # exact values of the bias format, layout ops applied
        try:
            y = finish(from_float(b, lf.accum if fmt is None else fmt))
        except ValueError as e:
            raise ValueError(f"{what}, bias {where(bias.path, m)}: {e}") from e
        if lf.output is None:
            _carrier_check(y.format, dtype, what + " (output=None keeps the accumulator)")
        return to_float(y, dtype)


def _add_cast(acc: FixedArray, init: FixedArray | None, fmt: Format | None, key) -> FixedArray:
    """``acc + init`` exactly (``init`` may be ``None``), then cast to ``fmt`` if given."""
    if init is not None:
        return add(acc, init, fmt, key=key)
    return acc if fmt is None else cast(acc, fmt, key=key)


def fixed_point(f: Callable, rules, *, ops=(), key=None) -> Callable:
    r"""``f`` with the matmuls/convs that read matched params run in fixed point.

    Args:
      f: any ``f(params, *args, **kwargs)`` (Linen ``apply``, an NNX split, a plain
        function); positional args are traced, keyword args static.
      rules: ``(pattern, LayerFormats | Format | None)`` pairs or a ``RuleSet``.
      ops: ``(pattern, OpFormats | None)`` pairs for the layers that read no weight
        (:mod:`qjax.fixed.elementwise`): ``pattern`` is matched (``re.fullmatch``, first
        match wins) against ``"<name stack>/<primitive>"`` of every ``add``, ``sub``,
        ``mul``, ``logistic`` and ``tanh`` of two activations (or an activation and a
        constant), e.g. ``r".*/residual/add"`` for adds under ``jax.named_scope("residual")``.
        Ops inside the functions a module calls (``jax.nn.gelu``, a LayerNorm) carry its
        name stack too: keep patterns precise (:mod:`qjax.fixed.elementwise`). Ops inside a
        ``custom_jvp`` / ``custom_vjp`` function (``jax.nn.relu``) are not seen.
      key: PRNG key, needed only if a format rounds ``STOCHASTIC``.

    Returns:
      ``g(params, *args, **kwargs)`` with ``f``'s outputs. ``params`` may hold float leaves
      (rounded on the fly) or ``FixedArray`` leaves (:func:`fixed_params`; their
      mantissas are used directly).

    Raises:
      ValueError: an accumulator too wide (naming the leaf and rule), an output format
        wider than the float carrier holds exactly; an ``ops`` pattern that matches no op
        (the message lists the op names seen).
      TypeError: an ``ops`` value that is not an ``OpFormats`` or ``None``.

    Example:
      >>> rules = [(r".*/kernel", LayerFormats(Format(8, 2), Format(8, 3), Format(12, 5))),
      ...          (r".*/bias", Format(12, 5))]
      >>> y = jax.jit(qjax.fixed.fixed_point(model.apply, rules))(variables, x)
    """
    rs, ops_rs = as_rules(rules), op_rules(ops)

    @functools.wraps(f)
    def g(params, *args, **kwargs):
        carriers, stored = _carriers(params, rs)
        traced = trace(f, carriers, *args, **kwargs)
        handler = _FixedServe(rs, stored, key, ops_rs)
        outs, _ = run(traced, handler, list(traced.param_leaves), jax.tree.leaves(args))
        handler.check_ops_used("fixed_point")
        return jax.tree.unflatten(traced.out_tree, outs)

    return g


def op_rules(ops) -> RuleSet:
    """``ops=`` pairs as a checked ``RuleSet``."""
    rs = ops if isinstance(ops, RuleSet) else RuleSet(list(ops))
    for pattern, value in rs:
        if value is not None and not isinstance(value, elementwise.OpFormats):
            raise TypeError(
                f"fixed_point ops rule {pattern!r}: the value must be an OpFormats or None, got {value!r}"
            )
    return rs


def unused_rules(rules, params: Any) -> list[str]:
    """Patterns that matched no leaf of ``params`` (first-match semantics)."""
    carriers, _ = _carriers(params, RuleSet([]))
    return as_rules(rules).unused([p for p, _ in leaves_with_paths(carriers)])
