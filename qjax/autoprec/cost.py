"""Cost models per (layer, candidate): bytes, bits, BOPs, analytical hardware time and
measured latency.

A *layer* is a params leaf read by at least one ``dot_general``/``conv_general_dilated``
of the model function (found by :func:`qjax.graph.find_ops`, so dataflow decides, not
names or shapes). MACs are counted from the jaxpr's shapes and dimension numbers, summed
over every execution of every op reading the leaf (:attr:`qjax.graph.OpInfo.count`: a
layer applied twice, each slice of a ``scan``-stacked leaf, each step of a ``scan`` or
static ``fori_loop``; a ``cond`` branch counts as if it ran, a ``while_loop`` body once).

* bytes: the stored size of the leaf as a ``QArray`` (packed values, scales, zero
  points; exactly :func:`qjax.footprint` of ``quantize_params``) or at its float dtype;
* bits: the ideal size, ``elements × format bits`` + scales (int3 counts 3 bits, though
  stored in nibbles);
* BOPs: ``MACs × weight bits × activation bits`` (float operands count their dtype's
  bits);
* time: ``MACs / speed`` of the candidate's compute format on a :class:`Hardware`;
* latency: seconds of each op of the layer run alone with the candidate on the current
  backend (``qjax.quantized`` execution), measured once and cached in a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.autoprec.hardware import Hardware
from qjax.graph.ops import OpInfo, find_ops, operand_channel_axes
from qjax.numerics.quantize import quantize
from qjax.numerics.spec import PER_TOKEN
from qjax.rules import RuleSet, leaves_with_paths

_PRIMITIVES = {"dot_general": lax.dot_general_p, "conv_general_dilated": lax.conv_general_dilated_p}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One quantizable layer: a params leaf read by matmuls/convs.

    Attributes:
      path: the leaf's path (the layer's identity; ``re.escape(path)`` is its rule).
      shape: the leaf's shape.
      dtype: the leaf's dtype name.
      macs: multiply-accumulates of all ops reading the leaf, per call of the function on
        the example arguments (each op times its ``count``).
      ops: the :class:`qjax.graph.OpInfo` of those ops, in evaluation order (identical
        ops once, with the number of times they run as ``count``).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    macs: int
    ops: tuple[OpInfo, ...]

    @property
    def size(self) -> int:
        """Number of weight elements."""
        return math.prod(self.shape)

    @property
    def float_bits(self) -> int:
        """Bits per element of the float leaf."""
        return jnp.dtype(self.dtype).itemsize * 8


def _operand_shapes(op: OpInfo) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if op.activation_shape is None:
        return None
    if op.weight_operand == 1:
        return op.activation_shape, op.weight_shape
    return op.weight_shape, op.activation_shape


def op_macs(op: OpInfo) -> int:
    """Multiply-accumulates of one op from its operand shapes and dimension numbers.

    ``dot_general``: batch × lhs-free × rhs-free × contracted sizes.
    ``conv_general_dilated``: output elements × (input features per group × kernel
    window). An op whose both operands are params leaves counts 0 (its other operand's
    shape is not recorded).

    Args:
      op: an :class:`qjax.graph.OpInfo` from :func:`qjax.graph.find_ops`.

    Returns:
      The MAC count (int).

    Raises:
      ValueError: another primitive (names the leaf).

    Example:
      >>> op_macs(find_ops(lambda p, x: x @ p["w"], {"w": w}, x)[0])   # x (4, 8), w (8, 3)
      96
    """
    shapes = _operand_shapes(op)
    if shapes is None:
        return 0
    lhs, rhs = shapes
    if op.primitive == "dot_general":
        (lc, rc), (lb, rb) = op.params["dimension_numbers"]
        batch = math.prod(lhs[d] for d in lb)
        contract = math.prod(lhs[d] for d in lc)
        lfree = math.prod(s for d, s in enumerate(lhs) if d not in set(lc) | set(lb))
        rfree = math.prod(s for d, s in enumerate(rhs) if d not in set(rc) | set(rb))
        return int(batch * contract * lfree * rfree)
    if op.primitive == "conv_general_dilated":
        out = jax.eval_shape(
            lambda a, b: lax.conv_general_dilated_p.bind(a, b, **op.params),
            jax.ShapeDtypeStruct(lhs, jnp.float32),
            jax.ShapeDtypeStruct(rhs, jnp.float32),
        )
        dn = op.params["dimension_numbers"]
        window = math.prod(rhs[d] for d in dn.rhs_spec[1:])  # input features per group × spatial
        return int(math.prod(out.shape) * window)
    raise ValueError(f"op_macs: unsupported primitive {op.primitive!r} (reading {op.path!r})")


def find_layers(
    f: Callable, params: Any, *args, paths: str | Sequence[str] | None = None, **kwargs
) -> tuple[Layer, ...]:
    """The quantizable layers of ``f(params, *args, **kwargs)`` in evaluation order.

    Args:
      f: the model function (Linen ``apply``, ``qjax.nnx_apply(graphdef)``, any function
        of a params pytree).
      params: float params.
      *args: example positional arguments (their shapes set the MACs; use a batch of one
        for per-example MACs).
      paths: regular expression(s) restricting the layers (default: every float leaf
        read by a matmul/conv).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      A tuple of :class:`Layer`.

    Raises:
      ValueError: a ``paths`` pattern matches no layer, or ``f`` reads no params leaf in a
        matmul/conv.

    Example:
      >>> [l.path for l in find_layers(model.apply, variables, x[:1])]
      ['params/Dense_0/kernel', 'params/Dense_1/kernel']
    """
    if isinstance(paths, str):
        paths = [paths]
    rules = None if paths is None else RuleSet([(p, True) for p in paths])
    leaves = dict(leaves_with_paths(params))
    by_path: dict[str, list[OpInfo]] = {}
    for op in find_ops(f, params, *args, **kwargs):
        leaf = leaves.get(op.path)
        if leaf is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        if rules is not None and rules.match(op.path) is None:
            continue
        by_path.setdefault(op.path, []).append(op)
    if rules is not None:
        unused = rules.unused(list(by_path))
        if unused:
            raise ValueError(f"find_layers: paths pattern(s) {unused} matched no matmul/conv weight")
    if not by_path:
        raise ValueError("find_layers: the function reads no float params leaf in a matmul/conv")
    out = []
    for path, ops in by_path.items():
        leaf = leaves[path]
        macs = sum(op_macs(op) * op.count for op in ops)
        out.append(Layer(path, tuple(np.shape(leaf)), jnp.dtype(leaf.dtype).name, macs, tuple(ops)))
    return tuple(out)


def _abstract_nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def layer_bytes(layer: Layer, candidate: Candidate) -> int:
    """Stored bytes of the layer's leaf with ``candidate`` (values, scales, zero points,
    packing), as :func:`qjax.footprint` would count them.

    Args:
      layer: a :class:`Layer`.
      candidate: a :class:`Candidate` (``"float"``: the leaf's own dtype).

    Returns:
      Bytes (int).

    Raises:
      ValueError: the candidate's weight spec does not fit the leaf (names the path).

    Example:
      >>> layer_bytes(layer, weight_candidates((4,))[0])   # (64, 32) int4 per channel
      1152
    """
    leaf = jax.ShapeDtypeStruct(layer.shape, jnp.dtype(layer.dtype))
    if candidate.weight is None:
        return _abstract_nbytes(leaf)
    why = candidate.fits(leaf)
    if why is not None:
        raise ValueError(f"layer {layer.path!r}: candidate {candidate.name!r} does not fit: {why}")
    return _abstract_nbytes(jax.eval_shape(lambda w: quantize(w, candidate.weight), leaf))


def layer_bits(layer: Layer, candidate: Candidate) -> int:
    """Ideal size in bits: ``elements × format bits`` plus the stored scales and zero
    points (8 bits per byte), as papers count model size; unlike :func:`layer_bytes` it
    ignores containers (int3 stored in nibbles costs 3 bits here, 4 in bytes).

    Args:
      layer: a :class:`Layer`.
      candidate: a :class:`Candidate` (``"float"``: the dtype's bits).

    Returns:
      Bits (int).

    Raises:
      ValueError: the candidate's weight spec does not fit the leaf (names the path).

    Example:
      >>> layer_bits(layer, weight_candidates((3,))[0])   # (64, 32) int3 + 32 f32 scales
      7168
    """
    if candidate.weight is None:
        return layer.size * layer.float_bits
    leaf = jax.ShapeDtypeStruct(layer.shape, jnp.dtype(layer.dtype))
    why = candidate.fits(leaf)
    if why is not None:
        raise ValueError(f"layer {layer.path!r}: candidate {candidate.name!r} does not fit: {why}")
    q = jax.eval_shape(lambda w: quantize(w, candidate.weight), leaf)
    side = _abstract_nbytes(q) - _abstract_nbytes(q.values)
    return layer.size * candidate.weight.bits + 8 * side


def layer_bops(layer: Layer, candidate: Candidate, *, act_bits: int = 32) -> int:
    """Bit operations ``MACs × weight bits × activation bits`` (float weights count
    their dtype's bits; float activations count ``act_bits``).

    Args:
      layer: a :class:`Layer` (its MACs are per call on the example arguments).
      candidate: a :class:`Candidate`.
      act_bits: bits of a float activation.

    Returns:
      BOPs (int). Never raises.

    Example:
      >>> layer_bops(layer, w8a8)   # == layer.macs * 64
    """
    return int(layer.macs * candidate.weight_bits(layer.float_bits) * candidate.act_bits(act_bits))


def layer_time(layer: Layer, candidate: Candidate, hardware: Hardware) -> float:
    """Analytical compute time in MAC units of the reference format:
    ``MACs / hardware.candidate_speed(candidate)``.

    Args:
      layer: a :class:`Layer`.
      candidate: a :class:`Candidate`.
      hardware: a :class:`qjax.autoprec.Hardware` (e.g. from :func:`detect_hardware`).

    Returns:
      Relative time (float). Never raises.

    Example:
      >>> layer_time(layer, w8a8, lookup("tpu-v5e")) == layer.macs / 2
      True
    """
    return layer.macs / hardware.candidate_speed(candidate)


# -- measured latency ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Measured seconds per (layer path, candidate name) on one backend.

    Attributes:
      seconds: ``{path: {candidate name: seconds per call}}``: all ops of the layer, each
        op's time less the dispatch overhead of a jitted call (clamped at 0), so layers
        add up.
      backend: ``"platform/device kind"`` the numbers were measured on.
      overhead_s: the dispatch time of one jitted call doing no work; a whole model's
        predicted latency is ``overhead_s + Σ seconds``.
    """

    seconds: Mapping[str, Mapping[str, float]]
    backend: str
    overhead_s: float = 0.0

    def get(self, path: str, name: str) -> float:
        """Seconds of layer ``path`` with candidate ``name``.

        Raises:
          KeyError: not measured (names both).

        Example:
          >>> measure_latency(layers, cands).get("params/Dense_0/kernel", "int8")
        """
        try:
            return self.seconds[path][name]
        except KeyError:
            raise KeyError(f"latency of layer {path!r} with candidate {name!r} was not measured") from None


def _backend() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}/{dev.device_kind}"


def _view_spec(layer: Layer, op: OpInfo, spec):
    """The weight spec for the weight as the op sees it: the candidate's own spec when
    the op reads the leaf unchanged, else one scale per op output channel."""
    if spec is None or op.weight_shape == layer.shape:
        return spec
    axes = operand_channel_axes(op.primitive, op.params, op.weight_operand, len(op.weight_shape))
    if op.primitive == "dot_general":
        (_, _), (lb, rb) = op.params["dimension_numbers"]
        batch = set(rb if op.weight_operand == 1 else lb)
        axes = tuple(a for a in axes if a not in batch)
    return spec.replace(channel_axes=axes, group_size=None, group_axis=None)


def _op_fn(op: OpInfo) -> Callable:
    prim = _PRIMITIVES[op.primitive]

    def fn(p, x):
        operands = [x, p["w"]] if op.weight_operand == 1 else [p["w"], x]
        return prim.bind(*operands, **op.params)

    return fn


def _time_many(fns: Mapping[str, Callable], *, repeats: int, target_s: float) -> dict[str, float]:
    """Best seconds per call of each zero-argument function, sampled round-robin (so a
    change in machine load hits every variant alike); each sample lasts >= ``target_s``."""
    inner = {}
    for k, fn in fns.items():
        jax.block_until_ready(fn())  # compile
        jax.block_until_ready(fn())
        t = time.perf_counter()
        jax.block_until_ready(fn())
        inner[k] = max(1, math.ceil(target_s / max(time.perf_counter() - t, 1e-7)))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner[k]):
                jax.block_until_ready(fn())
            best[k] = min(best[k], (time.perf_counter() - t) / inner[k])
    return best


def _op_callable(layer: Layer, op: OpInfo, candidate: Candidate) -> Callable | None:
    """A zero-argument jitted call of the op alone with ``candidate`` (``None``: nothing
    to time, the op reads no activation)."""
    from qjax.quant.calibrate import calibrate
    from qjax.quant.functions import quantized
    from qjax.quant.policy import Policy, Rule
    from qjax.quant.transforms import quantize_params

    if op.activation_shape is None:
        return None
    dtype = jnp.dtype(layer.dtype)
    kw, ka = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(kw, op.weight_shape, dtype)}
    x = jax.random.normal(ka, op.activation_shape, dtype)
    fn = _op_fn(op)
    if candidate.is_float:
        run = jax.jit(fn)
        return lambda: run(params, x)
    policy = Policy([Rule("w", weight=_view_spec(layer, op, candidate.weight), act=candidate.act)])
    stats = None
    act = candidate.act
    if act is not None and act.channel_axes is not PER_TOKEN and candidate.weight is not None:
        stats = calibrate(fn, policy, params, [(x,)])
    qparams = quantize_params(params, policy, act_stats=stats)
    run = jax.jit(quantized(fn, policy))
    return lambda: run(qparams, x)


def measure_latency(
    layers: Sequence[Layer],
    candidates: Sequence[Candidate],
    *,
    cache: str | Path | None = None,
    repeats: int = 5,
    target_s: float = 0.01,
) -> LatencyTable:
    """Microbenchmark every (layer, candidate) on the current backend.

    Each op of the layer runs alone under ``jax.jit`` on random operands of its traced
    shapes, float or through ``qjax.quantized`` with the candidate's specs (static
    activation scales calibrated on the random input); the candidates of one op are
    sampled round-robin and each time is the best of ``repeats`` samples of back-to-back
    calls lasting at least ``target_s`` each, less the
    dispatch overhead of a jitted call that does nothing, summed over the layer's ops, each
    times the number of times it runs (``OpInfo.count``: per layer of a ``scan`` stack,
    per step of a loop).
    Isolated ops do not see the fusion and layout choices XLA makes in the whole model:
    validate the sum against a whole-model timing. Results are cached in ``cache`` (JSON) keyed by backend, op
    (primitive, shapes, dimension numbers) and candidate specs, so a rerun measures only
    what is new. Candidates whose weight spec does not fit a layer are left out.

    Args:
      layers: from :func:`find_layers` (the example batch sets the operand shapes).
      candidates: the :class:`Candidate` list.
      cache: JSON file read and updated (created if missing); ``None``: no cache.
      repeats: timed samples per op.
      target_s: minimum seconds per sample.

    Returns:
      A :class:`LatencyTable`.

    Raises:
      ValueError: bad candidates; a cache file that is not a JSON object.

    Example:
      >>> lat = measure_latency(find_layers(model.apply, v, x[:64]), cands, cache="lat.json")
      >>> lat.get("params/Dense_0/kernel", "int8")
    """
    candidates = check_candidates(candidates)
    backend = _backend()
    path = None if cache is None else Path(cache)
    store: dict[str, float] = {}
    if path is not None and path.exists():
        store = json.loads(path.read_text() or "{}")
        if not isinstance(store, dict):
            raise ValueError(f"latency cache {str(path)!r} is not a JSON object")
    okey = f"{backend}|dispatch overhead"
    if okey not in store:
        noop = jax.jit(lambda x: x[:1])
        one = jnp.zeros((8,), jnp.float32)
        store[okey] = _time_many({"noop": lambda: noop(one)}, repeats=repeats, target_s=target_s)["noop"]
    overhead = store[okey]

    def op_key(layer: Layer, op: OpInfo, c: Candidate) -> str:
        fields = [op.primitive, op.weight_operand, op.weight_shape, op.activation_shape, layer.dtype]
        params = repr(sorted((k, repr(v)) for k, v in op.params.items()))
        return "|".join([backend, *map(str, fields), params, str(layer.shape == op.weight_shape), c.key()])

    seconds: dict[str, dict[str, float]] = {}
    for layer in layers:
        leaf = jax.ShapeDtypeStruct(layer.shape, jnp.dtype(layer.dtype))
        fitting = [c for c in candidates if c.fits(leaf) is None]
        for op in layer.ops:  # the candidates of one op are timed together, interleaved
            todo = {op_key(layer, op, c): c for c in fitting if op_key(layer, op, c) not in store}
            fns = {k: _op_callable(layer, op, c) for k, c in todo.items()}
            store.update({k: 0.0 for k, fn in fns.items() if fn is None})
            fns = {k: fn for k, fn in fns.items() if fn is not None}
            if fns:
                store.update(_time_many(fns, repeats=repeats, target_s=target_s))
        seconds[layer.path] = {
            c.name: sum(max(store[op_key(layer, op, c)] - overhead, 0.0) * op.count for op in layer.ops)
            for c in fitting
        }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(store, indent=1, sort_keys=True))
    return LatencyTable(seconds, backend, overhead)


def cost_matrices(
    layers: Sequence[Layer],
    candidates: Sequence[Candidate],
    *,
    act_bits: int = 32,
    hardware: Hardware | None = None,
    latency: LatencyTable | None = None,
) -> dict[str, np.ndarray]:
    """Cost of every (layer, candidate) as ``[layers, candidates]`` float arrays, ``inf``
    where the candidate does not fit the layer.

    Args:
      layers: from :func:`find_layers`.
      candidates: the :class:`Candidate` list.
      act_bits: bits of float activations in BOPs.
      hardware: adds ``"time"`` (:func:`layer_time`).
      latency: adds ``"latency"`` (seconds, from :func:`measure_latency`).

    Returns:
      ``{"bytes": ..., "bits": ..., "bops": ..., ["time": ...], ["latency": ...]}``.

    Raises:
      KeyError: ``latency`` lacks a (layer, candidate) that fits.

    Example:
      >>> c = cost_matrices(layers, cands); c["bytes"].shape
      (4, 4)
    """
    candidates = check_candidates(candidates)
    names = (
        ["bytes", "bits", "bops"]
        + (["time"] if hardware is not None else [])
        + (["latency"] if latency else [])
    )
    out = {n: np.full((len(layers), len(candidates)), np.inf) for n in names}
    for i, layer in enumerate(layers):
        leaf = jax.ShapeDtypeStruct(layer.shape, jnp.dtype(layer.dtype))
        for j, c in enumerate(candidates):
            if c.fits(leaf) is not None:
                continue
            out["bytes"][i, j] = layer_bytes(layer, c)
            out["bits"][i, j] = layer_bits(layer, c)
            out["bops"][i, j] = layer_bops(layer, c, act_bits=act_bits)
            if hardware is not None:
                out["time"][i, j] = layer_time(layer, c, hardware)
            if latency is not None:
                out["latency"][i, j] = latency.get(layer.path, c.name)
    return out
