"""A prompt prefilled once and replayed for every press gives each press exactly what its own prefill gives."""

from dataclasses import fields

import pytest
import torch
from eval_tiny import tiny_tokenizer
from helpers import METHODS

from modalkv import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.generation import generate_shared, generate_timed, share_prefill
from modalkv.presses import get_press

# KVzip's repetition request needs a real tokenizer: its replays are tested in test_kvzip.py.
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
        replayed = CompressedCache(press)
        replayed.replay_prefill(shared.layers)
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
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    assert share_prefill(model, {"input_ids": ids, "attention_mask": mask}) is not None  # a left-padded batch
    padded_embeds = {"inputs_embeds": model.get_input_embeddings()(ids), "attention_mask": mask}
    assert share_prefill(model, padded_embeds) is None  # positions of padded non-token inputs: the model's own affair
    one = {"input_ids": ids[:1], "attention_mask": torch.ones_like(ids[:1])}
    model.generation_config.repetition_penalty = 1.2  # changes greedy's pick from the logits
    try:
        assert share_prefill(model, one) is None
    finally:
        model.generation_config.repetition_penalty = None
    assert share_prefill(model, one) is not None


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_a_row_of_a_batch_prefill_is_that_prompt_own_recorded_prefill(model, name):
    """On a hybrid model too, whose sliding layers' inputs mark only their window as real."""
    if name == "gemma3_text":
        from test_hybrid import build

        model = build(name)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 128, (1, n), generator=gen) for n in (40, 27)]
    ids, mask = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 40 - prompt.shape[1] :], mask[row, 40 - prompt.shape[1] :] = prompt, 1
    batch = share_prefill(model, {"input_ids": ids, "attention_mask": mask})
    for index, prompt in enumerate(prompts):
        own = share_prefill(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
        row = batch.row(index)
        torch.testing.assert_close(row.first_logits, own.first_logits, rtol=0, atol=0)
        assert row.seconds == batch.row_seconds[index] and len(row.layers) == len(own.layers)
        torch.testing.assert_close(row.is_real, own.is_real, rtol=0, atol=0)
        for mine, theirs in zip(row.layers, own.layers, strict=True):
            for attribute in ("queries", "keys", "values", "is_real"):
                torch.testing.assert_close(getattr(mine, attribute), getattr(theirs, attribute), rtol=0, atol=0)
                assert getattr(mine, attribute).is_contiguous()


BATCH_INVARIANT = [method for method in REPLAYED if get_press(method).batch_invariant]


@pytest.mark.parametrize("method", BATCH_INVARIANT)
def test_prompts_decoded_together_each_give_what_they_give_alone(model, method):
    """A left-padded batch on one shared prefill: each prompt's text, token count and bytes are those it has decoded
    alone, including a prompt that reaches its end of sequence before the others (its bytes are taken then)."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 128, (1, n), generator=gen) for n in (96, 61, 80)]
    ids = torch.zeros(3, 96, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, 96 - prompt.shape[1] :], mask[row, 96 - prompt.shape[1] :] = prompt, 1
    tokenizer = tiny_tokenizer()
    press = get_press(method, budget=1.0 if method == "full" else 0.3)
    if "window_size" in {f.name for f in fields(getattr(press, "press", press))}:
        # shorter than the prompts: a window holding a whole prompt leaves ties, broken by position (and padding)
        press = get_press(method, budget=press.budget, window_size=8)
    settings = {"max_new_tokens": 8, "min_new_tokens": 1}

    def alone() -> list:
        return [
            generate_timed(model, tokenizer, press, {"input_ids": p, "attention_mask": torch.ones_like(p)}, **settings)
            for p in prompts
        ]

    # The second prompt's fourth token becomes the end of sequence: that prompt stops early, the others go on.
    with press.attach(model):
        free = model.generate(prompts[1], **{CACHE_KWARG: CompressedCache(press)}, max_new_tokens=8, do_sample=False)
    model.generation_config.eos_token_id = int(free[0, prompts[1].shape[1] + 3])
    try:
        singles = alone()
        shared = share_prefill(model, {"input_ids": ids, "attention_mask": mask})
        batched = generate_shared(
            model, tokenizer, press, {"input_ids": ids, "attention_mask": mask}, **settings, shared=shared
        )
    finally:
        model.generation_config.eos_token_id = None
    assert singles[1].generated_tokens < 8
    assert [r.generated_tokens for r in batched] == [r.generated_tokens for r in singles]
    for mine, theirs, prompt in zip(batched, singles, prompts, strict=True):
        assert mine.batch == 3 and mine.prompt_tokens == prompt.shape[1]
        assert mine.text == theirs.text
        for field in (
            "cache_bytes",
            "full_cache_bytes",
            "global_cache_bytes",
            "global_full_cache_bytes",
            "memory_bytes",
        ):
            assert getattr(mine, field) == getattr(theirs, field), field
