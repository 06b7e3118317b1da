"""Measured latency per (layer, candidate): each op of a layer run alone with the candidate
on the current backend (``qjax.quantized`` execution), timed once and cached in a JSON file
(the other cost models and :func:`~qjax.autoprec.cost.cost_matrices`: :mod:`qjax.autoprec.cost`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from qjax.autoprec.candidates import Candidate, check_candidates
from qjax.autoprec.cost import Layer
from qjax.graph.ops import OpInfo, operand_channel_axes
from qjax.numerics.spec import PER_TOKEN

_PRIMITIVES = {"dot_general": lax.dot_general_p, "conv_general_dilated": lax.conv_general_dilated_p}


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
    return spec.replace(channel_axes=axes, group_size=None, group_axis=None, tile_size=None, tile_axis=None)


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
    from qjax.quant.policy import Policy, Rule
    from qjax.quant.serve import quantized
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
