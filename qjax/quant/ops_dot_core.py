"""The contraction machinery behind :func:`qjax.quant.ops_dot.quantized_dot_general`:
scales mapped onto the output, blocks along the contraction (per-group scales, int32
overflow), the integer and float-codes contractions, packed int4/int2 operands handled
one bit field at a time, and the "split" formulation. See :mod:`qjax.quant.ops`.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.quant import ops_common as oc
from qjax.quant.ops_common import Operand

# Per-group scales along a contracting axis: one dot per group, unrolled, up to this many.
MAX_UNROLLED_BLOCKS = 64
# Integer matrix-vector products: XLA:CPU runs an int8 dot with a single row through a
# generic path that first widens the whole weight to int32; with two rows it uses its
# fast int8 kernel, so a lone row is padded with a zero row.
_PAD_VECTOR_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.int16))


def free_axes(nd: int, dn, side: int) -> list[int]:
    (lc, rc), (lb, rb) = dn
    c, b = (lc, lb) if side == 0 else (rc, rb)
    return [d for d in range(nd) if d not in c and d not in b]


def to_out(a: jax.Array, side: int, dn, n_lfree: int, n_rfree: int) -> jax.Array:
    """An operand-shaped array (size 1 on contracting axes) -> broadcastable against the
    dot_general output ``(batch..., lhs free..., rhs free...)``."""
    (lc, rc), (lb, rb) = dn
    c, b = (lc, lb) if side == 0 else (rc, rb)
    free = free_axes(a.ndim, dn, side)
    a = jnp.transpose(a, list(b) + free + list(c))
    a = a.reshape(a.shape[: len(b) + len(free)])
    if side == 0:
        return a.reshape(a.shape + (1,) * n_rfree)
    return a.reshape(a.shape[: len(b)] + (1,) * n_lfree + a.shape[len(b) :])


def _dot(a: jax.Array, b: jax.Array, dn, pref) -> jax.Array:
    """``lax.dot_general``; a single int8 row (column) is padded to two."""
    (lc, rc), (lb, _rb) = dn
    lrows = math.prod(a.shape[d] for d in free_axes(a.ndim, dn, 0))
    rrows = math.prod(b.shape[d] for d in free_axes(b.ndim, dn, 1))
    if not lb and jnp.dtype(a.dtype) in _PAD_VECTOR_DTYPES and jnp.dtype(b.dtype) == jnp.dtype(a.dtype):
        if lrows == 1 and rrows > 1:
            a2 = jnp.stack([a, jnp.zeros_like(a)])
            dn2 = ((tuple(d + 1 for d in lc), rc), ((), ()))
            return lax.dot_general(a2, b, dn2, preferred_element_type=pref)[0]
        if rrows == 1 and lrows > 1:
            b2 = jnp.stack([b, jnp.zeros_like(b)])
            dn2 = ((lc, tuple(d + 1 for d in rc)), ((), ()))
            y = lax.dot_general(a, b2, dn2, preferred_element_type=pref)
            return lax.index_in_dim(y, 0, axis=len(free_axes(a.ndim, dn, 0)), keepdims=False)
    return lax.dot_general(a, b, dn, preferred_element_type=pref)


# -- blocks: groups (and overflow chunks) along contracting axes become batch axes ----------


def _split_array(arr, shape, splits: dict[int, int], group_axis, group_size, is_values: bool):
    """Reshape ``arr`` (values, or a scale/zero point with size 1 / num_groups on split
    axes) so each split axis ``d`` becomes ``(n, block)`` (a scale: ``(n or 1, 1)``); a
    per-group scale is repeated onto blocks first."""
    if arr is None:
        return None
    if not is_values and group_axis in splits and arr.shape[group_axis] > 1:
        n = shape[group_axis] // splits[group_axis]
        arr = jnp.repeat(arr, group_size // splits[group_axis], axis=group_axis)
        arr = lax.slice_in_dim(arr, 0, n, axis=group_axis)
    new = []
    for d, size in enumerate(arr.shape):
        if d in splits:
            blk = splits[d]
            new += [size // blk, blk] if is_values else [size, 1]
        else:
            new.append(size)
    return arr.reshape(new)


def _blocked(a: Operand, b: Operand, dn, blocks: list[int]):
    """Split contracting pair ``i`` into blocks of ``blocks[i]``; the block index becomes a
    trailing batch axis. Returns the reshaped operands, the new dn and the output axes to sum."""
    (lc, rc), (lb, rb) = dn
    splits = [(lc[i], rc[i], blk) for i, blk in enumerate(blocks) if blk < a.shape[lc[i]]]
    if not splits:
        return a, b, dn, ()
    res = []
    for op, dims, c, bt in ((a, 0, lc, lb), (b, 1, rc, rb)):
        sp = {s[dims]: s[2] for s in splits}
        pos, pos_n = {}, {}
        k = 0
        for d in range(op.ndim):
            if d in sp:
                pos_n[d], pos[d] = k, k + 1
                k += 2
            else:
                pos[d] = k
                k += 1
        f = lambda x, v=False, op=op, sp=sp: _split_array(x, op.shape, sp, op.group_axis, op.group_size, v)
        shape = []
        for d, size in enumerate(op.shape):
            shape += [size // sp[d], sp[d]] if d in sp else [size]
        new = op.replace(
            values=f(op.values, True),
            scale=f(op.scale),
            zero_point=f(op.zero_point),
            shape=tuple(shape),
            group_axis=None,
            group_size=None,
        )
        res.append(
            (new, tuple(pos[d] for d in c), tuple(pos[d] for d in bt) + tuple(pos_n[s[dims]] for s in splits))
        )
    (a2, lc2, lb2), (b2, rc2, rb2) = res
    nb = len(lb)
    return a2, b2, ((lc2, rc2), (lb2, rb2)), tuple(range(nb, nb + len(splits)))


def _group_blocks(a: Operand, b: Operand, dn) -> list[int]:
    (lc, rc), _ = dn
    blocks = []
    for dl, dr in zip(lc, rc):
        blk = a.shape[dl]
        for op, d in ((a, dl), (b, dr)):
            if op.group_axis == d:
                blk = math.gcd(blk, op.group_size)
        blocks.append(blk)
    return blocks


def _scaled(y, a: Operand, b: Operand, dn):
    nl, nr = len(free_axes(a.ndim, dn, 0)), len(free_axes(b.ndim, dn, 1))
    for side, op in ((0, a), (1, b)):
        if op.scale is not None:
            y = y * to_out(op.scale, side, dn, nl, nr)
    return y


def _slice_operand(op: Operand, d: int, start: int, stop: int) -> Operand:
    """``op`` restricted to ``[start, stop)`` along contracting axis ``d``, which lies in
    one scale group (so the scale no longer varies along ``d``)."""

    def cut(x):
        if x is None or x.shape[d] == 1:
            return x
        g = start // op.group_size
        return lax.slice_in_dim(x, g, g + 1, axis=d)

    grouped = op.group_axis == d
    return op.replace(
        values=lax.slice_in_dim(op.values, start, stop, axis=d),
        scale=cut(op.scale) if grouped else op.scale,
        zero_point=cut(op.zero_point) if grouped else op.zero_point,
        shape=(*op.shape[:d], stop - start, *op.shape[d + 1 :]),
        group_axis=None if grouped else op.group_axis,
        group_size=None if grouped else op.group_size,
    )


def _for_blocks(a: Operand, b: Operand, dn, blocks: list[int], core) -> jax.Array:
    """Sum of ``core`` over the blocks of the contracting axes: one plain (non-batched)
    dot per block, unrolled, up to ``MAX_UNROLLED_BLOCKS`` blocks (XLA:CPU runs a batched
    dot far slower than separate dots); beyond that the blocks become a batch axis."""
    (lc, rc), _ = dn
    split = [i for i, blk in enumerate(blocks) if blk < a.shape[lc[i]]]
    counts = [a.shape[lc[i]] // blocks[i] for i in split]
    if oc.prod(counts) > MAX_UNROLLED_BLOCKS:
        a, b, dn, sum_axes = _blocked(a, b, dn, blocks)
        return jnp.sum(core(a, b, dn), axis=sum_axes)
    total = None
    for idx in itertools.product(*(range(n) for n in counts)):
        ai, bi = a, b
        for i, j in zip(split, idx):
            lo, hi = j * blocks[i], (j + 1) * blocks[i]
            ai, bi = _slice_operand(ai, lc[i], lo, hi), _slice_operand(bi, rc[i], lo, hi)
        ai = ai.replace(group_axis=None, group_size=None)  # one group left along the axis
        bi = bi.replace(group_axis=None, group_size=None)
        y = core(ai, bi, dn)
        total = y if total is None else total + y
    return total


def _int_contract(a: Operand, b: Operand, dn) -> jax.Array:
    """Integer path: int32 accumulation of codes, zero-point corrections in int32, then
    the two scales (per block) in float32."""
    mag = a.bound * b.bound
    if mag > oc.INT32_LIMIT:  # 16-bit x 16-bit with zero points: no exact int32 form
        return _float_contract(a, b, dn)
    blocks = _cap_blocks(_group_blocks(a, b, dn), oc.INT32_LIMIT // mag)
    return _for_blocks(a, b, dn, blocks, _int_core)


def _int_core(a: Operand, b: Operand, dn) -> jax.Array:
    (lc, rc), _ = dn
    nl, nr = len(free_axes(a.ndim, dn, 0)), len(free_axes(b.ndim, dn, 1))
    av, bv = a.values, b.values
    if av.dtype != bv.dtype:
        av, bv = av.astype(jnp.int16), bv.astype(jnp.int16)
    acc = _dot(av, bv, dn, jnp.int32)
    out = lambda x, side: to_out(x, side, dn, nl, nr)
    if a.zero_point is not None:
        acc = acc - out(a.zero_point, 0) * out(jnp.sum(bv, axis=rc, keepdims=True, dtype=jnp.int32), 1)
    if b.zero_point is not None:
        acc = acc - out(b.zero_point, 1) * out(jnp.sum(av, axis=lc, keepdims=True, dtype=jnp.int32), 0)
    if a.zero_point is not None and b.zero_point is not None:
        kc = oc.prod(av.shape[d] for d in lc)
        acc = acc + out(a.zero_point, 0) * out(b.zero_point, 1) * jnp.int32(kc)
    ftype = jnp.promote_types(a.scale.dtype, b.scale.dtype)
    return _scaled(acc.astype(ftype), a, b, dn)


def _float_contract(a: Operand, b: Operand, dn) -> jax.Array:
    """Float-codes path: codes (minus zero points) in a float dtype in which they are
    exact, a float dot with float32 accumulation per block, scales after. With two
    integer operands the blocks along the contraction are capped so that every partial
    sum stays below 2**24: exact in float32, so the integer part is exact as on the int
    path."""
    blocks = _group_blocks(a, b, dn)
    if a.kind == "int" and b.kind == "int":
        blocks = _cap_blocks(blocks, max(1, 2**24 // (a.bound * b.bound)))
    return _for_blocks(a, b, dn, blocks, _float_core)


def _cap_blocks(blocks: list[int], cap: int) -> list[int]:
    """Shrink the largest block (to a divisor of itself) until the product is <= cap."""
    blocks = list(blocks)
    while oc.prod(blocks) > cap:
        i = int(np.argmax(blocks))
        if blocks[i] == 1:
            break
        rest = oc.prod(blocks) // blocks[i]
        blocks[i] = oc.largest_divisor_at_most(blocks[i], max(1, cap // rest))
    return blocks


def _float_core(a: Operand, b: Operand, dn) -> jax.Array:
    cdt, acc_t = oc.compute_dtypes(a, b)
    return _scaled(_dot(oc.as_float_codes(a, cdt), oc.as_float_codes(b, cdt), dn, acc_t), a, b, dn)


# -- packed (int4/int2) operands: one contraction per bit field, no interleaving ----------


def contract(a: Operand, b: Operand, dn, method: str) -> jax.Array:
    for side, op in ((0, a), (1, b)):
        if op.packed_axis is not None:
            return _contract_packed(a, b, dn, method, side)
    (lc, rc), _ = dn
    if a.group_axis is not None and a.group_axis not in lc:
        a = oc.densify_group(a)
    if b.group_axis is not None and b.group_axis not in rc:
        b = oc.densify_group(b)
    if method == "int":
        return _int_contract(a, b, dn)
    return _float_contract(a, b, dn)


def _with(ops, side, op):
    ops = list(ops)
    ops[side] = op
    return ops


def _contract_packed(a: Operand, b: Operand, dn, method: str, side: int) -> jax.Array:
    """Contract with the packed operand ``(a, b)[side]`` without interleave-unpacking it,
    one operand per bit field (field ``j`` holds the codes at indices ``j`` mod
    ``8 // bits`` along the packed axis, sign-extended by int8 shifts).

    * Packed axis contracted: sum over fields of (field, the other operand's matching
      strided slice); needs the axis length and any group sizes along it to divide.
    * Packed axis free: one result per field, interleaved on the (small) output.
    * Otherwise (a batch axis, or lengths that do not divide): unpack fully.

    Unless the contraction is cut into group blocks anyway, the fields (and the other
    operand's slices) are concatenated and contracted as one dot: each dot has a fixed
    cost on XLA:CPU (one-row W4 1024-wide MLP: 1.4x float32 instead of 1.7-1.9x). With
    group blocks the concatenated copy costs more than it saves (W4 g128: 1.8-2.1x
    instead of 1.2-1.35x), so each field is contracted on its own.
    """
    pk, other = (a, b)[side], (a, b)[1 - side]
    (lc, rc), (lb, _) = dn
    c_pk, c_other = (lc, rc) if side == 0 else (rc, lc)
    p = pk.packed_axis
    per = 8 // pk.pack_bits
    length, nbytes = pk.shape[p], pk.values.shape[p]
    shape = (*pk.shape[:p], nbytes, *pk.shape[p + 1 :])
    one_dot = pk.group_axis not in c_pk and other.group_axis not in c_other
    unpacked_pk = dict(packed_axis=None, pack_bits=None)
    unpack_all = lambda: contract(*_with((a, b), side, oc.unpacked(pk)), dn, method)
    run = lambda pj, oj: contract(*_with(_with((a, b), side, pj), 1 - side, oj), dn, method)
    if p in c_pk:
        q = c_other[c_pk.index(p)]
        pairs = ((pk, p), (other, q))
        if length % per or any(op.group_axis == d and op.group_size % per for op, d in pairs):
            return unpack_all()
        other = oc.unpacked(other)
        fields = oc.fields(pk)
        slices = [oc.strided(other.values, q, j, per) for j in range(per)]
        if one_dot:  # no scale varies along p or q: concatenate the codes only
            pj = pk.replace(values=jnp.concatenate(fields, p), **unpacked_pk)
            return run(pj, other.replace(values=jnp.concatenate(slices, q)))
        total = None
        for f, o in zip(fields, slices, strict=True):
            pj = pk.replace(
                values=f,
                shape=shape,
                group_size=pk.group_size // per if pk.group_axis == p else pk.group_size,
                **unpacked_pk,
            )
            oj = other.replace(
                values=o,
                shape=(*other.shape[:q], nbytes, *other.shape[q + 1 :]),
                group_size=other.group_size // per if other.group_axis == q else other.group_size,
            )
            total = run(pj, oj) if total is None else total + run(pj, oj)
        return total
    free = free_axes(pk.ndim, dn, side)
    if p not in free:
        return unpack_all()
    if pk.group_axis == p:
        pk = oc.densify_group(pk)

    def take(x, j):  # per-element scale / zero point along p -> field j's entries
        if x is None or x.shape[p] == 1:
            return x
        if per * nbytes != length:
            widths = [(0, per * nbytes - length) if d == p else (0, 0) for d in range(x.ndim)]
            x = jnp.pad(x, widths, mode="edge")
        return oc.strided(x, p, j, per)

    def by_field(x):  # the same, for all fields side by side
        return x if x is None or x.shape[p] == 1 else jnp.concatenate([take(x, j) for j in range(per)], p)

    contract_with = lambda pj: contract(*_with((a, b), side, pj), dn, method)
    o = len(lb) + free.index(p) + (0 if side == 0 else len(free_axes(a.ndim, dn, 0)))
    fields = oc.fields(pk)
    if one_dot:  # the output along o is ordered (field, byte)
        pj = pk.replace(
            values=jnp.concatenate(fields, p),
            shape=(*shape[:p], per * nbytes, *shape[p + 1 :]),
            scale=by_field(pk.scale),
            zero_point=by_field(pk.zero_point),
            **unpacked_pk,
        )
        y = contract_with(pj)
        y = jnp.moveaxis(y.reshape((*y.shape[:o], per, nbytes, *y.shape[o + 1 :])), o, o + 1)
    else:
        ys = []
        for j, f in enumerate(fields):
            scale, zero_point = take(pk.scale, j), take(pk.zero_point, j)
            pj = pk.replace(values=f, shape=shape, scale=scale, zero_point=zero_point, **unpacked_pk)
            ys.append(contract_with(pj))
        y = jnp.stack(ys, axis=o + 1)
    y = y.reshape((*y.shape[:o], nbytes * per, *y.shape[o + 2 :]))
    return lax.slice_in_dim(y, 0, length, axis=o)


# -- method "split": float activation -> int8 pieces -----------------------------------------


def split_contract(a: Operand, b: Operand, dn) -> jax.Array:
    """Method "split": the float operand becomes three int8 pieces (a new leading free
    axis with per-piece, per-token scales), contracted on the integer path and summed."""
    side = 0 if a.kind == "float" else 1
    xo = (a, b)[side]
    (lc, rc), (lb, rb) = dn
    c, _bt = (lc, lb) if side == 0 else (rc, rb)
    token_axes = tuple(d for d in range(xo.ndim) if d not in c)
    codes, scales = oc.split_pieces(xo.values, token_axes)
    pieces = Operand(
        name=xo.name,
        kind="int",
        values=codes,
        scale=scales,
        zero_point=None,
        dtype=xo.dtype,
        shape=tuple(codes.shape),
        bound=128,
    )
    sh = lambda dims: tuple(d + 1 for d in dims)
    dn2 = ((sh(lc), rc), (sh(lb), rb)) if side == 0 else ((lc, sh(rc)), (lb, sh(rb)))
    y = contract(*_with((a, b), side, pieces), dn2, "int")
    o = len(lb) + (0 if side == 0 else len(free_axes(a.ndim, dn, 0)))
    return jnp.sum(y, axis=o)
