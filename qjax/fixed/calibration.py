"""Choosing fixed-point formats from calibration statistics.

The integer bits come from the observed range (the smallest ``I`` whose range covers the
largest magnitude seen), the fraction bits from the width (``F = W - I``).
:func:`collect_ranges` runs a function over calibration batches and records, for every
matmul/conv that reads a params leaf, the largest magnitude of its weight, its input and
its output; :func:`calibrate_formats` turns them into fixed-point rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.fixed.format import MAX_EXPONENT, Format
from qjax.fixed.network import LayerFormats, weight_operand
from qjax.graph.interpret import Handler, bind_eqn, materialize, run
from qjax.graph.trace import trace
from qjax.rules import leaves_with_paths


def integer_bits(amax: float, signed: bool = True) -> int:
    """The fewest integer bits ``I`` whose range strictly exceeds ``amax``:
    ``2^(I-1) > amax`` (signed) or ``2^I > amax`` (unsigned). Strict, so that a calibrated
    maximum that is an exact power of two (pixels scaled to [0, 1]) does not overflow.
    ``amax == 0`` (an all-zero tensor: a zero-initialised layer, a dead feature) has no
    scale to follow: it gets the range ``[-1, 1)`` (``I = 1``; unsigned ``[0, 1)``,
    ``I = 0``), as a value just below 1 would, so its fraction bits ``W - I`` stay
    ordinary and products with it stay within the 126 fraction bits allowed.

    Raises:
      ValueError: ``amax`` negative or not finite.
    """
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"the observed range must be a finite non-negative number, got {amax}")
    if amax == 0:
        return 1 if signed else 0
    _, exp = math.frexp(amax)  # 2^(exp-1) <= amax < 2^exp
    return exp + (1 if signed else 0)


def format_for_range(
    amax: float,
    width: int,
    *,
    signed: bool = True,
    rounding: str = "RND_CONV",
    overflow: str = "SAT",
) -> Format:
    """The ``width``-bit format covering ``[-amax, amax]`` (or ``[0, amax]``) with the most
    fraction bits.

    Args:
      amax: the largest magnitude observed.
      width: total bits.
      signed: two's complement or unsigned.
      rounding, overflow: the modes of the result.

    Returns:
      ``Format(width, I)`` with ``I`` from :func:`integer_bits`, clamped to the allowed
      ``[width - 126, 126]``.
    """
    i = integer_bits(amax, signed)
    i = max(min(i, MAX_EXPONENT), width - MAX_EXPONENT)
    return Format(width, i, signed, rounding, overflow)


@dataclasses.dataclass(frozen=True)
class OpRange:
    """Largest magnitudes seen by the ops that read one params leaf (over all batches and
    every read of the leaf); ``input_min`` tells whether the input was ever negative."""

    weight: float
    input: float
    output: float
    input_min: float


class _Ranges(Handler):
    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None:
            return None
        ref = invals[wi]
        args = [materialize(v) for v in invals]
        (y,) = bind_eqn(eqn, args)
        x = args[1 - wi]
        w = args[wi]
        # ranges, then whether weight / input / output hold a NaN or inf (an untaken cond
        # branch emits NaN for all seven: "not executed")
        bad = [jnp.any(~jnp.isfinite(v)) for v in (w, x, y)]
        stats = jnp.stack(
            [jnp.max(jnp.abs(w)), jnp.max(jnp.abs(x)), jnp.max(jnp.abs(y)), jnp.min(x), *bad]
        ).astype(jnp.float32)
        emit(ref.path, stats)
        return [y]


def collect_ranges(f: Callable, params: Any, batches: Iterable, **kwargs) -> dict[str, OpRange]:
    """Run ``f`` on calibration batches and record, per params leaf read by a
    matmul/conv, the largest |weight|, |input| and |output|.

    Args:
      f: ``f(params, *args, **kwargs)``.
      params: float params.
      batches: iterable of positional-argument tuples (a bare array means ``(array,)``).
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``{path: OpRange}``. An op that never ran (only in untaken ``cond`` branches) has
      NaN ranges; one that ran in some batches has the ranges of those.

    Raises:
      ValueError: no batches; a weight, input or output holding NaN or inf (names the
        leaf, the role and the batch).
    """

    def one(params, args):
        traced = trace(f, params, *args, **kwargs)
        return run(traced, _Ranges(), list(traced.param_leaves), jax.tree.leaves(args))[1]

    step = jax.jit(one)
    acc: dict[str, np.ndarray] = {}
    n = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        stats = {
            p: np.concatenate([np.asarray(x).reshape(-1, 7) for x in vs])
            for p, vs in step(params, args).items()
        }
        bad = [b for p, v in stats.items() if (b := _non_finite(p, np.fmax.reduce(v[:, 4:], axis=0)))]
        if bad:
            raise ValueError(
                f"collect_ranges: calibration batch {n} gives NaN or inf to the ops reading leaves "
                f"{', '.join(bad)} (NaN/inf inputs, or a diverged model): their ranges would be meaningless"
            )
        for path, v in stats.items():
            if path in acc:
                v = np.concatenate([v[:, :4], acc[path][None]])
            # fmax / fmin skip the NaN of reads in untaken cond branches
            acc[path] = np.concatenate([np.fmax.reduce(v[:, :3], axis=0), np.fmin.reduce(v[:, 3:4], axis=0)])
        n += 1
    if n == 0:
        raise ValueError("collect_ranges needs at least one batch")
    return {p: OpRange(float(v[0]), float(v[1]), float(v[2]), float(v[3])) for p, v in acc.items()}


def _non_finite(path: str, bad: np.ndarray) -> str | None:
    """``"'path' (input, output)"`` naming the roles whose flags are set, else ``None``."""
    roles = [r for r, b in zip(("weight", "input", "output"), bad) if b > 0]
    return f"{path!r} ({', '.join(roles)})" if roles else None


@jax.custom_vjp
def _tap(y, probe):
    return y


def _tap_fwd(y, probe):
    return y, None


def _tap_bwd(_, g):
    return g, jnp.max(jnp.abs(g)).astype(jnp.float32)


_tap.defvjp(_tap_fwd, _tap_bwd)


class _GradTaps(Handler):
    """Evaluates each op in float and passes its output through ``_tap``: the gradient
    with respect to the op's probe is the largest |gradient| of the op's output."""

    def __init__(self, probes):
        self.probes = probes

    def target(self, eqn, invals, emit):
        wi = weight_operand(invals)
        if wi is None or invals[wi].path not in self.probes:
            return None
        (y,) = bind_eqn(eqn, [materialize(v) for v in invals])
        return [_tap(y, self.probes[invals[wi].path])]


def collect_grad_ranges(
    f: Callable, params: Any, batches: Iterable, loss: Callable, **kwargs
) -> dict[str, float]:
    """The largest |gradient| of each matmul/conv output over calibration batches (what a
    gradient format must cover in fixed-point training).

    Args:
      f: ``f(params, x, **kwargs)``.
      params: float params.
      batches: iterable of ``(x, *targets)`` tuples.
      loss: ``loss(f(params, x), *targets) -> scalar``.
      **kwargs: static keyword arguments of ``f``.

    Returns:
      ``{path: largest |d loss / d output|}`` (an op read several times: the sum of the
      per-read maxima, an upper bound).

    Raises:
      ValueError: no batches.
    """
    from qjax.graph.ops import find_ops

    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("collect_grad_ranges needs at least one batch")
    paths = sorted({op.path for op in find_ops(f, params, first[0], **kwargs)})

    def tapped(probes, params, x, targets):
        traced = trace(f, params, x, **kwargs)
        out = run(traced, _GradTaps(probes), list(traced.param_leaves), [x])[0]
        return loss(jax.tree.unflatten(traced.out_tree, out), *targets)

    step = jax.jit(jax.grad(tapped))
    probes = {p: jnp.zeros((), jnp.float32) for p in paths}
    best = dict.fromkeys(paths, 0.0)
    for batch in (first, *batches):
        g = step(probes, params, batch[0], tuple(batch[1:]))
        best = {p: max(best[p], float(g[p])) for p in paths}
    return best


def calibrate_formats(
    ranges: dict[str, OpRange],
    width: int,
    *,
    weight_width: int | None = None,
    input_width: int | None = None,
    output_width: int | None = None,
    grad: Format | None = None,
    grad_ranges: dict[str, float] | None = None,
    grad_width: int | None = None,
    rounding: str = "RND_CONV",
    overflow: str = "SAT",
    params: Any = None,
    leaf_patterns: Iterable[str] = (),
    leaf_width: int | None = None,
) -> list[tuple[str, Any]]:
    """Fixed-point rules from calibration ranges: one ``LayerFormats`` per op leaf, with
    integer bits from the observed range and fraction bits from the width.

    Args:
      ranges: from :func:`collect_ranges`.
      width: default total bits of weight, input and output formats.
      weight_width, input_width, output_width: override ``width`` per role.
      grad: the gradient format for training (copied into every ``LayerFormats``).
      grad_ranges: per-op largest |gradient| (:func:`collect_grad_ranges`): each op then
        gets a ``grad_width``-bit ``STOCHASTIC``/``SAT`` gradient format covering it
        (instead of ``grad``).
      grad_width: total bits of those gradient formats (default ``width``).
      rounding, overflow: modes of every format.
      params: the params, needed with ``leaf_patterns``.
      leaf_patterns: patterns of other leaves (e.g. ``r".*/bias"``) that get a ``Format``
        rule from their own largest magnitude.
      leaf_width: total bits of those leaves (default ``output_width or width``).

    Returns:
      ``[(re.escape(path), LayerFormats | Format), ...]`` for :func:`qjax.fixed.fixed_point`.
      An op whose input was never negative gets an unsigned input format.

    Raises:
      ValueError: ``leaf_patterns`` without ``params``; a NaN, infinite or negative
        range (names the leaf and the role: weight, input, output, gradient).
    """
    ww, iw, ow = weight_width or width, input_width or width, output_width or width
    rules: list[tuple[str, Any]] = []
    for path, r in ranges.items():
        op_grad = grad
        if grad_ranges is not None and path in grad_ranges:
            gw = grad_width or width
            op_grad = _named_format(
                path, "gradient", grad_ranges[path], gw, rounding="STOCHASTIC", overflow="SAT"
            )
        fmts = LayerFormats(
            weight=_named_format(path, "weight", r.weight, ww, rounding=rounding, overflow=overflow),
            input=_named_format(
                path, "input", r.input, iw, signed=r.input_min < 0, rounding=rounding, overflow=overflow
            ),
            output=_named_format(path, "output", r.output, ow, rounding=rounding, overflow=overflow),
            grad=op_grad,
        )
        rules.append((re.escape(path), fmts))
    patterns = [re.compile(p) for p in leaf_patterns]
    if patterns:
        if params is None:
            raise ValueError("calibrate_formats: leaf_patterns needs params=")
        lw = leaf_width or ow
        for path, leaf in leaves_with_paths(params):
            if path in ranges or not any(p.fullmatch(path) for p in patterns):
                continue
            amax = float(jnp.max(jnp.abs(jnp.asarray(leaf)))) if jnp.size(leaf) else 0.0
            rules.append(
                (re.escape(path), _named_format(path, "leaf", amax, lw, rounding=rounding, overflow=overflow))
            )
    return rules


def _named_format(path: str, role: str, amax: float, width: int, **kw) -> Format:
    """:func:`format_for_range`, its errors naming the leaf and the role of the range."""
    try:
        return format_for_range(amax, width, **kw)
    except ValueError as err:
        why = " (NaN: the op never ran in the calibration batches, e.g. only in an untaken cond branch)"
        raise ValueError(
            f"calibrate_formats: leaf {path!r}, {role} range: {err}{why if math.isnan(float(amax)) else ''}"
        ) from None
