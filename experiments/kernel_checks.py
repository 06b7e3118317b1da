"""Operands, float64 / integer references and the correctness checks of the kernel
benchmark (``bench_kernels.py``): every kernel layout against its reference before any
timing, a compile failure recorded as a failed check rather than raised."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from timing import rel_err

from qjax.kernels import BlockConfig, api, gpu_wgmma, gpu_wgmma_weight_only, pack_int4
from qjax.kernels import _common as kc
from qjax.numerics import packing


def make_weight_only(rng, bits, k, n, group):
    """Random codes ``(K, N)`` and scales (per channel or per group)."""
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    codes = rng.integers(lo, hi + 1, (k, n)).astype(np.int8)
    s = rng.uniform(0.5, 1.5, (1 if group is None else k // group, n)).astype(np.float32) / (
        hi * math.sqrt(k)
    )
    return codes, jnp.asarray(s)


def weight_in_layout(codes, layout, pack_block=None):
    """The codes as a kernel operand: int8, the kernel-native int4 halves, or the pair
    layouts ``qjax.quantize`` stores (``k_pairs``: packed along K, ``n_pairs``: along N);
    with ``"_nk"`` appended, the weight stored ``(N, K)`` (PyTorch's ``(out, in)``)."""
    base, nk = kc.split_layout(layout)
    if nk:
        stored = jnp.asarray(codes.T)
        return stored if base == "int8" else packing.pack(stored, 4, axis=1 if base == "k_pairs" else 0)
    if layout == "int8":
        return jnp.asarray(codes)
    if layout == "k_halves":
        return pack_int4(jnp.asarray(codes), pack_block=pack_block)
    return packing.pack(jnp.asarray(codes), 4, axis=0 if layout == "k_pairs" else 1)


def reference_weight_only(x, codes, s, group):
    k = codes.shape[0]
    rows = k if group is None else group
    w = (
        codes.reshape(k // rows, rows, -1).astype(np.float64) * np.asarray(s, np.float64)[:, None, :]
    ).reshape(k, -1)
    return np.asarray(x, np.float64) @ w


def _weight_only_check(name, bits, layout, x, w, s, ref, kw) -> dict:
    """One weight-only kernel call against its float64 reference (relative error under
    1e-2); a compile failure is a failed check, not a crash."""
    check = {"check": name}
    try:
        if bits == 4:
            y = api.w4a16_matmul(x, w, s, layout=layout, **kw)
        else:
            y = api.w8a16_matmul(x, w, s, **kw)
        e = rel_err(y, ref)
        check.update(ok=e < 1e-2, rel_err=e)
    except Exception as exc:  # a compile failure is a finding, not a crash
        check.update(ok=False, error=repr(exc)[:3000])
    print(f"check {name}: {'ok' if check['ok'] else 'FAILED'} {check.get('rel_err', '')}", flush=True)
    return check


def exactness_checks(rng, platform, interpret=False, layouts=None, w8a8=True, quick=False):
    """int8 kernel bit-exact (K small enough that float32 holds the sums exactly) and each
    weight-only layout within bf16 tolerance, odd M; only the ``layouts`` (all if ``None``)
    and W8A8 cases that will be timed; ``quick``: one batch per engine (``--dry-run``)."""
    out = []
    for m in ((7,) if quick else (1, 7, 130)) if w8a8 else ():
        a = jnp.asarray(rng.integers(-128, 128, (m, 512)), jnp.int8)
        b = jnp.asarray(rng.integers(-128, 128, (512, 256)), jnp.int8)
        exact = np.asarray(a, np.int64) @ np.asarray(b, np.int64)
        for b_layout, bl in (("kn", b), ("nk", b.T + 0)):
            kw = dict(out_dtype=jnp.float32, b_layout=b_layout, platform=platform, interpret=interpret)
            y = api.int8_matmul(a, bl, 1.0, 1.0, **kw)
            ok = bool(np.array_equal(np.asarray(y).astype(np.int64), exact))
            out.append({"check": f"int8 exact m={m} b_layout={b_layout}", "ok": ok})
    for bits, layout, group in [
        (4, "k_halves", None),
        (4, "k_halves", 128),
        (4, "n_pairs", None),
        (4, "n_pairs", 64),
        (4, "k_pairs", 128),
        (8, "int8", None),
        (8, "int8", 128),
        (4, "k_pairs_nk", None),
        (4, "k_pairs_nk", 128),
        (4, "n_pairs_nk", 64),
        (8, "int8_nk", 128),
    ]:
        if layouts is not None and layout not in layouts:
            continue
        base, nk = kc.split_layout(layout)
        runs = [(1, "triton"), (13, "triton"), (70, "triton"), (1, "gemv"), (13, "gemv")]
        # the inline PTX (only hardware runs it) and the in-kernel split-K sum
        runs += [(1, "ptx"), (13, "ptx"), (70, "ptx"), (1, "split"), (13, "split"), (70, "split")]
        if quick:  # one batch per engine (a dry run rehearses the plumbing in the interpreter)
            runs = [run for run in runs if run[0] == (1 if run[1] == "gemv" else 13)]
        for m, engine in runs:
            k, n = 512, 256
            codes, s = make_weight_only(rng, bits, k, n, group)
            w = weight_in_layout(codes, layout, 128)
            x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
            ref = reference_weight_only(np.asarray(x, np.float32), codes, s, group)
            cfg = None  # the default (tensor-core) config, or a CUDA-core one
            bk = 128 if layout == "k_halves" else 64
            if engine == "gemv":
                cfg = BlockConfig(kc.pow2_at_least(m, 1), 64, bk, 2, engine="gemv")
            elif engine == "ptx":
                cfg = BlockConfig(16 if m <= 16 else 64, 64, bk, 2, dequant="ptx")
            elif engine == "split":  # four programs per output tile summed in the kernel
                dq = "ptx" if bits == 4 else "logic"
                cfg = BlockConfig(16 if m <= 16 else 64, 64, bk, 4, dequant=dq, split_reduce="kernel")
            kw = dict(
                group_size=group,
                platform=platform,
                interpret=interpret,
                out_dtype=jnp.float32,
                config=cfg,
                b_layout="nk" if nk else "kn",
            )
            s_w = s.T if nk else s
            name = f"{layout} g={group} m={m}" + ("" if engine == "triton" else f" {engine}")
            out.append(_weight_only_check(name, bits, base, x, w, s_w, ref, kw))
    return out


def wgmma_checks(rng, interpret=False):
    """The Hopper ``wgmma`` W8A8 kernel bit-exact at odd M, each shipped config (a compile
    failure is recorded, not raised)."""
    out = []
    for m in (1, 7, 130):
        a = jnp.asarray(rng.integers(-128, 128, (m, 512)), jnp.int8)
        b_nk = jnp.asarray(rng.integers(-128, 128, (256, 512)), jnp.int8)
        exact = np.asarray(a, np.int64) @ np.asarray(b_nk, np.int64).T
        for cfg in gpu_wgmma.CONFIGS:
            tile = f"{cfg.block_m}x{cfg.block_n}{' persistent' * cfg.persistent}"
            check = {"check": f"int8 exact m={m} wgmma {tile}"}
            try:
                y = api.int8_matmul(
                    a,
                    b_nk,
                    1.0,
                    1.0,
                    out_dtype=jnp.float32,
                    b_layout="nk",
                    platform="gpu",
                    config=cfg,
                    interpret=interpret,
                )
                check["ok"] = bool(np.array_equal(np.asarray(y).astype(np.int64), exact))
            except Exception as e:  # a Mosaic GPU compile failure is a finding, not a crash
                check.update(ok=False, error=repr(e)[:500])
            out.append(check)
    return out


def wgmma_weight_only_checks(rng, interpret=False, quick=False):
    """The Hopper weight-only ``wgmma`` kernel (weights stored ``(N, K)``, per channel)
    within bf16 tolerance of float64 at odd M, one and two warpgroups, two K steps per
    split (``quick``: one batch); a compile failure is a failed check."""
    out = []
    for bits, layout in ((4, "n_pairs_nk"), (8, "int8_nk")):
        rows = 64 * gpu_wgmma_weight_only._parts(layout)
        for m in (13,) if quick else (1, 13, 70):
            for wgs, bk, split, stages in ((1, 128, 2, 2), (2, 64, 4, 3)):
                k, n = 512, 256
                cfg = BlockConfig(
                    8 if m <= 8 else 16, wgs * rows, bk, split, True, num_stages=stages, engine="wgmma"
                )
                codes, s = make_weight_only(rng, bits, k, n, None)
                w = weight_in_layout(codes, layout)
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                ref = reference_weight_only(np.asarray(x, np.float32), codes, s, None)
                kw = dict(
                    b_layout="nk", platform="gpu", config=cfg, interpret=interpret, out_dtype=jnp.float32
                )
                name = f"{layout} m={m} wgmma {wgs}wg bk{bk} split{split}"
                out.append(_weight_only_check(name, bits, "n_pairs", x, w, s.T, ref, kw))
    return out
