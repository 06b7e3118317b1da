"""Number formats: narrow integers, fp8 / fp4 floats and codebooks (NF4).

A format is a small frozen dataclass: it knows its bit width, its representable range
and the dtype its values are stored in. Formats are hashable and static (they live in
the pytree aux data of a ``QArray``), and serialise to a short name (``"int4"``,
``"uint8"``, ``"int8_narrow"``, ``"fp8_e4m3"``, ``"fp4_e2m1"``, ``"nf4"``) for policies
stored as JSON.

Every format maps its stored values to the real numbers they stand for (before scaling)
with ``decode``, and 4-bit ones to the integer bit fields that ``packing`` stores two per
byte with ``to_codes`` / ``from_codes`` (``codes_signed``: how the fields sign-extend).
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_INT_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


class _Codes:
    """What packing and dequantization ask of every format: the container width, the fields
    packing stores (the codes themselves unless a format overrides it) and their values."""

    bits: int

    @property
    def pack_bits(self) -> int | None:
        """Container width when packed several to a byte (2 or 4), or ``None``."""
        if self.bits <= 2:
            return 2
        if self.bits <= 4:
            return 4
        return None

    def to_codes(self, values: jnp.ndarray) -> jnp.ndarray:
        """The integer fields that packing stores (the codes themselves)."""
        return values

    def from_codes(self, codes: jnp.ndarray) -> jnp.ndarray:
        """Inverse of :meth:`to_codes`."""
        return codes

    def decode(self, values: jnp.ndarray, dtype) -> jnp.ndarray:
        """The real value of each stored code (before scaling) in ``dtype``."""
        return values.astype(dtype)


class _SymmetricRange:
    """``qmin`` / ``qmax`` of a format symmetric about zero: ``-max_value`` / ``max_value``."""

    max_value: float

    @property
    def qmax(self) -> float:
        return self.max_value

    @property
    def qmin(self) -> float:
        return -self.max_value


@dataclasses.dataclass(frozen=True)
class IntFormat(_Codes):
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
    def codes_signed(self) -> bool:
        """Whether packed fields are sign-extended when unpacked."""
        return self.signed

    @property
    def name(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        return base + ("_narrow" if self.narrow else "")

    def with_narrow(self, narrow: bool = True) -> IntFormat:
        """This format with the narrow (symmetric) range switched on or off."""
        return dataclasses.replace(self, narrow=narrow)

    def __repr__(self) -> str:
        return f"qjax.{self.name}"


_FLOAT_DTYPES = {
    (4, 3): jnp.float8_e4m3fn,
    (5, 2): jnp.float8_e5m2,
    (2, 1): jnp.float4_e2m1fn,
}


@dataclasses.dataclass(frozen=True)
class FloatFormat(_SymmetricRange, _Codes):
    """A small floating point format: fp8 ``e4m3fn`` / ``e5m2`` or fp4 ``e2m1`` (the OCP MX
    / NVFP4 element type: ``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, no inf or NaN).

    Quantization to a float format scales ``x`` so its range maps onto ``±max_value``,
    saturates, and rounds to the nearest representable value (ties to even) or, with
    ``rounding="stochastic"``, to one of the two neighbouring values, unbiased. fp4 values
    are stored as ``float4_e2m1fn``, packed two per byte (their bit patterns, like int4)
    unless ``QuantSpec(pack=False)``.
    """

    exponent_bits: int
    mantissa_bits: int

    is_float = True

    def __post_init__(self):
        if (self.exponent_bits, self.mantissa_bits) not in _FLOAT_DTYPES:
            raise ValueError(
                "FloatFormat supports e4m3 (fp8_e4m3), e5m2 (fp8_e5m2) and e2m1 (fp4_e2m1), got "
                f"e{self.exponent_bits}m{self.mantissa_bits}"
            )

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(_FLOAT_DTYPES[(self.exponent_bits, self.mantissa_bits)])

    @property
    def max_value(self) -> float:
        """Largest finite magnitude (448 for e4m3fn, 57344 for e5m2, 6 for e2m1)."""
        return float(jnp.finfo(self.storage_dtype).max)

    signed = True
    narrow = False
    codes_signed = False

    def to_codes(self, values: jnp.ndarray) -> jnp.ndarray:
        """fp4 values as their 4-bit patterns (``uint8``), for packing."""
        return jax.lax.bitcast_convert_type(values, jnp.uint4).astype(jnp.uint8)

    def from_codes(self, codes: jnp.ndarray) -> jnp.ndarray:
        """Inverse of :meth:`to_codes`."""
        return jax.lax.bitcast_convert_type(codes.astype(jnp.uint4), self.storage_dtype)

    @property
    def name(self) -> str:
        return f"fp{self.bits}_e{self.exponent_bits}m{self.mantissa_bits}"

    def __repr__(self) -> str:
        return f"qjax.{self.name}"


# NF4 (NormalFloat4) of QLoRA: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized
# LLMs" (2023), Appendix E, as tabulated in bitsandbytes (functional.py, get_4bit_type("nf4")).
# Code i is the i-th value; code 7 is 0, codes 0 and 15 are -1 and 1.
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclasses.dataclass(frozen=True)
class CodebookFormat(_SymmetricRange, _Codes):
    """A format whose codes index a fixed, sorted table of real values (e.g. ``qjax.nf4``).

    Quantization picks the nearest table value of ``x / scale`` (a value exactly halfway
    between two picks the lower one) and stores its index (``uint8``; packed two per byte
    for up to 16 values, four per byte for up to 4); dequantization is
    ``values[code] * scale``. Symmetric only, round-to-nearest only; the scale maps the
    calibrated range onto ``max |values|``.

    Raises:
      ValueError: ``values`` not strictly increasing, fewer than 2 or more than 256.
    """

    name: str
    values: tuple[float, ...]

    is_float = True  # not integer codes on a uniform grid: the float-format code paths apply
    narrow = False
    codes_signed = False

    def __post_init__(self):
        v = tuple(float(a) for a in self.values)
        if not 2 <= len(v) <= 256 or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"codebook {self.name!r} values must be 2-256 strictly increasing numbers")
        object.__setattr__(self, "values", v)

    @property
    def bits(self) -> int:
        return max(1, (len(self.values) - 1).bit_length())

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.uint8)

    @property
    def max_value(self) -> float:
        return max(abs(self.values[0]), abs(self.values[-1]))

    @property
    def signed(self) -> bool:
        return self.values[0] < 0

    def encode(self, y: jnp.ndarray) -> jnp.ndarray:
        """Index (``uint8``) of the table value nearest to each ``y`` (ties: the lower)."""
        v = np.asarray(self.values, np.float64)
        mids = jnp.asarray((v[1:] + v[:-1]) / 2, y.dtype)
        # the number of midpoints below y; a NaN compares False everywhere: code 0
        return jnp.sum(y[..., None] > mids, axis=-1, dtype=jnp.int32).astype(jnp.uint8)

    def decode(self, values: jnp.ndarray, dtype) -> jnp.ndarray:
        """The table value of each code in ``dtype``."""
        table, codes = jnp.asarray(self.values, dtype), values.astype(jnp.int32)
        sharding = getattr(jax.typeof(values), "sharding", None)
        if getattr(sharding, "spec", None) is not None and any(e is not None for e in sharding.spec):
            return table.at[codes].get(out_sharding=sharding)  # Explicit mesh: keep the codes' sharding
        return table[codes]

    def __repr__(self) -> str:
        return f"qjax.{self.name}"


Format = IntFormat | FloatFormat | CodebookFormat

int2, int3, int4, int5, int6, int7, int8, int16 = (IntFormat(b) for b in (2, 3, 4, 5, 6, 7, 8, 16))
uint2, uint3, uint4, uint5, uint6, uint7, uint8, uint16 = (
    IntFormat(b, signed=False) for b in (2, 3, 4, 5, 6, 7, 8, 16)
)
fp8_e4m3 = FloatFormat(4, 3)
fp8_e5m2 = FloatFormat(5, 2)
fp4_e2m1 = FloatFormat(2, 1)
nf4 = CodebookFormat("nf4", NF4_VALUES)
_NAMED = {
    "fp8_e4m3": fp8_e4m3,
    "fp8_e4m3fn": fp8_e4m3,
    "e4m3": fp8_e4m3,
    "fp8_e5m2": fp8_e5m2,
    "e5m2": fp8_e5m2,
    "fp4_e2m1": fp4_e2m1,
    "fp4_e2m1fn": fp4_e2m1,
    "e2m1": fp4_e2m1,
    "nf4": nf4,
}

_NAME = re.compile(r"(u?)int(\d+)(_narrow)?")


def format_from_name(name: str) -> Format:
    """Parse a format name produced by ``fmt.name`` (``"int4"``, ``"uint8"``,
    ``"int8_narrow"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4_e2m1"``, ``"nf4"``).

    Raises:
      ValueError: the name is not a known format.
    """
    if isinstance(name, str) and name in _NAMED:
        return _NAMED[name]
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None and isinstance(name, str) and name.startswith("mx"):
        raise ValueError(
            f"{name!r} is not a number format but an OCP MX spec: use qjax.mx_spec(qjax.fp4_e2m1) "
            "(mxfp4), qjax.mx_spec(qjax.fp8_e4m3) (mxfp8) or qjax.mx_spec(qjax.int8) (mxint8)"
        )
    if m is None:
        raise ValueError(
            f"unknown number format {name!r}; expected e.g. 'int8', 'uint4', 'int8_narrow', "
            "'fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1', 'nf4'"
        )
    return IntFormat(int(m.group(2)), signed=not m.group(1), narrow=bool(m.group(3)))


def as_format(fmt: Format | str) -> Format:
    """Accept a format object or its name."""
    if isinstance(fmt, (IntFormat, FloatFormat, CodebookFormat)):
        return fmt
    if isinstance(fmt, str):
        return format_from_name(fmt)
    raise TypeError(f"expected a qjax number format (e.g. qjax.int8) or its name, got {fmt!r}")
