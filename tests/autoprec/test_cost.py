"""Cost models: MACs/BOPs against hand counts for Dense, Conv (strided, grouped),
einsum (with a batch dimension) and a scan over stacked weights; bytes against
qjax.footprint; analytical hardware time; the latency cache."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import qjax
from qjax import autoprec
from qjax.autoprec import latency as latency_mod

W8A8 = autoprec.Candidate(
    "w8a8",
    weight=qjax.QuantSpec(qjax.int8, channel_axes=(-1,)),
    act=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN),
)
CANDS = (*autoprec.weight_candidates((2, 4, 8)), W8A8)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="conv")(x)  # SAME, stride 1
        x = nn.Conv(4, (3, 3), strides=2, padding="VALID", name="strided")(x)
        x = nn.Conv(4, (1, 1), feature_group_count=2, name="grouped")(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(5, name="dense")(x)


@pytest.fixture(scope="module")
def net():
    x = jnp.ones((2, 7, 7, 3))
    shapes = jax.eval_shape(Net().init, jax.random.key(0), x)  # no eager conv compiles
    leaves = [jnp.linspace(-1.0, 1.0, math.prod(s.shape)).reshape(s.shape) for s in jax.tree.leaves(shapes)]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves), x


def test_macs_dense_and_conv_by_hand(net):
    v, x = net
    layers = {layer.path: layer for layer in autoprec.find_layers(Net().apply, v, x)}
    assert list(layers) == [
        "params/conv/kernel",
        "params/strided/kernel",
        "params/grouped/kernel",
        "params/dense/kernel",
    ]
    assert layers["params/conv/kernel"].macs == 2 * 7 * 7 * 6 * (3 * 3 * 3)
    assert layers["params/strided/kernel"].macs == 2 * 3 * 3 * 4 * (3 * 3 * 6)  # (7-3)//2+1 = 3
    assert layers["params/grouped/kernel"].macs == 2 * 3 * 3 * 4 * (1 * 1 * 2)  # 4 inputs / 2 groups
    assert layers["params/dense/kernel"].macs == 2 * (3 * 3 * 4) * 5
    dense = layers["params/dense/kernel"]
    assert autoprec.layer_bops(dense, CANDS[1]) == dense.macs * 4 * 32  # int4 weight, float32 act
    assert autoprec.layer_bops(dense, W8A8) == dense.macs * 8 * 8
    assert autoprec.layer_bops(dense, autoprec.FLOAT, act_bits=16) == dense.macs * 32 * 16


def test_macs_einsum_with_batch_dims_and_scan():
    def f(p, x):
        h = jnp.einsum("btd,dhk->bthk", x, p["proj"])  # (2,5,8) x (8,4,3)
        h = h.reshape(2, 5, 12)
        g = jnp.einsum("hbd,hdk->hbk", jnp.moveaxis(h, 1, 0)[:4], p["heads"])  # batch dim h

        def body(c, w):
            return jnp.tanh(c @ w), None

        out, _ = lax.scan(body, x[:, 0], p["stack"])  # 3 stacked (8, 8) layers
        return g.sum() + out.sum()

    p = {"proj": jnp.ones((8, 4, 3)), "heads": jnp.ones((4, 12, 2)), "stack": jnp.ones((3, 8, 8))}
    x = jnp.ones((2, 5, 8))
    layers = {layer.path: layer for layer in autoprec.find_layers(f, p, x)}
    assert layers["proj"].macs == 2 * 5 * 8 * 4 * 3
    assert layers["heads"].macs == 4 * 2 * 12 * 2  # batch h=4, b=2, contract d=12, k=2
    assert layers["stack"].macs == 3 * (2 * 8 * 8)
    with pytest.raises(ValueError, match="'nope'"):
        autoprec.find_layers(f, p, x, paths=["proj", "nope"])


def test_macs_count_every_execution_of_every_read():
    # find_layers counted identical ops once and scaled any view smaller than the leaf
    # as if it were a scan stack: a shared layer, a split or sliced kernel, an RNN cell
    B, K = 4, 16
    x = jnp.ones((B, K))

    class Shared(nn.Module):  # ALBERT-style: one Dense applied twice
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(K, use_bias=False)
            return d(jnp.tanh(d(x)))

    v = Shared().init(jax.random.key(0), x)
    [layer] = autoprec.find_layers(Shared().apply, v, x)
    assert layer.macs == 2 * B * K * K

    p = {"w": jnp.ones((K, 16))}

    def qkv(p, x):  # a fused kernel split 8/4/4 (grouped-query heads)
        wq, wk, wv = jnp.split(p["w"], [8, 12], axis=-1)
        return (x @ wq).sum() + (x @ wk).sum() + (x @ wv).sum()

    assert autoprec.find_layers(qkv, p, x)[0].macs == B * K * 16
    assert autoprec.find_layers(lambda p, x: x @ p["w"][:, :4], p, x)[0].macs == B * K * 4

    p = {"w": jnp.ones((K, K))}

    def rnn(p, x):
        return lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=10)[0]

    def nested(p, x):  # 5 scan steps of a 3-step fori_loop
        inner = lambda h: lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"]), h)
        return lax.scan(lambda h, _: (inner(h), None), x, None, length=5)[0]

    assert autoprec.find_layers(rnn, p, x)[0].macs == 10 * B * K * K
    assert autoprec.find_layers(nested, p, x)[0].macs == 15 * B * K * K


def test_bytes_match_footprint(net):
    v, x = net
    layers = autoprec.find_layers(Net().apply, v, x)
    absmax = autoprec.weight_candidates((2, 4, 8), calibration=qjax.calib.absmax())
    for c in (*absmax, W8A8):
        pol = qjax.Policy([qjax.Rule(r".*/kernel", weight=c.weight)])
        fp = {leaf.path: leaf.nbytes for leaf in qjax.footprint(qjax.quantize_params(v, pol)).leaves}
        for layer in layers:
            assert autoprec.layer_bytes(layer, c) == fp[layer.path], (c.name, layer.path)
    dense = layers[-1]
    assert autoprec.layer_bytes(dense, autoprec.FLOAT) == dense.size * 4
    # int4 packs two per byte along the last axis (odd 5 -> 3 bytes a row) + 5 float32 scales
    assert autoprec.layer_bytes(dense, CANDS[1]) == 36 * 3 + 5 * 4
    assert autoprec.layer_bits(dense, CANDS[1]) == 36 * 5 * 4 + 5 * 32  # ideal: no padding
    int3 = autoprec.weight_candidates((3,), calibration=qjax.calib.absmax(), include_float=False)[0]
    assert autoprec.layer_bits(dense, int3) == 36 * 5 * 3 + 5 * 32
    assert autoprec.layer_bytes(dense, int3) == autoprec.layer_bytes(dense, CANDS[1])  # nibbles
    assert autoprec.layer_bits(dense, autoprec.FLOAT) == 36 * 5 * 32


def test_cost_matrices_mark_unfit_and_hardware_time(net):
    v, x = net
    layers = autoprec.find_layers(Net().apply, v, x)
    g32 = autoprec.Candidate(
        "int4g4", weight=qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=4, group_axis=0)
    )
    hw = autoprec.lookup("tpu-v5e")
    cm = autoprec.cost_matrices(layers, (*CANDS, g32), hardware=hw)
    assert set(cm) == {"bytes", "bits", "bops", "time"}
    assert math.isinf(cm["bytes"][0, -1]) and math.isinf(
        cm["bops"][0, -1]
    )  # conv axis 0 is 3: 4 does not divide
    assert math.isfinite(cm["bytes"][-1, -1])  # dense kernel (36, 5): groups of 4 rows
    dense = layers[-1]
    assert autoprec.layer_time(dense, W8A8, hw) == dense.macs / 2
    assert autoprec.layer_time(dense, CANDS[1], hw) == dense.macs  # weight-only computes in bf16
    with pytest.raises(ValueError, match=r"params/conv/kernel.*int4g4"):
        autoprec.layer_bytes(layers[0], g32)


def test_measure_latency_and_cache(tmp_path, monkeypatch):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.relu(nn.Dense(16)(x)))

    x = jnp.ones((4, 12))
    v = M().init(jax.random.key(0), x)
    layers = autoprec.find_layers(M().apply, v, x)
    cache = tmp_path / "lat.json"
    cands = (W8A8, autoprec.FLOAT)
    lat = autoprec.measure_latency(layers, cands, cache=cache, repeats=1, target_s=1e-4)
    for layer in layers:
        for c in cands:
            assert 0 <= lat.get(layer.path, c.name) < 1.0
    assert len(json.loads(cache.read_text())) == len(layers) * len(cands) + 1  # + dispatch overhead
    assert 0 < lat.overhead_s < 0.01

    def boom(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(latency_mod, "_time_many", boom)
    again = autoprec.measure_latency(layers, cands, cache=cache)
    assert again.seconds == lat.seconds
    cm = autoprec.cost_matrices(layers, cands, latency=again)
    assert cm["latency"][0, 0] == lat.get(layers[0].path, "w8a8")
    with pytest.raises(KeyError, match="'int2'"):
        lat.get(layers[0].path, "int2")


def test_measure_latency_counts_every_layer_of_a_scan_stack(monkeypatch):
    # a scan-stacked leaf's op was timed once and counted once, not once per layer
    L, B, K = 6, 4, 8
    p = {"w": jnp.ones((L, K, K))}
    x = jnp.ones((B, K))

    def scanned(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    def unrolled(p, x):
        for i in range(L):
            x = jnp.tanh(x @ p["w"][i])
        return x

    fake = lambda fns, **kw: {k: 1.0 if k == "noop" else 3.0 for k in fns}  # 2 s per op after overhead
    monkeypatch.setattr(latency_mod, "_time_many", fake)
    for f in (scanned, unrolled):
        [layer] = autoprec.find_layers(f, p, x)
        assert layer.macs == L * B * K * K
        lat = autoprec.measure_latency([layer], [autoprec.FLOAT])
        assert lat.get("w", "float") == L * 2.0
