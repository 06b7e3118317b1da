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
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.autoprec.hardware import Hardware
from qjax.graph.ops import OpInfo, find_ops
from qjax.numerics.quantize import quantize
from qjax.rules import RuleSet, leaves_with_paths

if TYPE_CHECKING:  # latency imports Layer from here
    from qjax.autoprec.latency import LatencyTable


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
