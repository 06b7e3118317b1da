"""Weight codes to bfloat16 in inline PTX (``dequant="ptx"``): int4 nibbles and int8 codes.

The tensor-core weight-only kernel turns each byte of packed int4 codes into two bfloat16
values. Written as ``jax.numpy`` integer logic (:func:`qjax.kernels._fastcvt.nibbles_bf16`)
Triton works on 16-bit lanes one code at a time: 5.8 SASS instructions per code on sm_90a
(offline, ``experiments/triton_sass.py``), mostly ``PRMT`` / ``IMAD`` moving single bytes.
The PTX (:data:`NIBBLES_LO_BF16`, :data:`NIBBLES_HI_BF16`) takes four bytes in one 32-bit
register and builds bfloat16 values two per register with the magic-number conversion of
:mod:`qjax.kernels._fastcvt`:

1. one ``prmt`` reorders the bytes ``[b0, b1, b2, b3]`` to ``[b0, b2, b1, b3]``, so each
   16-bit lane holds one byte of the low output pair and one of the high pair;
2. three shifts (by 4, 8, 12) bring each nibble to bits 0-3 of its lane;
3. one ``lop3`` per register keeps bits 0-3 of each lane, flips bit 3 (two's complement
   to unsigned: ``u = s + 8``) and sets the exponent of bfloat16 ``128.0`` (one unit in
   the last place is 1), giving ``128 + u`` in both lanes;
4. one ``fma.rn.bf16x2`` per register subtracts ``136`` from both lanes (exact).

That is 12 instructions for 8 codes (13 if ptxas does not merge the two blocks' ``prmt``).
int8 codes (:data:`INT8_BF16`, :func:`int8_bf16_ptx`) take 11 instructions for 4 codes
through float32 (one ``xor``, a ``prmt`` and a ``sub.f32`` per code, one
``cvt.rn.bf16x2.f32`` per pair). ``fma.rn.bf16x2`` and ``cvt.rn.bf16x2.f32`` need sm_80
(Ampere) or newer. Where the conversion pays depends on the register layout Triton picks
(unswapped tiles: yes; swapped: no; see :mod:`qjax.kernels.candidates`).

Pallas' interpreter cannot run PTX, so with ``interpret=True`` the same PTX text runs
through :func:`run_ptx`, a small emulator of the instructions it uses: the interpreted
kernel tests check this text, not a Python rewrite of it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Triton's packing with pack=4 (read in Triton 3.5's LLVM IR for this op): an int8 operand's
# four elements are one <4 x i8> register (element j in byte j); a bfloat16 result is two
# <2 x bfloat> registers (element j in register j // 2, low half first). Operands: $0 $1 the
# result (bytes 0-1 / 2-3), $2 the four bytes.
# jax's lowering of a multi-result elementwise_inline_asm is broken (it wraps the op's result
# list as one value, jax 0.10 and 0.11), so the low and high nibbles are two asm blocks (ptxas
# sees both and may merge their shared byte permute).


def _unpack_asm(shift0: int, shift1: int) -> str:
    """PTX for one bfloat16 result: the nibbles at bit ``shift0`` / ``shift1`` of each lane
    of the permuted word ``[b0, b2, b1, b3]`` (low nibbles: 0 and 8; high: 4 and 12)."""
    shifts = [f"shr.u32 $1, $0, {shift1};"] + ([f"shr.u32 $0, $0, {shift0};"] if shift0 else [])
    regs = ("$0", "$1")
    return "\n".join(
        [
            "{",
            ".reg .b32 one, bias;",
            "mov.b32 one, 0x3f803f80;",  # bfloat16 (1, 1)
            "mov.b32 bias, 0xc308c308;",  # bfloat16 (-136, -136)
            "prmt.b32 $0, $2, $2, 0x3120;",
            *shifts,
            *(f"lop3.b32 {r}, {r}, 0x000f000f, 0x43084308, 0x6a;" for r in regs),  # (a & b) ^ c
            *(f"fma.rn.bf16x2 {r}, {r}, one, bias;" for r in regs),
            "}",
        ]
    )


NIBBLES_LO_BF16 = _unpack_asm(0, 8)
NIBBLES_HI_BF16 = _unpack_asm(4, 12)
# int8 codes: flip the sign bits (u = s + 128), put each byte under the exponent of float32
# 2^23 with one prmt, subtract 2^23 + 128 (exact), pack two floats into bfloat16x2 (exact:
# |s| <= 128 has 8 significant bits): 11 instructions for 4 codes
INT8_BF16 = "\n".join(
    [
        "{",
        ".reg .b32 t, m, f0, f1, f2, f3;",
        "mov.b32 m, 0x4b000000;",  # float32 2^23
        "xor.b32 t, $2, 0x80808080;",
        *(f"prmt.b32 f{j}, t, m, 0x765{j};" for j in range(4)),  # [byte j, 0, 0, 0x4b]
        *(f"sub.f32 f{j}, f{j}, 0f4B000080;" for j in range(4)),  # - (2^23 + 128)
        "cvt.rn.bf16x2.f32 $0, f1, f0;",  # the first operand goes to the upper half
        "cvt.rn.bf16x2.f32 $1, f3, f2;",
        "}",
    ]
)
_CONSTRAINTS = "=r,=r,r"  # two output registers, one packed input


def _bytes_to_bf16(p: jax.Array, asms: Sequence[str], interpret: bool) -> tuple[jax.Array, ...]:
    """One bfloat16 array of ``p``'s shape per PTX block in ``asms`` (four bytes in, two
    bfloat16x2 registers out); on the emulator when ``interpret``."""
    if not interpret:
        from jax.experimental.pallas import triton as pltr

        out = [jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)]
        return tuple(
            pltr.elementwise_inline_asm(
                asm, args=[p], constraints=_CONSTRAINTS, pack=4, result_shape_dtypes=out
            )[0]
            for asm in asms
        )
    if p.size % 4:
        raise ValueError(f"code tile of {p.size} bytes: the PTX takes them four at a time")
    b = p.reshape(-1, 4).astype(jnp.uint8).astype(jnp.uint32)
    word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24

    def run(asm):  # two registers of bfloat16 pairs -> four elements per word
        r0, r1 = run_ptx(asm, [word], n_out=2)
        lanes = jnp.stack([r0 & 0xFFFF, r0 >> 16, r1 & 0xFFFF, r1 >> 16], axis=-1)
        return lax.bitcast_convert_type(lanes.astype(jnp.uint16), jnp.bfloat16).reshape(p.shape)

    return tuple(run(asm) for asm in asms)


def nibbles_bf16_ptx(p: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The signed low and high nibbles of int8 bytes ``p``, as exact bfloat16, in PTX.

    Same values as :func:`qjax.kernels._fastcvt.nibbles_bf16`. Inside a Pallas Triton
    kernel this is inline assembly; with ``interpret=True`` the PTX runs through
    :func:`run_ptx` (``p.size`` must then be a multiple of 4, as every kernel tile is).

    Args:
      p: int8 array (a kernel tile of packed codes).
      interpret: the kernel runs in the Pallas interpreter.

    Returns:
      ``(low, high)`` bfloat16 arrays of ``p``'s shape.
    """
    lo, hi = _bytes_to_bf16(p, (NIBBLES_LO_BF16, NIBBLES_HI_BF16), interpret)
    return lo, hi


def int8_bf16_ptx(p: jax.Array, *, interpret: bool = False) -> jax.Array:
    """int8 codes ``p`` as exact bfloat16, in PTX (:data:`INT8_BF16`); see
    :func:`nibbles_bf16_ptx` for ``interpret``."""
    return _bytes_to_bf16(p, (INT8_BF16,), interpret)[0]


# -- emulator --------------------------------------------------------------------------------------


def _f32(r: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(r, jnp.float32)


def _bf16_bits(v: jax.Array) -> jax.Array:
    """float32 -> bfloat16 (nearest, ties to even) bits, in the low half of a uint32."""
    return lax.bitcast_convert_type(v.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)


def _bf16x2(op, *regs: jax.Array) -> jax.Array:
    """Apply ``op`` to the two bfloat16 lanes of uint32 registers (float32 arithmetic,
    rounded once to bfloat16: exact whenever the float32 result is)."""

    def lane(r, shift):
        bits = ((r >> shift) & 0xFFFF).astype(jnp.uint16)
        return lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)

    return _bf16_bits(op(*(lane(r, 0) for r in regs))) | _bf16_bits(op(*(lane(r, 16) for r in regs))) << 16


def _prmt(a: jax.Array, b: jax.Array, sel: int) -> jax.Array:
    """PTX ``prmt.b32`` (default mode): byte ``i`` of the result is byte ``sel[4i+2:4i]`` of
    ``{b, a}`` (``a`` bytes 0-3, ``b`` bytes 4-7), its sign replicated when bit ``4i+3`` is set."""
    pool = [(a >> (8 * j)) & 0xFF for j in range(4)] + [(b >> (8 * j)) & 0xFF for j in range(4)]
    out = jnp.zeros_like(a)
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = pool[s & 7]
        if s & 8:
            byte = jnp.where(byte & 0x80, jnp.uint32(0xFF), jnp.uint32(0))
        out = out | byte << (8 * i)
    return out


def _lop3(a: jax.Array, b: jax.Array, c: jax.Array, lut: int) -> jax.Array:
    """PTX ``lop3.b32``: bit ``(a << 2) | (b << 1) | c`` of ``lut``, bit by bit."""
    full = jnp.uint32(0xFFFFFFFF)
    out = jnp.zeros_like(a)
    for i in range(8):
        if lut >> i & 1:
            out = out | (
                (a if i & 4 else ~a & full) & (b if i & 2 else ~b & full) & (c if i & 1 else ~c & full)
            )
    return out


def run_ptx(asm: str, inputs: Sequence[jax.Array], n_out: int) -> list[jax.Array]:
    """Run straight-line PTX on uint32 arrays (an emulator for the interpreted kernels).

    Supports ``.reg .b32`` declarations, ``mov.b32``, ``prmt.b32`` (default mode),
    ``shr.u32``, ``xor.b32``, ``lop3.b32``, ``sub.f32``, ``fma.rn.bf16x2`` and
    ``cvt.rn.bf16x2.f32``, integer and ``0f`` (float32 bits) immediates, with registers
    ``$0 .. $(n_out-1)`` as outputs and the following ``$i`` as ``inputs``.

    Args:
      asm: the PTX (an optional ``{ ... }`` scope, statements ending in ``;``).
      inputs: uint32 arrays of one shape, one per input operand.
      n_out: the number of output registers.

    Returns:
      the ``n_out`` output registers, uint32.

    Raises:
      ValueError: an instruction or operand the emulator does not know.
    """
    shape = jnp.shape(inputs[0])
    regs = {f"${n_out + i}": jnp.asarray(x, jnp.uint32) for i, x in enumerate(inputs)}

    def val(tok: str):
        if re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", tok):
            return jnp.full(shape, int(tok, 0), jnp.uint32)
        if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", tok):  # a float32 given by its bits
            return jnp.full(shape, int(tok[2:], 16), jnp.uint32)
        if tok not in regs:
            raise ValueError(f"PTX operand {tok!r} read before it is written")
        return regs[tok]

    def imm(tok: str) -> int:
        if not re.fullmatch(r"0[xX][0-9a-fA-F]+|\d+", tok):
            raise ValueError(f"PTX operand {tok!r}: the emulator needs an immediate here")
        return int(tok, 0)

    for stmt in asm.replace("{", " ").replace("}", " ").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, _, rest = stmt.partition(" ")
        d, *src = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            r = val(src[0])
        elif op == "prmt.b32":
            r = _prmt(val(src[0]), val(src[1]), imm(src[2]))
        elif op == "shr.u32":
            r = val(src[0]) >> imm(src[1])
        elif op == "lop3.b32":
            r = _lop3(val(src[0]), val(src[1]), val(src[2]), imm(src[3]))
        elif op == "xor.b32":
            r = val(src[0]) ^ val(src[1])
        elif op == "fma.rn.bf16x2":
            r = _bf16x2(lambda a, b, c: a * b + c, val(src[0]), val(src[1]), val(src[2]))
        elif op == "sub.f32":
            r = lax.bitcast_convert_type(_f32(val(src[0])) - _f32(val(src[1])), jnp.uint32)
        elif op == "cvt.rn.bf16x2.f32":  # the first source to the upper half
            r = _bf16_bits(_f32(val(src[0]))) << 16 | _bf16_bits(_f32(val(src[1])))
        else:
            raise ValueError(f"PTX instruction {op!r} is not emulated")
        regs[d] = r
    missing = [f"${i}" for i in range(n_out) if f"${i}" not in regs]
    if missing:
        raise ValueError(f"PTX never writes output register(s) {missing}")
    return [regs[f"${i}"] for i in range(n_out)]
