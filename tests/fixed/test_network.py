"""Fixed-point inference of whole functions: equal to a hand-written integer reference,
the same through Linen, NNX, jit and stored ``FixedArray`` params; rules and errors."""

import dataclasses
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import qjax
from qjax import fixed as qf

from . import reference as ref

RC = dict(rounding="RND_CONV", overflow="SAT")
L1 = qf.LayerFormats(weight=qf.Format(6, 1, **RC), input=qf.Format(8, 3, **RC), output=qf.Format(12, 4, **RC))
L2 = qf.LayerFormats(
    weight=qf.Format(6, 1, rounding="TRN", overflow="SAT"),
    input=qf.Format(8, 2, signed=False, rounding="RND", overflow="SAT"),
    output=qf.Format(14, 5, rounding="TRN_ZERO", overflow="WRAP"),
)
B = qf.Format(10, 3, **RC)
RULES = [(r"w1", L1), (r"w2", L2), (r"b.", B)]


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def _params(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        "w1": jax.random.normal(k[0], (5, 6)) * 0.6,
        "b1": jax.random.normal(k[1], (6,)) * 0.5,
        "w2": jax.random.normal(k[2], (6, 3)) * 0.6,
        "b2": jax.random.normal(k[3], (3,)) * 0.5,
    }


def _q(v, f: qf.Format) -> int:
    return ref.quantize(Fraction(float(v)), f.width, f.integer, f.signed, f.rounding, f.overflow)


def _layer(xs, w, lf: qf.LayerFormats, bias, bias_fmt):
    """One layer in Python integers: exact products and sums, casts, then the bias added
    exactly; returns exact rational values."""
    xm = [[_q(v, lf.input) for v in row] for row in xs]
    wm = [[_q(v, lf.weight) for v in row] for row in w]
    frac = lf.input.fraction + lf.weight.fraction
    o = lf.output
    out = []
    for row in xm:
        accs = [sum(row[k] * wm[k][j] for k in range(len(row))) for j in range(len(wm[0]))]
        ys = [ref.cast(a, frac, o.width, o.integer, o.signed, o.rounding, o.overflow) for a in accs]
        out.append(
            [
                ref.value(y, o.fraction) + ref.value(_q(b, bias_fmt), bias_fmt.fraction)
                for y, b in zip(ys, bias)
            ]
        )
    return out


def test_tiny_mlp_equals_a_hand_written_integer_reference():
    p = _params()
    x = jax.random.normal(jax.random.key(9), (4, 5)) * 2
    y = jax.jit(qf.fixed_point(mlp, RULES))(p, x)
    pn = {k: np.asarray(v, np.float64) for k, v in p.items()}
    h = _layer(np.asarray(x, np.float64), pn["w1"], L1, pn["b1"], B)
    h = [[max(v, Fraction(0)) for v in row] for row in h]
    want = _layer(h, pn["w2"], L2, pn["b2"], B)
    assert np.asarray(y, np.float64).tolist() == [[float(v) for v in row] for row in want]
    assert np.abs(np.asarray(y) - np.asarray(mlp(p, x))).max() < 1.0  # coarse formats, but sane


def test_stored_fixed_params_give_the_same_result_without_float_weights():
    p = _params(1)
    x = jax.random.normal(jax.random.key(3), (8, 5))
    fp = qf.fixed_params(p, RULES)
    assert all(isinstance(fp[k], qf.FixedArray) for k in p)
    assert fp["w1"].format == L1.weight and fp["b1"].format == B
    g = jax.jit(qf.fixed_point(mlp, RULES))
    np.testing.assert_array_equal(g(fp, x), g(p, x))
    hlo = g.lower(fp, x).as_text()
    assert "xi32>" in hlo and re.search(r"dot_general.*xi(8|16|32)>", hlo.replace("\n", " "))


def test_unmatched_layers_stay_float():
    p = _params(2)
    x = jax.random.normal(jax.random.key(4), (3, 5))
    only_first = [(r"w1", L1), (r"w2", None)]
    y = qf.fixed_point(mlp, only_first)(p, x)
    h = qf.fixed_point(lambda p, x: x @ p["w1"], only_first)(p, x) + p["b1"]
    np.testing.assert_allclose(y, jax.nn.relu(h) @ p["w2"] + p["b2"], rtol=1e-6, atol=1e-6)
    assert qf.unused_rules([(r"w1", L1), (r"nope", B)], p) == ["nope"]


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def test_linen_cnn_matches_integer_ops_layer_by_layer():
    m = CNN()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    v = m.init(jax.random.key(1), x)
    conv = qf.LayerFormats(qf.Format(8, 1, **RC), qf.Format(8, 3, **RC), qf.Format(12, 4, **RC))
    dense = qf.LayerFormats(
        qf.Format(8, 1, **RC), qf.Format(8, 4, signed=False, **RC), qf.Format(12, 5, **RC)
    )
    rules = [(r".*Conv_0/kernel", conv), (r".*Dense_0/kernel", dense), (r".*/bias", qf.Format(12, 4, **RC))]
    y = jax.jit(qf.fixed_point(m.apply, rules))(v, x)

    # the same computation written with the qjax.fixed ops directly
    @jax.jit
    def by_hand(pv, x):
        return _cnn_by_hand(pv, x, conv, dense)

    np.testing.assert_array_equal(np.asarray(y), np.asarray(by_hand(v["params"], x)))


def _cnn_by_hand(pv, x, conv, dense):
    xf = qf.from_float(x, conv.input)
    c = qf.conv_general_dilated(
        xf,
        qf.from_float(pv["Conv_0"]["kernel"], conv.weight),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        fmt=conv.output,
    )
    b = qf.from_float(pv["Conv_0"]["bias"], qf.Format(12, 4, **RC))
    h = qf.relu(qf.add(c, b))
    h = qf.FixedArray(nn.max_pool(h.mantissa, (2, 2), (2, 2)), h.format).reshape(2, -1)
    out = qf.matmul(
        qf.cast(h, dense.input), qf.from_float(pv["Dense_0"]["kernel"], dense.weight), dense.output
    )
    out = qf.add(out, qf.from_float(pv["Dense_0"]["bias"], qf.Format(12, 4, **RC)))
    return out.to_float()


def test_nnx_model():
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    rules = [(r"kernel", L1), (r"bias", B)]
    y = qf.fixed_point(qjax.nnx_apply(graphdef), rules)(state, x)
    want = qf.add(
        qf.matmul(qf.from_float(x, L1.input), qf.from_float(state["kernel"][...], L1.weight), L1.output),
        qf.from_float(state["bias"][...], B),
    )
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.to_float()))


def test_errors_name_the_leaf_and_rule():
    p = _params()
    x = jnp.ones((2, 5))
    wide = qf.LayerFormats(qf.Format(16, 2), qf.Format(16, 4), qf.Format(16, 6))
    with pytest.raises(
        ValueError, match=r"leaf 'w1' \(rule 0 'w1'\): dot_general: the accumulator needs .* = 35 bits"
    ):
        qf.fixed_point(mlp, [("w1", wide)])(p, x)
    too_wide_out = qf.LayerFormats(qf.Format(8, 2), qf.Format(8, 3), qf.Format(28, 6))
    with pytest.raises(ValueError, match=r"leaf 'w1'.*float32, which holds at most 24 bits"):
        qf.fixed_point(mlp, [("w1", too_wide_out)])(p, x)
    with pytest.raises(TypeError, match=r"rule 'w1'.*LayerFormats, a Format or None"):
        qf.fixed_point(mlp, [("w1", "int8")])


def test_scanned_stack_and_stochastic_formats():
    """A ``lax.scan`` over stacked weights: every slice runs in fixed point, the same as an
    unrolled loop of qjax.fixed ops; stochastic formats need a key."""
    ws = jax.random.normal(jax.random.key(0), (3, 6, 6)) * 0.4
    x = jax.random.normal(jax.random.key(1), (4, 6))

    def stack(p, x):
        return jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, p["ws"])[0]

    rules = [("ws", L1)]
    y = jax.jit(qf.fixed_point(stack, rules))({"ws": ws}, x)

    @jax.jit
    def unrolled(ws, x):
        h = x
        for i in range(3):
            h = qf.relu(qf.matmul(qf.from_float(h, L1.input), qf.from_float(ws[i], L1.weight), L1.output))
            h = h.to_float()
        return h

    np.testing.assert_array_equal(np.asarray(y), np.asarray(unrolled(ws, x)))
    sr = qf.LayerFormats(L1.weight, L1.input.replace(rounding="STOCHASTIC"), L1.output)
    with pytest.raises(ValueError, match=r"leaf 'ws'.*needs a PRNG key"):
        qf.fixed_point(stack, [("ws", sr)])({"ws": ws}, x)
    a = qf.fixed_point(stack, [("ws", sr)], key=jax.random.key(0))({"ws": ws}, x)
    b = qf.fixed_point(stack, [("ws", sr)], key=jax.random.key(0))({"ws": ws}, x)
    np.testing.assert_array_equal(a, b)


# -- hls4ml accumulators (accum_t, bias in the accumulator) ------------------------------

HW, HX, HB = qf.Format(8, 2, **RC), qf.Format(8, 3, **RC), qf.Format(10, 3, **RC)
HOUT = qf.Format(8, 3, rounding="RND", overflow="SAT")


def _hls_dense(x, w, b, lf: qf.LayerFormats):
    """hls4ml's dense_latency on float inputs quantized as hls4ml would (x to data_t, w to
    weight_t, b to bias_t), with ``lf.accum`` (``None``: an accumulator wide enough to be
    exact); returns float values."""
    acc = lf.accum or qf.Format(40, 20)
    t = lambda f: (f.width, f.integer, f.signed, f.rounding, f.overflow)
    wm = [[_q(v, lf.weight) for v in row] for row in w]
    bm = [_q(v, HB) for v in b]
    out = []
    for row in x:
        xm = [_q(v, lf.input) for v in row]
        ms = ref.dense_latency(
            xm, wm, bm, lf.input.fraction, lf.weight.fraction, HB.fraction, t(acc), t(HOUT)
        )
        out.append([float(ref.value(m, HOUT.fraction)) for m in ms])
    return out


@pytest.mark.parametrize(
    "accum, linen",
    [
        (None, False),  # the exact accumulator, bias inside (bias_in_accumulator=True)
        (qf.Format(10, 4, rounding="TRN", overflow="SAT"), False),
        (qf.Format(10, 4, rounding="RND", overflow="WRAP"), True),
        (qf.Format(9, 3, rounding="TRN", overflow="WRAP"), True),
    ],
)
def test_dense_layer_is_bit_exact_with_hls4ml_dense_latency(accum, linen):
    """``x @ w + b`` and a Linen ``Dense``: the bias starts the accumulator, the products
    and partial sums are cast to ``accum``, one cast to ``output`` (previously: the product
    cast to ``output`` and the bias added after it in float; 256/256 outputs differed)."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (16, 6)) * 2, np.float64)
    lf = qf.LayerFormats(HW, HX, HOUT, accum=accum, bias_in_accumulator=True)
    if linen:
        m = nn.Dense(4)
        v = m.init(jax.random.key(1), x[:1])
        v = jax.tree.map(lambda a: a * 1.5, v)
        w, b = v["params"]["kernel"], v["params"]["bias"]
        y = jax.jit(qf.fixed_point(m.apply, [(r".*kernel", lf), (r".*bias", HB)]))(v, x)
    else:
        w = jax.random.normal(jax.random.key(1), (6, 4))
        b = jax.random.normal(jax.random.key(2), (4,)) * 1.5
        f = lambda p, x: x @ p["w"] + p["b"]
        y = jax.jit(qf.fixed_point(f, [("w", lf), ("b", HB)]))({"w": w, "b": b}, x)
    want = _hls_dense(x, np.asarray(w, np.float64), np.asarray(b, np.float64), lf)
    assert np.asarray(y, np.float64).tolist() == want


def _conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def test_accumulator_options_and_errors():
    p = {"w": jax.random.normal(jax.random.key(1), (6, 4)), "b": jnp.ones((4,))}
    x = jnp.ones((2, 6))
    f = lambda p, x: x @ p["w"] + p["b"]
    with pytest.raises(ValueError, match=r"bias leaf 'b'.*needs a format.*Format rule"):
        jax.jit(qf.fixed_point(f, [("w", qf.LayerFormats(HW, HX, HOUT, bias_in_accumulator=True))]))(p, x)
    # bias_in_accumulator=False: the bias is added (in float) after the cast to output
    lf = qf.LayerFormats(HW, HX, HOUT, accum=qf.Format(12, 5))
    assert lf.bias_inside and not dataclasses.replace(lf, bias_in_accumulator=False).bias_inside
    after = jax.jit(qf.fixed_point(f, [("w", dataclasses.replace(lf, bias_in_accumulator=False))]))(p, x)
    no_bias = jax.jit(qf.fixed_point(lambda p, x: x @ p["w"], [("w", lf)]))(p, x)
    np.testing.assert_array_equal(after, no_bias + 1)
    conv = {"k": jnp.ones((3, 3, 1, 2)), "b": jnp.ones((2,))}
    with pytest.raises(ValueError, match=r"leaf 'k'.*accum is implemented for dot_general"):
        jax.jit(qf.fixed_point(_conv, [("k", lf)]))(conv, jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"leaf 'w'.*inference-only"):
        jax.jit(qf.fake_fixed_point(f, [("w", lf)]))(p, x)
    with pytest.raises(TypeError, match=r"LayerFormats\.accum"):
        qf.LayerFormats(HW, HX, HOUT, accum="ap_fixed<16,6>")


def test_conv_bias_in_the_exact_accumulator():
    """A convolution adds its bias exactly to the exact accumulator before the one cast."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 1))
    p = {"k": jax.random.normal(jax.random.key(1), (3, 3, 1, 2)), "b": jnp.asarray([0.3, -1.1])}
    conv = qf.LayerFormats(
        qf.Format(8, 1, **RC), qf.Format(8, 3, **RC), qf.Format(8, 3, **RC), bias_in_accumulator=True
    )
    bf = qf.Format(12, 4, **RC)
    y = jax.jit(qf.fixed_point(_conv, [("k", conv), ("b", bf)]))(p, x)
    xm = [[_q(v, conv.input) for v in row] for row in np.asarray(x, np.float64)[..., 0].reshape(-1, 5)]
    km = np.vectorize(lambda v: _q(v, conv.weight))(np.asarray(p["k"], np.float64)[:, :, 0, :])
    bm = [_q(v, bf) for v in np.asarray(p["b"], np.float64)]
    xm = np.pad(np.asarray(xm).reshape(2, 5, 5), ((0, 0), (1, 1), (1, 1)))
    frac = conv.input.fraction + conv.weight.fraction
    o = conv.output
    want = np.zeros((2, 5, 5, 2))
    for n, i, j, c in np.ndindex(want.shape):
        acc = ref.value(int((xm[n, i : i + 3, j : j + 3] * km[:, :, c]).sum()), frac)
        acc += ref.value(bm[c], bf.fraction)
        want[n, i, j, c] = float(
            ref.value(ref.quantize(acc, o.width, o.integer, o.signed, o.rounding, o.overflow), o.fraction)
        )
    np.testing.assert_array_equal(np.asarray(y, np.float64), want)


def test_residual_add_written_with_fixed_ops_matches_an_hls4ml_add():
    """The documented workaround for hls4ml's ``Add`` (result_t cast, SAT): a carrier read
    with ``from_float`` in its own format is exact, so ``qf.add`` inside the model is bit-exact."""
    lf = qf.LayerFormats(HW, HX, qf.Format(12, 5, **RC))
    res = qf.Format(8, 3, rounding="TRN", overflow="SAT")

    def f(p, x):
        h = x @ p["w"]
        s = qf.add(qf.from_float(h, lf.output), qf.from_float(x[:, :4] * 8, HX), res)
        return qf.to_float(s)

    p = {"w": jax.random.normal(jax.random.key(1), (6, 4))}
    x = jax.random.normal(jax.random.key(0), (8, 6)) * 3
    y = np.asarray(jax.jit(qf.fixed_point(f, [("w", lf)]))(p, x), np.float64)
    xn, wn = np.asarray(x, np.float64), np.asarray(p["w"], np.float64)
    o = lf.output
    for i, j in np.ndindex(y.shape):
        xm = [_q(v, HX) for v in xn[i]]
        acc = sum(m * _q(wn[k, j], HW) for k, m in enumerate(xm))
        h = ref.value(ref.cast(acc, 11, o.width, o.integer, o.signed, o.rounding, o.overflow), o.fraction)
        s = h + ref.value(_q(xn[i, j] * 8, HX), HX.fraction)
        want = ref.quantize(s, res.width, res.integer, res.signed, res.rounding, res.overflow)
        assert y[i, j] == float(ref.value(want, res.fraction))
    assert y.max() == 4 - 2.0**-5 and y.min() == -4  # saturated
