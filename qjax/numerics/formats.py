"""Number formats: narrow integers and fp8.

A format is a small frozen dataclass: it knows its bit width, its representable range
and the dtype its values are stored in. Formats are hashable and static (they live in
the pytree aux data of a ``QArray``), and serialise to a short name (``"int4"``,
``"uint8"``, ``"int8_narrow"``, ``"fp8_e4m3"``) for policies stored as JSON.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

SUPPORTED_INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A signed or unsigned integer format of ``bits`` bits.

    Args:
      bits: 2–8 or 16.
      signed: two's complement (``True``) or unsigned.
      narrow: for signed formats, drop the most negative code so the range is symmetric
        (``int8`` narrow is −127..127), as symmetric weight quantization usually wants.

    Raises:
      ValueError: ``bits`` unsupported, or ``narrow`` on an unsigned format.
    """

    bits: int
    signed: bool = True
    narrow: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool):
            raise TypeError(f"IntFormat bits must be an int, got {self.bits!r}")
        if self.bits not in SUPPORTED_INT_BITS:
            raise ValueError(
                f"IntFormat bits={self.bits} is not supported; choose one of {SUPPORTED_INT_BITS}"
            )
        if self.narrow and not self.signed:
            raise ValueError("narrow=True only applies to signed integer formats")

    is_float = False

    @property
    def qmin(self) -> int:
        """Smallest representable integer code."""
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """Largest representable integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> jnp.dtype:
        """Dtype of unpacked values (int8/uint8, or int16/uint16 for 16 bits)."""
        if self.bits <= 8:
            return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)
        return jnp.dtype(jnp.int16 if self.signed else jnp.uint16)

    @property
    def pack_bits(self) -> int | None:
        """Container width when packed several to a byte (2 or 4), or ``None``."""
        if self.bits <= 2:
            return 2
        if self.bits <= 4:
            return 4
        return None

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("_narrow" if self.narrow else "")

    def with_narrow(self, narrow: bool = True) -> IntFormat:
        """This format with the narrow (symmetric) range switched on or off."""
        return dataclasses.replace(self, narrow=narrow)

    def __repr__(self) -> str:
        return f"qjax.{self.name}"


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """An 8-bit floating point format (``e4m3fn`` or ``e5m2``).

    Quantization to a float format scales ``x`` so its range maps onto ``±max_value``,
    saturates, and rounds to the nearest representable value (ties to even) or, with
    ``rounding="stochastic"``, to one of the two neighbouring values, unbiased.
    """

    exponent_bits: int
    mantissa_bits: int

    is_float = True

    def __post_init__(self):
        if (self.exponent_bits, self.mantissa_bits) not in ((4, 3), (5, 2)):
            raise ValueError(
                "FloatFormat supports e4m3 (fp8_e4m3) and e5m2 (fp8_e5m2), got "
                f"e{self.exponent_bits}m{self.mantissa_bits}"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float8_e4m3fn if self.exponent_bits == 4 else jnp.float8_e5m2)

    @property
    def max_value(self) -> float:
        """Largest finite magnitude (448 for e4m3fn, 57344 for e5m2)."""
        return float(jnp.finfo(self.storage_dtype).max)

    @property
    def qmax(self) -> float:
        return self.max_value

    @property
    def qmin(self) -> float:
        return -self.max_value

    signed = True
    narrow = False
    pack_bits = None

    @property
    def name(self) -> str:
        return f"fp8_e{self.exponent_bits}m{self.mantissa_bits}"

    def __repr__(self) -> str:
        return f"qjax.{self.name}"


Format = IntFormat | FloatFormat

int2, int3, int4, int5, int6, int7, int8, int16 = (IntFormat(b) for b in (2, 3, 4, 5, 6, 7, 8, 16))
uint2, uint3, uint4, uint5, uint6, uint7, uint8, uint16 = (
    IntFormat(b, signed=False) for b in (2, 3, 4, 5, 6, 7, 8, 16)
)
fp8_e4m3 = FloatFormat(4, 3)
fp8_e5m2 = FloatFormat(5, 2)

_NAME = re.compile(r"(u?)int(\d+)(_narrow)?")


def format_from_name(name: str) -> Format:
    """Parse a format name produced by ``fmt.name`` (``"int4"``, ``"uint8"``,
    ``"int8_narrow"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``).

    Raises:
      ValueError: the name is not a known format.
    """
    if name in ("fp8_e4m3", "fp8_e4m3fn", "e4m3"):
        return fp8_e4m3
    if name in ("fp8_e5m2", "e5m2"):
        return fp8_e5m2
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(
            f"unknown number format {name!r}; expected e.g. 'int8', 'uint4', 'int8_narrow', "
            "'fp8_e4m3', 'fp8_e5m2'"
        )
    return IntFormat(int(m.group(2)), signed=not m.group(1), narrow=bool(m.group(3)))


def as_format(fmt: Format | str) -> Format:
    """Accept a format object or its name."""
    if isinstance(fmt, (IntFormat, FloatFormat)):
        return fmt
    if isinstance(fmt, str):
        return format_from_name(fmt)
    raise TypeError(f"expected a qjax number format (e.g. qjax.int8) or its name, got {fmt!r}")
