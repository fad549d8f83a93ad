"""Decode-time compression: the cache stays at its budget, and what is kept is attended to correctly."""

import pytest
import torch
from transformers import DynamicCache

from modalkv import CompressedCache, get_press
from modalkv.modality import IMAGE
from modalkv.presses import PRESSES
from modalkv.presses.base import DecodeView, Press
from modalkv.storage import RaggedRows


@pytest.mark.parametrize("method", ["streaming_llm", "h2o", "tova"])
@pytest.mark.parametrize("budget", [16, 0.25])
def test_cache_stays_at_its_budget_over_200_generated_tokens(model, prompt, method, budget):
    press = get_press(method, budget=budget)
    cache = CompressedCache(press)
    out = press.generate(model, input_ids=prompt, past_key_values=cache, max_new_tokens=200, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 200
    assert cache.get_seq_length() == prompt.shape[1] + 199  # the last token is sampled, never fed back
    expected = 16 if budget == 16 else int(0.25 * prompt.shape[1])
    for layer in cache.layers:
        assert layer.kept_lengths().tolist() == [[expected, expected]]
    assert cache.cache_bytes() == 2 * 2 * expected * 2 * model.config.head_dim * 4


def test_without_decode_compression_the_cache_grows(model, prompt):
    press = get_press("streaming_llm", budget=16, evict_every=0)
    cache = CompressedCache(press)
    press.generate(model, input_ids=prompt, past_key_values=cache, max_new_tokens=20, do_sample=False)
    assert cache.layers[0].kept_lengths().tolist() == [[16 + 19, 16 + 19]]


def test_presses_without_decode_eviction_refuse_the_option():
    with pytest.raises(ValueError, match="lookm defines no decode-time eviction"):
        get_press("lookm", budget=0.2, evict_every=4)
    with pytest.raises(ValueError, match="evict_every must be >= 0"):
        get_press("snapkv", budget=0.2, evict_every=-1)
    with pytest.raises(ValueError, match="adakv chooses what each head keeps at prefill"):
        get_press("adakv:snapkv", budget=0.2, evict_every=4)


# Presses that score stored tokens while decoding but compress once unless asked (`evict_every=0` by default).
RESCORING = [name for name, p in PRESSES.items() if p.decode_scores is not Press.decode_scores and not p.evict_every]


@pytest.mark.parametrize("method", RESCORING)
def test_rescoring_every_n_steps_returns_to_the_budget_and_keeps_the_window(model, prompt, method):
    press = get_press(method, budget=12, evict_every=5)
    cache = CompressedCache(press)
    seq = prompt.shape[1]
    with press.attach(model), torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        for step in range(1, 16):
            model(torch.tensor([[7]]), past_key_values=cache, use_cache=True)
            lengths = {n for layer in cache.layers for n in layer.kept_lengths().flatten().tolist()}
            assert lengths == {12 + step % 5}  # grows for 4 steps, back to 12 tokens on every 5th
    if method == "snapkv":  # the 5 generated tokens of the last window are never the ones evicted
        for layer in cache.kept_positions():
            for head in layer[0]:
                assert set(range(seq + 10, seq + 15)) <= set(head)


def test_sliding_window_decoding_equals_an_uncompressed_cache_with_evicted_tokens_masked(model, prompt):
    """Independent reference: a DynamicCache holding everything, with a 2-D attention mask that hides exactly the
    tokens StreamingLLM has evicted (true positions, no storage tricks)."""
    seq, budget, steps = prompt.shape[1], 12, 24
    press = get_press("streaming_llm", budget=budget)
    cache, reference = CompressedCache(press), DynamicCache()
    with press.attach(model), torch.no_grad():
        ours = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
    ref_logits = model(prompt, past_key_values=reference, use_cache=True).logits[:, -1]
    for step in range(steps):
        token = ours.argmax(-1, keepdim=True)
        kept = cache.kept_positions()[0][0][0]
        for layer in cache.kept_positions():  # StreamingLLM keeps the same tokens in every layer and head
            assert layer == [[kept, kept]]
        assert kept == [0, 1, 2, 3, *range(seq + step - (budget - 4), seq + step)]
        mask = torch.zeros(1, seq + step + 1, dtype=torch.long)
        mask[0, [*kept, seq + step]] = 1
        with torch.no_grad():
            ref_logits = model(token, past_key_values=reference, attention_mask=mask, use_cache=True).logits[:, -1]
            with press.attach(model):
                ours = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        assert (ours - ref_logits).abs().max() <= 1e-4


def test_a_multi_token_forward_evicts_back_to_the_budget(model, prompt):
    press = get_press("streaming_llm", budget=12)
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        model(torch.tensor([[5, 6, 7, 8, 9]]), past_key_values=cache, use_cache=True)
    seq = prompt.shape[1] + 5
    assert cache.kept_positions()[1][0][1] == [0, 1, 2, 3, *range(seq - 8, seq)]


def test_h2o_adds_each_new_attention_and_evicts_the_lowest_outside_the_recent_window():
    keys = torch.zeros(2, 6, 4)  # 2 rows (1 batch row x 2 KV heads), 6 tokens
    kept = {"keys": keys, "values": keys.clone(), "columns": torch.arange(6).repeat(2, 1).int()}
    kept["scores"] = torch.tensor([[5.0, 1.0, 3.0, 0.5, 2.0, 0.0], [0.0, 4.0, 1.0, 3.0, 2.0, 0.0]])
    rows = RaggedRows.build(kept, torch.tensor([6, 6]), limits=torch.tensor([4, 4]), reserve=1)
    rows.append({"keys": torch.zeros(2, 4), "values": torch.zeros(2, 4)}, start_column=6, fill={})
    rows.unevicted = 3  # built 2 over the limit, then one more
    # Attention of the new token's 2 query heads (G=2) per row over the 7 slots.
    attention = torch.zeros(2, 2, 7)
    attention[0, :, 1] = 1.0  # row 0: token 1 becomes heavy (1 + 1 = 2)
    attention[1, :, 2] = 1.0  # row 1: token 2 becomes 2
    press = get_press("h2o", budget=4)  # recent window = 2 tokens: columns 5 and 6
    view = DecodeView(rows, attention, {}, num_kv_heads=2, query_groups=2, seen=7)
    press.observe(view)
    scores = press.decode_scores(view)
    assert torch.equal(
        view.slot("scores"),
        kept["scores"].new_tensor([[5.0, 2.0, 3.0, 0.5, 2.0, 0.0, 0.0], [0.0, 4.0, 2.0, 3.0, 2.0, 0.0, 0.0]]),
    )
    # 7 tokens, limit 4: the 3 lowest outside the recent window go
    rows.evict(torch.nn.functional.pad(scores, (0, rows.layout.page_size - 7), value=float("inf")))
    assert [sorted(c) for c in layer_columns(rows)] == [[0, 2, 5, 6], [1, 3, 5, 6]]


def layer_columns(rows: RaggedRows) -> list[list[int]]:
    return [row[:n] for row, n in zip(rows.padded()["columns"].tolist(), rows.lengths.tolist(), strict=True)]


def scored_rows(lengths, limits, seed=0):
    """Rows with the given lengths (columns 0..len-1 per row), values = 2 * keys and random distinct scores."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(4, 10, 4, generator=gen)[
        : len(lengths), : max(lengths)
    ]  # row i: the same draw whatever the rest
    scores = torch.rand(4, 10, generator=gen)[: len(lengths), : max(lengths)]
    columns = torch.arange(max(lengths)).repeat(len(lengths), 1).int()
    kept = {"keys": keys, "values": keys * 2, "columns": columns, "scores": scores}
    rows = RaggedRows.build(kept, torch.tensor(lengths), limits=torch.tensor(limits), reserve=1)
    rows.unevicted = max(n - k for n, k in zip(lengths, limits, strict=True))  # built over the limits
    return rows, scores


@pytest.mark.parametrize(
    ("lengths", "limits"),
    [([9, 9, 9], [8, 8, 8]), ([9, 9, 9], [6, 6, 6]), ([10, 9, 8], [7, 9, 5]), ([10, 9, 8], [9, 8, 7])],
)
def test_removal_keeps_each_rows_highest_scores_within_its_limit(lengths, limits):
    rows, scores = scored_rows(lengths, limits)
    assert (rows.uniform_length is not None) == (len(set(lengths)) == 1)  # alike rows: one page each, host-known
    pairs = enumerate(zip(lengths, limits, strict=True))
    expected = [sorted(scores[i, :n].topk(min(n, k)).indices.tolist()) for i, (n, k) in pairs]
    rows.evict(rows.pages("scores").clone())
    assert rows.lengths.tolist() == [min(n, k) for n, k in zip(lengths, limits, strict=True)]
    padded = rows.padded()
    for i, columns in enumerate(layer_columns(rows)):  # every slot moved with its key, value and score
        assert sorted(columns) == expected[i]
        n = rows.lengths[i]
        assert torch.equal(padded["values"][i, :n], 2 * padded["keys"][i, :n])
        assert torch.equal(padded["scores"][i, :n], scores[i, columns])


def test_ragged_and_alike_rows_evict_the_same_tokens():
    alike, _ = scored_rows([9, 9, 9], [7, 7, 7])
    ragged, _ = scored_rows([9, 9, 9, 3], [7, 7, 7, 3])  # a short fourth row makes the layout paged
    assert alike.uniform_length == 9 and ragged.uniform_length is None
    alike.evict(alike.pages("scores").clone())
    ragged.evict(ragged.pages("scores").clone())
    assert [sorted(c) for c in layer_columns(alike)] == [sorted(c) for c in layer_columns(ragged)[:3]]
    assert alike.uniform_length == 7


@pytest.mark.parametrize("method", ["snapkv", "retentivekv", "madakv"])
def test_beam_search_at_full_budget_equals_dynamic_cache_and_the_maps_follow_the_beams(model, prompt, method):
    prompts = torch.cat([prompt, prompt.flip(-1)])
    modality = torch.zeros_like(prompts)
    modality[0, 10:30] = IMAGE
    modality[1, 5:12] = IMAGE
    beams = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8, "do_sample": False}
    with torch.no_grad():
        plain = model.generate(input_ids=prompts, past_key_values=DynamicCache(), **beams)
        full = get_press(method, budget=1.0).generate(model, input_ids=prompts, modality=modality, **beams)
        cache = CompressedCache(get_press(method, budget=0.3))
        compressed = cache.press.generate(model, input_ids=prompts, modality=modality, past_key_values=cache, **beams)
    assert torch.equal(full, plain)
    assert compressed.shape == plain.shape
    # Each prompt's map on each of its beams, in generate()'s row order, after the beams were reordered.
    assert torch.equal(cache.modality, modality.repeat_interleave(3, dim=0))
