"""Memory and decode-speed benchmark: every number a ratio to the uncompressed cache measured in the same run.

For each context length the uncompressed baseline and each (method, budget) cell are run in turn, `repeats`
times, interleaved so that a noisy neighbour slows both; the short-context floor (decoding with a 256-token
context, where what remains is reading the weights) is measured in the same rounds. Peak memory needs one process
per cell (the allocator keeps what earlier runs freed): see `prefill_memory.py`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from modalkv.cache import CompressedCache
from modalkv.presses import Press

FLOOR_CONTEXT = 256


@dataclass
class Run:
    """One prefill + decode measurement."""

    method: str
    budget: float | int
    context: int
    prefill_seconds: float
    decode_ms_per_token: float  # median over decoded tokens after `warmup`
    cache_bytes: int  # KV bytes held after decoding
    full_cache_bytes: int
    memory_bytes: int = 0  # a press's state beside the tokens (RetentiveKV), not in cache_bytes


@torch.no_grad()
def measure(model: PreTrainedModel, press: Press | None, prompt: torch.Tensor, decode_tokens: int, warmup: int = 2):
    """Greedy prefill + `decode_tokens` steps; `press=None` is transformers' own DynamicCache (the baseline)."""
    cache = DynamicCache() if press is None else CompressedCache(press)
    # GPU kernels run asynchronously: wait for them, or the clock measures only their launch.
    synchronize = torch.cuda.synchronize if prompt.is_cuda else lambda: None
    with contextlib.nullcontext() if press is None else press.attach(model):
        synchronize()
        start = time.perf_counter()
        # Only the last position's logits, as generate() asks: the full [S, vocab] logits would dominate prefill.
        logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        synchronize()
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(decode_tokens):
            start = time.perf_counter()
            logits = model(logits.argmax(-1), past_key_values=cache, use_cache=True).logits[:, -1:]
            synchronize()
            steps.append(time.perf_counter() - start)
    if press is None:
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        full_bytes = held
    else:
        held, full_bytes = cache.cache_bytes(), cache.full_cache_bytes()
    return Run(
        method="dynamic_cache" if press is None else press.label(),
        budget=1.0 if press is None else press.budget,
        context=prompt.shape[1],
        prefill_seconds=prefill,
        decode_ms_per_token=1000 * statistics.median(steps[warmup:] or steps),
        cache_bytes=held,
        full_cache_bytes=full_bytes,
        memory_bytes=0 if press is None else cache.memory_bytes(),
    )


def run_grid(
    model: PreTrainedModel,
    prompt_of_length: Callable[[int], torch.Tensor],
    presses: list[Press],
    contexts: list[int],
    decode_tokens: int,
    repeats: int = 1,
    on_run: Callable[[Run], None] | None = None,
) -> list[dict]:
    """Runs every press at every context against the baseline and the floor, interleaved; returns summary rows."""
    rows = []
    for context in contexts:
        prompt, floor_prompt = prompt_of_length(context), prompt_of_length(FLOOR_CONTEXT)
        runs: dict[str, list[Run]] = {}
        for _ in range(repeats):
            for key, press, tokens in [("baseline", None, prompt), ("floor", None, floor_prompt)] + [
                (press.label() + f"@{press.budget}", press, prompt) for press in presses
            ]:
                run = measure(model, press, tokens, decode_tokens)
                runs.setdefault(key, []).append(run)
                if on_run is not None:
                    on_run(run)
        baseline = runs.pop("baseline")
        baseline_ms = statistics.median(r.decode_ms_per_token for r in baseline)
        floor_ms = statistics.median(r.decode_ms_per_token for r in runs.pop("floor"))
        for cell in runs.values():
            ms = statistics.median(r.decode_ms_per_token for r in cell)
            row = asdict(cell[0]) | {
                "decode_ms_per_token": ms,
                "prefill_seconds": statistics.median(r.prefill_seconds for r in cell),
                "baseline_ms_per_token": baseline_ms,
                "floor_ms_per_token": floor_ms,
                "decode_speedup": baseline_ms / ms,
                "vs_floor": ms / floor_ms,
                "cache_ratio": cell[0].cache_bytes / cell[0].full_cache_bytes,
                "repeats": len(cell),
            }
            rows.append(row)
    return rows
