"""bitsandbytes NF4 checkpoints (QLoRA, the Hub's ``*-bnb-4bit`` models). The reference
here is a NumPy transcription of bitsandbytes' own pure-PyTorch ("default" backend)
``quantize_4bit`` / ``dequantize_4bit`` and the double quantization of the absmax
(``quantize_blockwise`` at blocksize 256 after subtracting the mean), written to the
tensors and JSON quant state ``Linear4bit`` saves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis_budget import examples

import qjax
from qjax.numerics.formats import NF4_VALUES

NF4 = np.asarray(NF4_VALUES, np.float32)
DYNAMIC = np.linspace(-1, 1, 256).astype(np.float32)  # any sorted 256-value map (it is stored)


def _nearest(scaled: np.ndarray, table: np.ndarray) -> np.ndarray:
    return np.argmin(np.abs(scaled[:, None] - table[None, :]), axis=-1).astype(np.uint8)


def _blockwise(a: np.ndarray, block: int, table: np.ndarray):
    """bitsandbytes' quantize_blockwise / quantize_4bit on a flat array: codes, absmax."""
    blocks = -(-a.size // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[: a.size] = a
    absmax = np.abs(padded.reshape(blocks, block)).max(-1).astype(np.float32)
    with np.errstate(all="ignore"):
        scaled = np.clip(padded.reshape(blocks, block) * (1 / absmax[:, None]), -1, 1)
    scaled = np.nan_to_num(scaled).reshape(-1)[: a.size]
    return _nearest(scaled, table), absmax


def bnb_checkpoint(
    w: np.ndarray, name: str, block: int = 64, nested: bool = False, dtype="bfloat16", nested_dtype="float32"
):
    """The tensors ``Linear4bit`` saves for the (out, in) weight ``w``."""
    codes, absmax = _blockwise(w.reshape(-1), block, NF4)
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    out = {name: ((codes[::2] << 4) | codes[1::2]).reshape(-1, 1), name + ".quant_map": NF4}
    state = {"quant_type": "nf4", "blocksize": block, "dtype": dtype, "shape": list(w.shape)}
    if nested:
        offset = absmax.mean()
        q8, outer = _blockwise(absmax - offset, 256, DYNAMIC)
        out |= {
            name + ".absmax": q8,
            name + ".nested_absmax": outer,
            name + ".nested_quant_map": DYNAMIC,
        }
        state |= {"nested_blocksize": 256, "nested_dtype": nested_dtype, "nested_offset": float(offset)}
    else:
        out[name + ".absmax"] = absmax
    out[name + ".quant_state.bitsandbytes__nf4"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def bnb_dequantize(t: dict, name: str) -> np.ndarray:
    """bitsandbytes' dequantize_4bit (float32): the (out, in) weight."""
    state = json.loads(bytes(t[name + ".quant_state.bitsandbytes__nf4"]).decode())
    n, k = state["shape"]
    packed = t[name].reshape(-1)
    codes = np.empty(2 * packed.size, np.int64)
    codes[1::2], codes[::2] = packed & 0xF, packed >> 4
    absmax = t[name + ".absmax"]
    if "nested_blocksize" in state:
        nb = state["nested_blocksize"]
        q = t[name + ".nested_quant_map"][absmax.astype(np.int64)]
        # dequantize_blockwise writes nested_dtype; `absmax += offset` rounds to it again
        inner = jnp.dtype(state["nested_dtype"])
        absmax = (q * np.repeat(t[name + ".nested_absmax"], nb)[: absmax.size]).astype(inner)
        absmax = (
            (absmax.astype(np.float32) + np.float32(state["nested_offset"])).astype(inner).astype(np.float32)
        )
    block = state["blocksize"]
    return (t[name + ".quant_map"][codes[: n * k]].reshape(-1, block) * absmax[:, None]).reshape(n, k)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("block", [64, 128])
def test_nf4_weights_load_as_the_bitsandbytes_dequantization(nested, block):
    w = np.random.default_rng(0).normal(size=(48, 512)).astype(np.float32) * 0.02
    w[3, :block] = 0.0  # an all-zero block: absmax 0
    name = "model.layers.0.mlp.down_proj.weight"
    t = bnb_checkpoint(w, name, block, nested)
    q = qjax.from_bnb_4bit(t, name, dtype=jnp.float32)
    assert q.shape == (512, 48) and q.format == qjax.nf4 and q.group_size == block
    np.testing.assert_array_equal(q.dequantize(), bnb_dequantize(t, name).T)
    assert np.max(np.abs(np.asarray(q.dequantize()) - w.T)) < 0.2 * np.abs(w).max()  # and it is w
    default = qjax.from_bnb_4bit(t, name)  # the layer's own dtype, from the quant state
    assert default.dtype == jnp.bfloat16
    # served like a weight quantized here: x @ W.T of the PyTorch layer
    x = jax.random.normal(jax.random.key(0), (4, 512))
    policy = qjax.Policy(
        [
            qjax.Rule(
                "kernel", weight=qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=block, group_axis=-2)
            )
        ]
    )
    y = qjax.quantized(lambda p, x: x @ p["kernel"], policy)({"kernel": q}, x)
    np.testing.assert_allclose(y, np.asarray(x, np.float64) @ bnb_dequantize(t, name).T, rtol=1e-4, atol=1e-5)


def test_absmax_double_quantized_in_bfloat16():
    # bitsandbytes 0.44's CPU / XPU backend keeps bf16 absmax: its nested scales round to bf16
    w = np.random.default_rng(3).normal(size=(16, 1024)).astype(np.float32)
    t = bnb_checkpoint(w, "w", 64, nested=True, nested_dtype="bfloat16")
    got = np.asarray(qjax.from_bnb_4bit(t, "w", dtype=jnp.float32).dequantize())
    np.testing.assert_array_equal(got, bnb_dequantize(t, "w").T)
    as_f32 = bnb_checkpoint(w, "w", 64, nested=True)
    assert not np.array_equal(got, bnb_dequantize(as_f32, "w").T)  # the rounding is seen


def test_safetensors_file_and_other_quant_storage(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    w = np.random.default_rng(1).normal(size=(32, 256)).astype(np.float32)
    name = "lm.q_proj.weight"
    t = bnb_checkpoint(w, name, 64, nested=True, dtype="float16")
    safetensors.save_file(t, str(tmp_path / "model.safetensors"))
    loaded = safetensors.load_file(str(tmp_path / "model.safetensors"))
    q = qjax.from_bnb_4bit(loaded, name)
    assert q.dtype == jnp.float16
    np.testing.assert_array_equal(
        qjax.from_bnb_4bit(loaded, name, dtype=jnp.float32).dequantize(), bnb_dequantize(t, name).T
    )
    # bnb_4bit_quant_storage=float32 (FSDP): the same bytes viewed as another dtype
    stored = dict(t)
    stored[name] = t[name].reshape(-1).view(np.float32).reshape(-1, 1)
    np.testing.assert_array_equal(
        qjax.from_bnb_4bit(stored, name, pack_codes=False).values,
        qjax.from_bnb_4bit(t, name, pack_codes=False).values,
    )


@settings(deadline=None, max_examples=examples(4))  # make fuzz scales it up
@given(
    k_groups=st.sampled_from([1, 3]),  # few shapes: each compiles its quantize / dequantize
    n=st.sampled_from([1, 5]),
    block=st.sampled_from([32, 64]),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qjax_nf4_round_trips_through_the_bitsandbytes_tensors(k_groups, n, block, per_channel, seed):
    k = k_groups * block
    w = jnp.asarray(np.random.default_rng(seed).normal(size=(k, n)), jnp.float32)
    grouped = not (per_channel and k in (32, 64, 128))  # per channel: blocksize K
    groups = {"group_size": block, "group_axis": -2} if grouped else {}
    spec = qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), **groups)
    q = qjax.quantize(w, spec)
    t = qjax.to_bnb_4bit(q, "w")
    back = qjax.from_bnb_4bit(t, "w", dtype=jnp.float32)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())
    np.testing.assert_array_equal(bnb_dequantize(t, "w").T, q.dequantize())  # what bitsandbytes reads


def test_bad_tensors_are_refused_by_name():
    w = np.random.default_rng(2).normal(size=(8, 128)).astype(np.float32)
    t = bnb_checkpoint(w, "w", 64)
    with pytest.raises(ValueError, match=r"no 'w\.absmax'.*keys under 'w'"):
        qjax.from_bnb_4bit({k: v for k, v in t.items() if k != "w.absmax"}, "w")
    with pytest.raises(ValueError, match="is 'v' a 4-bit weight"):
        qjax.from_bnb_4bit(t, "v")
    fp4 = {k.replace("nf4", "fp4"): v for k, v in t.items()}
    with pytest.raises(ValueError, match="only NF4"):
        qjax.from_bnb_4bit(fp4, "w")
    with pytest.raises(ValueError, match="not NF4's table"):
        qjax.from_bnb_4bit(t | {"w.quant_map": NF4[::-1].copy()}, "w")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qjax.from_bnb_4bit(t | {"w.absmax": np.full(16, np.nan, np.float32)}, "w")
    with pytest.raises(ValueError, match="15 absmax values for 16 blocks"):
        qjax.from_bnb_4bit(t | {"w.absmax": t["w.absmax"][:15]}, "w")
    with pytest.raises(ValueError, match="bytes of codes"):
        qjax.from_bnb_4bit(t | {"w": t["w"][:-1]}, "w")
    odd = bnb_checkpoint(np.ones((4, 96), np.float32), "w", 64)  # blocks straddle rows
    with pytest.raises(ValueError, match="not a multiple of blocksize 64"):
        qjax.from_bnb_4bit(odd, "w")
    state = json.loads(bytes(t["w.quant_state.bitsandbytes__nf4"]).decode()) | {"shape": None}
    bad = t | {"w.quant_state.bitsandbytes__nf4": np.frombuffer(json.dumps(state).encode(), np.uint8)}
    with pytest.raises(ValueError, match="has no 'shape'"):
        qjax.from_bnb_4bit(bad, "w")
    with pytest.raises(ValueError, match="NF4 QArray"):
        qjax.to_bnb_4bit(
            qjax.quantize(
                jnp.ones((64, 4)), qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=64, group_axis=-2)
            ),
            "w",
        )
    with pytest.raises(ValueError, match="blocksize"):
        qjax.to_bnb_4bit(
            qjax.quantize(
                jnp.ones((96, 4)), qjax.QuantSpec(qjax.nf4, channel_axes=(-1,), group_size=48, group_axis=-2)
            ),
            "w",
        )
