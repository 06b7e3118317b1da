"""Public entry points of the low-bit matmul kernels.

Each takes the quantized operands, picks the platform (``"gpu"``: Pallas Triton kernels,
``"tpu"``: Pallas Mosaic kernels, ``"xla"``: the same arithmetic as plain XLA ops), picks
block sizes (an explicit ``config``, else the tuning table, else a default), checks them
against the shape, and runs.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from qjax.kernels import _common as c
from qjax.kernels import tuning
from qjax.kernels._common import BlockConfig

PLATFORMS = ("gpu", "tpu", "xla")
_WGMMA_OUT = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))


def resolve_platform(platform: str | None, interpret) -> str:
    """``platform`` or the default backend's (``cuda``/``rocm``/``gpu`` -> ``"gpu"``,
    ``tpu`` -> ``"tpu"``, anything else -> ``"xla"``).

    Raises:
      ValueError: unknown platform, or ``interpret`` without a kernel platform named.
    """
    if platform is None:
        backend = jax.default_backend()
        platform = "gpu" if backend in ("gpu", "cuda", "rocm") else "tpu" if backend == "tpu" else "xla"
        if interpret and platform == "xla":
            raise ValueError(
                "interpret=True on a CPU backend: name the kernel to interpret with platform='gpu' or 'tpu'"
            )
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is not one of {PLATFORMS}")
    return platform


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_config_gpu(cfg: BlockConfig, kind: str, m: int, k: int, n: int, group_size, layout) -> None:
    """Raise ``ValueError`` naming the rule a GPU config breaks for this shape.

    ``engine="wgmma"`` configs follow :func:`qjax.kernels.gpu_wgmma.check_config_wgmma`
    (W8A8) or :func:`qjax.kernels.gpu_wgmma_weight_only.check_config` (weight-only).
    Triton rules: tiles are powers of two with ``block_m >= 16`` (Triton's smallest dot; the
    ``gemv`` engine instead takes ``block_m <= 16``, no swap, ``block_n >= 64``); ``block_n``
    divides N; ``split_k`` divides K and ``block_k`` divides ``K // split_k``; with groups,
    ``block_k`` divides the group size and the group size divides ``K // split_k``; int4
    tiles keep at least 16 along the contraction after unpacking; ``dequant="ptx"`` is for
    the ``triton`` engine's weight-only kernels only, and not swapped ``k_pairs`` tiles (the
    nibbles joined along K after the asm gave wrong results on an H100);
    ``split_reduce="kernel"`` is for the ``triton`` engine's weight-only kernels with
    ``split_k > 1``.
    """

    def bad(msg):
        raise ValueError(f"config {cfg} does not fit {kind} at M={m}, K={k}, N={n}: {msg}")

    for name in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            bad(f"{name}={v!r} must be a positive int")
    if cfg.engine not in c.ENGINES:
        bad(f"engine must be one of {c.ENGINES}")
    if cfg.persistent and cfg.engine != "wgmma":
        bad("persistent is a wgmma-engine option")
    if cfg.dequant not in c.DEQUANTS:
        bad(f"dequant must be one of {c.DEQUANTS}")
    if cfg.dequant == "ptx" and (cfg.engine != "triton" or kind == "w8a8"):
        bad("dequant='ptx' is the triton engine's weight-only (w4a16, w8a16) code conversion")
    if cfg.split_reduce not in c.SPLIT_REDUCES:
        bad(f"split_reduce must be one of {c.SPLIT_REDUCES}")
    if cfg.split_reduce == "kernel" and (cfg.engine != "triton" or kind == "w8a8" or cfg.split_k == 1):
        bad("split_reduce='kernel' sums the split_k > 1 partials of the triton engine's weight-only kernels")
    if cfg.engine == "wgmma":
        if kind == "w8a8":
            from qjax.kernels import gpu_wgmma

            gpu_wgmma.check_config_wgmma(cfg, m, k, n, layout)
        else:
            from qjax.kernels import gpu_wgmma_weight_only

            gpu_wgmma_weight_only.check_config(cfg, kind, m, k, n, group_size, layout)
        return
    for name in ("block_m", "block_n", "block_k"):
        if not _pow2(getattr(cfg, name)):
            bad(f"{name} must be a power of two")
    if cfg.engine == "gemv":
        if kind == "w8a8":
            bad("the gemv engine runs the weight-only ops only")
        if cfg.swap or cfg.block_m > 16:
            bad("the gemv engine takes block_m <= 16 and no swap")
        if cfg.block_n < 64:
            bad("the gemv engine needs block_n >= 64 (whole 32-bit weight words per thread)")
    elif cfg.block_m < 16:
        bad("block_m must be at least 16 (Triton's smallest dot)")
    if cfg.block_n < 16 or cfg.block_k < 16:
        bad("block_n and block_k must be at least 16")
    if n % cfg.block_n:
        bad("block_n must divide N")
    if cfg.split_k < 1 or k % cfg.split_k or (k // cfg.split_k) % cfg.block_k:
        bad("split_k must divide K and block_k must divide K // split_k")
    if kind == "w8a8" and cfg.split_k != 1:
        bad("split_k is for the weight-only kernels")
    base = c.split_layout(layout)[0] if kind != "w8a8" else layout
    if cfg.dequant == "ptx" and base == "k_pairs" and cfg.swap:
        # wrong on an H100 (relative error ~1 at M = 1, 13, 70;
        # experiments/results/gpu_session_2026-11-26/) where the kernel joins the nibbles along
        # K after the asm, though the emulated PTX is right in the interpreter. Unswapped tiles
        # no longer join (even / odd activations instead) and pass on an H100
        # (experiments/results/gpu_session_2026-11-27/); swapped ones still join
        bad("dequant='ptx' gives wrong results with swapped k_pairs tiles on hardware; use dequant='logic'")
    if base in ("k_halves", "k_pairs") and cfg.block_k < 32:
        bad("int4 packed along K needs block_k >= 32 (two halves of at least 16)")
    if base == "n_pairs" and cfg.block_n < 32:
        bad("int4 packed along N needs block_n >= 32 (two halves of at least 16)")
    if group_size is not None and (group_size % cfg.block_k or (k // cfg.split_k) % group_size):
        bad(f"block_k must divide group_size={group_size} and group_size must divide K // split_k")


def default_config_gpu(kind: str, m: int, k: int, n: int, group_size, layout, pack_block=None) -> BlockConfig:
    """A reasonable GPU config when the tuning table has none (see ``check_config_gpu``)."""
    if layout == "k_halves":
        bk_pref = pack_block
    elif kind == "w8a8":
        bk_pref = 128
    else:
        bk_pref = 128 if m <= 64 else 64
    bk = bk_pref
    limit = group_size if group_size is not None else k
    while bk > 16 and (limit % bk or k % bk):
        bk //= 2
    if kind == "w8a8":
        bm = 128 if m > 64 else max(16, c.pow2_at_least(m, 16))
        bn = next(b for b in (128, 64, 32, 16) if n % b == 0) if n % 16 == 0 else 16
        return BlockConfig(bm, bn, bk, 1, False, 8 if bm * bn >= 128 * 128 else 4, 3)
    if m <= 16:
        bn = next((b for b in (64, 32, 128, 16) if n % b == 0), 16)
        tiles = n // bn
        split = 1
        while (
            tiles * split < 128
            and split < 8
            and k % (2 * split * bk) == 0
            and (group_size is None or (k // (2 * split)) % group_size == 0)
        ):
            split *= 2
        return BlockConfig(16, bn, bk, split, True, 4, 4)
    bm = 64 if m <= 64 else 128
    bn = next((b for b in (128, 64, 32, 16) if n % b == 0), 16)
    return BlockConfig(bm, bn, bk, 1, False, 4 if bm == 64 else 8, 3)


def kernel_layout(layout: str) -> str:
    """The layout the kernel reads: a W8A8 weight stored ``(N, K)`` (dispatch's
    ``"nk_stored"``) is the kernel's ``"nk"``."""
    return "nk" if layout == "nk_stored" else layout


def engines_here(kind: str, layout: str) -> tuple[str, ...]:
    """GPU engines whose tuning entries apply to this op on the current device (``gemv``:
    the weight-only ops; ``wgmma``: on a Hopper GPU, W8A8 with the weight ``(N, K)`` and the
    weight-only ops with a weight stored ``(N, K)`` as ``"n_pairs_nk"`` / ``"int8_nk"``)."""
    if kind != "w8a8":
        from qjax.kernels import gpu_wgmma, gpu_wgmma_weight_only

        if layout in gpu_wgmma_weight_only.LAYOUTS and gpu_wgmma.available():
            return ("triton", "gemv", "wgmma")
        return ("triton", "gemv")
    if kernel_layout(layout) == "nk":
        from qjax.kernels import gpu_wgmma

        if gpu_wgmma.available():
            return ("triton", "wgmma")
    return ("triton",)


def tuned_entry(platform, kind, m, k, n, group_size, layout, pack_block=None) -> tuning.TunedEntry | None:
    """The ``platform`` tuning table's entry for this op: on a GPU, of each usable engine's
    nearest entry (:func:`engines_here`; only configs that fit the shape), the one
    :func:`tuning.preferred` picks (nearest batch, on a tie the larger: an engine measured at
    one row says nothing about four, the CUDA-core ``gemv`` ran 2-9x slower at M = 4 than at
    M = 1 on an H100; then nearest shape; then the shorter kernel time, or the larger speedup
    across shapes); on a TPU the nearest entry (its block sizes are re-derived by
    ``default_config_tpu``). ``None`` if none qualifies.
    """
    if platform != "gpu":
        return tuning.lookup(platform, tuning.kernel_name(kind, layout), m, k, n, group_size)
    fits = []
    for engine in engines_here(kind, layout):
        e = tuning.lookup("gpu", tuning.kernel_name(kind, layout, engine), m, k, n, group_size)
        if e is None or (layout == "k_halves" and e.config.block_k != pack_block):
            continue
        try:
            check_config_gpu(e.config, kind, m, k, n, group_size, kernel_layout(layout))
        except ValueError:  # the nearest measured config does not fit this shape
            continue
        fits.append(e)

    return tuning.preferred(fits, m, k, n)


def choose_config(platform, kind, m, k, n, group_size, layout, pack_block, config) -> BlockConfig:
    """``config``, else the tuning table's best entry that fits, else the default. For a W8A8
    weight stored ``(N, K)`` (``"nk_stored"``) without entries of its own, the entries of the
    in-program transposed weight (``"nk"``): the kernel and its operand are the same."""
    table_layout, layout = layout, kernel_layout(layout)
    if platform == "tpu":
        from qjax.kernels import tpu

        if config is not None:
            if config.engine != "triton":
                raise ValueError(f"config {config}: engine {config.engine!r} is a GPU kernel")
            if config.dequant != "logic":
                raise ValueError(f"config {config}: dequant {config.dequant!r} is GPU (PTX) only")
            return config
        if kind == "w8a8":
            return tpu.default_config_tpu("int8_matmul", m, k, n, group_size, layout, pack_block)
        cfg = tpu.default_config_tpu("weight_only", m, k, n, group_size, layout, pack_block)
        with _no_tile_fits(platform, kind, m, k, n):  # no legal tile (group sizes, pack_block)
            tpu.check_weight_only_config(cfg, layout, group_size, pack_block)
        return cfg
    if config is not None:
        check_config_gpu(config, kind, m, k, n, group_size, layout)
        return config
    entry = tuned_entry(platform, kind, m, k, n, group_size, table_layout, pack_block)
    if entry is None and table_layout != layout:
        entry = tuned_entry(platform, kind, m, k, n, group_size, layout, pack_block)
    if entry is not None:
        return entry.config
    cfg = default_config_gpu(kind, m, k, n, group_size, layout, pack_block)
    with _no_tile_fits(platform, kind, m, k, n):
        check_config_gpu(cfg, kind, m, k, n, group_size, layout)
    return cfg


@contextlib.contextmanager
def _no_tile_fits(platform: str, kind: str, m: int, k: int, n: int):
    """Say that no kernel tile fits the shape when the config the caller did not choose (the
    default) is refused, with the rule it broke."""
    try:
        yield
    except ValueError as e:
        hint = (
            " (the GPU kernels need K and N multiples of 16)"
            if platform == "gpu" and (k % 16 or n % 16)
            else ""
        )
        raise ValueError(
            f"no {platform} kernel tile fits {kind} at M={m}, K={k}, N={n}{hint}: the default "
            f"tile breaks a rule: {e}. Use platform='xla' (or qjax.quantized's backend='auto', "
            "which falls back by itself)"
        ) from None


def _check_wgmma_runnable(cfg: BlockConfig, interpret) -> None:
    """Refuse a ``wgmma``-engine run that cannot happen here: ``interpret=True`` (the Mosaic
    GPU kernels need explicit GPU interpret parameters) or a GPU that is not a Hopper."""
    from qjax.kernels import gpu_wgmma

    if interpret is True:
        raise ValueError(
            "interpret=True: the wgmma engine runs in JAX's GPU interpreter only with explicit "
            "interpret parameters (InterpretGPUParams); or pick a Triton config"
        )
    if not interpret and jax.default_backend() == "gpu" and not gpu_wgmma.available():
        cc = tuning.gpu_compute_capability() or "unknown"
        raise ValueError(
            f"config {cfg}: the wgmma engine needs a Hopper (sm_90) GPU, this one has compute "
            f"capability {cc}; pick a Triton config"
        )


def _weight_only(
    x, w, scales, *, bits, layout, b_layout, group_size, pack_block, out_dtype, platform, config, interpret
):
    layout = c.weight_layout(layout, b_layout)
    c.check_2d("x", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}")
    c.check_2d("w", w)
    w = c.as_int8(w) if bits == 4 else w
    if bits == 8 and w.dtype != jnp.int8:
        raise TypeError(f"w must be int8 codes, got {w.dtype}")
    k, n = c.logical_k_n(layout, w.shape)
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(
            f"x has {x.shape[1]} columns but the {layout} weight {tuple(w.shape)} holds K={k} rows"
        )
    if layout == "k_halves" and (pack_block is None or pack_block <= 0 or pack_block % 2 or k % pack_block):
        raise ValueError(f"pack_block={pack_block!r} must be positive, even and divide K={k}")
    s = c.normalize_weight_scales(scales, k, n, group_size, nk=b_layout == "nk")
    group_size = None if group_size is None else int(group_size)  # validated: a NumPy int is fine
    if layout == "k_halves" and group_size is not None and group_size % pack_block:
        raise ValueError(
            f"pack_block={pack_block} must divide group_size={group_size} (each byte's two "
            "nibbles must share a group)"
        )
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    platform = resolve_platform(platform, interpret)
    common = dict(layout=layout, group_size=group_size, out_dtype=out_dtype)
    reference = lambda x, w, s: c.xla_weight_only(x, w, s, pack_block=pack_block, **common)
    if m == 0 or n == 0 or k == 0 or platform == "xla":
        return reference(x, w, s)
    kind = "w4a16" if bits == 4 else "w8a16"
    cfg = choose_config(platform, kind, m, k, n, group_size, layout, pack_block, config)
    if platform == "tpu":
        from qjax.kernels import tpu

        run = functools.partial(tpu.weight_only_matmul_tpu, pack_block=pack_block)
    else:
        from qjax.kernels import gpu, gpu_gemv

        if layout == "k_halves" and cfg.block_k != pack_block:
            raise ValueError(
                f"for layout 'k_halves' the kernel's block_k ({cfg.block_k}) must equal "
                f"pack_block ({pack_block})"
            )
        if cfg.engine == "wgmma":
            from qjax.kernels import gpu_wgmma_weight_only

            _check_wgmma_runnable(cfg, interpret)
            run = gpu_wgmma_weight_only.weight_only_wgmma
        else:
            run = gpu_gemv.weight_only_gemv if cfg.engine == "gemv" else gpu.weight_only_matmul_gpu
    kernel = lambda x, w, s: run(x, w, s, config=cfg, interpret=interpret, **common)
    return c.with_reference_jvp(kernel, reference, x, w, s)


def w4a16_matmul(
    x: jax.Array,
    w_packed: jax.Array,
    scales: jax.Array,
    *,
    group_size: int | None = None,
    layout: str = "k_halves",
    b_layout: str = "kn",
    pack_block: int | None = 128,
    out_dtype=None,
    platform: str | None = None,
    config: BlockConfig | None = None,
    interpret=False,
) -> jax.Array:
    """``x @ W`` for a weight of packed int4 codes times scales (W4A16).

    Args:
      x: ``(M, K)`` float activations (the kernels compute in bfloat16, accumulate in
        float32).
      w_packed: ``uint8``/``int8`` bytes in ``layout``: ``"k_halves"`` ``(K/2, N)`` from
        :func:`qjax.kernels.pack_int4` (default), ``"k_pairs"`` ``(K/2, N)`` or
        ``"n_pairs"`` ``(K, N/2)`` as ``qjax.quantize`` packs along K or N. With
        ``b_layout="nk"`` the weight is stored ``(N, K)``: ``"k_pairs"`` ``(N, K/2)``,
        ``"n_pairs"`` ``(N/2, K)``.
      scales: ``(N,)``/``(1, N)`` per channel, or ``(K // group_size, N)``; with
        ``b_layout="nk"``: ``(N,)``/``(N, 1)`` or ``(N, K // group_size)``.
      group_size: rows of K sharing a scale (``None``: per channel).
      layout: see above.
      b_layout: ``"kn"`` (default) or ``"nk"``: the weight stored ``(N, K)``, as
        PyTorch's ``(out, in)`` weights and ``x @ w.T`` models hold it (not ``"k_halves"``;
        on TPU with groups of at least ``block_k``, 128).
      pack_block: the ``"k_halves"`` block (the GPU kernel's K tile equals it).
      out_dtype: result dtype (default ``x.dtype``).
      platform: ``"gpu"``, ``"tpu"`` or ``"xla"`` (default: the default backend's; CPU ->
        ``"xla"``).
      config: block sizes (default: tuning table, else a heuristic). On a Hopper GPU,
        ``BlockConfig(..., swap=True, engine="wgmma")`` with ``b_layout="nk"``,
        ``layout="n_pairs"`` and per-channel scales runs the Mosaic GPU kernel of
        :mod:`qjax.kernels.gpu_wgmma_weight_only` (TMA-fed ``wgmma``).
      interpret: run the kernel in the Pallas interpreter (``True``, or for TPU a
        ``pltpu.InterpretParams``; the ``wgmma`` engine takes JAX's GPU interpreter
        parameters); needs ``platform`` on CPU.

    Returns:
      ``(M, N)`` array of ``out_dtype``. Differentiable in ``x`` and ``scales`` (forward and
      reverse mode, any order): the derivatives are those of the XLA formulation
      (``platform="xla"``) at the same operands, e.g. for adapters trained over a frozen
      int4 weight.

    Raises:
      ValueError / TypeError: shapes, dtypes, group size, pack block or config that do not fit,
        named in the message.

    Example:
      >>> w = qjax.kernels.pack_int4(codes, pack_block=128)
      >>> y = qjax.kernels.w4a16_matmul(x, w, scales, group_size=128)
    """
    return _weight_only(
        x,
        w_packed,
        scales,
        bits=4,
        layout=layout,
        b_layout=b_layout,
        group_size=group_size,
        pack_block=pack_block,
        out_dtype=out_dtype,
        platform=platform,
        config=config,
        interpret=interpret,
    )


def w8a16_matmul(
    x: jax.Array,
    w_q: jax.Array,
    scales: jax.Array,
    *,
    group_size: int | None = None,
    b_layout: str = "kn",
    out_dtype=None,
    platform: str | None = None,
    config: BlockConfig | None = None,
    interpret=False,
) -> jax.Array:
    """``x @ W`` for int8 weight codes ``(K, N)`` (``(N, K)`` with ``b_layout="nk"``)
    times per-channel or per-group scales (W8A16). Arguments, result and derivatives as
    :func:`w4a16_matmul`."""
    return _weight_only(
        x,
        w_q,
        scales,
        bits=8,
        layout="int8",
        b_layout=b_layout,
        group_size=group_size,
        pack_block=None,
        out_dtype=out_dtype,
        platform=platform,
        config=config,
        interpret=interpret,
    )


def int8_matmul(
    a_q: jax.Array,
    b_q: jax.Array,
    a_scale,
    b_scale,
    *,
    out_dtype=jnp.bfloat16,
    b_layout: str = "kn",
    platform: str | None = None,
    config: BlockConfig | None = None,
    interpret=False,
) -> jax.Array:
    """``(a_q @ b_q) * a_scale[:, None] * b_scale[None, :]`` with int8 x int8 -> int32
    accumulation and the rescale fused in the kernel's epilogue (W8A8).

    Args:
      a_q: ``(M, K)`` int8 (activations, per-token or per-tensor scale).
      b_q: ``(K, N)`` int8 (weights, per-channel or per-tensor scale), or ``(N, K)`` with
        ``b_layout="nk"``. On Hopper the 8-bit tensor-core instruction reads both operands
        K-major, so weights stored ``(N, K)`` (transposed once, offline) spare the kernel
        a transpose of every weight tile.
      a_scale: scalar, ``(M,)`` or ``(M, 1)``.
      b_scale: scalar, ``(N,)`` or ``(1, N)``.
      b_layout: ``"kn"`` (default) or ``"nk"``: how ``b_q`` is stored.
      out_dtype, platform, config, interpret: as :func:`w4a16_matmul`. A GPU ``config``
        with ``engine="wgmma"`` (or a tuning-table entry holding one, used only on Hopper)
        runs the Mosaic GPU kernel of :mod:`qjax.kernels.gpu_wgmma` (needs
        ``b_layout="nk"``; float32 / bfloat16 / float16 output).

    Returns:
      ``(M, N)`` array of ``out_dtype``. Differentiable in the scales, as the XLA
      formulation (``platform="xla"``) is.

    Raises:
      ValueError / TypeError: operands that are not int8 matrices with matching K, an
        unknown ``b_layout``, scales of the wrong shape, or a config that does not fit.
    """
    c.check_2d("a_q", a_q, (jnp.int8,))
    c.check_2d("b_q", b_q, (jnp.int8,))
    c.int8_dimension_numbers(b_layout)  # validates b_layout
    m, k = a_q.shape
    k2, n = b_q.shape if b_layout == "kn" else b_q.shape[::-1]
    if k != k2:
        raise ValueError(
            f"a_q is {tuple(a_q.shape)} and b_q is {tuple(b_q.shape)} (b_layout={b_layout!r}): "
            "contraction sizes differ"
        )
    sa = c.row_scale(a_scale, m, "a_scale")
    sb = c.col_scale(b_scale, n, "b_scale")
    out_dtype = jnp.dtype(out_dtype)
    platform = resolve_platform(platform, interpret)
    reference = functools.partial(c.xla_int8_matmul, out_dtype=out_dtype, b_layout=b_layout)
    if m == 0 or n == 0 or k == 0 or platform == "xla":
        return reference(a_q, b_q, sa, sb)
    cfg = choose_config(platform, "w8a8", m, k, n, None, b_layout, None, config)
    if cfg.engine == "wgmma":
        from qjax.kernels import gpu_wgmma

        if out_dtype not in _WGMMA_OUT:
            raise ValueError(f"the wgmma engine writes {', '.join(map(str, _WGMMA_OUT))}, not {out_dtype}")
        _check_wgmma_runnable(cfg, interpret)
        kernel = functools.partial(
            gpu_wgmma.int8_matmul_wgmma, out_dtype=out_dtype, config=cfg, interpret=interpret
        )
        return c.with_reference_jvp(kernel, reference, a_q, b_q, sa, sb)
    kw = dict(out_dtype=out_dtype, config=cfg, b_layout=b_layout, interpret=interpret)
    if platform == "tpu":
        from qjax.kernels import tpu

        kernel = functools.partial(tpu.int8_matmul_tpu, **kw)
    else:
        from qjax.kernels import gpu

        kernel = functools.partial(gpu.int8_matmul_gpu, **kw)
    return c.with_reference_jvp(kernel, reference, a_q, b_q, sa, sb)
