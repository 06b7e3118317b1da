"""``QuantSpec``: everything needed to quantize one tensor, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from qjax.numerics import calibration as calib
from qjax.numerics.formats import CodebookFormat, Format, as_format
from qjax.numerics.granularity import Layout, normalize_axis, resolve_layout
from qjax.numerics.scaling import POW2_SCALE_DTYPE, ROUNDING_MODES

STE_MODES = ("plain", "clipped", "lsq")
# QuantSpec.scale_dtype ("float32": the default, None); float8_e8m0fnu: OCP MX power-of-two scales
SCALE_DTYPES = ("float32", "bfloat16", POW2_SCALE_DTYPE)
_SCALE_DTYPE_ALIASES = {"e8m0": POW2_SCALE_DTYPE, "float8_e8m0": POW2_SCALE_DTYPE}
MX_BLOCK = 32  # OCP MX block size


class _PerToken:
    """Sentinel for ``channel_axes``: one scale per token (every non-contracting axis of
    an activation operand). It is resolved per op by the graph layer; a tensor on its own
    has no contracting axis, so ``quantize`` treats it as "every axis but the last"."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "qjax.PER_TOKEN"

    def __reduce__(self):
        return (_PerToken, ())


PER_TOKEN = _PerToken()


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _as_int(v, name: str):
    """Python int from an int or numpy integer; anything else is returned for the
    field's own check to reject with its message."""
    return int(v) if _is_int(v) else v


def default_calibration(symmetric: bool) -> calib.Calibration:
    """The calibrator a spec gets when none is given: absmax (symmetric) or minmax."""
    return calib.absmax() if symmetric else calib.minmax()


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor.

    Args:
      format: number format, e.g. ``qjax.int8``, ``qjax.int4``, ``qjax.fp8_e4m3``,
        ``qjax.fp4_e2m1``, ``qjax.nf4`` (or its name, e.g. ``"int4"``).
      channel_axes: axes that get their own scale (``()`` is per-tensor; ``(-1,)`` is per
        output channel of a ``(in, out)`` kernel), or ``qjax.PER_TOKEN``.
      group_size: with ``group_axis``, cut that axis into groups of this many elements,
        each with its own scale (combinable with ``channel_axes``).
      group_axis: the axis cut into groups.
      symmetric: scale only (``True``) or scale and integer zero point.
      calibration: a ``qjax.calib`` calibrator; default absmax (symmetric) or minmax.
      rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased, needs a key;
        integer and fp8/fp4 formats).
      ste: backward rule of ``fake_quant``: ``"plain"``, ``"clipped"`` or ``"lsq"``.
      pad_groups: allow a ``group_size`` that does not divide the axis (last group short).
      tile_size: with ``tile_axis`` (one of ``channel_axes``), the channels along that axis
        share their scale in tiles of this many consecutive channels (a short last tile
        allowed): with ``group_size`` along the contracted axis, 2-D block scales (DeepSeek-V3's
        and Qwix's 128 × 128 fp8 tiles). The scales are stored per channel (repeated over
        each tile), so every consumer of a ``QArray`` reads them as it reads channel scales.
        absmax / minmax calibration only.
      tile_axis: the channel axis cut into tiles.
      pack: store 2-bit and 3/4-bit integers (and fp4, nf4) packed four / two to a byte.
      pack_axis: the axis along which values are packed.
      scale_dtype: how scales are stored: ``None`` (the compute dtype: float32, or float64
        for float64 input) or ``"bfloat16"`` (half the bytes: 0.125 bits per weight instead
        of 0.25 for groups of 128). The scale is rounded up to bfloat16 (so the calibrated
        range never clips) and codes and zero points are computed with it, so
        ``dequantize`` is exact to it; arithmetic on scales stays in float32. (float16 is
        not offered: its range cannot hold every scale, and a clamped scale clips.) Or
        ``"float8_e8m0fnu"`` (alias ``"e8m0"``): one power-of-two scale (1 byte) per group,
        chosen by the OCP MX rule ``2^(floor(log2 amax) - emax)`` with ``emax`` the exponent
        of the format's largest value, which may saturate the top of a block's range (see
        :func:`qjax.numerics.scaling.pow2_scale`; asymmetric specs round their scale up to
        a power of two instead). :func:`mx_spec` builds the MXFP4 / MXFP8 specs.

    Raises:
      ValueError / TypeError: any field is invalid; the message names it.

    Example:
      >>> spec = QuantSpec(qjax.int4, channel_axes=(-1,), group_size=128, group_axis=0)
    """

    format: Format
    channel_axes: tuple[int, ...] | _PerToken = ()
    group_size: int | None = None
    group_axis: int | None = None
    symmetric: bool = True
    calibration: calib.Calibration | None = None
    rounding: str = "nearest"
    ste: str = "clipped"
    pad_groups: bool = False
    pack: bool = True
    pack_axis: int = -1
    scale_dtype: str | None = None
    tile_size: int | None = None
    tile_axis: int | None = None

    def __post_init__(self):
        fmt = as_format(self.format)
        object.__setattr__(self, "format", fmt)
        if self.scale_dtype is not None:
            try:
                name = _SCALE_DTYPE_ALIASES.get(self.scale_dtype) or jnp.dtype(self.scale_dtype).name
            except TypeError:
                name = repr(self.scale_dtype)
            if name not in SCALE_DTYPES:
                raise ValueError(f"scale_dtype must be None or one of {SCALE_DTYPES}, got {name}")
            object.__setattr__(self, "scale_dtype", None if name == "float32" else name)
        for name in ("group_size", "group_axis", "pack_axis", "tile_size", "tile_axis"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_int(value, name))
        axes = self.channel_axes
        if axes is not PER_TOKEN:
            if _is_int(axes):
                axes = (axes,)
            if not isinstance(axes, (tuple, list)) or not all(_is_int(a) for a in axes):
                raise TypeError(f"channel_axes must be a tuple of ints or qjax.PER_TOKEN, got {axes!r}")
            axes = tuple(int(a) for a in axes)
            if len(set(axes)) != len(axes):
                raise ValueError(f"channel_axes {tuple(axes)} repeats an axis")
            object.__setattr__(self, "channel_axes", tuple(axes))
        if (self.group_size is None) != (self.group_axis is None):
            raise ValueError(
                "group_size and group_axis go together: per-group quantization needs both "
                f"(got group_size={self.group_size}, group_axis={self.group_axis})"
            )
        if self.group_size is not None:
            gs = self.group_size
            if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
                raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
            if not isinstance(self.group_axis, int) or isinstance(self.group_axis, bool):
                raise TypeError(f"group_axis must be an int, got {self.group_axis!r}")
            if axes is PER_TOKEN:
                raise ValueError("per-group quantization cannot be combined with qjax.PER_TOKEN")
            if self.group_axis in self.channel_axes:
                raise ValueError(f"group_axis={self.group_axis} is also in channel_axes={self.channel_axes}")
        if self.calibration is None:
            object.__setattr__(self, "calibration", default_calibration(self.symmetric))
        if not isinstance(self.calibration, calib.Calibration):
            raise TypeError(
                "calibration must be a qjax.calib calibrator (e.g. qjax.calib.absmax()), "
                f"got {self.calibration!r}"
            )
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"rounding={self.rounding!r} is not one of {ROUNDING_MODES}")
        if self.ste not in STE_MODES:
            raise ValueError(f"ste={self.ste!r} is not one of {STE_MODES}")
        if fmt.is_float:
            if not self.symmetric:
                raise ValueError(f"{fmt.name} is a float format: it supports symmetric=True only")
        if isinstance(fmt, CodebookFormat) and (self.rounding != "nearest" or self.ste == "lsq"):
            raise ValueError(
                f"{fmt.name} is a codebook format: it supports rounding='nearest' and ste 'plain' or "
                f"'clipped' only, got rounding={self.rounding!r}, ste={self.ste!r}"
            )
        if self.ste == "lsq" and not self.symmetric:
            raise ValueError("ste='lsq' (learned step size) supports symmetric quantization only")
        if not isinstance(self.pack_axis, int) or isinstance(self.pack_axis, bool):
            raise TypeError(f"pack_axis must be an int, got {self.pack_axis!r}")
        self._check_tile()

    def _check_tile(self) -> None:
        if (self.tile_size is None) != (self.tile_axis is None):
            raise ValueError(
                "tile_size and tile_axis go together "
                f"(got tile_size={self.tile_size}, tile_axis={self.tile_axis})"
            )
        if self.tile_size is None:
            return
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be a positive int, got {self.tile_size}")
        if self.channel_axes is PER_TOKEN or self.tile_axis not in self.channel_axes:
            raise ValueError(
                f"tile_axis={self.tile_axis} must be one of channel_axes={self.channel_axes} "
                "(written the same way)"
            )
        if self.calibration.name not in ("absmax", "minmax") or self.ste == "lsq":
            raise ValueError(
                "tile scales are the absmax / minmax of each tile: use calibration absmax or minmax and a "
                f"ste other than 'lsq', got {self.calibration.name!r}, ste={self.ste!r}"
            )

    def tile(self, ndim: int) -> tuple[int, int] | None:
        """``(tile axis as a negative index, tile size)`` for a rank-``ndim`` tensor, or
        ``None`` without tiles."""
        if self.tile_axis is None:
            return None
        return normalize_axis(self.tile_axis, ndim, "tile_axis"), self.tile_size

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def packed(self) -> bool:
        """Whether values of this spec are stored packed several per byte."""
        return bool(self.pack and self.format.pack_bits is not None)

    def layout(self, shape) -> Layout:
        """Resolve this spec's granularity against a concrete ``shape``.

        Raises:
          ValueError: an axis is out of range for ``shape`` or the group size does not
            divide (and ``pad_groups`` is off).
        """
        axes = self.channel_axes
        if axes is PER_TOKEN:
            axes = tuple(range(len(shape) - 1))
        return resolve_layout(shape, axes, self.group_axis, self.group_size, self.pad_groups)

    def replace(self, **changes) -> QuantSpec:
        """A copy with some fields changed (validated again).

        Changing ``symmetric`` without giving ``calibration`` re-defaults a calibrator that
        was the default of the old symmetry (absmax <-> minmax), so
        ``QuantSpec(f).replace(symmetric=False) == QuantSpec(f, symmetric=False)``; any
        other calibrator is kept.
        """
        flips = "symmetric" in changes and bool(changes["symmetric"]) != self.symmetric
        if flips and "calibration" not in changes and self.calibration == default_calibration(self.symmetric):
            changes["calibration"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (see :func:`spec_from_dict`)."""
        return {
            "format": self.format.name,
            "channel_axes": "per_token" if self.channel_axes is PER_TOKEN else list(self.channel_axes),
            "group_size": self.group_size,
            "group_axis": self.group_axis,
            "symmetric": self.symmetric,
            "calibration": self.calibration.to_dict(),
            "rounding": self.rounding,
            "ste": self.ste,
            "pad_groups": self.pad_groups,
            "pack": self.pack,
            "pack_axis": self.pack_axis,
            "scale_dtype": self.scale_dtype,
            "tile_size": self.tile_size,
            "tile_axis": self.tile_axis,
        }


def mx_spec(format: Format | str, *, block_axis: int = 0, channel_axes=(-1,), block_size: int = MX_BLOCK):
    """An OCP MX (Microscaling) spec: ``format`` elements (``qjax.fp4_e2m1`` for MXFP4,
    ``qjax.fp8_e4m3`` / ``fp8_e5m2`` for MXFP8, ``qjax.int8`` for MXINT8) with one E8M0
    power-of-two scale per block of ``block_size`` (32) along ``block_axis``, the contracted
    axis (0 for a ``(K, N)`` kernel, -1 for an activation), and per ``channel_axes``.

    Example:
      >>> spec = mx_spec(qjax.fp4_e2m1)   # MXFP4 for a (K, N) kernel
    """
    return QuantSpec(
        format,
        channel_axes=channel_axes,
        group_size=block_size,
        group_axis=block_axis,
        scale_dtype=POW2_SCALE_DTYPE,
    )


def spec_from_dict(d: dict[str, Any]) -> QuantSpec:
    """Inverse of :meth:`QuantSpec.to_dict`.

    Raises:
      ValueError: unknown keys or invalid values.
    """
    d = dict(d)
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown QuantSpec keys {sorted(unknown)}; expected a subset of {sorted(known)}")
    if "calibration" in d and isinstance(d["calibration"], dict):
        d["calibration"] = calib.calibration_from_dict(d["calibration"])
    if d.get("channel_axes") == "per_token":
        d["channel_axes"] = PER_TOKEN
    elif "channel_axes" in d:
        d["channel_axes"] = tuple(d["channel_axes"])
    return QuantSpec(**d)
