"""Model loading by name: embedded offline models (converted once to safetensors), the embedded mini-VLMs
(`modalkv.vlm`) and hub/local ones. Pretrained weights are loaded by `modalkv.pretrained`, below this module and
`modalkv.vlm` both.
"""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from modalkv.pretrained import (
    EMBEDDED_MODELS,
    MINI_VLM,
    MINI_VLMS,
    EmbeddedModel,
    ModelNotFoundError,
    cache_dir,
    embedded_model_path,
    load_pretrained,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "MINI_VLM",
    "MINI_VLMS",
    "EmbeddedModel",
    "ModelNotFoundError",
    "cache_dir",
    "embedded_model_path",
    "load_model",
    "parse_dtype",
]

DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name such as "bf16" or "float32" to a torch.dtype.

    Args:
        name: one of float32/fp32, bfloat16/bf16, float16/fp16.

    Returns:
        The matching torch.dtype.
    """
    dtype = _DTYPES.get(_DTYPE_ALIASES.get(name, name))
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}; accepted: {', '.join([*_DTYPES, *_DTYPE_ALIASES])}")
    return dtype


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """`pretrained.load_pretrained` (an embedded model, a local folder or a hub id: the model and its tokenizer or
    processor), plus the embedded vision-language models "mini-vlm" and "mini-vlm-gemma3" (`modalkv.vlm`)."""
    if name_or_path in MINI_VLMS:
        from modalkv.vlm import load_mini_vlm  # imported here: only these models need the vision tower

        return load_mini_vlm(name_or_path, dtype=dtype, attn_implementation=attn_implementation, device=device)
    return load_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation, device=device)
