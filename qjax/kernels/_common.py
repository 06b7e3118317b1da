"""Shared pieces of the low-bit matmul kernels: weight layouts, operand checks, block
configurations and the XLA formulation every kernel must agree with.

Weight layouts (``layout=``) for a weight ``W`` of shape ``(K, N)``:

* ``"int8"``: ``int8`` codes ``(K, N)``.
* ``"k_halves"``: int4 codes packed two per byte along K, *the two halves of each block
  of* ``pack_block`` *rows in the low and high nibbles*: byte ``[c*P/2 + j, n]`` holds
  ``W[c*P + j, n]`` (low nibble) and ``W[c*P + P/2 + j, n]`` (high nibble), ``P =
  pack_block``. A kernel whose K tile is ``P`` reads its activation tile as two contiguous
  halves: no interleave, no strided access. Built by :func:`qjax.kernels.pack_int4`.
* ``"k_pairs"``: int4 packed along K as ``qjax.quantize`` stores it (``pack_axis=0``):
  byte ``[r, n]`` holds ``W[2r, n]`` (low) and ``W[2r + 1, n]`` (high).
* ``"n_pairs"``: int4 packed along N as ``qjax.quantize`` stores it by default
  (``pack_axis=-1``): byte ``[k, c]`` holds ``W[k, 2c]`` (low) and ``W[k, 2c + 1]`` (high).

The W8A8 kernels take the weight as ``(K, N)`` or, with ``b_layout="nk"``, transposed
``(N, K)`` (:data:`B_LAYOUTS`). So do the GPU weight-only kernels (``"int8"``, ``"k_pairs"``,
``"n_pairs"``: :data:`NK_LAYOUTS`): a weight stored ``(N, K)``, as PyTorch's ``(out, in)``
and ``x @ w.T`` models hold it, packed along K (``pack_axis=-1``, pairs along the last
axis) or along N (``pack_axis=0``); its scales are then ``(N,)`` / ``(N, 1)`` or ``(N, K //
group_size)``. Internally such a layout is named with an ``"_nk"`` suffix
(:func:`weight_layout`).

Nibbles are two's-complement int4 (``-8..7``); packed bytes may be ``uint8`` or ``int8``.
Scales are ``(1, N)`` / ``(N,)`` (per output channel) or ``(K // group_size, N)`` (groups
of ``group_size`` consecutive rows of K).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.numerics import packing

LAYOUTS = ("int8", "k_halves", "k_pairs", "n_pairs")
NK_LAYOUTS = ("int8", "k_pairs", "n_pairs")  # the layouts of a weight stored (N, K)
ENGINES = ("triton", "wgmma", "gemv")  # GPU kernel families (BlockConfig.engine)
DEQUANTS = ("logic", "ptx")  # how the tensor-core weight-only kernel converts codes (BlockConfig.dequant)
SPLIT_REDUCES = ("xla", "kernel")  # how split-K partials are summed (BlockConfig.split_reduce)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch parameters of one kernel call.

    Attributes:
      block_m, block_n, block_k: tile of the output rows, output columns and contraction.
      split_k: the contraction cut into this many chunks run by separate programs
        (partial float32 sums added afterwards); GPU weight-only kernels only.
      swap: compute the transposed product ``W^T x^T`` so the (large) weight tile is the
        left operand of the tensor-core instruction and the few activation rows its
        narrow right side (GPU, small batches).
      num_warps, num_stages: Triton launch parameters (GPU only); with ``engine="wgmma"``
        ``num_stages`` is the depth of the TMA input pipeline and ``num_warps`` is unused.
      engine: ``"triton"`` (Pallas Triton tensor-core kernels: every NVIDIA GPU, every op),
        ``"gemv"`` (the Pallas Triton CUDA-core weight-only kernel for a few rows; see
        :mod:`qjax.kernels.gpu_gemv`) or ``"wgmma"`` (the Pallas Mosaic GPU W8A8 kernel:
        Hopper only, weight ``(N, K)``; see :mod:`qjax.kernels.gpu_wgmma`).
      persistent: ``wgmma`` engine only: one block per SM looping over output tiles.
      dequant: how the ``triton`` engine's weight-only kernel turns codes into bfloat16:
        ``"logic"`` (``jax.numpy`` integer logic, one code per instruction) or ``"ptx"``
        (inline PTX on four codes per 32-bit register, sm_80 or newer; see
        :mod:`qjax.kernels._ptx`).
      split_reduce: how the ``triton`` engine's weight-only kernel sums its ``split_k``
        partials: ``"xla"`` (a float32 ``(split_k, M, N)`` result summed by XLA after the
        kernel: a second kernel launch) or ``"kernel"`` (each program stores its partial in
        a workspace and the last program of each output tile, counted by an atomic, sums
        them in split order and writes the tile: one launch, a deterministic sum, though
        not bit-identical to XLA's, whose order differs).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    swap: bool = False
    num_warps: int = 4
    num_stages: int = 3
    engine: str = "triton"
    persistent: bool = False
    dequant: str = "logic"
    split_reduce: str = "xla"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BlockConfig:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# -- checks --------------------------------------------------------------------------------------


def check_2d(name: str, x, dtypes: tuple | None = None) -> None:
    """Raise a ``ValueError``/``TypeError`` naming ``name`` unless ``x`` is a 2-D array of
    one of ``dtypes``."""
    if not hasattr(x, "shape") or len(x.shape) != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {getattr(x, 'shape', type(x).__name__)}")
    if dtypes is not None and jnp.dtype(x.dtype) not in [jnp.dtype(d) for d in dtypes]:
        raise TypeError(
            f"{name} must have dtype {' or '.join(str(jnp.dtype(d)) for d in dtypes)}, got {x.dtype}"
        )


def weight_layout(layout: str, b_layout: str = "kn") -> str:
    """The internal name of a weight-only layout: ``layout`` for a weight ``(K, N)``,
    ``layout + "_nk"`` for one stored ``(N, K)``.

    Raises:
      ValueError: an unknown ``layout`` or ``b_layout``, or ``"k_halves"`` stored ``(N, K)``.
    """
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"b_layout={b_layout!r} is not one of {B_LAYOUTS}")
    allowed = LAYOUTS if b_layout == "kn" else NK_LAYOUTS
    if layout not in allowed:
        raise ValueError(f"layout={layout!r} is not one of {allowed} (for a weight stored {b_layout!r})")
    return layout if b_layout == "kn" else f"{layout}_nk"


def transposed_packing(layout: str) -> str:
    """The pair layout of the same bytes read with the two axes swapped: pairs along the
    first axis of an ``(N, K)`` array are pairs along N (``"n_pairs"``), and so on."""
    return {"k_pairs": "n_pairs", "n_pairs": "k_pairs"}.get(layout, layout)


def split_layout(layout: str) -> tuple[str, bool]:
    """``(packing layout, stored (N, K)?)`` of an internal layout name (:func:`weight_layout`)."""
    if layout.endswith("_nk") and layout[:-3] in NK_LAYOUTS:
        return layout[:-3], True
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS} (or {NK_LAYOUTS} with '_nk')")
    return layout, False


def logical_k_n(layout: str, w_shape: tuple[int, int]) -> tuple[int, int]:
    """``(K, N)`` of the weight a packed array of ``w_shape`` holds."""
    layout, nk = split_layout(layout)
    if nk:
        n, k = logical_k_n(transposed_packing(layout), w_shape)
        return k, n
    k, n = w_shape
    if layout in ("k_halves", "k_pairs"):
        return 2 * k, n
    if layout == "n_pairs":
        return k, 2 * n
    return k, n


def normalize_weight_scales(scales, k: int, n: int, group_size: int | None, nk: bool = False) -> jax.Array:
    """Scales as a float32 ``(K // group_size, N)`` array (``(1, N)`` per channel), or for
    a weight stored ``(N, K)`` (``nk``) in its orientation: ``(N, K // group_size)`` (``(N,
    1)`` per channel).

    Raises:
      ValueError: a shape that is neither per channel nor per group, or a group size that
        does not divide K.
    """
    s = jnp.asarray(scales)
    if group_size is None:
        want = (n, 1) if nk else (1, n)
        if s.shape not in ((n,), want):
            groups = s.shape[1] if nk else s.shape[0]
            hint = (
                f" (grouped scales? pass group_size={k // groups})"
                if s.ndim == 2 and groups > 1 and k % groups == 0 and s.shape[0 if nk else 1] == n
                else ""
            )
            raise ValueError(f"per-channel scales must have shape ({n},) or {want}, got {s.shape}{hint}")
        return s.reshape(want).astype(jnp.float32)
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of K={k} (an int)")
    group_size = int(group_size)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of K={k}")
    want = (n, k // group_size) if nk else (k // group_size, n)
    if s.shape != want:
        raise ValueError(
            f"group scales must have shape {want} for K={k}, group_size={group_size}"
            f"{' (weight stored (N, K))' if nk else ''}, got {s.shape}"
        )
    return s.astype(jnp.float32)


def row_scale(scale, m: int, name: str) -> jax.Array:
    """A scalar, ``(M,)`` or ``(M, 1)`` scale as a float32 ``(M, 1)`` column."""
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim == 0:
        return jnp.full((m, 1), s)
    if s.shape in ((m,), (m, 1)):
        return s.reshape(m, 1)
    raise ValueError(f"{name} must be a scalar or have shape ({m},) or ({m}, 1), got {s.shape}")


def col_scale(scale, n: int, name: str) -> jax.Array:
    """A scalar, ``(N,)`` or ``(1, N)`` scale as a float32 ``(1, N)`` row."""
    s = jnp.asarray(scale, jnp.float32)
    if s.ndim == 0:
        return jnp.full((1, n), s)
    if s.shape in ((n,), (1, n)):
        return s.reshape(1, n)
    raise ValueError(f"{name} must be a scalar or have shape ({n},) or (1, {n}), got {s.shape}")


# -- int4 nibbles ----------------------------------------------------------------------------------


def as_int8(packed) -> jax.Array:
    """Packed bytes as ``int8`` (a bitcast for ``uint8``)."""
    packed = jnp.asarray(packed)
    if packed.dtype == jnp.uint8:
        return lax.bitcast_convert_type(packed, jnp.int8)
    if packed.dtype != jnp.int8:
        raise TypeError(f"packed int4 weights must be uint8 or int8 bytes, got {packed.dtype}")
    return packed


def nibbles(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sign-extended low and high nibbles of ``int8`` bytes, as ``int32`` (used inside the
    kernels and by the XLA formulation alike)."""
    p = p.astype(jnp.int32)
    lo = lax.shift_right_arithmetic(lax.shift_left(p, 28), 28)
    hi = lax.shift_right_arithmetic(lax.shift_left(p, 24), 28)
    return lo, hi


def pack_int4(codes, *, pack_block: int = 128) -> jax.Array:
    """Pack int4 codes ``(K, N)`` into the ``"k_halves"`` layout (see module doc).

    Args:
      codes: integer array ``(K, N)`` with values in ``[-8, 7]``.
      pack_block: K block whose two halves share bytes; even, divides K.

    Returns:
      ``uint8`` array ``(K // 2, N)``.

    Raises:
      ValueError: codes that are not 2-D integers, or a ``pack_block`` that does not fit K.
    """
    codes = jnp.asarray(codes)
    check_2d("codes", codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    k, n = codes.shape
    if pack_block <= 0 or pack_block % 2 or k % pack_block:
        raise ValueError(f"pack_block={pack_block} must be even and divide K={k}")
    check_code_range(codes, -8, 7, "codes")
    c = codes.astype(jnp.int32).reshape(k // pack_block, 2, pack_block // 2, n)
    b = (c[:, 0] & 0xF) | ((c[:, 1] & 0xF) << 4)
    return b.reshape(k // 2, n).astype(jnp.uint8)


def check_code_range(codes, lo: int, hi: int, name: str) -> None:
    """Raise ``ValueError`` when concrete ``codes`` hold values outside ``[lo, hi]`` (they
    would wrap silently when packed: unsigned 0..15 codes are not int4). Traced codes are
    not checked."""
    try:
        a = np.asarray(codes)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if a.size and (a.min() < lo or a.max() > hi):
        raise ValueError(
            f"{name} hold values in [{a.min()}, {a.max()}], outside [{lo}, {hi}] (signed int4; "
            "shift unsigned codes by -8 and fold the shift into the zero point)"
        )


def unpack_codes(w, layout: str, pack_block: int | None = None) -> jax.Array:
    """The ``int32`` codes ``(K, N)`` a weight array of ``layout`` holds (for an ``"_nk"``
    layout the array is stored ``(N, K)``; the codes come back ``(K, N)`` all the same)."""
    base, nk = split_layout(layout)
    if nk:
        return unpack_codes(w, transposed_packing(base)).T
    if layout == "int8":
        return jnp.asarray(w).astype(jnp.int32)
    if layout in ("k_pairs", "n_pairs"):  # qjax.quantize's own packing
        axis = 0 if layout == "k_pairs" else 1
        w = lax.bitcast_convert_type(as_int8(w), jnp.uint8)
        return packing.unpack(w, 4, 2 * w.shape[axis], axis=axis, signed=True).astype(jnp.int32)
    lo, hi = nibbles(as_int8(w))
    r, c = lo.shape
    if layout == "k_halves":
        p = pack_block
        if p is None or p % 2 or (2 * r) % p:
            raise ValueError(f"pack_block={p!r} must be even and divide K={2 * r} for layout 'k_halves'")
        halves = [x.reshape(2 * r // p, p // 2, c) for x in (lo, hi)]
        return jnp.stack(halves, axis=1).reshape(2 * r, c)
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


def dequantize_weight(w, scales, *, layout: str, group_size: int | None, pack_block: int | None = None):
    """The float32 ``(K, N)`` weight ``codes * scale``."""
    codes = unpack_codes(w, layout, pack_block)
    k, n = codes.shape
    s = _scales_kn(scales, k, n, group_size, layout)
    rows = k if group_size is None else group_size
    return (codes.reshape(k // rows, rows, n).astype(jnp.float32) * s[:, None, :]).reshape(k, n)


def _scales_kn(scales, k: int, n: int, group_size: int | None, layout: str) -> jax.Array:
    """Scales of a weight in ``layout`` as float32 ``(K // group_size, N)`` / ``(1, N)``."""
    nk = split_layout(layout)[1]
    s = normalize_weight_scales(scales, k, n, group_size, nk)
    return s.T if nk else s


# -- XLA formulations (the fallback, and what the kernels must reproduce) ----------------------------


def xla_weight_only(x, w, scales, *, layout, group_size, pack_block=None, out_dtype=None):
    """``x @ dequantize(w)`` with XLA: bfloat16 operands, float32 accumulation, per-group
    partial sums scaled in float32 (the kernels' arithmetic)."""
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    codes = unpack_codes(w, layout, pack_block)
    k, n = codes.shape
    s = _scales_kn(scales, k, n, group_size, layout)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    if group_size is None:
        acc = jnp.dot(xb, codes.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return (acc * s).astype(out_dtype)
    g = k // group_size
    cg = codes.astype(jnp.bfloat16).reshape(g, group_size, n)
    xg = xb.reshape(xb.shape[0], g, group_size)
    part = jnp.einsum("mgk,gkn->gmn", xg, cg, preferred_element_type=jnp.float32)
    return jnp.sum(part * s[:, None, :], axis=0).astype(out_dtype)


B_LAYOUTS = ("kn", "nk")  # W8A8 weight: (K, N), or transposed (N, K) (K-major: Hopper's int8 wgmma)


def int8_dimension_numbers(b_layout: str):
    """``dot_general`` dimension numbers of ``a (M, K)`` with a weight in ``b_layout``."""
    if b_layout not in B_LAYOUTS:
        raise ValueError(f"b_layout={b_layout!r} is not one of {B_LAYOUTS}")
    return (((1,), (0 if b_layout == "kn" else 1,)), ((), ()))


def xla_int8_matmul(a_q, b_q, a_scale, b_scale, *, out_dtype=jnp.bfloat16, b_layout="kn"):
    """``(a_q @ b_q) * a_scale * b_scale`` with XLA's int8 x int8 -> int32 dot
    (``b_q`` is ``(N, K)`` with ``b_layout="nk"``)."""
    acc = lax.dot_general(a_q, b_q, int8_dimension_numbers(b_layout), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * a_scale * b_scale).astype(out_dtype)


def grouped_tile(pid, num_m: int, num_n: int, group_m: int = 8):
    """``(row tile, column tile)`` of program ``pid`` in grouped order: consecutive programs
    share a band of ``group_m`` row tiles, so the column (weight) tiles they read stay in L2.
    Works on traced integers (inside kernels) and Python ints."""
    width = group_m * num_n
    first = (pid // width) * group_m
    size = jnp.minimum(num_m - first, group_m)
    return first + (pid % width) % size, (pid % width) // size


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(1, x)))))


def k_perm_pairs_to_halves(k: int, block_k: int) -> np.ndarray:
    """Static index map taking activations of a ``"k_pairs"`` weight to the order a
    ``"k_halves"`` kernel with tile ``block_k`` reads: ``x[:, perm]``."""
    c, j = np.divmod(np.arange(k // 2), block_k // 2)
    perm = np.empty(k, np.int64)
    perm[c * block_k + j] = 2 * np.arange(k // 2)
    perm[c * block_k + block_k // 2 + j] = 2 * np.arange(k // 2) + 1
    return perm


def with_reference_jvp(kernel, reference, *args):
    """``kernel(*args)``, differentiated as ``reference(*args)``, the XLA formulation of the
    same product (:func:`xla_weight_only`, :func:`xla_int8_matmul`).

    A ``pallas_call`` has no derivative rule of its own. The kernels compute what their
    reference does (up to float rounding), so forward- and reverse-mode derivatives of any
    order (with respect to activations and scales; integer codes get ``float0`` tangents)
    come from the reference at the same operands, for example training adapters over a
    frozen int4 weight.
    """
    f = jax.custom_jvp(kernel)

    @f.defjvp
    def _jvp(primals, tangents):
        # f, not kernel: an outer derivative (a Hessian) applies this rule again
        return f(*primals), jax.jvp(reference, primals, tangents)[1]

    return f(*args)
