"""Pallas TPU (Mosaic) kernels for the low-bit matmuls.

* :func:`int8_matmul_tpu`: ``int8 x int8 -> int32`` blocked matmul with the per-token x
  per-channel float32 rescale fused into the epilogue.
* :func:`weight_only_matmul_tpu`: bfloat16 activations times int8 / int4 weights (any of
  the layouts of :mod:`qjax.kernels._common`), dequantized tile by tile in VMEM, float32
  accumulation.

Both take already validated, normalised operands (the public API checks shapes, dtypes
and scales); they check only the block configuration, raising ``ValueError`` with the
rule that failed. Operands whose sizes are not multiples of the blocks are zero-padded
here (only when needed) and the result sliced back.

Tiling rules (Mosaic): the last two dimensions of every block are multiples of
``(8, 128)`` or the full array dimension; ``int8`` blocks get a second-minor multiple of
32 (their native ``(32, 128)`` tile); activation tiles are sliced into halves along lanes
for the K-packed layouts, so ``block_k / 2`` is a multiple of 128 there.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.kernels._common import LAYOUTS, BlockConfig, as_int8, cdiv, int8_dimension_numbers, nibbles

__all__ = ["default_config_tpu", "int8_matmul_tpu", "weight_only_matmul_tpu"]

_KINDS = ("int8_matmul", "weight_only")
_DIMS = ("parallel", "parallel", "arbitrary")
_DOT = (((1,), (0,)), ((), ()))


def _round_up(x: int, m: int) -> int:
    return cdiv(x, m) * m


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """``a`` zero-padded at the end to ``(rows, cols)`` (no copy when already that shape)."""
    r, c = a.shape
    if (r, c) == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - r), (0, cols - c)))


def _compiler_params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=_DIMS)


# -- block configurations ------------------------------------------------------------------------


def _check_positive(config: BlockConfig) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(config, name)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.{name}={v!r} must be a positive int")
    if config.split_k != 1:
        raise ValueError(f"config.split_k={config.split_k} is not supported by the TPU kernels (must be 1)")


def _check_int8_config(config: BlockConfig) -> None:
    _check_positive(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if bm % 32:
        raise ValueError(
            f"config.block_m={bm} must be a multiple of 32 (sublane tile of the int8 activation block)"
        )
    if bn % 128:
        raise ValueError(f"config.block_n={bn} must be a multiple of 128 (lane width)")
    if bk % 128:
        raise ValueError(
            f"config.block_k={bk} must be a multiple of 128 (lane width of the activation block)"
        )


def _check_weight_only_config(
    config: BlockConfig, layout: str, group_size: int | None, pack_block: int | None
) -> None:
    _check_positive(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    if bm % 8:
        raise ValueError(f"config.block_m={bm} must be a multiple of 8 (sublane tile)")
    if layout == "n_pairs":
        if bn % 256:
            raise ValueError(
                f"config.block_n={bn} must be a multiple of 256 for layout 'n_pairs' "
                "(block_n / 2 packed columns, a multiple of 128 lanes)"
            )
    elif bn % 128:
        raise ValueError(f"config.block_n={bn} must be a multiple of 128 (lane width)")
    if layout in ("k_halves", "k_pairs"):
        if bk % 256:
            raise ValueError(
                f"config.block_k={bk} must be a multiple of 256 for layout {layout!r} "
                "(block_k / 2, the packed rows and each activation half, a multiple of 128)"
            )
        if layout == "k_halves" and bk != pack_block:
            raise ValueError(
                f"config.block_k={bk} must equal pack_block={pack_block} for layout "
                "'k_halves' (the K tile reads one packed block)"
            )
    elif bk % 128:
        raise ValueError(
            f"config.block_k={bk} must be a multiple of 128 (lane width of the activation block)"
        )
    if group_size is None:
        return
    g = group_size
    if bk % g and g % bk:
        raise ValueError(
            f"config.block_k={bk} must be a multiple of group_size={g}, or group_size a multiple of block_k"
        )
    if g < bk:
        # rows of one group inside the dequantized code block (second-minor of a reshape)
        rows = g // 2 if layout == "k_pairs" else g
        if layout == "k_pairs" and g % 2:
            raise ValueError(f"group_size={g} must be even for layout 'k_pairs' (a byte holds rows 2r, 2r+1)")
        if rows % 8:
            what = "group_size / 2" if layout == "k_pairs" else "group_size"
            raise ValueError(
                f"{what}={rows} must be a multiple of 8 (sublane tile) when group_size < block_k={bk}"
            )
        if layout == "k_halves" and (bk // 2) % g:
            raise ValueError(
                f"group_size={g} must divide block_k / 2={bk // 2} for layout 'k_halves' "
                "(each nibble half of the tile holds whole groups)"
            )


def default_config_tpu(
    kind: str,
    m: int,
    k: int,
    n: int,
    group_size: int | None = None,
    layout: str = "int8",
    pack_block: int | None = None,
) -> BlockConfig:
    """A legal default :class:`BlockConfig` for a TPU kernel call.

    Args:
      kind: ``"int8_matmul"`` (:func:`int8_matmul_tpu`) or ``"weight_only"``
        (:func:`weight_only_matmul_tpu`).
      m, k, n: logical problem size ``(M, K) @ (K, N)``.
      group_size, layout, pack_block: weight-only quantization (ignored for ``"int8_matmul"``).

    Prefers tiles that divide the problem (no padding): ``block_m`` up to 128 (256 from
    M >= 512), ``block_n`` 256 if it divides N, else 128 (512 / 256 for ``"n_pairs"``), ``block_k`` 512 /
    256 / 128 compatible with the group size, ``pack_block`` for ``"k_halves"``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not one of {_KINDS}")
    sub = 32 if kind == "int8_matmul" else 16
    bm = 256 if m >= 512 else min(128, _round_up(max(m, 1), sub))
    if kind == "int8_matmul":
        bn = 256 if n % 256 == 0 else 128
        bk = next((c for c in (512, 256, 128) if k % c == 0), min(512, _round_up(k, 128)))
        return BlockConfig(bm, bn, bk)

    if layout == "n_pairs":
        bn = 512 if n % 512 == 0 else 256
    else:
        bn = 256 if n % 256 == 0 else 128
    if layout == "k_halves":
        return BlockConfig(bm, bn, pack_block if pack_block is not None else 0)
    cands = (512, 256) if layout == "k_pairs" else (512, 256, 128)

    def legal(bk: int) -> bool:
        try:
            _check_weight_only_config(BlockConfig(bm, bn, bk), layout, group_size, pack_block)
        except ValueError:
            return False
        return True

    ok = [c for c in cands if legal(c)]
    if group_size is not None and not ok:  # e.g. an odd group size: a K tile of whole groups
        step = 256 if layout == "k_pairs" else 128
        ok = [c for c in (group_size * step // math.gcd(group_size, step),) if legal(c)]
    if not ok:
        ok = [cands[-1]]  # illegal: the kernel's check reports why
    bk = next((c for c in ok if k % c == 0), ok[-1])
    return BlockConfig(bm, bn, bk)


# -- int8 x int8 ---------------------------------------------------------------------------------


def _int8_kernel(a_ref, b_ref, as_ref, bs_ref, o_ref, acc_ref, *, dn):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], dn, preferred_element_type=jnp.int32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        out = acc_ref[...].astype(jnp.float32) * as_ref[...] * bs_ref[...]
        o_ref[...] = out.astype(o_ref.dtype)


def int8_matmul_tpu(
    a_q,
    b_q,
    a_scale,
    b_scale,
    *,
    out_dtype,
    config: BlockConfig | None = None,
    b_layout="kn",
    interpret=False,
) -> jax.Array:
    """``(a_q @ b_q) * a_scale * b_scale`` as a Pallas TPU kernel.

    Args:
      a_q: ``int8`` ``(M, K)``; b_q: ``int8`` ``(K, N)``, or ``(N, K)`` with ``b_layout="nk"``
        (the MXU contracts a transposed right operand natively).
      a_scale: float32 ``(M, 1)``; b_scale: float32 ``(1, N)``.
      out_dtype: dtype of the result.
      config: tiles (``block_m`` % 32, ``block_n`` % 128, ``block_k`` % 128); default
        :func:`default_config_tpu`.
      interpret: ``bool`` or ``pltpu.InterpretParams``, passed to ``pl.pallas_call``.

    Returns:
      ``(M, N)`` array of ``out_dtype``: the int32 accumulator, converted to float32 and
      scaled in the epilogue of the last K step.
    """
    dn = int8_dimension_numbers(b_layout)
    m, k = a_q.shape
    n = b_q.shape[1] if b_layout == "kn" else b_q.shape[0]
    if config is None:
        config = default_config_tpu("int8_matmul", m, k, n)
    _check_int8_config(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    a_q = _pad2(a_q, mp, kp)
    if b_layout == "kn":
        b_q, b_spec = _pad2(b_q, kp, np_), pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))
    else:
        b_q, b_spec = _pad2(b_q, np_, kp), pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk))
    a_scale = _pad2(jnp.asarray(a_scale, jnp.float32).reshape(m, 1), mp, 1)
    b_scale = _pad2(jnp.asarray(b_scale, jnp.float32).reshape(1, n), 1, np_)

    out = pl.pallas_call(
        functools.partial(_int8_kernel, dn=dn),
        out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.dtype(out_dtype)),
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            b_spec,
            pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.int32)],
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="qjax_int8_matmul",
    )(a_q, b_q, a_scale, b_scale)
    return out if (mp, np_) == (m, n) else out[:m, :n]


# -- weight only ---------------------------------------------------------------------------------


def _pairs_to_halves(x: jax.Array, block_k: int) -> jax.Array:
    """``x[:, k_perm_pairs_to_halves(K, block_k)]`` as a transpose (no gather): within each
    K tile, the even columns, then the odd ones."""
    m, k = x.shape
    return x.reshape(m, k // block_k, block_k // 2, 2).swapaxes(2, 3).reshape(m, k)


def _row_scale(s, first: int, count: int, rows: int):
    """Groups ``first .. first+count`` of a ``(g, 1, bn)`` scale block as a per-row
    ``(count * rows, bn)`` scale (``rows`` consecutive rows share a group)."""
    s = s[first : first + count]
    bn = s.shape[-1]
    return jnp.broadcast_to(s, (count, rows, bn)).reshape(count * rows, bn)


def _dq(codes, scale=None):
    """int32 codes (times a float32 per-row scale) as the bfloat16 MXU operand."""
    w = codes.astype(jnp.float32)
    if scale is not None:
        w = w * scale
    return w.astype(jnp.bfloat16)


def _dot(x, w):
    return lax.dot_general(x, w, _DOT, preferred_element_type=jnp.float32)


def _weight_only_kernel(*refs, layout: str, mode: str, g_tile: int, rows: int):
    """One ``(bm, bn)`` output tile, one K step.

    ``mode``: ``"channel"`` (scale in the epilogue), ``"outer"`` (one group per K tile:
    the tile's partial sum scaled before accumulation) or ``"inner"`` (``g_tile`` groups of
    ``rows`` code rows per tile: per-row scales applied while dequantizing).
    """
    if layout == "n_pairs":
        x_ref, w_ref, se_ref, so_ref, oe_ref, oo_ref, acc_e, acc_o = refs
        s_refs, o_refs, accs = (se_ref, so_ref), (oe_ref, oo_ref), (acc_e, acc_o)
    else:
        x_ref, w_ref, s_ref, o_ref, acc = refs
        s_refs, o_refs, accs = (s_ref,), (o_ref,), (acc,)
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        for a in accs:
            a[...] = jnp.zeros_like(a)

    inner = mode == "inner"
    if layout == "int8":
        s = _row_scale(s_refs[0][...], 0, g_tile, rows) if inner else None
        parts = [_dot(x_ref[...], _dq(w_ref[...].astype(jnp.int32), s))]
    elif layout == "n_pairs":
        x = x_ref[...]
        codes = nibbles(w_ref[...])
        parts = [
            _dot(x, _dq(c, _row_scale(sr[...], 0, g_tile, rows) if inner else None))
            for c, sr in zip(codes, s_refs)
        ]
    else:  # k_halves, k_pairs: activation halves times low / high nibbles
        half = x_ref.shape[1] // 2
        lo, hi = nibbles(w_ref[...])
        if not inner:
            s_lo = s_hi = None
        elif layout == "k_halves":  # low nibbles: rows [0, bk/2) of the tile, high: [bk/2, bk)
            s_lo = _row_scale(s_refs[0][...], 0, g_tile // 2, rows)
            s_hi = _row_scale(s_refs[0][...], g_tile // 2, g_tile // 2, rows)
        else:  # k_pairs: byte row r holds tile rows 2r, 2r+1, both in group 2r // G
            s_lo = s_hi = _row_scale(s_refs[0][...], 0, g_tile, rows)
        parts = [_dot(x_ref[:, :half], _dq(lo, s_lo)) + _dot(x_ref[:, half:], _dq(hi, s_hi))]

    for a, p, sr in zip(accs, parts, s_refs):
        if mode == "outer":
            p = p * sr[0]  # (1, bn)
        a[...] += p

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        for a, o, sr in zip(accs, o_refs, s_refs):
            out = a[...] * sr[...] if mode == "channel" else a[...]
            o[...] = out.astype(o.dtype)


def weight_only_matmul_tpu(
    x,
    w,
    scales,
    *,
    layout: str,
    group_size: int | None,
    pack_block: int | None,
    out_dtype,
    config: BlockConfig | None = None,
    interpret=False,
) -> jax.Array:
    """``x @ dequantize(w, scales)`` as a Pallas TPU kernel.

    Args:
      x: float ``(M, K)``, fed to the MXU as bfloat16.
      w: weight in ``layout`` (``"int8"`` ``(K, N)``; ``"k_halves"`` / ``"k_pairs"``
        ``(K/2, N)``; ``"n_pairs"`` ``(K, N/2)``; int4 bytes as ``uint8`` or ``int8``).
      scales: float32 ``(K // group_size, N)``, or ``(1, N)`` when ``group_size`` is None.
      layout, group_size, pack_block: the quantization (``pack_block`` for ``"k_halves"``).
      out_dtype: dtype of the result.
      config: tiles; default :func:`default_config_tpu`. Rules: ``block_m`` % 8;
        ``block_n`` % 128 (% 256 for ``"n_pairs"``, the logical columns of a tile);
        ``block_k`` % 128 (% 256 for the K-packed layouts, and ``== pack_block`` for
        ``"k_halves"``); ``block_k`` a multiple of ``group_size`` or the reverse; for
        groups smaller than the tile, ``group_size`` (``group_size / 2`` for ``"k_pairs"``)
        % 8 and, for ``"k_halves"``, dividing ``block_k / 2``.
      interpret: ``bool`` or ``pltpu.InterpretParams``, passed to ``pl.pallas_call``.

    Returns:
      ``(M, N)`` array of ``out_dtype``, accumulated in float32.

    ``"k_pairs"`` runs the ``"k_halves"`` kernel on activations permuted as
    :func:`~qjax.kernels._common.k_perm_pairs_to_halves` says (a transpose); ``"n_pairs"``
    computes the even and odd output columns as two outputs and interleaves them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    m, kk = x.shape
    wk, wn = w.shape
    k = 2 * wk if layout in ("k_halves", "k_pairs") else wk
    n = 2 * wn if layout == "n_pairs" else wn
    if kk != k:
        raise ValueError(f"x has K={kk} but the {layout!r} weight of shape {w.shape} holds K={k}")
    if config is None:
        config = default_config_tpu("weight_only", m, k, n, group_size, layout, pack_block)
    _check_weight_only_config(config, layout, group_size, pack_block)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    g = group_size
    w = w if layout == "int8" else as_int8(w)
    scales = jnp.asarray(scales, jnp.float32)

    # Padding: M and N freely; K to whole tiles and whole groups (zero codes, zero scales).
    mp, np_ = _round_up(m, bm), _round_up(n, bn)
    kp = _round_up(k, bk if g is None else max(bk, g))
    if layout == "k_halves" and kp != k:
        raise ValueError(f"K={k} must be a multiple of block_k=pack_block={bk} for layout 'k_halves'")
    x = _pad2(x.astype(jnp.bfloat16), mp, kp)
    wr, wc = {"int8": (kp, np_), "n_pairs": (kp, np_ // 2)}.get(layout, (kp // 2, np_))
    w = _pad2(w, wr, wc)
    scales = _pad2(scales, scales.shape[0] if g is None else kp // g, np_)
    if layout == "k_pairs":
        x = _pairs_to_halves(x, bk)

    if g is None:
        mode, g_tile, rows = "channel", 1, 0
    elif g >= bk:
        mode, g_tile, rows = "outer", 1, 0
    else:
        mode, g_tile = "inner", bk // g
        rows = g // 2 if layout == "k_pairs" else g

    bnw = bn // 2 if layout == "n_pairs" else bn  # columns of one weight / output block
    s_list = [scales[:, 0::2], scales[:, 1::2]] if layout == "n_pairs" else [scales]
    if mode == "channel":
        s_spec = pl.BlockSpec((1, bnw), lambda i, j, kk: (0, j))
    else:
        s_list = [s.reshape(s.shape[0], 1, s.shape[1]) for s in s_list]
        if mode == "outer":
            # lax.div, not //: floor division lowers through `sign`, which needs a TPU to
            # query the chip version (no lowering for TPU from a CPU host); kk >= 0 anyway.
            per = g // bk
            s_spec = pl.BlockSpec((1, 1, bnw), lambda i, j, kk: (lax.div(kk, per), 0, j))
        else:
            s_spec = pl.BlockSpec((g_tile, 1, bnw), lambda i, j, kk: (kk, 0, j))
    w_rows = bk // 2 if layout in ("k_halves", "k_pairs") else bk
    n_out = 2 if layout == "n_pairs" else 1
    out_shape = jax.ShapeDtypeStruct((mp, np_ // n_out), jnp.dtype(out_dtype))
    o_spec = pl.BlockSpec((bm, bnw), lambda i, j, kk: (i, j))

    outs = pl.pallas_call(
        functools.partial(_weight_only_kernel, layout=layout, mode=mode, g_tile=g_tile, rows=rows),
        out_shape=[out_shape] * n_out,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((w_rows, bnw), lambda i, j, kk: (kk, j)),
            *[s_spec] * len(s_list),
        ],
        out_specs=[o_spec] * n_out,
        scratch_shapes=[pltpu.VMEM((bm, bnw), jnp.float32)] * n_out,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name=f"qjax_weight_only_{layout}",
    )(x, w, *s_list)
    out = outs[0] if n_out == 1 else jnp.stack(outs, axis=-1).reshape(mp, np_)
    return out if (mp, np_) == (m, n) else out[:m, :n]
