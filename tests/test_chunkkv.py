"""ChunkKVPress on hand-made tensors: kvpress 0.5.5's chunk choice, padding, short prompts, token budgets."""

import pytest
import torch
from prefill import kept_sets, make_inputs

from modalkv import get_press
from modalkv.presses import ChunkKVPress, KnormPress


def kvpress_chunks(scores: torch.Tensor, chunk_length: int, ratio: float) -> list[int]:
    """The kept positions of kvpress 0.5.5's ChunkKVPress (batch 1) for inner scores [1, H, S]."""
    seq = scores.shape[-1]
    complete, remaining = divmod(seq, chunk_length)
    per_chunk = scores[..., : complete * chunk_length].sum(1).view(-1, complete, chunk_length).mean(-1)
    if remaining:
        per_chunk = torch.cat([per_chunk, scores[..., -remaining:].sum(1).mean(-1, keepdim=True)], dim=-1)
    kept = max(1, int((complete + (remaining > 0)) * ratio))
    chunks = per_chunk.topk(kept, dim=-1).indices[0].tolist()
    return sorted(p for c in chunks for p in range(c * chunk_length, min((c + 1) * chunk_length, seq)))


@pytest.mark.parametrize(("seq", "ratio"), [(100, 0.2), (107, 0.3), (45, 0.5)])
def test_keeps_kvpress_chunks_in_every_head(seq, ratio):
    inputs = make_inputs(seq=seq, seed=seq)
    press = get_press("chunkkv:knorm", budget=ratio, chunk_length=10)
    expected = kvpress_chunks(KnormPress().score(inputs), 10, ratio)
    assert kept_sets(press, inputs) == [[expected] * 2]


def test_inner_always_kept_tokens_rank_first_as_kvpress_pads_them():
    inputs = make_inputs(seq=60, seed=4)
    press = get_press("chunkkv:snapkv", budget=0.2, chunk_length=10, window_size=8)
    scores = press.press.score(inputs)
    top = scores[..., :-8].max()
    scores[..., -8:] = top + 1  # kvpress's SnapKV pads the window with max + 1
    assert kept_sets(press, inputs) == [[kvpress_chunks(scores, 10, 0.2)] * 2]
    assert set(range(50, 60)) <= set(kept_sets(press, inputs)[0][0])  # the window's chunk


def test_chunks_start_at_the_first_real_token():
    alone = make_inputs(seq=50, seed=5)
    padded = make_inputs(batch=2, seq=53, seed=5, is_real=torch.tensor([[False] * 3 + [True] * 50, [True] * 53]))
    padded.keys[0, :, 3:], padded.queries[0, :, 3:] = alone.keys[0], alone.queries[0]
    press = get_press("chunkkv:knorm", budget=0.4, chunk_length=10)
    shifted = [[p + 3 for p in head] for head in kept_sets(press, alone)[0]]
    assert kept_sets(press, padded)[0] == shifted


def test_a_prompt_shorter_than_a_chunk_is_left_to_the_inner_press():
    inputs = make_inputs(seq=15, seed=6)
    chunked = get_press("chunkkv:knorm", budget=0.4, chunk_length=20)
    assert kept_sets(chunked, inputs) == kept_sets(get_press("knorm", budget=0.4), inputs)


def test_token_budgets_keep_whole_chunks_within_the_budget():
    inputs = make_inputs(seq=100, seed=7)
    assert [len(h) for h in kept_sets(get_press("chunkkv:knorm", budget=35, chunk_length=10), inputs)[0]] == [30, 30]
    assert kept_sets(get_press("chunkkv:knorm", budget=120, chunk_length=10), inputs) == [[list(range(100))] * 2]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="chunk_length must be >= 1"):
        get_press("chunkkv", budget=0.2, chunk_length=0)
    with pytest.raises(ValueError, match="no decode-time eviction inside it"):
        get_press("chunkkv:h2o", budget=0.2)
    with pytest.raises(ValueError, match="chunkkv needs a scoring press inside"):
        ChunkKVPress(budget=0.2, press=get_press("full"))
