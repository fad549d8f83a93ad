"""Presses on hand-made tensors: the kept set is what each definition gives."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from prefill import kept_sets, make_inputs
from transformers import BloomConfig, BloomForCausalLM

from modalkv import get_press
from modalkv.presses.base import check_budget, tokens_for_budget
from modalkv.presses.scoring import accumulated_attention


@pytest.mark.parametrize("budget", [0.2, 1.0, 1, 2, 4096])
def test_valid_budgets(budget):
    check_budget(budget)


@pytest.mark.parametrize("budget", [0, -0.1, -3, 1.5, 1.0001, True, "0.2", None, float("nan")])
def test_invalid_budgets_are_named(budget):
    with pytest.raises(ValueError, match="budget must be a ratio in \\(0, 1\\] or an integer token count > 1"):
        get_press("snapkv", budget=budget)


def test_budget_rule_ratio_and_tokens():
    num_real = torch.tensor([100, 7, 3])
    assert tokens_for_budget(0.2, num_real).tolist() == [20, 1, 1]
    assert tokens_for_budget(1.0, num_real).tolist() == [100, 7, 3]
    assert tokens_for_budget(30, num_real).tolist() == [30, 7, 3]
    assert tokens_for_budget(0.65, torch.tensor([180])).tolist() == [117]  # float32 would give 116
    assert tokens_for_budget(0.7, torch.tensor([90])).tolist() == [63]  # a plain float64 floor gives 62
    lengths = torch.arange(1, 8193)
    for ratio in (0.05, 0.1, 0.2, 0.35, 0.5, 0.7):  # exact: the largest count whose ratio does not exceed the budget
        expected = torch.tensor([max(1, (n * round(ratio * 100)) // 100) for n in lengths.tolist()])
        assert torch.equal(tokens_for_budget(ratio, lengths), expected)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'snapkvv'; known methods: .*h2o.*snapkv.*streaming_llm"):
        get_press("snapkvv", budget=0.2)


def test_full_takes_no_budget():
    with pytest.raises(ValueError, match="full press keeps everything"):
        get_press("full", budget=0.5)


def test_streaming_llm_keeps_sinks_after_padding_and_the_recent_window():
    is_real = torch.tensor([[False] * 5 + [True] * 15, [True] * 20])
    press = get_press("streaming_llm", budget=8)
    sets = kept_sets(press, make_inputs(batch=2, is_real=is_real))
    assert sets[0] == [[5, 6, 7, 8, 16, 17, 18, 19]] * 2
    assert sets[1] == [[0, 1, 2, 3, 16, 17, 18, 19]] * 2


def kvpress_snapkv_scores(inputs, window_size, kernel_size):
    """SnapKV scores written as kvpress 0.5 writes them (repeat_kv, triu mask, mean, avg-pool, group mean)."""
    batch, kv_heads, seq, dim = inputs.keys.shape
    groups = inputs.queries.shape[1] // kv_heads
    keys = inputs.keys.repeat_interleave(groups, dim=1)
    weights = inputs.queries[:, :, -window_size:] @ keys.transpose(2, 3) / math.sqrt(dim)
    weights += torch.triu(torch.full_like(weights, float("-inf")), diagonal=seq - window_size + 1)
    weights = weights.softmax(dim=-1)[..., :-window_size]
    scores = F.avg_pool1d(weights.mean(dim=-2), kernel_size, padding=kernel_size // 2, stride=1)
    return scores.view(batch, kv_heads, groups, seq - window_size).mean(2)


def test_snapkv_scores_equal_the_reference_formula():
    inputs = make_inputs(seq=30)
    press = get_press("snapkv", budget=0.5, window_size=6, kernel_size=5)
    ours = press.score(inputs)[..., :-6]
    assert torch.allclose(ours, kvpress_snapkv_scores(inputs, 6, 5), atol=1e-6)


def test_snapkv_keeps_the_window_and_the_top_scores():
    inputs = make_inputs(seq=30)
    press = get_press("snapkv", budget=10, window_size=4)
    scores = kvpress_snapkv_scores(inputs, 4, 5)
    for head, kept in enumerate(kept_sets(press, inputs)[0]):
        expected = sorted([*scores[0, head].topk(6).indices.tolist(), 26, 27, 28, 29])
        assert kept == expected


def test_snapkv_max_pooling_option():
    inputs = make_inputs(seq=30)
    avg = get_press("snapkv", budget=0.5, window_size=6, pooling="avg").score(inputs)
    peak = get_press("snapkv", budget=0.5, window_size=6, pooling="max").score(inputs)
    assert (peak >= avg - 1e-7).all() and not torch.allclose(peak, avg)
    with pytest.raises(ValueError, match="pooling must be 'avg' or 'max'"):
        get_press("snapkv", budget=0.5, pooling="median")


@pytest.mark.parametrize("chunk_elements", [1 << 22, 40_000])  # one chunk of queries; chunks of 16 queries
def test_accumulated_attention_equals_the_dense_causal_sum_over_every_query(monkeypatch, chunk_elements):
    monkeypatch.setattr("modalkv.presses.scoring._CHUNK_ELEMENTS", chunk_elements)
    # 300 tokens, the first 5 of one row left padding, which gives and gets no attention
    is_real = torch.tensor([[False] * 5 + [True] * 295, [True] * 300])
    inputs = make_inputs(batch=2, seq=300, is_real=is_real)
    keys = inputs.keys.repeat_interleave(2, dim=1)  # 4 query heads on 2 KV heads
    logits = inputs.queries @ keys.transpose(2, 3) * inputs.scaling
    visible = torch.ones(300, 300, dtype=torch.bool).tril() & is_real[:, None, None, :]
    weights = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    dense = weights.sum(dim=2).view(2, 2, 2, 300).mean(2)  # summed over queries, averaged over a group's heads
    torch.testing.assert_close(accumulated_attention(inputs), dense, rtol=1e-5, atol=1e-5)


def test_accumulated_attention_is_computed_once_per_layer_and_copied_to_each_caller():
    inputs = make_inputs(seq=40)
    first = accumulated_attention(inputs)
    first.fill_(0.0)  # a caller's copy: changing it leaves what the next press gets alone
    inputs.derived["accumulated_attention"] += 1.0  # a second call reads the kept result, not a new pass
    torch.testing.assert_close(accumulated_attention(inputs), accumulated_attention(make_inputs(seq=40)) + 1.0)
    replayed = dataclasses.replace(inputs, state={})  # how a cache replays a recorded prefill: the same results
    assert replayed.derived is inputs.derived


def test_pad_tokens_are_never_selected():
    is_real = torch.tensor([[False] * 10 + [True] * 10])
    press = get_press("snapkv", budget=1.0)
    assert kept_sets(press, make_inputs(is_real=is_real)) == [[list(range(10, 20))] * 2]


def test_model_without_attention_interface_is_refused():
    model = BloomForCausalLM(
        BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    with pytest.raises(ValueError, match="BloomForCausalLM does not route its attention through"):
        get_press("snapkv", budget=0.5).generate(model, input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_empty_and_too_long_prompts_are_refused(model):
    press = get_press("snapkv", budget=0.5)
    with pytest.raises(ValueError, match="the prompt is empty"):
        press.generate(model, input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the prompt has 510 tokens and 4 new tokens .* at most 512 positions"):
        press.generate(model, input_ids=torch.ones(1, 510, dtype=torch.long), max_new_tokens=4)


def test_snapkv_prompt_shorter_than_the_window_keeps_the_budget():
    press = get_press("snapkv", budget=0.5, window_size=64)
    assert press.select(make_inputs(seq=20)).lengths.tolist() == [[10, 10]]
