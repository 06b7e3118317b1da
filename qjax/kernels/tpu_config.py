"""Block configurations of the Pallas TPU kernels (:mod:`qjax.kernels.tpu`): the rules a
config must follow, checked with ``ValueError`` naming the rule, and a legal default.

Tiling rules (Mosaic): the last two dimensions of every block are multiples of
``(8, 128)`` or the full array dimension; ``int8`` blocks get a second-minor multiple of
32 (their native ``(32, 128)`` tile); activation tiles are sliced into halves along lanes
for the K-packed layouts, so ``block_k / 2`` is a multiple of 128 there. A weight stored
``(N, K)`` has K on the lanes of its tile, so its groups must span whole K tiles.
"""

from __future__ import annotations

import math

from qjax.kernels._common import SPLIT_REDUCES, BlockConfig, cdiv, split_layout

_KINDS = ("int8_matmul", "weight_only")


def round_up(x: int, m: int) -> int:
    return cdiv(x, m) * m


def _check_positive(config: BlockConfig) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(config, name)
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"config.{name}={v!r} must be a positive int")
    if config.split_k != 1:
        raise ValueError(f"config.split_k={config.split_k} is not supported by the TPU kernels (must be 1)")
    if config.split_reduce not in SPLIT_REDUCES:
        raise ValueError(f"config.split_reduce={config.split_reduce!r} must be one of {SPLIT_REDUCES}")
    if config.split_reduce != "xla":
        raise ValueError(f"config.split_reduce={config.split_reduce!r} is a GPU option (TPU kernels: 'xla')")


def check_int8_config(config: BlockConfig) -> None:
    """Raise ``ValueError`` naming the rule an int8 matmul config breaks."""
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


def check_weight_only_config(
    config: BlockConfig, layout: str, group_size: int | None, pack_block: int | None
) -> None:
    """Raise ``ValueError`` naming the rule a weight-only config breaks (module docstring;
    ``layout`` may carry ``"_nk"``: the weight tile is then ``(block_n, block_k)`` with K on
    lanes, and a group covers whole K tiles)."""
    _check_positive(config)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    base, nk = split_layout(layout)
    where = f"an (N, K) weight packed along {'K' if base == 'k_pairs' else 'N'}" if nk else f"layout {base!r}"
    if bm % 8:
        raise ValueError(f"config.block_m={bm} must be a multiple of 8 (sublane tile)")
    if base == "n_pairs" and bn % 256:
        raise ValueError(
            f"config.block_n={bn} must be a multiple of 256 for {where} "
            "(block_n / 2 columns of each nibble plane, a multiple of 128 lanes)"
        )
    if bn % 128:
        raise ValueError(f"config.block_n={bn} must be a multiple of 128 (lane width)")
    if base in ("k_halves", "k_pairs") and bk % 256:
        raise ValueError(
            f"config.block_k={bk} must be a multiple of 256 for {where} "
            "(block_k / 2, the packed bytes and each activation half, a multiple of 128)"
        )
    if bk % 128:
        raise ValueError(
            f"config.block_k={bk} must be a multiple of 128 (lane width of the activation block)"
        )
    if nk:
        if group_size is not None and group_size % bk:
            raise ValueError(
                f"group_size={group_size} must be a multiple of config.block_k={bk} for a weight "
                "stored (N, K) (its scales vary along lanes; a group spans whole K tiles)"
            )
        return
    if layout == "k_halves" and bk != pack_block:
        raise ValueError(
            f"config.block_k={bk} must equal pack_block={pack_block} for layout "
            "'k_halves' (the K tile reads one packed block)"
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
    bm = 256 if m >= 512 else min(128, round_up(max(m, 1), sub))
    if kind == "int8_matmul":
        bn = 256 if n % 256 == 0 else 128
        bk = next((c for c in (512, 256, 128) if k % c == 0), min(512, round_up(k, 128)))
        return BlockConfig(bm, bn, bk)

    base = split_layout(layout)[0]
    if base == "n_pairs":
        bn = 512 if n % 512 == 0 else 256
    else:
        bn = 256 if n % 256 == 0 else 128
    if layout == "k_halves":
        return BlockConfig(bm, bn, pack_block if pack_block is not None else 0)
    cands = (512, 256) if base == "k_pairs" else (512, 256, 128)

    def legal(bk: int) -> bool:
        try:
            check_weight_only_config(BlockConfig(bm, bn, bk), layout, group_size, pack_block)
        except ValueError:
            return False
        return True

    ok = [c for c in cands if legal(c)]
    if group_size is not None and not ok:  # e.g. an odd group size: a K tile of whole groups
        step = 256 if base == "k_pairs" else 128
        ok = [c for c in (group_size * step // math.gcd(group_size, step),) if legal(c)]
    if not ok:
        ok = [cands[-1]]  # illegal: the kernel's check reports why
    bk = next((c for c in ok if k % c == 0), ok[-1])
    return BlockConfig(bm, bn, bk)
