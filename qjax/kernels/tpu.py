"""Pallas TPU (Mosaic) kernels for the low-bit matmuls.

* :func:`int8_matmul_tpu`: ``int8 x int8 -> int32`` blocked matmul with the per-token x
  per-channel float32 rescale fused into the epilogue.
* :func:`weight_only_matmul_tpu`: bfloat16 activations times int8 / int4 weights (any of
  the layouts of :mod:`qjax.kernels._common`, ``(K, N)`` or stored ``(N, K)``), dequantized
  tile by tile in VMEM, float32 accumulation.

Both take already validated, normalised operands (the public API checks shapes, dtypes
and scales); they check only the block configuration, raising ``ValueError`` with the
rule that failed. Operands whose sizes are not multiples of the blocks are zero-padded
here (only when needed) and the result sliced back.

The block configurations' rules and defaults: :mod:`qjax.kernels.tpu_config`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.kernels._common import BlockConfig, as_int8, int8_dimension_numbers, nibbles, split_layout
from qjax.kernels.tpu_config import (
    check_int8_config,
    check_weight_only_config,
    default_config_tpu,
    round_up,
)

__all__ = ["check_weight_only_config", "default_config_tpu", "int8_matmul_tpu", "weight_only_matmul_tpu"]

_DIMS = ("parallel", "parallel", "arbitrary")
_DOT = (((1,), (0,)), ((), ()))
_DOT_NK = (((1,), (1,)), ((), ()))  # x (m, k) . w (n, k): the MXU takes a transposed right operand


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
    """``a`` zero-padded at the end to ``(rows, cols)`` (no copy when already that shape)."""
    r, c = a.shape
    if (r, c) == (rows, cols):
        return a
    return jnp.pad(a, ((0, rows - r), (0, cols - c)))


def _compiler_params() -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=_DIMS)


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
    check_int8_config(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
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


def _dot(x, w, nk=False):
    return lax.dot_general(x, w, _DOT_NK if nk else _DOT, preferred_element_type=jnp.float32)


def _weight_only_kernel(*refs, layout: str, mode: str, g_tile: int, rows: int, nk: bool = False):
    """One ``(bm, bn)`` output tile, one K step.

    ``mode``: ``"channel"`` (scale in the epilogue), ``"outer"`` (one group per K tile:
    the tile's partial sum scaled before accumulation) or ``"inner"`` (``g_tile`` groups of
    ``rows`` code rows per tile: per-row scales applied while dequantizing; not for a
    weight stored ``(N, K)``, ``nk``, whose tile is ``(N, K)``-shaped and contracted on its
    last axis).
    """
    dot = functools.partial(_dot, nk=nk)
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
        parts = [dot(x_ref[...], _dq(w_ref[...].astype(jnp.int32), s))]
    elif layout == "n_pairs":
        x = x_ref[...]
        codes = nibbles(w_ref[...])
        parts = [
            dot(x, _dq(c, _row_scale(sr[...], 0, g_tile, rows) if inner else None))
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
        parts = [dot(x_ref[:, :half], _dq(lo, s_lo)) + dot(x_ref[:, half:], _dq(hi, s_hi))]

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
        ``(K/2, N)``; ``"n_pairs"`` ``(K, N/2)``; int4 bytes as ``uint8`` or ``int8``), or
        stored ``(N, K)`` with ``"_nk"`` appended (``"int8_nk"`` ``(N, K)``, ``"k_pairs_nk"``
        ``(N, K/2)``, ``"n_pairs_nk"`` ``(N/2, K)``; groups must then be multiples of
        ``block_k``, see :func:`check_weight_only_config`).
      scales: float32 ``(K // group_size, N)``, or ``(1, N)`` when ``group_size`` is None;
        ``(N, K // group_size)`` / ``(N, 1)`` for an ``"_nk"`` layout.
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
    full_layout = layout
    layout, nk = split_layout(layout)
    m, kk = x.shape
    wk, wn = w.shape[::-1] if nk else w.shape  # the (K, N) view of the stored array
    k = 2 * wk if layout in ("k_halves", "k_pairs") else wk
    n = 2 * wn if layout == "n_pairs" else wn
    if kk != k:
        raise ValueError(f"x has K={kk} but the {full_layout!r} weight of shape {w.shape} holds K={k}")
    if config is None:
        config = default_config_tpu("weight_only", m, k, n, group_size, full_layout, pack_block)
    check_weight_only_config(config, full_layout, group_size, pack_block)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    g = group_size
    w = w if layout == "int8" else as_int8(w)
    scales = jnp.asarray(scales, jnp.float32)
    if nk:  # (N, groups) -> (groups, N): a small copy, so the scale rows broadcast over lanes
        scales = scales.T

    # Padding: M and N freely; K to whole tiles and whole groups (zero codes, zero scales).
    mp, np_ = round_up(m, bm), round_up(n, bn)
    kp = round_up(k, bk if g is None else max(bk, g))
    if layout == "k_halves" and kp != k:
        raise ValueError(f"K={k} must be a multiple of block_k=pack_block={bk} for layout 'k_halves'")
    x = _pad2(x.astype(jnp.bfloat16), mp, kp)
    wr, wc = {"int8": (kp, np_), "n_pairs": (kp, np_ // 2)}.get(layout, (kp // 2, np_))
    w = _pad2(w, wc, wr) if nk else _pad2(w, wr, wc)
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
    if nk:
        w_spec = pl.BlockSpec((bnw, w_rows), lambda i, j, kk: (j, kk))
    else:
        w_spec = pl.BlockSpec((w_rows, bnw), lambda i, j, kk: (kk, j))
    n_out = 2 if layout == "n_pairs" else 1
    out_shape = jax.ShapeDtypeStruct((mp, np_ // n_out), jnp.dtype(out_dtype))
    o_spec = pl.BlockSpec((bm, bnw), lambda i, j, kk: (i, j))

    outs = pl.pallas_call(
        functools.partial(_weight_only_kernel, layout=layout, mode=mode, g_tile=g_tile, rows=rows, nk=nk),
        out_shape=[out_shape] * n_out,
        grid=(mp // bm, np_ // bn, kp // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            w_spec,
            *[s_spec] * len(s_list),
        ],
        out_specs=[o_spec] * n_out,
        scratch_shapes=[pltpu.VMEM((bm, bnw), jnp.float32)] * n_out,
        compiler_params=_compiler_params(),
        interpret=interpret,
        name=f"qjax_weight_only_{full_layout}",
    )(x, w, *s_list)
    out = outs[0] if n_out == 1 else jnp.stack(outs, axis=-1).reshape(mp, np_)
    return out if (mp, np_) == (m, n) else out[:m, :n]
