"""AdaKV head-wise budgets, and ragged per-layer / per-head budgets through decoding."""

import math

import pytest
import torch

from modalkv import CompressedCache, get_press
from modalkv.presses.base import PrefillInputs


def make_inputs(seq=40, kv_heads=3, groups=2, dim=8, seed=0) -> PrefillInputs:
    gen = torch.Generator().manual_seed(seed)
    return PrefillInputs(
        module=None,
        layer_idx=0,
        queries=torch.randn(1, kv_heads * groups, seq, dim, generator=gen) * 3,
        keys=torch.randn(1, kv_heads, seq, dim, generator=gen),
        values=torch.randn(1, kv_heads, seq, dim, generator=gen),
        is_real=torch.ones(1, seq, dtype=torch.bool),
        scaling=1 / math.sqrt(dim),
    )


def kvpress_adakv_kept(scores: torch.Tensor, n_kept: int, alpha: float) -> torch.Tensor:
    """kvpress's AdaKV written out independently: safeguard per head, then a global top-k over all heads."""
    heads, seq = scores.shape
    scores = scores.clone()
    safe = scores.topk(int(n_kept * alpha), dim=-1).indices
    scores.scatter_(-1, safe, torch.finfo(scores.dtype).max)
    pruned = scores.reshape(-1).topk(heads * (seq - n_kept), largest=False).indices
    keep = torch.ones(heads * seq, dtype=torch.bool)
    keep[pruned] = False
    return keep.view(heads, seq)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_keeps_what_kvpress_keeps(alpha):
    inputs = make_inputs()
    inner = get_press("knorm", budget=0.25)  # no always-kept tokens: the comparison is exact
    press = get_press("adakv:knorm", budget=0.25, alpha_safeguard=alpha)
    selection = press.select(inputs)
    expected = kvpress_adakv_kept(inner.score(inputs)[0].float(), 10, alpha)
    assert selection.lengths[0].tolist() == expected.sum(-1).tolist()
    assert int(selection.lengths.sum()) == 3 * 10
    for head in range(3):
        kept = selection.indices[0, head, : selection.lengths[0, head]]
        assert kept.tolist() == expected[head].nonzero().flatten().tolist()


def test_adakv_safeguard_and_window_are_kept_per_head():
    inputs = make_inputs(seq=60)
    press = get_press("adakv:snapkv", budget=0.5, window_size=4, alpha_safeguard=0.5)
    selection = press.select(inputs)
    for head in range(3):
        kept = set(selection.indices[0, head, : selection.lengths[0, head]].tolist())
        assert {56, 57, 58, 59} <= kept
        assert len(kept) >= 15  # 50% of the 30-token per-head budget is guaranteed to each head


def test_adakv_budget_one_keeps_everything():
    selection = get_press("adakv:snapkv", budget=1.0).select(make_inputs())
    assert selection.lengths.tolist() == [[40, 40, 40]]


def test_adakv_rejects_a_press_without_scores():
    with pytest.raises(ValueError, match="adakv needs a scoring press"):
        get_press("adakv:full")


RAGGED = [("adakv:snapkv", {}), ("pyramidkv", {"beta": 2})]  # beta 2: a pyramid even on this 2-layer toy


@pytest.mark.parametrize(("method", "params"), RAGGED)
def test_ragged_budgets_store_exactly_what_was_chosen(model, prompt, method, params):
    press = get_press(method, budget=0.25, window_size=4, **params)
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    lengths = [layer.kept_lengths() for layer in cache.layers]
    assert sum(int(x.sum()) for x in lengths) == 2 * 2 * 12  # the layers' total is the budget
    assert len({n for x in lengths for n in x.flatten().tolist()}) > 1  # really ragged: not one rectangle
    assert cache.cache_bytes() == sum(int(x.sum()) for x in lengths) * 2 * model.config.head_dim * 4


@pytest.mark.parametrize(("method", "params"), RAGGED)
def test_ragged_budgets_one_multi_token_forward_equals_token_by_token(model, prompt, method, params):
    """A follow-up of several tokens after a ragged compression gives what feeding them one by one gives: the
    causal mask each layer builds from its own storage is right (transformers' shared mask is sized from layer 0)."""
    follow_up = torch.tensor([[11, 12, 13, 14, 15, 16]])
    press = get_press(method, budget=0.25, window_size=4, **params)
    with press.attach(model), torch.no_grad():
        together = CompressedCache(press)
        model(prompt, past_key_values=together, use_cache=True)
        at_once = model(follow_up, past_key_values=together, use_cache=True).logits[0]
        apart = CompressedCache(press)
        model(prompt, past_key_values=apart, use_cache=True)
        one_by_one = torch.cat([model(t[None, None], past_key_values=apart).logits[0] for t in follow_up[0]])
    assert (at_once - one_by_one).abs().max() <= 1e-4
    out = press.generate(model, input_ids=prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt.shape[1] + 8
