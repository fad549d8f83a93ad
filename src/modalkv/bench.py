"""Memory and decode-speed benchmark: every number a ratio to the uncompressed cache measured in the same run.

For each context length and batch size the uncompressed baseline and each (method, budget) cell are run in turn,
`repeats` times, interleaved so that a noisy neighbour slows both; the short-context floor (decoding with a 256-token
context at the same batch, where what remains is reading the weights) is measured in the same rounds. A batch is
`batch` distinct prompts decoded together (left-padded when their lengths differ); its throughput is batch x tokens
per second. Peak memory and the largest batch under a memory limit are measured in fresh processes:
`peak_memory.py`.

With `share_prefill`, each (context, batch) is prefilled once and every cell replays that recorded prefill into its
own cache (`generation.record_prefill`, `SharedPrefill`): a cell's decoding steps start from exactly the cache its
own prefill would build, and a long-context grid pays one long forward instead of one per cell and round. Its prefill
time is then the shared forward's plus the cell's own work (its choice of tokens; a prompt state such as KVzip's
reconstruction, made once for every budget and counted in each).

What a GPU pays per decode step is also counted, on any device (`decode_dispatch`, `modalkv.profiling`): aten
operations per layer and step (each at most one kernel launch) and host-device synchronisations per step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, StaticCache

from modalkv.api import compiled_cache
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.generation import SharedPrefill, record_prefill, synchronizer
from modalkv.presses import Press
from modalkv.profiling import DispatchCounter

FLOOR_CONTEXT = 256
COUNT_STEPS = 4  # decode steps counted at dispatch level per method and context, after the timed ones
COMPILE_WARMUP = 6  # untimed first steps of a compiled cell: compilation and recompilations (growth, new views)


class Prompts(NamedTuple):
    """A batch of prompts: token ids [B, S], left-padded when lengths differ, and their mask (None: no padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    @classmethod
    def of(cls, prompts: Prompts | torch.Tensor) -> Prompts:
        """`prompts` as a batch (a tensor is one unpadded batch)."""
        return prompts if isinstance(prompts, Prompts) else cls(prompts)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def context(self) -> int:
        """The longest prompt's length (the padded width)."""
        return self.input_ids.shape[1]


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
    context: int  # the longest prompt of the batch
    prefill_seconds: float
    decode_ms_per_token: float  # median decoding step after `warmup` (one token for every sequence of the batch)
    cache_bytes: int  # KV bytes held after decoding, the whole batch
    full_cache_bytes: int
    memory_bytes: int = 0  # a press's state beside the tokens (RetentiveKV), not in cache_bytes
    allocated_bytes: int = 0  # what the cache's storage allocated (kept + slack + positions); the baseline: cache_bytes
    batch: int = 1
    prompt_tokens: int = 0  # real (unpadded) prompt tokens over the batch
    decoded_tokens: int = 0  # tokens each sequence decoded before the sizes were taken
    bytes_per_sequence_prefill: float = 0.0  # (cache + press state) bytes per sequence right after the prefill
    bytes_per_sequence_decoded: float = 0.0  # the same after `decoded_tokens` steps
    ops_per_layer_step: float | None = None  # aten ops per layer and decode step (None: not counted)
    syncs_per_step: float | None = None  # host syncs per decode step
    top_ops: dict[str, float] | None = None  # op name -> calls per step
    sync_sites: dict[str, float] | None = None  # "kind at file:line in function" -> syncs per step
    shared_prefill: bool = False  # the cache was replayed from a `SharedPrefill` (prefill_seconds: `measure`)


@dataclass
class Decoder:
    """Greedy decoding of a prefilled cache with `model` (or its compiled forward): the argmax of the last logits
    fed back. The token stays on the device: no `.item()`, so feeding it back is no sync. With padded prompts the
    mask grows by one real column per step, as generate() does it."""

    model: Callable
    cache: object
    logits: torch.Tensor  # [B, 1, vocab]: the last position's
    attention_mask: torch.Tensor | None = None

    @classmethod
    def prefill(cls, model: PreTrainedModel, prompts: Prompts, cache) -> Decoder:
        """Prefills `cache` with `prompts` (only the last position's logits, as generate() asks: the full [S, vocab]
        logits would dominate the prefill)."""
        mask = prompts.attention_mask
        extra = {} if mask is None else {"attention_mask": mask}
        logits = model(prompts.input_ids, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1, **extra).logits
        return cls(model, cache, logits, mask)

    def step(self, counter: DispatchCounter | None = None) -> None:
        """One decoding step for every sequence; only the model call is counted."""
        token = self.logits.argmax(-1)
        extra = {}
        if self.attention_mask is not None:
            self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
            extra["attention_mask"] = self.attention_mask
        with counter if counter is not None else contextlib.nullcontext():
            output = self.model(token, **{CACHE_KWARG: self.cache}, use_cache=True, **extra)
        self.logits = output.logits[:, -1:]


def _record(model: PreTrainedModel, prompts: Prompts) -> SharedPrefill:
    inputs = {"input_ids": prompts.input_ids}
    if prompts.attention_mask is not None:
        inputs["attention_mask"] = prompts.attention_mask
    return record_prefill(model, inputs)


def held_bytes(cache) -> tuple[int, int, int, int]:
    """(kept K/V bytes, press state bytes, allocated bytes, uncompressed bytes) of a cache: a CompressedCache's
    own accounting, or what transformers' DynamicCache / StaticCache tensors hold (padding included)."""
    if isinstance(cache, CompressedCache):
        return cache.cache_bytes(), cache.memory_bytes(), cache.allocated_bytes(), cache.full_cache_bytes()
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
    return held, 0, held, held


def make_cache(model: PreTrainedModel, press: Press | None, prompt_tokens: int, new_tokens: int, compile: bool):
    """The cache of one cell: transformers' DynamicCache (press None), its StaticCache for the whole run (press None,
    compiled: transformers' own fast path), or a CompressedCache (compiled: the new tokens reserved per row)."""
    if press is not None:
        return compiled_cache(press, new_tokens) if compile else CompressedCache(press)
    if compile:
        return StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens)
    return DynamicCache(config=model.config)  # sliding-window layers keep only their window, as transformers does


def cell_name(press: Press | None, compile: bool) -> str:
    name = ("static_cache" if compile else "dynamic_cache") if press is None else press.label()
    return f"{name}+compile" if compile and press is not None else name


@torch.no_grad()
def count_decode(decoder: Decoder, layers: int, steps: int, warmup: int = 0) -> DecodeDispatch:
    """`warmup` uncounted then `steps` counted greedy steps of a prefilled decoder (press attached)."""
    for _ in range(warmup):
        decoder.step()
    counter = DispatchCounter()
    for _ in range(steps):
        decoder.step(counter)
    return DecodeDispatch(
        steps=steps,
        layers=layers,
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
    cache = make_cache(model, press, prompt.shape[1], steps + warmup, compile=False)
    layers = model.config.get_text_config().num_hidden_layers
    with contextlib.nullcontext() if press is None else press.attach(model):
        return count_decode(Decoder.prefill(model, Prompts(prompt), cache), layers, steps, warmup)


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    press: Press | None,
    prompts: Prompts | torch.Tensor,
    decode_tokens: int,
    warmup: int = 2,
    count_steps: int = 0,
    compile: bool = False,
    recorded: SharedPrefill | None = None,
):
    """Greedy prefill + `decode_tokens` steps; `press=None` is transformers' own DynamicCache (the baseline).

    `prompts`: a batch (a tensor is one unpadded batch). `count_steps` > 0 then counts aten ops and host syncs over
    that many more steps (`count_decode`), untimed: the timed steps were their warm-up, and the cache sizes are taken
    before them. `compile`: the decoding steps run a torch.compile'd forward (the prefill does not); with
    `press=None` that is transformers' StaticCache + compile. Compilation happens in the first steps: `warmup` must
    cover them (the median is taken after it). `recorded`: these prompts' prefill (`generation.record_prefill`),
    replayed instead of run; the prefill time is then the recorded forward's plus this cell's replay.
    """
    prompts = Prompts.of(prompts)
    cache = make_cache(model, press, prompts.context, decode_tokens + count_steps + 1, compile)
    forward = model
    if compile:
        torch._dynamo.reset()  # each cell compiles afresh: earlier cells' graphs would count against dynamo's limit
        forward = torch.compile(model, mode="reduce-overhead" if prompts.input_ids.is_cuda else "default")
    synchronize = synchronizer(prompts.input_ids.device)
    batch = prompts.batch
    with contextlib.nullcontext() if press is None else press.attach(model):
        synchronize()
        start = time.perf_counter()
        if recorded is None:
            decoder = Decoder.prefill(model, prompts, cache)
            synchronize()
            prefill = time.perf_counter() - start
        else:
            if press is None:
                recorded.fill(cache)
                synchronize()
                own = time.perf_counter() - start
            else:  # the press's own work, a prompt state made once for every budget included (`SharedPrefill.replay`)
                own = recorded.replay(model, press, cache)[1]
            decoder = Decoder(model, cache, recorded.first_logits[:, None], prompts.attention_mask)
            prefill = recorded.seconds + own
        after_prefill = held_bytes(cache)
        decoder.model = forward
        steps = []
        for _ in range(decode_tokens):
            start = time.perf_counter()
            decoder.step()
            synchronize()
            steps.append(time.perf_counter() - start)
        held, memory, allocated, full_bytes = held_bytes(cache)
        layers = model.config.get_text_config().num_hidden_layers
        dispatch = count_decode(decoder, layers, count_steps) if count_steps and not compile else None
    mask = prompts.attention_mask
    return Run(
        method=cell_name(press, compile),
        budget=1.0 if press is None else press.budget,
        context=prompts.context,
        prefill_seconds=prefill,
        decode_ms_per_token=1000 * statistics.median(steps[warmup:] or steps),
        cache_bytes=held,
        full_cache_bytes=full_bytes,
        memory_bytes=memory,
        allocated_bytes=allocated,
        batch=batch,
        prompt_tokens=int(mask.sum()) if mask is not None else batch * prompts.context,
        decoded_tokens=decode_tokens,
        bytes_per_sequence_prefill=(after_prefill[0] + after_prefill[1]) / batch,
        bytes_per_sequence_decoded=(held + memory) / batch,
        ops_per_layer_step=dispatch and dispatch.ops_per_layer_step,
        syncs_per_step=dispatch and dispatch.syncs_per_step,
        top_ops=dispatch and dispatch.top_ops,
        sync_sites=dispatch and dispatch.sync_sites,
        shared_prefill=recorded is not None,
    )


def run_grid(
    model: PreTrainedModel,
    prompts_of: Callable[[int, int], Prompts | torch.Tensor],
    presses: list[Press],
    contexts: list[int],
    decode_tokens: int,
    repeats: int = 1,
    on_run: Callable[[Run], None] | None = None,
    count_steps: int = COUNT_STEPS,
    compile: bool = False,
    batches: tuple[int, ...] | list[int] = (1,),
    share_prefill: bool = False,
) -> list[dict]:
    """Runs every press at every context and batch size against the baseline and the floor, interleaved; returns
    summary rows. `prompts_of(context, batch)` gives the prompts (distinct texts: a batch of copies would let a
    method's choices coincide across rows).

    The first round of each (context, batch) also counts aten ops and host syncs over `count_steps` untimed decode
    steps after the timed ones (0: not counted) for the baseline and every press: `ops_per_layer_step`,
    `syncs_per_step` (and the baseline's as `baseline_ops_per_layer_step`, `baseline_syncs_per_step`).

    Rows carry `tokens_per_second` (batch x decoding steps per second) and `throughput_speedup`, tokens/s over
    DynamicCache's at the same batch and context (at one batch that equals `decode_speedup`; across batches the
    tokens/s are what compare).

    `compile`: every press also runs compiled (its row's method ends in "+compile"), and transformers' StaticCache +
    compile joins as a peer row; the ratios stay to the eager DynamicCache. Compiling takes the first decoding steps
    of each cell (not timed: the warm-up is widened to cover them).

    `share_prefill`: each (context, batch)'s prompts, and the floor's, are prefilled once and replayed into every
    cell's cache (`generation.record_prefill`).
    """
    rows = []
    for context in contexts:
        for batch in batches:
            prompts, floor_prompts = (Prompts.of(prompts_of(n, batch)) for n in (context, FLOOR_CONTEXT))
            record = _record if share_prefill else lambda model, prompts: None
            main, floor = (prompts, record(model, prompts)), (floor_prompts, record(model, floor_prompts))
            runs: dict[str, list[Run]] = {}
            for round_ in range(repeats):
                cells = [("baseline", None, main, False), ("floor", None, floor, False)]
                cells += [(press.label() + f"@{press.budget}", press, main, False) for press in presses]
                if compile:
                    cells += [("static_cache+compile", None, main, True)]
                    cells += [(press.label() + f"+compile@{press.budget}", press, main, True) for press in presses]
                for key, press, (tokens, recorded), compiled in cells:
                    count = count_steps if round_ == 0 and key != "floor" else 0
                    warmup = COMPILE_WARMUP if compiled else 2
                    run = measure(model, press, tokens, decode_tokens + warmup - 2, warmup, count, compiled, recorded)
                    runs.setdefault(key, []).append(run)
                    if on_run is not None:
                        on_run(run)
            del main, floor  # a recorded prefill holds every layer's queries: freed before the next context's
            rows += summarise(runs)
    return rows


def summarise(runs: dict[str, list[Run]]) -> list[dict]:
    """Rows of one (context, batch): each cell's medians over rounds, with its ratios to the same run's baseline
    ("baseline") and floor ("floor")."""
    baseline = runs.pop("baseline")
    baseline_ms = statistics.median(r.decode_ms_per_token for r in baseline)
    floor_ms = statistics.median(r.decode_ms_per_token for r in runs.pop("floor"))
    rows = []
    for cell in runs.values():
        ms = statistics.median(r.decode_ms_per_token for r in cell)
        batch = cell[0].batch
        rows.append(
            asdict(cell[0])
            | {
                "decode_ms_per_token": ms,
                "prefill_seconds": statistics.median(r.prefill_seconds for r in cell),
                "baseline_ms_per_token": baseline_ms,
                "baseline_ops_per_layer_step": baseline[0].ops_per_layer_step,
                "baseline_syncs_per_step": baseline[0].syncs_per_step,
                "baseline_bytes_per_sequence_prefill": baseline[0].bytes_per_sequence_prefill,
                "baseline_bytes_per_sequence_decoded": baseline[0].bytes_per_sequence_decoded,
                "floor_ms_per_token": floor_ms,
                "decode_speedup": baseline_ms / ms,
                "tokens_per_second": 1000 * batch / ms,
                "baseline_tokens_per_second": 1000 * batch / baseline_ms,
                "throughput_speedup": baseline_ms / ms,
                "vs_floor": ms / floor_ms,
                "cache_ratio": cell[0].cache_bytes / cell[0].full_cache_bytes,
                "repeats": len(cell),
            }
        )
    return rows
