"""Model integration: route a model's attention through modalkv, generate with a compressed cache, and refuse the
models and prompts the engine cannot serve. `Press.attach` and `Press.generate` are thin entry points to this module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import CompileConfig, PreTrainedModel

from modalkv.attention import ATTENTION_NAME, register
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.modality import modality_from_input_ids
from modalkv.policy import Policy, attention_windows
from modalkv.storage import GROWTH_MIN


@contextmanager
def attach(press: Policy, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    """Routes `model`'s attention through modalkv for the duration of the block (restored afterwards).

    Only a `CompressedCache` is compressed; any other cache (or none) gets plain sdpa attention.
    """
    check_model(model)
    register()
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    # Only the language model's attention: a VLM's vision tower keeps its own (it has no cache to compress).
    key = next((k for k in model.config.sub_configs if getattr(model.config, k) is text_config), None)
    model.set_attn_implementation({key: ATTENTION_NAME} if key else ATTENTION_NAME)
    try:
        if text_config._attn_implementation != ATTENTION_NAME:
            raise ValueError(
                f"{type(model).__name__} does not route its attention through transformers' "
                "AttentionInterface, so modalkv cannot compress its cache"
            )
        yield model
    finally:
        model.set_attn_implementation({key: previous} if key else previous)


def generate(
    press: Policy,
    model: PreTrainedModel,
    modality: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    compile: bool = False,
    **kwargs,
) -> torch.Tensor:
    """`model.generate(**kwargs)` with a compressed cache; see `Press.generate`."""
    if "past_key_values" in kwargs and CACHE_KWARG != "past_key_values":  # the name transformers < 5.24 knew
        kwargs[CACHE_KWARG] = kwargs.pop("past_key_values")
    if CACHE_KWARG not in kwargs:
        kwargs[CACHE_KWARG] = compiled_cache(press, kwargs.get("max_new_tokens")) if compile else CompressedCache(press)
    cache = kwargs[CACHE_KWARG]
    if not isinstance(cache, CompressedCache):
        raise ValueError(f"{CACHE_KWARG} must be a CompressedCache, got {type(cache).__name__}")
    if compile:
        if not cache.is_compileable:
            raise ValueError("compile=True needs a cache made with CompressedCache(press, compileable=True)")
        kwargs.setdefault("compile_config", decode_compile_config(model.device))
    if modality is None and "input_ids" in kwargs:
        modality = modality_from_input_ids(model.config, kwargs["input_ids"])
    if modality is not None and cache.modality is None:
        cache.modality = modality
    elif modality is not None and not torch.equal(modality, cache.modality):
        raise ValueError("two different modality maps: one given to generate(), another held by the cache")
    if patches is not None:
        cache.patches = patches
    # generate() repeats each prompt row before the prefill for beams or several returned sequences: so do the maps.
    config = kwargs.get("generation_config", model.generation_config)
    beams = kwargs.get("num_beams", config.num_beams) or 1
    copies = beams if beams > 1 else kwargs.get("num_return_sequences", config.num_return_sequences) or 1
    if copies > 1 and cache.modality is not None:
        cache.batch_repeat_interleave(copies)  # nothing is stored yet: only the maps are repeated
    prompt = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if prompt is not None:
        check_prompt_length(model, prompt.shape[1], kwargs.get("max_new_tokens", 0))
    with attach(press, model):
        return model.generate(**kwargs)


def compiled_cache(press: Policy, max_new_tokens: int | None) -> CompressedCache:
    """A cache whose decoding steps transformers may compile: the whole generation's tokens reserved per row, so
    that rows never grow (a growth changes shapes: one more compilation)."""
    return CompressedCache(press, reserve=max(max_new_tokens or 0, GROWTH_MIN), compileable=True)


def decode_compile_config(device: torch.device) -> CompileConfig:
    """How generate() compiles the decoding steps: CUDA graphs on a GPU ("reduce-overhead", transformers' default);
    elsewhere plain inductor, which transformers only does when told to compile on every device."""
    if device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(mode="default")
    config._compile_all_devices = True  # transformers' switch for compiling on CPU (off by default: often slower)
    return config


def check_model(model: PreTrainedModel) -> None:
    """Raises ValueError for models the engine cannot serve correctly: layers other than full attention and sliding
    windows (read as transformers' DynamicCache reads them)."""
    try:
        attention_windows(model.config.get_text_config(decoder=True))
    except ValueError as error:
        raise ValueError(f"{type(model).__name__}: {error}") from None


def check_prompt_length(model: PreTrainedModel, num_tokens: int, max_new_tokens: int = 0) -> None:
    """Raises ValueError for an empty prompt or one that cannot fit the model's positions with the new tokens."""
    if num_tokens == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and num_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {num_tokens} tokens and {max_new_tokens} new tokens were asked for, but the model "
            f"handles at most {limit} positions"
        )
