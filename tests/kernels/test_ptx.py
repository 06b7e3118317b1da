"""The inline-PTX nibble unpacking (``dequant="ptx"``) and the emulator that runs it in
interpret mode: the emulator against the PTX ISA's definitions of its instructions, the
shipped PTX against an integer reference on every byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.kernels import BlockConfig, w4a16_matmul, w8a16_matmul
from qjax.kernels._fastcvt import nibbles_bf16
from qjax.kernels._ptx import int8_bf16_ptx, nibbles_bf16_ptx, run_ptx

from .cuda_target import triton_modules

U32 = st.integers(0, 2**32 - 1)


def run(asm, n_out, *regs):
    return [int(r[0]) for r in run_ptx(asm, [jnp.asarray([v], jnp.uint32) for v in regs], n_out)]


@pytest.mark.parametrize(
    "sel,want",
    [
        (0x3210, 0x44332211),  # identity on a
        (0x7654, 0x88776655),  # b
        (0x0123, 0x11223344),  # byte reverse
        (0x3120, 0x44223311),  # the unpacking's reorder: [b0, b2, b1, b3]
        (0x5140, 0x66225511),
        (0x8888, 0x00000000),  # sign of byte 0 (0x11: positive) replicated
        (0xFFFF, 0xFFFFFFFF),  # sign of byte 7 (0x88: negative) replicated
    ],
)
def test_prmt_follows_the_ptx_definition(sel, want):
    (got,) = run(f"prmt.b32 $0, $1, $2, {sel:#x};", 1, 0x44332211, 0x88776655)
    assert got == want, hex(got)


@given(st.integers(0, 255))
def test_lop3_truth_table_is_its_immediate(lut):
    # the PTX ISA defines immLut as F(0xF0, 0xCC, 0xAA) (bits above 7: F(0, 0, 0))
    (got,) = run(f"lop3.b32 $0, $1, $2, $3, {lut};", 1, 0xF0, 0xCC, 0xAA)
    assert got == lut | (0xFFFFFF00 if lut & 1 else 0)


@given(U32, U32, U32)
def test_lop3_boolean_functions(a, b, c):
    for lut, f in [(0x6A, (a & b) ^ c), (0xFE, a | b | c), (0x96, a ^ b ^ c), (0x80, a & b & c), (0xF0, a)]:
        (got,) = run(f"lop3.b32 $0, $1, $2, $3, {lut:#x};", 1, a, b, c)
        assert got == f


def test_shr_mov_and_bf16x2_fma():
    bf = lambda v: int(np.array(v, jnp.bfloat16).view(np.uint16))
    a = bf(3.0) | bf(-2.5) << 16
    b = bf(2.0) | bf(4.0) << 16
    c = bf(0.5) | bf(1.0) << 16
    (d,) = run("fma.rn.bf16x2 $0, $1, $2, $3;", 1, a, b, c)
    assert (d & 0xFFFF, d >> 16) == (bf(6.5), bf(-9.0))
    (d,) = run("fma.rn.bf16x2 $0, $1, $2, $3;", 1, bf(257.0), bf(1.0), 0)  # rounds to nearest even
    assert d & 0xFFFF == bf(256.0)
    assert run("shr.u32 $0, $1, 12;", 1, 0xF0000000) == [0x000F0000]
    assert run("{ .reg .b32 t; mov.b32 t, 0x1234; mov.b32 $0, t; }", 1, 0) == [0x1234]


def test_xor_sub_f32_and_bf16x2_pack():
    f32 = lambda v: int(np.array(v, np.float32).view(np.uint32))
    bf = lambda v: int(np.array(v, jnp.bfloat16).view(np.uint16))
    assert run("xor.b32 $0, $1, 0x80808080;", 1, 0x01FF7F80) == [0x817FFF00]
    assert run("sub.f32 $0, $1, 0f4B000080;", 1, f32(2.0**23 + 5)) == [f32(-123.0)]
    (d,) = run("cvt.rn.bf16x2.f32 $0, $1, $2;", 1, f32(-3.0), f32(1.0 + 2**-8))  # first source: upper
    assert (d >> 16, d & 0xFFFF) == (bf(-3.0), bf(1.0))  # 1 + 2^-8 is a tie: rounds to even


def test_emulator_errors():
    with pytest.raises(ValueError, match=r"'add\.u32' is not emulated"):
        run("add.u32 $0, $1, $1;", 1, 1)
    with pytest.raises(ValueError, match="'t' read before"):
        run("mov.b32 $0, t;", 1, 1)
    with pytest.raises(ValueError, match=r"never writes output register\(s\) \['\$1'\]"):
        run("mov.b32 $0, $2;", 2, 1)
    with pytest.raises(ValueError, match="needs an immediate"):
        run("shr.u32 $0, $1, $1;", 1, 1)
    with pytest.raises(ValueError, match="four at a time"):
        nibbles_bf16_ptx(jnp.zeros((3, 5), jnp.int8), interpret=True)


def test_shipped_ptx_unpacks_every_byte():
    b = np.arange(256, dtype=np.uint8)
    p = jnp.asarray(np.random.default_rng(0).permutation(np.tile(b, 4)).reshape(32, 32).view(np.int8))
    lo, hi = nibbles_bf16_ptx(p, interpret=True)
    u = np.asarray(p).view(np.uint8).astype(np.int64)
    assert lo.dtype == hi.dtype == jnp.bfloat16 and lo.shape == p.shape
    np.testing.assert_array_equal(np.asarray(lo, np.float64), ((u & 0xF) ^ 8) - 8)
    np.testing.assert_array_equal(np.asarray(hi, np.float64), ((u >> 4) ^ 8) - 8)
    ref_lo, ref_hi = nibbles_bf16(p)  # same values as the integer-logic unpacking, bit for bit
    np.testing.assert_array_equal(np.asarray(lo).view(np.uint16), np.asarray(ref_lo).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(hi).view(np.uint16), np.asarray(ref_hi).view(np.uint16))


def test_shipped_int8_ptx_converts_every_byte():
    p = jnp.asarray(
        np.random.default_rng(1).permutation(np.arange(-128, 128).repeat(4)).reshape(32, 32), jnp.int8
    )
    y = int8_bf16_ptx(p, interpret=True)
    assert y.dtype == jnp.bfloat16 and y.shape == p.shape
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(p, np.float64))


@pytest.mark.parametrize("layout", ["k_halves", "n_pairs", "int8"])
def test_ptx_config_lowers_to_inline_asm(layout):
    k = n = 1024
    cfg = BlockConfig(16, 128, 128, 2, True, dequant="ptx")
    wshape = {"n_pairs": (k, n // 2), "int8": (k, n)}.get(layout, (k // 2, n))
    args = (
        jax.ShapeDtypeStruct((4, k), jnp.bfloat16),
        jax.ShapeDtypeStruct(wshape, jnp.int8),
        jax.ShapeDtypeStruct((1, n), jnp.float32),
    )
    if layout == "int8":
        fn = lambda x, w, s: w8a16_matmul(x, w, s, platform="gpu", config=cfg)
    else:
        fn = lambda x, w, s: w4a16_matmul(
            x,
            w,
            s,
            layout=layout,
            pack_block=128 if layout == "k_halves" else None,
            platform="gpu",
            config=cfg,
        )
    (module,) = triton_modules(fn, *args)
    # once per K step: low and high nibbles, or the int8 codes
    assert module.count("tt.elementwise_inline_asm") == (1 if layout == "int8" else 2)
    assert ("cvt.rn.bf16x2.f32" if layout == "int8" else "fma.rn.bf16x2") in module


def test_ptx_unpacking_is_refused_off_gpu():
    x = jnp.zeros((4, 256), jnp.bfloat16)
    w = jnp.zeros((128, 128), jnp.uint8)
    s = jnp.ones((1, 128), jnp.float32)
    cfg = BlockConfig(16, 128, 128, dequant="ptx")
    with pytest.raises(ValueError, match="dequant 'ptx' is GPU"):
        w4a16_matmul(x, w, s, layout="k_halves", pack_block=128, platform="tpu", config=cfg, interpret=True)


@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_ptx_candidates_are_unswapped_int4_tiles(m):
    from qjax.kernels.candidates import gpu_candidates, variant

    ptx = [c for c in gpu_candidates("w4a16", m, 4096, 4096, 128, "n_pairs") if c.dequant == "ptx"]
    expected = {"triton+ptx", "triton+ptx+ksum"} if m == 1 else {"triton+ptx"}  # ksum: one row only
    assert ptx and not any(c.swap for c in ptx) and {variant(c) for c in ptx} == expected
    int8 = gpu_candidates("w8a16", m, 4096, 4096, None, "int8")
    assert any(c.dequant == "ptx" for c in int8) == (m > 16)  # small batches: the PTX loses for int8
    if m <= 16:  # unswapped int8 tiles first: the swapped ones spill in the offline SASS
        first = next(c for c in int8 if c.engine == "triton")
        assert not first.swap and first.block_m == 16
    for layout in ("k_pairs", "k_pairs_nk"):  # unswapped only: swapped tiles were wrong on an H100
        kp = [c for c in gpu_candidates("w4a16", m, 4096, 4096, 128, layout) if c.dequant == "ptx"]
        assert kp and not any(c.swap for c in kp)
