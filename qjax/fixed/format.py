"""Fixed-point formats with ``ap_fixed<W, I, Q, O>`` semantics.

A :class:`Format` is static metadata: total width ``W`` (bits), integer bits ``I``
(the sign bit included for signed formats), signedness, a rounding mode ``Q`` and an
overflow mode ``O``. The number of fraction bits is ``F = W - I`` (``I`` may be negative
or larger than ``W``); a mantissa ``m`` stands for the value ``m · 2^-F``.

Rounding modes (what happens to the bits dropped by a cast):

========== ==================================================================
TRN        truncate toward −∞ (floor)
TRN_ZERO   truncate toward zero
RND        round to nearest, ties toward +∞
RND_ZERO   round to nearest, ties toward zero
RND_INF    round to nearest, ties away from zero
RND_MIN_INF round to nearest, ties toward −∞
RND_CONV   round to nearest, ties to even (convergent)
STOCHASTIC round up with probability equal to the dropped fraction (needs a key;
           unbiased: the expected result is the exact value)
========== ==================================================================

Overflow modes (what happens when the rounded value is outside the range):

========== ==================================================================
WRAP       keep the low ``W`` bits (two's complement for signed formats)
SAT        clamp to ``[min, max]``
SAT_ZERO   an overflowing value becomes 0
SAT_SYM    clamp to ``[-max, max]`` (signed: the most negative code is never
           produced, as hls4ml/QONNX "narrow" ranges); unsigned: like SAT
========== ==================================================================

Mantissas are stored as ``int32`` when ``W <= 31`` and as ``int64`` otherwise, which
needs ``jax_enable_x64``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

ROUNDING_MODES = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV", "STOCHASTIC")
"""Rounding modes, ``ap_fixed`` names (an ``AP_`` prefix and lower case are accepted)."""

DETERMINISTIC_ROUNDING = ROUNDING_MODES[:-1]

OVERFLOW_MODES = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")
"""Overflow modes, ``ap_fixed`` names (an ``AP_`` prefix and lower case are accepted)."""

MAX_WIDTH = 63
"""Widest format: its mantissa must fit a signed 64-bit integer."""

MAX_INT32_WIDTH = 31
"""Widest format stored as ``int32``; wider formats need ``jax_enable_x64``."""

MAX_EXPONENT = 126
"""Bound on ``I`` and on ``F = W - I``: every value and every step ``2^-F`` of a format is
then a normal float32, so ``to_float``/``from_float`` never overflow or underflow."""


def _mode(value: str, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} mode must be a string, one of {', '.join(allowed)}; got {value!r}")
    name = value.strip().upper()
    if name.startswith("AP_"):
        name = name[3:]
    if name not in allowed:
        raise ValueError(f"unknown {what} mode {value!r}; expected one of {', '.join(allowed)}")
    return name


def x64_enabled() -> bool:
    """Whether JAX 64-bit types are enabled (read at trace time)."""
    return bool(jax.config.jax_enable_x64)


def require_x64(what: str) -> None:
    """Raise unless ``jax_enable_x64`` is on.

    Raises:
      ValueError: 64-bit integers are needed for ``what`` and x64 is off.
    """
    if not x64_enabled():
        raise ValueError(
            f"{what} needs 64-bit integers, but jax_enable_x64 is off: enable it with "
            "jax.config.update('jax_enable_x64', True) (or the jax.enable_x64() context), or use "
            f"formats of at most {MAX_INT32_WIDTH} bits"
        )


def int_dtype_for_bits(bits: int, what: str):
    """``int32`` for ``bits <= 32`` (two's complement), else ``int64`` (checked for x64).

    Args:
      bits: signed bits the values need, sign included.
      what: names the thing in the error.

    Raises:
      ValueError: more than 64 bits, or more than 32 with x64 off.
    """
    if bits > 64:
        raise ValueError(f"{what} needs {bits} bits; at most 64 are supported")
    if bits > 32:
        require_x64(what)
        return jnp.int64
    return jnp.int32


@dataclasses.dataclass(frozen=True)
class Format:
    """A fixed-point format, ``ap_fixed<width, integer, rounding, overflow>``.

    Args:
      width: total bits ``W`` (1 to 63).
      integer: integer bits ``I``, the sign bit included; the fraction bits are
        ``F = W - I``. ``I`` may be negative (all bits are fraction bits, the values
        are small) or larger than ``W`` (steps larger than 1). ``I <= 126`` and
        ``F <= 126``.
      signed: two's complement (``ap_fixed``) or unsigned (``ap_ufixed``).
      rounding: one of :data:`ROUNDING_MODES` (default ``"TRN"``, as ``ap_fixed``).
      overflow: one of :data:`OVERFLOW_MODES` (default ``"WRAP"``, as ``ap_fixed``).

    Frozen and hashable: use it as static pytree metadata or a ``jit`` static argument.

    Raises:
      TypeError: a non-integer width/integer or a non-string mode.
      ValueError: width outside 1..63, integer or fraction bits beyond 126, or an
        unknown mode (the message names it).

    Example:
      >>> fmt = Format(16, 6, rounding="RND_CONV", overflow="SAT")
      >>> fmt.fraction, fmt.max_value
      (10, 31.9990234375)
    """

    width: int
    integer: int
    signed: bool = True
    rounding: str = "TRN"
    overflow: str = "WRAP"

    def __post_init__(self):
        for name in ("width", "integer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"Format {name} must be an int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not isinstance(self.signed, (bool, np.bool_)):
            raise TypeError(f"Format signed must be a bool, got {self.signed!r}")
        object.__setattr__(self, "signed", bool(self.signed))
        if not 1 <= self.width <= MAX_WIDTH:
            raise ValueError(f"Format width must be between 1 and {MAX_WIDTH} bits, got width={self.width}")
        if self.integer > MAX_EXPONENT:
            raise ValueError(
                f"Format integer={self.integer} is larger than the allowed {MAX_EXPONENT} "
                "(values would not fit a float32)"
            )
        if self.width - self.integer > MAX_EXPONENT:
            raise ValueError(
                f"Format(width={self.width}, integer={self.integer}) has {self.width - self.integer} "
                f"fraction bits; at most {MAX_EXPONENT} are allowed (integer >= width - {MAX_EXPONENT})"
            )
        object.__setattr__(self, "rounding", _mode(self.rounding, ROUNDING_MODES, "rounding"))
        object.__setattr__(self, "overflow", _mode(self.overflow, OVERFLOW_MODES, "overflow"))

    # -- derived quantities ---------------------------------------------------------

    @property
    def fraction(self) -> int:
        """Fraction bits ``F = W - I`` (negative when ``I > W``)."""
        return self.width - self.integer

    @property
    def lsb(self) -> float:
        """The step between neighbouring values, ``2^-F``."""
        return 2.0**-self.fraction

    @property
    def min_mantissa(self) -> int:
        """The smallest mantissa: ``-2^(W-1)`` (signed) or 0."""
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def max_mantissa(self) -> int:
        """The largest mantissa: ``2^(W-1) - 1`` (signed) or ``2^W - 1``."""
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    @property
    def min_value(self) -> float:
        return self.min_mantissa * self.lsb

    @property
    def max_value(self) -> float:
        return self.max_mantissa * self.lsb

    @property
    def stochastic(self) -> bool:
        return self.rounding == "STOCHASTIC"

    @property
    def dtype(self):
        """The mantissa storage dtype: ``int32`` for ``W <= 31``, else ``int64``.

        Raises:
          ValueError: ``W > 31`` and ``jax_enable_x64`` is off.
        """
        if self.width <= MAX_INT32_WIDTH:
            return jnp.int32
        require_x64(f"{self} (width {self.width} > {MAX_INT32_WIDTH})")
        return jnp.int64

    def narrow_dtype(self):
        """The smallest integer dtype that holds every mantissa (int8/int16/int32/int64);
        used for the operands of integer matmuls."""
        bits = self.width + (0 if self.signed else 1)
        for dt, b in ((jnp.int8, 8), (jnp.int16, 16)):
            if bits <= b:
                return dt
        return self.dtype

    def replace(self, **changes) -> Format:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_fraction(self, fraction: int) -> Format:
        """The same width with ``fraction`` fraction bits."""
        return self.replace(integer=self.width - fraction)

    def __str__(self) -> str:
        kind = "ap_fixed" if self.signed else "ap_ufixed"
        return f"{kind}<{self.width},{self.integer},AP_{self.rounding},AP_{self.overflow}>"

    @classmethod
    def parse(cls, text: str) -> Format:
        """Parse ``"ap_fixed<16,6>"``, ``"ap_ufixed<8,2,AP_RND,AP_SAT>"`` or
        ``"fixed<16,6,RND_CONV,SAT>"`` (modes optional: ap_fixed defaults TRN/WRAP).

        Raises:
          ValueError: the text is not such a type (or names an unknown mode).
        """
        m = re.fullmatch(r"\s*(ap_)?(u?)fixed\s*<([^>]*)>\s*", text)
        if m is None:
            raise ValueError(f"cannot parse {text!r} as a fixed-point type like 'ap_fixed<16,6,AP_RND>'")
        parts = [p.strip() for p in m.group(3).split(",")]
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"cannot parse {text!r}: expected <width,integer[,rounding[,overflow]]>")
        try:
            width, integer = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"cannot parse {text!r}: width and integer must be integers") from None
        kw = {}
        if len(parts) > 2:
            kw["rounding"] = parts[2]
        if len(parts) > 3:
            kw["overflow"] = parts[3]
        return cls(width, integer, signed=m.group(2) != "u", **kw)


def exact_add_format(a: Format, b: Format) -> Format:
    """The format that holds every ``a + b`` exactly: ``F = max(Fa, Fb)``, one more
    integer bit than the wider operand (an unsigned operand counts one bit more when the
    other is signed); signed if either operand is. Modes are ``a``'s.

    Raises:
      ValueError: the result would be wider than 63 bits.
    """
    return _exact_sum(a, b, a.signed or b.signed, f"the exact sum of {a} and {b}")


def exact_sub_format(a: Format, b: Format) -> Format:
    """The format that holds every ``a - b`` exactly: the width of
    :func:`exact_add_format`, always signed (a difference of unsigned values can be
    negative; ``ap_fixed``'s ``minus`` type). Modes are ``a``'s.

    Raises:
      ValueError: the result would be wider than 63 bits.
    """
    return _exact_sum(a, b, True, f"the exact difference of {a} and {b}")


def _exact_sum(a: Format, b: Format, signed: bool, what: str) -> Format:
    """``F = max(Fa, Fb)``, ``I = max(Ia', Ib') + 1`` where an unsigned operand of a sum
    with a signed one counts one more bit (``ap_fixed``'s ``plus`` / ``minus`` widths)."""
    mixed = a.signed != b.signed
    ia = a.integer + (1 if mixed and not a.signed else 0)
    ib = b.integer + (1 if mixed and not b.signed else 0)
    frac = max(a.fraction, b.fraction)
    integer = max(ia, ib) + 1
    return _exact(integer + frac, integer, signed, a, what)


def exact_mul_format(a: Format, b: Format) -> Format:
    """The format that holds every ``a · b`` exactly: ``W = Wa + Wb``, ``I = Ia + Ib``
    (as ``ap_fixed``); modes are ``a``'s.

    Raises:
      ValueError: the result would be wider than 63 bits.
    """
    signed = a.signed or b.signed
    return _exact(a.width + b.width, a.integer + b.integer, signed, a, f"the exact product of {a} and {b}")


def _exact(width: int, integer: int, signed: bool, like: Format, what: str) -> Format:
    if width > MAX_WIDTH:
        raise ValueError(f"{what} needs {width} bits; at most {MAX_WIDTH} are supported")
    return Format(width, integer, signed, like.rounding, like.overflow)
