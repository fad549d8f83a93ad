"""Memory and decode-speed benchmark: every number a ratio to the uncompressed cache measured in the same run.

For each context length the uncompressed baseline and each (method, budget) cell are run in turn, `repeats`
times, interleaved so that a noisy neighbour slows both; the short-context floor (decoding with a 256-token
context, where what remains is reading the weights) is measured in the same rounds. Peak memory needs one process
per cell (the allocator keeps what earlier runs freed): see `prefill_memory.py`.

What a GPU pays per decode step is also counted, on any device (`decode_dispatch`, `modalkv.profiling`): aten
operations per layer and step (each at most one kernel launch) and host-device synchronisations per step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from modalkv.api import compiled_cache
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.presses import Press
from modalkv.profiling import DispatchCounter

FLOOR_CONTEXT = 256
COUNT_STEPS = 4  # decode steps counted at dispatch level per method and context, after the timed ones
COMPILE_WARMUP = 6  # untimed first steps of a compiled cell: compilation and recompilations (growth, new views)


@dataclass
class DecodeDispatch:
    """Aten ops and host syncs of whole-model greedy decode steps (see `modalkv.profiling`)."""

    steps: int
    layers: int  # num_hidden_layers of the text config
    ops: int  # over all `steps`
    syncs: int
    top_ops: dict[str, float]  # op name -> calls per step, the most frequent first
    sync_sites: dict[str, float]  # "kind at file:line in function" -> per step
    report: str  # DispatchCounter.report() per step, with the top ops and where each sync comes from

    @property
    def ops_per_layer_step(self) -> float:
        return self.ops / self.steps / self.layers

    @property
    def syncs_per_step(self) -> float:
        return self.syncs / self.steps


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
    allocated_bytes: int = 0  # what the cache's storage allocated (kept + slack + positions); the baseline: cache_bytes
    ops_per_layer_step: float | None = None  # aten ops per layer and decode step (None: not counted)
    syncs_per_step: float | None = None  # host syncs per decode step
    top_ops: dict[str, float] | None = None  # op name -> calls per step
    sync_sites: dict[str, float] | None = None  # "kind at file:line in function" -> syncs per step


def prefill_logits(model: PreTrainedModel, prompt: torch.Tensor, cache) -> torch.Tensor:
    """Prefills `cache` with `prompt`; returns the last position's logits [batch, 1, vocab]."""
    # Only the last position's logits, as generate() asks: the full [S, vocab] logits would dominate prefill.
    return model(prompt, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1).logits


def greedy_step(model: Callable, logits: torch.Tensor, cache, counter: DispatchCounter | None = None):
    """One greedy step of `model` (or its compiled forward): the argmax of `logits` fed back; returns the new last
    logits. Only the model is counted. The token stays on the device: no `.item()`, so feeding it back is no sync.
    """
    token = logits.argmax(-1)
    with counter if counter is not None else contextlib.nullcontext():
        output = model(token, **{CACHE_KWARG: cache}, use_cache=True)
    return output.logits[:, -1:]


def make_cache(model: PreTrainedModel, press: Press | None, prompt_tokens: int, new_tokens: int, compile: bool):
    """The cache of one cell: transformers' DynamicCache (press None), its StaticCache for the whole run (press None,
    compiled: transformers' own fast path), or a CompressedCache (compiled: the new tokens reserved per row)."""
    if press is not None:
        return compiled_cache(press, new_tokens) if compile else CompressedCache(press)
    if compile:
        return StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
    return DynamicCache()


def cell_name(press: Press | None, compile: bool) -> str:
    name = ("static_cache" if compile else "dynamic_cache") if press is None else press.label()
    return f"{name}+compile" if compile and press is not None else name


@torch.no_grad()
def count_decode(model: PreTrainedModel, cache, logits: torch.Tensor, steps: int, warmup: int = 0) -> DecodeDispatch:
    """`warmup` uncounted then `steps` counted greedy steps on an already prefilled `cache` (press attached)."""
    for _ in range(warmup):
        logits = greedy_step(model, logits, cache)
    counter = DispatchCounter()
    for _ in range(steps):
        logits = greedy_step(model, logits, cache, counter)
    return DecodeDispatch(
        steps=steps,
        layers=model.config.get_text_config().num_hidden_layers,
        ops=counter.total_ops,
        syncs=counter.total_syncs,
        top_ops={name: count / steps for name, count in counter.top_ops(10)},
        sync_sites={f"{kind} at {site}": n / steps for (kind, site), n in counter.sync_sites.most_common()},
        report=counter.report(top=10, per=steps),
    )


@torch.no_grad()
def decode_dispatch(
    model: PreTrainedModel, press: Press | None, prompt: torch.Tensor, steps: int = COUNT_STEPS, warmup: int = 2
) -> DecodeDispatch:
    """Prefills `prompt`, decodes `warmup` steps, then counts aten ops and host syncs over `steps` decode steps.

    `press=None` is transformers' DynamicCache; else a `CompressedCache(press)` with the press attached (a cache
    alone is not enough: the press routes the model's attention). `.ops_per_layer_step` and `.syncs_per_step` are
    the headline figures; `.report` says which ops dominate and where the syncs come from.
    """
    cache = DynamicCache() if press is None else CompressedCache(press)
    with contextlib.nullcontext() if press is None else press.attach(model):
        return count_decode(model, cache, prefill_logits(model, prompt, cache), steps, warmup)


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    press: Press | None,
    prompt: torch.Tensor,
    decode_tokens: int,
    warmup: int = 2,
    count_steps: int = 0,
    compile: bool = False,
):
    """Greedy prefill + `decode_tokens` steps; `press=None` is transformers' own DynamicCache (the baseline).

    `count_steps` > 0 then counts aten ops and host syncs over that many more steps (`count_decode`), untimed: the
    timed steps were their warm-up, and the cache sizes are taken before them. `compile`: the decoding steps run
    a torch.compile'd forward (the prefill does not); with `press=None` that is transformers' StaticCache + compile.
    Compilation happens in the first steps: `warmup` must cover them (the median is taken after it).
    """
    cache = make_cache(model, press, prompt.shape[1], decode_tokens + count_steps + 1, compile)
    forward = model
    if compile:
        torch._dynamo.reset()  # each cell compiles afresh: earlier cells' graphs would count against dynamo's limit
        forward = torch.compile(model, mode="reduce-overhead" if prompt.is_cuda else "default")
    # GPU kernels run asynchronously: wait for them, or the clock measures only their launch.
    synchronize = torch.cuda.synchronize if prompt.is_cuda else lambda: None
    with contextlib.nullcontext() if press is None else press.attach(model):
        synchronize()
        start = time.perf_counter()
        logits = prefill_logits(model, prompt, cache)
        synchronize()
        prefill = time.perf_counter() - start
        steps = []
        for _ in range(decode_tokens):
            start = time.perf_counter()
            logits = greedy_step(forward, logits, cache)
            synchronize()
            steps.append(time.perf_counter() - start)
        if press is None:
            held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)  # static: what it holds
            full_bytes, memory, allocated = held, 0, held
        else:
            held, full_bytes, memory = cache.cache_bytes(), cache.full_cache_bytes(), cache.memory_bytes()
            allocated = cache.allocated_bytes()
        dispatch = count_decode(model, cache, logits, count_steps) if count_steps and not compile else None
    return Run(
        method=cell_name(press, compile),
        budget=1.0 if press is None else press.budget,
        context=prompt.shape[1],
        prefill_seconds=prefill,
        decode_ms_per_token=1000 * statistics.median(steps[warmup:] or steps),
        cache_bytes=held,
        full_cache_bytes=full_bytes,
        memory_bytes=memory,
        allocated_bytes=allocated,
        ops_per_layer_step=dispatch and dispatch.ops_per_layer_step,
        syncs_per_step=dispatch and dispatch.syncs_per_step,
        top_ops=dispatch and dispatch.top_ops,
        sync_sites=dispatch and dispatch.sync_sites,
    )


def run_grid(
    model: PreTrainedModel,
    prompt_of_length: Callable[[int], torch.Tensor],
    presses: list[Press],
    contexts: list[int],
    decode_tokens: int,
    repeats: int = 1,
    on_run: Callable[[Run], None] | None = None,
    count_steps: int = COUNT_STEPS,
    compile: bool = False,
) -> list[dict]:
    """Runs every press at every context against the baseline and the floor, interleaved; returns summary rows.

    The first round of each context also counts aten ops and host syncs over `count_steps` untimed decode steps
    after the timed ones (0: not counted) for the baseline and every press: `ops_per_layer_step`, `syncs_per_step`
    (and the baseline's as `baseline_ops_per_layer_step`, `baseline_syncs_per_step`).

    `compile`: every press also runs compiled (its row's method ends in "+compile"), and transformers' StaticCache +
    compile joins as a peer row; the ratios stay to the eager DynamicCache. Compiling takes the first decoding steps
    of each cell (not timed: the warm-up is widened to cover them).
    """
    rows = []
    for context in contexts:
        prompt, floor_prompt = prompt_of_length(context), prompt_of_length(FLOOR_CONTEXT)
        runs: dict[str, list[Run]] = {}
        for round_ in range(repeats):
            cells = [("baseline", None, prompt, False), ("floor", None, floor_prompt, False)]
            cells += [(press.label() + f"@{press.budget}", press, prompt, False) for press in presses]
            if compile:
                cells += [("static_cache+compile", None, prompt, True)]
                cells += [(press.label() + f"+compile@{press.budget}", press, prompt, True) for press in presses]
            for key, press, tokens, compiled in cells:
                count = count_steps if round_ == 0 and key != "floor" else 0
                warmup = COMPILE_WARMUP if compiled else 2
                run = measure(model, press, tokens, decode_tokens + warmup - 2, warmup, count, compiled)
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
                "baseline_ops_per_layer_step": baseline[0].ops_per_layer_step,
                "baseline_syncs_per_step": baseline[0].syncs_per_step,
                "floor_ms_per_token": floor_ms,
                "decode_speedup": baseline_ms / ms,
                "vs_floor": ms / floor_ms,
                "cache_ratio": cell[0].cache_bytes / cell[0].full_cache_bytes,
                "repeats": len(cell),
            }
            rows.append(row)
    return rows
