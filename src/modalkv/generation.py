"""Timed generation with a press: what the CLI, the demo and the benchmark report."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from modalkv.api import compiled_cache
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.presses import Press


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, raw: bool = False) -> dict[str, torch.Tensor]:
    """Tokenises `text` as one user turn of the model's chat template, or exactly as given when `raw`."""
    if not text.strip():
        raise ValueError("the prompt is empty: give at least one token")
    if raw or tokenizer.chat_template is None:
        return dict(tokenizer(text, add_special_tokens=False, return_tensors="pt"))
    messages = [{"role": "user", "content": text}]
    return dict(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    )


class _StepClock(LogitsProcessor):
    """Records the time at which each forward's logits reach the sampler (the first one ends the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


@dataclass
class GenerationResult:
    text: str
    method: str
    budget: float | int
    prompt_tokens: int
    generated_tokens: int
    cache_bytes: int  # KV bytes held at the end, every layer (sliding-window layers: their window)
    full_cache_bytes: int  # what transformers' own cache would hold for the same tokens (its sliding layers: windows)
    global_cache_bytes: int  # the same over the layers the press compresses (all, unless the model has sliding ones)
    global_full_cache_bytes: int
    allocated_bytes: int  # bytes the storage allocated (kept + documented slack)
    memory_bytes: int  # a press's state beside the tokens (RetentiveKV's memories), not in cache_bytes
    prefill_seconds: float
    decode_ms_per_token: float | None  # median over decoded tokens; None with fewer than 2 new tokens
    compiled: bool = False  # decoded with a torch.compile'd forward

    def to_dict(self) -> dict:
        return asdict(self)


def generate_timed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    press: Press,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    modality: torch.Tensor | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Greedy generation of one prompt with `press`, timing prefill and decode separately. `modality`: the
    prompt's modality map (default: from the model's image/video token ids). `compile`: decode compiled (the
    median step time then excludes the compilation, paid by the first steps, when enough tokens follow)."""
    cache = compiled_cache(press, max_new_tokens) if compile else CompressedCache(press)
    clock = _StepClock()
    start = time.perf_counter()
    output = press.generate(
        model,
        modality=modality,
        compile=compile,
        **inputs,
        **{CACHE_KWARG: cache},
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_tokens = inputs["input_ids"].shape[1]
    new_tokens = output[0, prompt_tokens:]
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    return GenerationResult(
        text=tokenizer.decode(new_tokens, skip_special_tokens=True),
        method=press.name,
        budget=press.budget,
        prompt_tokens=prompt_tokens,
        generated_tokens=len(new_tokens),
        cache_bytes=cache.cache_bytes(),
        full_cache_bytes=cache.full_cache_bytes(),
        global_cache_bytes=cache.cache_bytes(include_sliding=False),
        global_full_cache_bytes=cache.full_cache_bytes(include_sliding=False),
        allocated_bytes=cache.allocated_bytes(),
        memory_bytes=cache.memory_bytes(),
        prefill_seconds=clock.times[0] - start,
        decode_ms_per_token=1000 * statistics.median(steps) if steps else None,
        compiled=compile,
    )
