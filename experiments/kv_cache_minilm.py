"""KV-cache formats on real keys and values: all-MiniLM-L6-v2's attention, a study.

Keys and values of MiniLM's six layers (12 heads x 32 channels) on the 310 sentences of
``experiments/data/sentences.txt`` (batches of 32, padded to 64 tokens) are written into a
``qjax.KVCache`` of each format, and the layer's attention is computed on the codes
(``cache.attend`` with the padding mask; MiniLM attends both ways). Error of each layer's
attention output against float64 attention over the float32 keys and values:
``||y - y64|| / ||y64||`` over the real (unpadded) query tokens, the median and worst of
the six layers, and the bytes of the cache against a bf16 cache (4- and 2-bit group
scales in bfloat16; the float tail of block-scaled keys, one block per sequence, aside). These are real
activations with outlier key channels, unlike the random data of ``bench_kv_cache.py``;
it is an encoder, so there is no decoding, only the attention read.

Usage::

    .venv/bin/python experiments/kv_cache_minilm.py        # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax.numpy as jnp
import numpy as np
from report import machine, write

import qjax
from qjax.distill.capture import capture_linen
from qjax.models import load_minilm, tokenize

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
RESULTS = Path(__file__).resolve().parent / "results"
SEQ, BATCH = 64, 32


def _kivi(bits, block):
    return qjax.QuantSpec(
        bits, channel_axes=(0, 2, 3), group_size=block, group_axis=1, symmetric=False, scale_dtype="bfloat16"
    )


def _token(bits, group=None, symmetric=True):
    if group is None:
        return qjax.QuantSpec(bits, channel_axes=qjax.PER_TOKEN, symmetric=symmetric)
    return qjax.QuantSpec(
        bits,
        channel_axes=(0, 1, 2),
        group_size=group,
        group_axis=3,
        symmetric=symmetric,
        scale_dtype="bfloat16",
    )


# name: (key spec, value spec)
FORMATS = {
    "int8/token": (_token(qjax.int8), _token(qjax.int8)),
    "fp8/token": (_token(qjax.fp8_e4m3), _token(qjax.fp8_e4m3)),
    "int4/token": (_token(qjax.int4), _token(qjax.int4)),
    "int4/g16 asym": (_token(qjax.int4, 16, False), _token(qjax.int4, 16, False)),
    "int4 KIVI (k/channel-block16, v/g16)": (_kivi(qjax.int4, 16), _token(qjax.int4, 16, False)),
    # the keys' format alone (values int8 per token)
    "k int4/g16 asym, v int8/token": (_token(qjax.int4, 16, False), _token(qjax.int8)),
    "k int4 KIVI block16, v int8/token": (_kivi(qjax.int4, 16), _token(qjax.int8)),
    "k int2/g16 asym, v int8/token": (_token(qjax.int2, 16, False), _token(qjax.int8)),
    "k int2 KIVI block16, v int8/token": (_kivi(qjax.int2, 16), _token(qjax.int8)),
    "int2/g16 asym": (_token(qjax.int2, 16, False), _token(qjax.int2, 16, False)),
    "int2 KIVI (k/channel-block16, v/g16)": (_kivi(qjax.int2, 16), _token(qjax.int2, 16, False)),
}


def reference(q, k, v, mask) -> np.ndarray:
    """float64 bidirectional attention with a key padding mask; q, k, v (B, T, H, D)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--batches", type=int, default=0, help="use only this many batches (0: all)")
    args = p.parse_args(argv)
    model, variables, tok = load_minilm()
    sentences = [s for s in SENTENCES.read_text().splitlines() if s.strip()]
    grab = capture_linen(model, r"layer_\d+/attention/(query|key|value)")
    starts = list(range(0, len(sentences), BATCH))[: args.batches or None]
    sq = {name: np.zeros(6) for name in FORMATS}  # squared error / squared norm, per layer
    norm = np.zeros(6)
    bytes_x = {}
    for start in starts:
        batch = tokenize(tok, sentences[start : start + BATCH], max_length=SEQ, padding="max_length")
        _, feats = grab(variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mask = jnp.asarray(batch["attention_mask"], bool)
        b = mask.shape[0]
        for layer in range(6):
            q, k, v = (
                feats[f"layer_{layer}/attention/{n}"]["output"].reshape(b, SEQ, 12, 32)
                for n in ("query", "key", "value")
            )
            want = reference(q, k, v, mask)
            real = np.asarray(mask)[:, :, None, None]
            norm[layer] += np.sum(np.where(real, want, 0) ** 2)
            for name, (k_spec, v_spec) in FORMATS.items():
                cache = qjax.KVCache.init(
                    k_spec, value_spec=v_spec, batch=b, length=SEQ, heads=12, head_dim=32, dtype=jnp.float32
                )
                cache = cache.update(k, v, 0)
                got = np.asarray(cache.attend(q, mask=mask[:, None, None, :]), np.float64)
                sq[name][layer] += np.sum(np.where(real, got - want, 0) ** 2)
                bf16 = 2 * k.size * 2
                bytes_x[name] = (cache.k.nbytes + cache.v.nbytes) / bf16  # the float tails aside
    rel = {name: np.sqrt(sq[name] / norm) for name in FORMATS}
    result = {
        **machine(),
        "sentences": len(sentences) if not args.batches else min(len(sentences), args.batches * BATCH),
        "seq": SEQ,
        "formats": {
            name: {
                "rel_err_per_layer": rel[name].tolist(),
                "median": float(np.median(rel[name])),
                "worst": float(rel[name].max()),
                "bytes_x_bf16": bytes_x[name],
            }
            for name in FORMATS
        },
    }
    lines = [
        f"# KV-cache formats on MiniLM's keys and values ({result['date']}, {result['machine']}, "
        f"{result['cpu_count']} cores, jax {result['jax']})",
        "",
        f"{result['sentences']} sentences, padded to {SEQ} tokens; error of each layer's attention output "
        "||y - y64|| / ||y64|| over real tokens against float64 attention over the float keys and values; "
        "bytes (codes, scales, zero points) against a bf16 cache; block-scaled keys also hold a float "
        "tail of one block per sequence, not counted. Scales of the 4- and 2-bit groups are bfloat16.",
        "",
        "| format | median of 6 layers | worst layer | bytes × bf16 |",
        "|---|---|---|---|",
    ]
    for name, r in result["formats"].items():
        lines.append(f"| {name} | {r['median']:.2e} | {r['worst']:.2e} | {r['bytes_x_bf16']:.3f} |")
    print("\n".join(lines))
    write("kv_cache_minilm", result, "\n".join(lines) + "\n", Path(args.out))


if __name__ == "__main__":
    main()
