"""Pruning schedules: which steps update the masks, and to what sparsity.

A schedule is a frozen dataclass and a function of the step, like an optax schedule:
``schedule(step)`` returns the target sparsity as a ``jnp`` float scalar and works with a
traced integer step (``jax.jit``, ``lax.scan``). ``schedule.is_update(step)`` says whether
the masks are recomputed at ``step``; ``schedule.effective(step)`` is the sparsity the masks
hold after the update of ``step`` (a step function: the value at the last update step, ``0``
before the first one). Steps count optimizer updates from ``0``.

* :func:`one_shot` prunes once, at ``step``, to the target.
* :func:`periodic` re-prunes every ``every`` steps from ``start`` to ``end`` (both included),
  at a constant target (a fixed-sparsity re-selection, or the drop/regrow updates of
  dynamic sparse training: :class:`qjax.prune.dst.SET`, :class:`qjax.prune.dst.RigL`).
* :func:`polynomial` is gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to
  prune"): ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n Δt))**3`` updated every ``Δt``
  steps between ``begin = t0`` and ``end = t0 + n Δt``.

``one_shot`` and ``periodic`` have no target of their own: :func:`qjax.prune.sparsify.sparsify`
fills it from the pruner's ``sparsity`` (``schedule.with_target(pruner.sparsity)``); calling a
target-less schedule directly raises an error. Pass ``target=`` to use one on its own.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["OneShot", "Periodic", "Polynomial", "Schedule", "one_shot", "periodic", "polynomial"]


def _int(name: str, where: str, value: Any, minimum: int = 0) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: `{name}` must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValueError(f"{where}: `{name}` must be >= {minimum}, got {v}")
    return v


def _fraction(name: str, where: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: `{name}` must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0):  # also rejects NaN
        raise ValueError(f"{where}: `{name}` must be in [0, 1], got {value!r}")
    return v


def _float_dtype():
    return jnp.result_type(float)  # float64 under jax_enable_x64, else float32


def _step(step: Any) -> jax.Array:
    return jnp.asarray(step, dtype=jnp.int32 if not jax.config.jax_enable_x64 else jnp.int64)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Base class of pruning schedules (see the module docstring).

    Subclasses implement ``_value(step)`` (the sparsity as a function of the step) and
    ``_last_update(step)`` (the last update step ``<= step``, ``-1`` if none).

    Attributes:
      target: the final sparsity in ``[0, 1]``, or ``None`` to take the pruner's.
    """

    target: float | None = None

    def _name(self) -> str:
        return type(self).__name__.lower().replace("oneshot", "one_shot")

    def _target(self) -> float:
        if self.target is None:
            raise ValueError(
                f"{self._name()} schedule has no target sparsity: pass target=... or use it through "
                "qjax.prune.sparsify, which fills it from pruner.sparsity"
            )
        return self.target

    def with_target(self, target: float) -> Schedule:
        """A copy with ``target`` set (checked to lie in ``[0, 1]``).

        Raises:
          ValueError: ``target`` outside ``[0, 1]``.
        """
        return dataclasses.replace(self, target=_fraction("target", self._name(), target))

    def __call__(self, step: Any) -> jax.Array:
        """The target sparsity at ``step`` (a ``jnp`` float scalar; ``step`` may be traced).

        Under ``jax.jit`` the value may differ from eager evaluation by one ulp (XLA may
        contract the final multiply-add into an FMA).

        Raises:
          ValueError: the schedule has no target.
        """
        return self._value(_step(step))

    def is_update(self, step: Any) -> jax.Array:
        """Whether the masks are recomputed at ``step`` (a ``jnp`` bool scalar)."""
        s = _step(step)
        return self._last_update(s) == s

    def effective(self, step: Any) -> jax.Array:
        """The sparsity the masks hold after the update of ``step``: the value at the last
        update step ``<= step``, ``0`` before the first update.

        Raises:
          ValueError: the schedule has no target.
        """
        s = _step(step)
        last = self._last_update(s)
        return jnp.where(last >= 0, self._value(jnp.maximum(last, 0)), jnp.zeros((), _float_dtype()))

    def update_steps(self, until: int) -> list[int]:
        """The update steps in ``[0, until)`` as Python ints (for inspection and tests)."""
        raise NotImplementedError

    # subclass hooks
    def _value(self, step: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def _last_update(self, step: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def last_step(self) -> int | None:
        """The last update step, or ``None`` if updates never stop."""
        return None


@dataclasses.dataclass(frozen=True)
class OneShot(Schedule):
    """Prune once, at ``step``, to the target (see :func:`one_shot`)."""

    step: int = 0

    def _value(self, step):
        return jnp.where(step >= self.step, jnp.asarray(self._target(), _float_dtype()), 0.0)

    def _last_update(self, step):
        return jnp.where(step >= self.step, self.step, -1)

    @property
    def last_step(self) -> int | None:
        return self.step

    def update_steps(self, until: int) -> list[int]:
        return [self.step] if self.step < until else []


@dataclasses.dataclass(frozen=True)
class Periodic(Schedule):
    """Re-prune every ``every`` steps at a constant target (see :func:`periodic`)."""

    every: int = 1
    start: int = 0
    end: int | None = None

    def _value(self, step):
        return jnp.where(step >= self.start, jnp.asarray(self._target(), _float_dtype()), 0.0)

    def _last_update(self, step):
        t = step if self.end is None else jnp.minimum(step, self.end)
        last = self.start + (t - self.start) // self.every * self.every
        return jnp.where(step >= self.start, last, -1)

    @property
    def last_step(self) -> int | None:
        return self.end

    def update_steps(self, until: int) -> list[int]:
        stop = until if self.end is None else min(until, self.end + 1)
        return list(range(self.start, stop, self.every))


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """Gradual pruning ``s_f + (s_i - s_f)(1 - (t - begin)/(end - begin))**power`` (see
    :func:`polynomial`)."""

    begin: int = 0
    end: int = 1
    every: int = 1
    power: float = 3.0
    initial: float = 0.0

    def _value(self, step):
        dt = _float_dtype()
        # multiply by the reciprocal: XLA turns a division by a constant into this under jit
        inv = jnp.asarray(1.0 / (self.end - self.begin), dt)
        frac = jnp.clip((step - self.begin).astype(dt) * inv, 0.0, 1.0)
        s_f, s_i = jnp.asarray(self._target(), dt), jnp.asarray(self.initial, dt)
        base = 1.0 - frac
        if float(self.power).is_integer():  # same multiplications eager and under jit
            decay = jax.lax.integer_pow(base, int(self.power))
        else:
            decay = base**self.power
        return s_f + (s_i - s_f) * decay

    def _last_update(self, step):
        t = jnp.minimum(step, self.end)
        last = self.begin + (t - self.begin) // self.every * self.every
        last = jnp.where(step >= self.end, self.end, last)
        return jnp.where(step >= self.begin, last, -1)

    @property
    def last_step(self) -> int | None:
        return self.end

    def update_steps(self, until: int) -> list[int]:
        steps = list(range(self.begin, min(until, self.end + 1), self.every))
        if self.end < until and (not steps or steps[-1] != self.end):
            steps.append(self.end)
        return steps


def one_shot(step: int = 0, *, target: float | None = None) -> OneShot:
    """Prune once, at ``step``, to the target sparsity.

    ``schedule(t)`` is ``0`` before ``step`` and the target from ``step`` on; the only update
    step is ``step``.

    Args:
      step: the (0-based) optimizer step at which the masks are computed.
      target: the sparsity; ``None`` (default) takes the pruner's inside ``sparsify``.

    Returns:
      A :class:`OneShot` schedule.

    Raises:
      TypeError: ``step`` is not an integer. ValueError: ``step < 0``, ``target`` outside
      ``[0, 1]``.

    Example:
      >>> s = one_shot(10, target=0.9)
      >>> round(float(s(9)), 6), round(float(s(10)), 6), bool(s.is_update(10)), bool(s.is_update(11))
      (0.0, 0.9, True, False)
    """
    sched = OneShot(step=_int("step", "one_shot", step))
    return sched if target is None else sched.with_target(target)


def periodic(every: int, start: int = 0, end: int | None = None, *, target: float | None = None) -> Periodic:
    """Recompute the masks every ``every`` steps at a constant target sparsity.

    Update steps are ``start, start + every, ...`` up to ``end`` (included; ``None``: no end).
    ``schedule(t)`` is ``0`` before ``start`` and the target from ``start`` on. Use it for
    iterative re-selection at a fixed sparsity and for the drop/regrow updates of dynamic
    sparse training (e.g. ``periodic(100, start=100, end=75_000)`` with ``RigL``).

    Args:
      every: the number of steps between updates (``> 0``).
      start: the first update step (``>= 0``).
      end: the last step at which an update may happen (``> start``), or ``None``.
      target: the sparsity; ``None`` (default) takes the pruner's inside ``sparsify``.

    Returns:
      A :class:`Periodic` schedule.

    Raises:
      TypeError: a step argument is not an integer. ValueError: ``every <= 0``,
      ``start < 0``, ``end <= start``, ``target`` outside ``[0, 1]`` (the message names the
      argument).

    Example:
      >>> periodic(3, start=2, end=9, target=0.5).update_steps(12)
      [2, 5, 8]
    """
    every = _int("every", "periodic", every, minimum=1)
    start = _int("start", "periodic", start)
    if end is not None:
        end = _int("end", "periodic", end)
        if end <= start:
            raise ValueError(f"periodic: `end` ({end}) must be greater than `start` ({start})")
    sched = Periodic(every=every, start=start, end=end)
    return sched if target is None else sched.with_target(target)


def polynomial(
    target: float, begin: int, end: int, every: int, power: float = 3, *, initial: float = 0.0
) -> Polynomial:
    """Gradual magnitude pruning schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin))**power`` for ``t`` in
    ``[begin, end]``, ``s_i`` before ``begin`` and ``s_f`` after ``end``. Masks are updated
    at ``begin, begin + every, ...`` and at ``end`` (so the target is always reached, also
    when ``end - begin`` is not a multiple of ``every``); before ``begin`` the masks are
    dense, after ``end`` they stay fixed.

    Args:
      target: final sparsity ``s_f`` in ``[0, 1]``.
      begin: first update step ``t0`` (``>= 0``).
      end: last update step ``t0 + n Δt`` (``> begin``).
      every: update interval ``Δt`` (``> 0``).
      power: exponent (3 in the paper; ``> 0``).
      initial: initial sparsity ``s_i`` in ``[0, 1]`` (default ``0``).

    Returns:
      A :class:`Polynomial` schedule.

    Raises:
      TypeError: a step argument is not an integer. ValueError: ``target``/``initial``
      outside ``[0, 1]``, ``begin < 0``, ``end <= begin``, ``every <= 0``, ``power <= 0``
      (the message names the argument).

    Example:
      >>> s = polynomial(0.8, begin=0, end=100, every=10)
      >>> round(float(s(50)), 4)
      0.7
      >>> s.update_steps(35)
      [0, 10, 20, 30]
    """
    where = "polynomial"
    target = _fraction("target", where, target)
    initial = _fraction("initial", where, initial)
    begin = _int("begin", where, begin)
    end = _int("end", where, end)
    if end <= begin:
        raise ValueError(f"polynomial: `end` ({end}) must be greater than `begin` ({begin})")
    every = _int("every", where, every, minimum=1)
    try:
        power = float(power)
    except (TypeError, ValueError):
        raise TypeError(f"polynomial: `power` must be a number, got {power!r}") from None
    if not (power > 0 and math.isfinite(power)):
        raise ValueError(f"polynomial: `power` must be a positive finite number, got {power!r}")
    return Polynomial(target=target, begin=begin, end=end, every=every, power=power, initial=initial)
