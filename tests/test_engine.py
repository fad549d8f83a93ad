"""Engine invariants: keep-all equals transformers' DynamicCache; eviction keeps positions and masks right."""

import gc
from dataclasses import fields

import pytest
import torch
from conftest import tiny_llama
from helpers import METHODS
from transformers import DynamicCache

from modalkv import CompressedCache, get_press
from modalkv.presses.base import Press

# Every method at budget 1.0 (and one absolute budget above the prompt) must be `full`, decode-time eviction included.
KEEP_ALL = [
    *((name, 1.0) for name in METHODS),
    ("snapkv", 10_000),
    ("retentivekv", 10_000),  # nothing evicted: empty states, read every step, change nothing
]


def greedy(model, ids, cache, steps=12, **kw):
    return model.generate(
        ids,
        past_key_values=cache,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kw,
    )


def max_logit_gap(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("method", "budget"), KEEP_ALL)
def test_keep_all_generate_equals_dynamic_cache(model, prompt, method, budget):
    reference = greedy(model, prompt, DynamicCache())
    press = get_press(method, budget=budget)
    with press.attach(model):
        out = greedy(model, prompt, CompressedCache(press))
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_gap(out.logits, reference.logits) <= 1e-4


def test_keep_all_sampling_equals_dynamic_cache(model, prompt):
    torch.manual_seed(7)
    reference = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=0, pad_token_id=0)
    press = get_press("full")
    torch.manual_seed(7)
    out = press.generate(model, input_ids=prompt, max_new_tokens=10, do_sample=True, top_k=0, pad_token_id=0)
    assert torch.equal(out, reference)


def forward_loop(model, ids, cache, steps=6, **prefill_kwargs):
    """A hand-written greedy loop without position_ids: positions come from cache.get_seq_length()."""
    logits = [model(ids, past_key_values=cache, use_cache=True, **prefill_kwargs).logits[:, -1]]
    for _ in range(steps):
        next_token = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(next_token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


def test_keep_all_forward_loop_equals_dynamic_cache(model, prompt):
    reference = forward_loop(model, prompt, DynamicCache())
    press = get_press("full")
    with press.attach(model):
        cache = CompressedCache(press)
        out = forward_loop(model, prompt, cache)
    assert (out - reference).abs().max() <= 1e-4
    assert cache.get_seq_length() == prompt.shape[1] + 6


def test_follow_up_generate_on_same_cache_equals_dynamic_cache(model, prompt):
    question = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    reference_cache, cache = DynamicCache(), CompressedCache(get_press("full"))
    first = greedy(model, prompt, reference_cache, steps=5)
    follow_up = torch.cat([first.sequences, question], dim=1)
    reference = greedy(model, follow_up, reference_cache, steps=5)
    with cache.press.attach(model):
        greedy(model, prompt, cache, steps=5)
        out = greedy(model, follow_up, cache, steps=5)
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_gap(out.logits, reference.logits) <= 1e-4


# Every method but `random` and `cam` (their draws depend on the batch's shape) and `kvzip` (its repetition request
# needs a real tokenizer; the same test is in test_kvzip.py).
# KVzip is batch-invariant too (tested in test_kvzip.py), but its reconstruction pass makes this test slow.
BATCHABLE = [method for method in METHODS if get_press(method).batch_invariant and method != "kvzip"]


@pytest.mark.parametrize("method", BATCHABLE)
def test_left_padded_batch_equals_one_by_one(model, method):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (48, 29, 37)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    # A window shorter than the prompts: a window holding a whole prompt leaves ties, broken by position.
    press = get_press(method, budget=1.0 if method == "full" else 0.5)
    if "window_size" in {f.name for f in fields(getattr(press, "press", press))}:
        press = get_press(method, budget=press.budget, window_size=8)
    with press.attach(model):
        batched = greedy(model, ids, CompressedCache(press), attention_mask=mask)
        for i, p in enumerate(prompts):
            single = greedy(model, p[None], CompressedCache(press))
            assert torch.equal(batched.sequences[i, width:], single.sequences[0, len(p) :])
            gap = max_logit_gap([x[i : i + 1] for x in batched.logits], single.logits)
            assert gap <= 1e-4


def test_padding_is_never_kept(model):
    ids = torch.tensor([[0, 0, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    press = get_press("full")
    cache = CompressedCache(press)
    with press.attach(model):
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    for layer in cache.kept_positions():
        assert layer == [[list(range(4, 12))] * 2]
    assert cache.cache_bytes() == 2 * 2 * 8 * layer_bytes_per_token(model)


def layer_bytes_per_token(model) -> int:
    return 2 * model.config.head_dim * 4


def test_decoding_after_eviction_matches_dynamic_cache_holding_the_kept_tokens(model, prompt):
    """StreamingLLM keeps the same tokens in every head, so an independent reference exists: a DynamicCache
    holding exactly those tokens (cut from an uncompressed prefill), decoded with the true positions."""
    seq = prompt.shape[1]
    press = get_press("streaming_llm", budget=16, evict_every=0)  # prefill eviction only
    cache = CompressedCache(press)
    with press.attach(model):
        out = forward_loop(model, prompt, cache)
    kept = torch.tensor([0, 1, 2, 3, *range(seq - 12, seq)])
    for layer in cache.kept_positions():  # the kept prompt tokens, then the 6 decoded ones
        assert layer == [[[*kept.tolist(), *range(seq, seq + 6)]] * 2]

    full = DynamicCache()
    logits = [model(prompt, past_key_values=full, use_cache=True).logits[:, -1]]
    for layer in full.layers:
        layer.keys, layer.values = layer.keys[:, :, kept], layer.values[:, :, kept]
    for step in range(6):
        next_token = logits[-1].argmax(-1, keepdim=True)
        position = torch.tensor([[seq + step]])
        mask = torch.ones(1, len(kept) + step + 1, dtype=torch.long)
        step_out = model(next_token, past_key_values=full, position_ids=position, attention_mask=mask, use_cache=True)
        logits.append(step_out.logits[:, -1])
    assert (out - torch.stack(logits)).abs().max() <= 1e-4


def test_generate_after_eviction_equals_forward_loop(model, prompt):
    press = get_press("snapkv", budget=0.3, window_size=8)
    with press.attach(model):
        loop = forward_loop(model, prompt, CompressedCache(press), steps=6)
        out = greedy(model, prompt, CompressedCache(press), steps=7)
    assert (torch.stack(out.logits) - loop).abs().max() <= 1e-4


class HeadBudgetPress(Press):
    """Keeps a different number of the most recent tokens in each KV head, to exercise ragged storage."""

    def __init__(self, per_head: list[int]):
        super().__init__(budget=1.0)
        self.per_head = per_head

    def score(self, inputs):
        return torch.arange(inputs.keys.shape[2], dtype=torch.float32).expand(inputs.keys.shape[:3])

    def num_kept(self, inputs):
        return torch.tensor(self.per_head)[None].expand(inputs.keys.shape[0], -1)


def test_ragged_heads_store_what_each_head_keeps(model, prompt):
    press = HeadBudgetPress([10, 40])
    cache = CompressedCache(press)
    with press.attach(model):
        forward_loop(model, prompt, cache, steps=3)
    layer = cache.layers[0]
    assert layer.kept_lengths().tolist() == [[13, 43]]
    # Unlike rows share one paged buffer: the 10-token row owns fewer pages than the 40-token one.
    assert layer.rows.uniform_length is None
    assert layer.rows.layout.capacities[0] < layer.rows.layout.capacities[1]
    seq = prompt.shape[1]
    assert cache.kept_positions()[1][0][0] == list(range(seq - 10, seq + 3))


def test_bytes_are_kept_tokens_and_allocation_is_real(model, prompt):
    press = get_press("snapkv", budget=0.25, window_size=8)
    cache = CompressedCache(press)
    with press.attach(model):
        model(prompt, past_key_values=cache, use_cache=True)
    per_token = layer_bytes_per_token(model)
    kept = sum(int(layer.kept_lengths().sum()) for layer in cache.layers)
    assert kept == 2 * 2 * 12  # 2 layers x 2 KV heads x floor(0.25 * 48)
    assert cache.cache_bytes() == kept * per_token
    assert cache.full_cache_bytes() == 2 * 2 * 48 * per_token
    storage = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in layer.rows.slots.values())
    assert cache.allocated_bytes() == storage
    # Documented slack right after compression: 16 reserved slots per row, rounded up to a page of 8 slots (12 + 16
    # -> 32), plus an int32 column per slot.
    assert storage == 2 * 2 * 32 * (per_token + 4)  # 2 layers x 2 rows x 32 slots


def test_prefill_keys_are_freed(model, prompt):
    press = get_press("snapkv", budget=0.25, window_size=8)
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():  # as generate() runs; with autograd the graph holds everything
        model(prompt, past_key_values=cache, use_cache=True)
    gc.collect()
    # plain tensors only: an earlier test's torch.compile can leave FakeTensors (shapes without storage) alive
    full_length = [o for o in gc.get_objects() if type(o) is torch.Tensor and o.shape == (1, 2, 48, 16)]
    assert full_length == []


def test_decode_growth_is_amortised(model, prompt):
    press = get_press("snapkv", budget=0.25, window_size=8)
    cache = CompressedCache(press)
    with press.attach(model):
        model(prompt, past_key_values=cache, use_cache=True)
        rows = cache.layers[0].rows
        reallocations, keys = 0, rows.slots["keys"]
        for _ in range(100):
            model(torch.tensor([[5]]), past_key_values=cache, use_cache=True)
            reallocations += rows.slots["keys"] is not keys
            keys = rows.slots["keys"]
    assert rows.uniform_length == 12 + 100
    assert reallocations <= 6
    assert max(rows.layout.capacities) <= rows.uniform_length * 17 // 16 + 16 + 8  # + 1/16, 16 at least, a page


def test_bfloat16_keep_all_equals_dynamic_cache_and_bytes_use_two_byte_elements(prompt):
    model = tiny_llama().to(torch.bfloat16)
    reference = greedy(model, prompt, DynamicCache())
    press = get_press("full")
    cache = CompressedCache(press)
    with press.attach(model):
        out = greedy(model, prompt, cache)
    assert torch.equal(out.sequences, reference.sequences)
    assert max_logit_gap(out.logits, reference.logits) == 0
    assert cache.full_cache_bytes() == 2 * 2 * (48 + 11) * 2 * 16 * 2  # bf16: 2 bytes per element
    compressed = CompressedCache(get_press("snapkv", budget=0.5, window_size=8))
    with compressed.press.attach(model):
        greedy(model, prompt, compressed)
    assert compressed.layers[0].rows.slots["keys"].dtype == torch.bfloat16
    assert compressed.cache_bytes() == 2 * 2 * (24 + 11) * 2 * 16 * 2
