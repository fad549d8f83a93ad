"""Timed generation with a press: what the CLI, the demo and the benchmark report."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from transformers import (
    Cache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from modalkv.api import compiled_cache
from modalkv.cache import CompressedCache, SequenceBytes
from modalkv.compat import CACHE_KWARG
from modalkv.policy import PrefillInputs
from modalkv.presses import FullPress, Press


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
class SharedPrefill:
    """A prompt's (or a left-padded batch of prompts') prefill, run once through the model and replayed for each
    press (`generate_timed(shared=)`, `generate_shared`): every layer's prefill inputs (`CompressedCache.replay_prefill`
    says why that is exact) and the prompts' last logits, from which every press's first new token comes. A grid of
    many presses on one prompt then pays one forward over the prompt instead of one per press."""

    layers: list[PrefillInputs]
    first_logits: torch.Tensor  # [B, vocab]
    row_seconds: list[float]  # per row: the model's forward over that prompt alone
    is_real: torch.Tensor  # [B, S] the prompts' tokens, not padding (a sliding layer's inputs mark only its window)
    input_ids: torch.Tensor | None = None  # [B, S] the prompts' token ids (None: they came as embeddings)
    # press label -> (its `Press.prompt_state`, the seconds it took): made by the first budget that needs it
    prompt_states: dict[str, tuple[dict, float]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The model's forward over the prompt (a batch: over each of its prompts, summed)."""
        return sum(self.row_seconds)

    def replay(
        self, model: PreTrainedModel, press: Press, cache: CompressedCache | None = None
    ) -> tuple[CompressedCache, float]:
        """`cache` (empty; default: a new `CompressedCache(press)`) filled with what `press` keeps of this prefill
        (call it where the press is attached or `using` the model), and the seconds of the press's own work: its
        prompt state (`Press.prompt_state`, e.g. KVzip's reconstruction: made once per press setting, its seconds
        counted for every budget that uses it) and its choice of tokens."""
        synchronize = synchronizer(self.is_real.device)
        synchronize()
        start = time.perf_counter()
        cache = CompressedCache(press) if cache is None else cache
        made_before = 0.0
        if press.label() in self.prompt_states:
            state, made_before = self.prompt_states[press.label()]
        else:
            state = press.prompt_state(model, self.input_ids, self.is_real, self.layers[0].modality)
            if state:  # empty where the budget keeps every token: another budget may need it
                self.prompt_states[press.label()] = (state, time.perf_counter() - start)
        cache.press_state.update(state)
        cache.replay_prefill(self.layers)
        synchronize()
        return cache, time.perf_counter() - start + made_before

    def fill(self, cache: Cache) -> None:
        """Fills transformers' own empty cache (DynamicCache, StaticCache) with every layer's keys and values, as its
        prefill would (its sliding layers keep their window): the uncompressed baseline of a replayed grid."""
        for inputs in self.layers:
            cache.update(inputs.keys, inputs.values, inputs.layer_idx)

    def row(self, index: int) -> SharedPrefill:
        """The `index`-th prompt's own recorded prefill, its padding cut off: exactly what `share_prefill` records
        for that prompt alone (a batch, of token ids only, records each prompt alone, then pads), so a press that
        cannot decode rows together runs on its batch's prefill instead of a forward of its own."""
        padding = int((~self.is_real[index]).sum())

        def cut(tensor: torch.Tensor) -> torch.Tensor:  # contiguous, as the prompt's own recording is
            return tensor[index : index + 1, :, padding:].contiguous()

        layers = [
            replace(
                layer,
                queries=cut(layer.queries),
                keys=cut(layer.keys),
                values=cut(layer.values),
                is_real=layer.is_real[index : index + 1, padding:].contiguous(),
                derived={},
            )
            for layer in self.layers
        ]
        is_real = self.is_real[index : index + 1, padding:].contiguous()
        ids = None if self.input_ids is None else self.input_ids[index : index + 1, padding:].contiguous()
        return SharedPrefill(layers, self.first_logits[index : index + 1], [self.row_seconds[index]], is_real, ids)


# Settings of a generation config that change which token greedy decoding picks from the logits. With none of them
# set, the first new token is the argmax of the prompt's last logits (end-of-sequence masked while min_new_tokens asks
# for more), which is what a shared prefill assumes.
_LOGITS_SETTINGS = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
}


def share_prefill(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    modality: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
) -> SharedPrefill | None:
    """The prefill of a prompt (`inputs`: the model's keyword inputs; `modality`, `patches`: its maps) or of a
    left-padded batch of token-id prompts, recorded for replay; None where replaying could differ from running each
    press's own prefill in generate(): a generation config whose logits processors change greedy's first pick, or a
    batch of other inputs than token ids.

    A batch is prefilled one prompt at a time, without its padding, and recorded left-padded (zeros, `is_real`
    False): each row is then exactly its prompt's own prefill at generate()'s positions (from 0 after its padding),
    and no [B, H, S, S] attention is ever formed (on a CPU a batched prefill is no faster: it is compute-bound)."""
    if any(getattr(model.generation_config, name, None) not in neutral for name, neutral in _LOGITS_SETTINGS.items()):
        return None
    ids = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if ids.shape[0] > 1:
        if set(inputs) - {"input_ids", "attention_mask"} or modality is not None or patches is not None:
            return None
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        layers, logits, seconds = [], [], []
        for index, (row, real) in enumerate(zip(ids, mask, strict=True)):
            prompt = row[real][None]
            recorded = record_prefill(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
            if not layers:
                layers = [_empty_batch(layer, len(ids), ids.shape[1]) for layer in recorded.layers]
            for batch, layer in zip(layers, recorded.layers, strict=True):
                _place(batch, index, layer)
            logits.append(recorded.first_logits)
            seconds.append(recorded.seconds)
            del recorded  # freed before the next prompt is recorded
        return SharedPrefill(layers, torch.cat(logits), seconds, mask, ids)
    return record_prefill(model, inputs, modality, patches)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued kernels (CUDA runs them asynchronously: a clock would measure their launch)."""
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def record_prefill(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    modality: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
) -> SharedPrefill:
    """One forward of `model` over `inputs` as given (a padded batch: in one forward, at the positions the model
    derives itself, as the benchmark's own prefill runs it), recorded for replay. `share_prefill` says when a replay
    equals generate()'s own prefill."""
    recorder = FullPress()
    cache = CompressedCache(recorder, modality=modality, patches=patches, record_prefill=True)
    # generate() computes the prefill's logits for the last token only where the model can: so do we (same rounding)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    synchronize = synchronizer(model.device)
    with recorder.attach(model), torch.no_grad():
        synchronize()
        start = time.perf_counter()
        logits = model(**inputs, **{CACHE_KWARG: cache}, **last_only).logits[:, -1]
        synchronize()
        seconds = time.perf_counter() - start
    shape = cache.recorded_prefill[0].is_real.shape  # [B, S]
    mask = inputs.get("attention_mask", torch.ones(shape, dtype=torch.bool, device=logits.device))
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"the attention mask is {tuple(mask.shape)} but the prompt's prefill has {tuple(shape)} tokens"
        )
    return SharedPrefill(cache.recorded_prefill, logits, [seconds], mask.bool(), inputs.get("input_ids"))


@torch.no_grad()
def prefill_cache(
    model: PreTrainedModel,
    press: Press,
    inputs: dict[str, torch.Tensor],
    modality: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    shared: SharedPrefill | None = None,
) -> tuple[CompressedCache, torch.Tensor, float, bool]:
    """A prompt prefilled into a new cache of `press` (attached to `model` by the caller): replayed from `shared`
    when given (`SharedPrefill.replay`), else the model's own prefill on `inputs` (its keyword inputs, without the
    maps).

    Returns:
        (the cache, the last position's logits [B, vocab], the prefill's seconds (a replay counts the recorded
        forward's), whether it was replayed).
    """
    if shared is not None:
        cache, seconds = shared.replay(model, press)
        return cache, shared.first_logits, shared.seconds + seconds, True
    start = time.perf_counter()
    cache = CompressedCache(press, modality=modality, patches=patches)
    logits = model(**inputs, **{CACHE_KWARG: cache}, logits_to_keep=1).logits[:, -1]
    return cache, logits, time.perf_counter() - start, False


def _empty_batch(layer: PrefillInputs, batch: int, width: int) -> PrefillInputs:
    """One layer's prefill inputs for a left-padded batch `width` columns wide, all padding (zeros, `is_real` False),
    shaped like `layer`'s (one prompt's): the prompts are placed in it one by one as they are recorded, so a batch
    never holds more than itself and one prompt's recording."""

    def zeros(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.new_zeros((batch, tensor.shape[1], width, tensor.shape[3]))

    return replace(
        layer,
        queries=zeros(layer.queries),
        keys=zeros(layer.keys),
        values=zeros(layer.values),
        is_real=layer.is_real.new_zeros((batch, width)),
        derived={},
    )


def _place(batch: PrefillInputs, index: int, layer: PrefillInputs) -> None:
    """Copies one prompt's recorded layer into row `index` of `batch`, after its left padding."""
    start = batch.is_real.shape[1] - layer.is_real.shape[1]
    for name in ("queries", "keys", "values"):
        getattr(batch, name)[index, :, start:] = getattr(layer, name)[0]
    batch.is_real[index, start:] = layer.is_real[0]


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
    allocated_bytes: int  # bytes the storage allocated (kept + documented slack); a batch: this prompt's share
    memory_bytes: int  # a press's state beside the tokens (RetentiveKV's memories), not in cache_bytes
    prefill_seconds: float
    decode_ms_per_token: float | None  # median over decoded tokens; None with fewer than 2 new tokens
    compiled: bool = False  # decoded with a torch.compile'd forward
    shared_prefill: bool = False  # the model's prefill forward was shared with other presses (`SharedPrefill`)
    batch: int = 1  # prompts decoded together (`generate_shared`): timings are the batch's, bytes this prompt's

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
    shared: SharedPrefill | None = None,
) -> GenerationResult:
    """Greedy generation of one prompt with `press`, timing prefill and decode separately. `modality`: the
    prompt's modality map (default: from the model's image/video token ids). `compile`: decode compiled (the
    median step time then excludes the compilation, paid by the first steps, when enough tokens follow).
    `shared`: this prompt's recorded prefill (`share_prefill`), replayed instead of running the model's prefill again
    (`SharedPrefill.replay`); the prefill time is then the shared forward's plus the press's own work on it."""
    continues = set(inputs) <= {"input_ids", "attention_mask"}  # generate() goes on from token ids
    if shared is not None and not compile and continues:
        (result,) = generate_shared(model, tokenizer, press, inputs, max_new_tokens, min_new_tokens, shared)
        return result
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
    return _result(tokenizer, press, cache, prompt_tokens, new_tokens, clock.times[0] - start, steps, compiled=compile)


def generate_shared(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    press: Press,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    min_new_tokens: int,
    shared: SharedPrefill,
) -> list[GenerationResult]:
    """Greedy generation of a prompt, or of a left-padded batch of prompts decoded together, on their shared prefill:
    the press compresses the recorded layers, each row's first new token is greedy's pick from the recorded logits,
    and generate() continues from them on the compressed cache. One result per row, each what that prompt decoded
    alone reports: its text up to its end of sequence, its cache sizes when it stopped (`SequenceMeter`). A batch's
    timings are the batch's: one prefill, and decoding steps that advance every row.

    Rows are independent only for presses whose choices for a row do not depend on the others (`batch_invariant`).
    """
    with press.using(model), torch.no_grad():
        cache, compress_seconds = shared.replay(model, press)
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    logits = shared.first_logits.clone()
    if min_new_tokens > 0 and eos:
        logits[:, eos] = float("-inf")
    first = logits.argmax(-1, keepdim=True)  # [B, 1]
    meter = SequenceMeter(cache, (mask == 0).sum(-1), eos, max_new_tokens)
    meter(first, None)
    new_tokens, steps = first, []
    if not meter.done:
        clock = _StepClock()
        output = press.generate(
            model,
            input_ids=torch.cat([ids, first], dim=1),
            attention_mask=torch.cat([mask, torch.ones_like(first)], dim=1),
            **{CACHE_KWARG: cache},
            max_new_tokens=max_new_tokens - 1,
            min_new_tokens=max(min_new_tokens - 1, 0),
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            stopping_criteria=StoppingCriteriaList([meter]),
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, ids.shape[1] :]
        meter.finish()
        steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    prefill_seconds = shared.seconds + compress_seconds
    return [
        GenerationResult(
            text=tokenizer.decode(row[:count], skip_special_tokens=True),
            method=press.name,
            budget=press.budget,
            prompt_tokens=int(real),
            generated_tokens=count,
            cache_bytes=held.cache,
            full_cache_bytes=held.full_cache,
            global_cache_bytes=held.global_cache,
            global_full_cache_bytes=held.global_full_cache,
            allocated_bytes=cache.allocated_bytes() // len(ids),
            memory_bytes=held.memory,
            prefill_seconds=prefill_seconds,
            decode_ms_per_token=1000 * statistics.median(steps) if steps else None,
            shared_prefill=True,
            batch=len(ids),
        )
        for row, count, held, real in zip(new_tokens, meter.generated, meter.bytes, mask.sum(-1), strict=True)
    ]


class SequenceMeter(StoppingCriteria):
    """Watches a batch's generation after each new token and, for each row at the token that ends it (its end of
    sequence, or the last one allowed), keeps how many tokens it generated and its bytes in the cache then (a cache
    holds every token but the last generated): what that prompt, decoded alone, would end with. It stops nothing
    itself; generate() goes on until every row is done."""

    def __init__(self, cache: CompressedCache, padding: torch.Tensor, eos: list[int], max_new_tokens: int):
        self.cache, self.padding, self.eos, self.max_new_tokens = cache, padding, eos, max_new_tokens
        self.generated: list[int | None] = [None] * len(padding)
        self.bytes: list[SequenceBytes | None] = [None] * len(padding)
        self.count = 0

    @property
    def done(self) -> bool:
        return all(n is not None for n in self.generated)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        self.count += 1
        eos = torch.tensor(self.eos, dtype=input_ids.dtype, device=input_ids.device)
        ended = torch.isin(input_ids[:, -1], eos).tolist()
        last = self.count == self.max_new_tokens
        self.record([r for r, n in enumerate(self.generated) if n is None and (ended[r] or last)])
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)

    def record(self, rows: list[int]) -> None:
        if rows:
            held = self.cache.sequence_bytes(self.padding)
            for row in rows:
                self.generated[row], self.bytes[row] = self.count, held[row]

    def finish(self) -> None:
        """Rows generate() stopped for a reason of its own (the model's longest position): where they are now."""
        self.record([r for r, n in enumerate(self.generated) if n is None])


def _result(
    tokenizer: PreTrainedTokenizerBase,
    press: Press,
    cache: CompressedCache,
    prompt_tokens: int,
    new_tokens: torch.Tensor,
    prefill_seconds: float,
    steps: list[float],
    **flags: bool,
) -> GenerationResult:
    """What a generation produced and held; `steps`: the seconds of each timed decoding step."""
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
        prefill_seconds=prefill_seconds,
        decode_ms_per_token=1000 * statistics.median(steps) if steps else None,
        **flags,
    )
