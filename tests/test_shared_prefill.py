"""A prompt prefilled once and replayed for every press gives each press exactly what its own prefill gives."""

import pytest
import torch
from eval_tiny import tiny_tokenizer
from helpers import METHODS

from modalkv import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.generation import generate_timed, share_prefill
from modalkv.presses import get_press

# KVzip's prefill runs the model itself (it is not replayed: the runner gives it its own prefill).
REPLAYED = [method for method in METHODS if method != "kvzip"]


@pytest.fixture(scope="module")
def shared_inputs(model):
    ids = torch.randint(3, 128, (1, 96), generator=torch.Generator().manual_seed(7))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return inputs, share_prefill(model, inputs)


@pytest.mark.parametrize("method", REPLAYED)
def test_a_replayed_prefill_generates_as_the_press_own_prefill(model, shared_inputs, method):
    inputs, shared = shared_inputs
    tokenizer = tiny_tokenizer()
    press = get_press(method, budget=1.0 if method == "full" else 0.3, **({"seed": 0} if method == "random" else {}))
    alone = generate_timed(model, tokenizer, press, inputs, max_new_tokens=8, min_new_tokens=1)
    replayed = generate_timed(model, tokenizer, press, inputs, max_new_tokens=8, min_new_tokens=1, shared=shared)
    assert replayed.shared_prefill and not alone.shared_prefill
    assert replayed.text == alone.text and replayed.generated_tokens == alone.generated_tokens == 8
    for field in ("cache_bytes", "global_cache_bytes", "allocated_bytes", "memory_bytes", "full_cache_bytes"):
        assert getattr(replayed, field) == getattr(alone, field), field


@pytest.mark.parametrize("method", ["snapkv", "madakv", "retentivekv", "adakv:snapkv", "cam"])
def test_a_replayed_cache_holds_the_same_tokens_and_decodes_the_same_logits(model, shared_inputs, method):
    inputs, shared = shared_inputs
    press = get_press(method, budget=0.3)
    own = CompressedCache(press)
    follow = torch.tensor([[5, 9, 11]])
    with press.using(model), press.attach(model), torch.no_grad():
        model(**inputs, **{CACHE_KWARG: own})
        replayed = CompressedCache.from_recorded_prefill(press, shared.layers)
        assert replayed.kept_positions() == own.kept_positions()
        for cache in (own, replayed):
            logits = [model(follow[:, i : i + 1], **{CACHE_KWARG: cache}).logits for i in range(3)]
            cache.logits = torch.cat(logits, dim=1)
    torch.testing.assert_close(replayed.logits, own.logits, rtol=0, atol=0)
    assert replayed.kept_positions() == own.kept_positions()
    for mine, theirs in zip(replayed.layers, own.layers, strict=True):
        assert mine.memory.keys() == theirs.memory.keys()
        for name in mine.memory:
            torch.testing.assert_close(mine.memory[name], theirs.memory[name], rtol=0, atol=0)


def test_a_prompt_that_cannot_be_replayed_exactly_is_not_shared(model):
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(7))
    assert share_prefill(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}) is None  # a batch
    one = {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1])}
    model.generation_config.repetition_penalty = 1.2  # changes greedy's pick from the logits
    try:
        assert share_prefill(model, one) is None
    finally:
        model.generation_config.repetition_penalty = None
    assert share_prefill(model, one) is not None
