"""The decoding step a compressed layer owns: no host-device synchronisation and a number of operations that does
not depend on how ragged the rows are (what a GPU pays per layer and step: launches and syncs)."""

import pytest
import torch
from test_engine import HeadBudgetPress

from modalkv import CompressedCache, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.modality import IMAGE
from modalkv.profiling import DispatchCounter


def decode_counts(model, prompt, press, steps=4, warm_up=3, attention_mask=None, modality=None):
    """Prefill, `warm_up` greedy steps, then a DispatchCounter over `steps` more (tokens stay on the device)."""
    cache = CompressedCache(press, modality=modality)
    with press.attach(model), torch.no_grad():
        token = model(prompt, attention_mask=attention_mask, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        for _ in range(warm_up):
            token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        with DispatchCounter() as counter:
            for _ in range(steps):
                token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
    return counter, cache


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("snapkv", {}),
        ("madakv", {}),
        ("h2o", {}),
        ("tova", {}),
        ("retentivekv", {"evict_every": 1}),
        ("streaming_llm", {}),
        ("knorm", {"evict_every": 1}),
        ("adakv:snapkv", {}),
    ],
)
@pytest.mark.parametrize("layout", ["alike", "ragged"])
def test_a_steady_decoding_step_never_waits_for_the_device(model, method, params, layout):
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 128, (2, 40), generator=gen)
    mask, modality = None, torch.zeros_like(prompt)
    modality[:, 5:25] = IMAGE
    if layout == "ragged":  # a left-padded row: rows of different lengths, paged storage and eviction
        mask = torch.ones_like(prompt)
        mask[1, :9] = 0
    counter, cache = decode_counts(model, prompt, get_press(method, budget=0.3, **params), 4, 3, mask, modality)
    rows = cache.layers[0].rows
    assert (rows.uniform_length is None) == (layout == "ragged" or method.startswith("adakv"))
    assert counter.total_syncs == 0, counter.report()


def test_ragged_rows_cost_the_same_operations_whatever_their_lengths(model, prompt):
    counts = []
    for per_head in ([10, 40], [3, 45], [30, 33]):
        counter, cache = decode_counts(model, prompt, HeadBudgetPress(per_head), steps=3)
        assert cache.layers[0].kept_lengths().tolist() == [[n + 6 for n in per_head]]
        counts.append(counter.total_ops)
    assert len(set(counts)) == 1, counts


def test_rows_that_grow_while_decoding_never_wait_either(model, prompt):
    press = get_press("snapkv", budget=0.3, window_size=8)
    counter, cache = decode_counts(model, prompt, press, steps=40)
    rows = cache.layers[0].rows
    assert rows.uniform_length == int(0.3 * 48) + 43  # grown past the 16 reserved slots, more than once
    assert counter.total_syncs == 0, counter.report()
