"""MadaKV: the MPA split, HCC's exact total, the ablations, and end-to-end generation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prefill import kept_sets, make_inputs

from modalkv import CompressedCache, get_press
from modalkv.modality import IMAGE
from modalkv.presses.madakv import MadaKVPress, coverage
from modalkv.presses.scoring import share


class FixedImportance(MadaKVPress):
    """MadaKV with a given psi, so the equations can be checked on hand-made numbers."""

    def __init__(self, psi, **params):
        super().__init__(**params)
        self.psi = psi

    def importance(self, inputs):
        return self.psi


@given(
    total=st.integers(0, 60),
    weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10)), min_size=1, max_size=6),
    capacity=st.lists(st.integers(0, 20), min_size=6, max_size=6),
)
def test_share_is_exact_capped_and_proportional(total, weights, capacity):
    capacity = torch.tensor(capacity[: len(weights)])
    total = min(total, int(capacity.sum()))
    parts = share(torch.tensor(total), torch.tensor(weights), capacity)
    assert int(parts.sum()) == total
    assert bool(((parts >= 0) & (parts <= capacity)).all())
    ideal = total * torch.tensor(weights, dtype=torch.float64) / max(sum(weights), 1e-9)
    uncapped = (ideal <= capacity).all() and sum(weights) > 0
    if uncapped:  # within one token of the proportional split
        assert bool(((parts - ideal).abs() < 1 + 1e-6).all())


def test_coverage_counts_the_fewest_tokens_reaching_theta():
    psi = torch.tensor([[[0.5, 0.3, 0.1, 0.1, 9.0]]])
    members = torch.tensor([[True, True, True, True, False]])
    assert coverage(psi, members, 0.8).tolist() == [[2]]  # 0.5 + 0.3 = 0.8 of 1.0
    assert coverage(psi, members, 0.81).tolist() == [[3]]
    assert coverage(psi, torch.zeros_like(members), 0.9).tolist() == [[0]]


def test_mpa_splits_each_head_by_its_modality_mass_and_keeps_the_top_of_each():
    seq, window = 20, 2
    modality = torch.zeros(1, seq, dtype=torch.long)
    modality[0, 2:10] = IMAGE  # tokens 2..9 visual; 0, 1, 10..17 text; 18, 19 proxies
    psi = torch.zeros(1, 2, seq)
    psi[0, 0, 2:10] = torch.arange(8, 0, -1) * 0.1  # head 0: visual mass 3.6
    psi[0, 0, 10:18] = torch.arange(1, 9) * 0.0125  # text mass 0.45: 8/9 of the mass is visual
    psi[0, 1, 2:10] = 0.01  # head 1: visual mass 0.08
    psi[0, 1, 10:18] = torch.arange(1, 9) * 0.1  # text mass 3.6 (+ 0.003 below)
    psi[0, 1, :2] = torch.tensor([0.001, 0.002])
    inputs = make_inputs(seq=seq, modality=modality)
    press = FixedImportance(psi, budget=11, window_size=window, hcc=False)  # 11 = 2 proxies + 9 selectable
    head0, head1 = kept_sets(press, inputs)[0]
    assert head0 == [2, 3, 4, 5, 6, 7, 8, 9, 17, 18, 19]  # 8 visual (8/9 of 9), the top text token, proxies
    # 9 * 0.08 / 3.683 = 0.2 visual, 8.8 text: floors 0 and 8, the largest remainder gives text the 9th token
    assert head1 == [1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]


def test_mpa_and_hcc_off_is_plain_proxy_window_top_k():
    inputs = make_inputs(seq=60, seed=3)
    ours = get_press("madakv", budget=0.3, window_size=8, mpa=False, hcc=False)
    snapkv = get_press("snapkv", budget=0.3, window_size=8, kernel_size=1)  # no pooling: the same ranking
    assert kept_sets(ours, inputs) == kept_sets(snapkv, inputs)


def test_text_only_mpa_is_plain_top_k():
    inputs = make_inputs(seq=60, seed=4)
    with_mpa = get_press("madakv", budget=0.3, window_size=8, hcc=False)
    without = get_press("madakv", budget=0.3, window_size=8, hcc=False, mpa=False)
    assert kept_sets(with_mpa, inputs) == kept_sets(without, inputs)


@settings(max_examples=40, deadline=None)
@given(
    seq=st.integers(12, 80),
    budget=st.one_of(st.floats(0.05, 0.95), st.integers(2, 90)),
    layers=st.integers(1, 6),
    window=st.integers(1, 8),
    image_share=st.floats(0, 1),
    seed=st.integers(0, 1000),
    ends=st.sampled_from([0.0, 1.0, 3.0]),
)
def test_hcc_keeps_exactly_the_budget_over_all_layers_and_heads(seq, budget, layers, window, image_share, seed, ends):
    gen = torch.Generator().manual_seed(seed)
    modality = (torch.rand(1, seq, generator=gen) < image_share).long() * IMAGE
    press = get_press("madakv", budget=budget, window_size=window, ends=ends)
    state: dict = {}
    kept = 0
    for layer in range(layers):
        inputs = make_inputs(seq=seq, seed=seed + layer, modality=modality, num_layers=layers, layer_idx=layer)
        inputs.state = state
        selection = press.select(inputs)
        lengths = selection.lengths
        assert bool((lengths >= 1).all()) and bool((lengths <= seq).all())
        if layer < layers - 1 or layers == 1:
            proxies = set(range(seq - min(window, int(lengths.min()) - 1), seq))
            for head in range(2):  # the proxies are kept
                assert proxies <= set(selection.indices[0, head, : lengths[0, head]].tolist())
        kept += int(lengths.sum())
    target = min(budget, seq) if budget > 1 else max(1, int(budget * seq + 1e-9))
    assert kept == layers * 2 * target


@pytest.mark.parametrize("hcc", [True, False])
def test_ends_gives_the_first_and_last_layers_more(hcc):
    """`ends` moves budget from the middle layers to the first and last ones, the total unchanged. HCC off: the
    shares themselves. HCC on: each layer's share caps what its demand may take (at twice the share), so the first
    layer takes more; here every layer's demand exceeds its cap and later ones get what is left."""
    layers, seq = 5, 64
    kept = {}
    for ends in (0.0, 2.0):
        press = get_press("madakv", budget=0.25, window_size=4, ends=ends, hcc=hcc, mpa=False)
        state: dict = {}
        kept[ends] = []
        for layer in range(layers):
            inputs = make_inputs(seq=seq, seed=0, num_layers=layers, layer_idx=layer)
            inputs.state = state
            kept[ends].append(int(press.select(inputs).lengths.sum()))
    flat, ends = kept[0.0], kept[2.0]
    assert abs(sum(ends) - sum(flat)) <= (0 if hcc else layers)
    assert ends[0] > flat[0]
    if not hcc:
        assert ends[-1] > flat[-1] and ends[2] < flat[2]
    with pytest.raises(ValueError, match="ends must be"):
        get_press("madakv", budget=0.25, ends=1.0, literal_hcc=True)


@pytest.mark.parametrize("params", [{}, {"mpa": False}, {"hcc": False}, {"literal_hcc": True}, {"ends": 1.0}])
def test_generate_end_to_end_with_a_modality_map(model, prompt, params):
    modality = torch.zeros_like(prompt)
    modality[0, 5:30] = IMAGE
    press = get_press("madakv", budget=0.25, window_size=8, **params)
    cache = CompressedCache(press)
    out = press.generate(model, input_ids=prompt, modality=modality, past_key_values=cache, max_new_tokens=6)
    assert out.shape[1] == prompt.shape[1] + 6
    prefill_kept = sum(int(layer.kept_lengths().sum()) for layer in cache.layers) - 2 * 2 * 5
    if not params.get("literal_hcc"):
        assert prefill_kept == 2 * 2 * 12  # 2 layers x 2 KV heads x floor(0.25 * 48)


@pytest.mark.parametrize("method", ["madakv", "snapkv", "tova", "pyramidkv", "retentivekv"])
def test_a_padded_row_shorter_than_the_window_keeps_its_exact_budget(method):
    """The window then holds padding queries, which see no key: their attention must count as zero, not NaN."""
    is_real = torch.ones(2, 48, dtype=torch.bool)
    is_real[0, :20] = False  # 28 real tokens, fewer than MadaKV's / SnapKV's window plus what they select
    modality = torch.zeros(2, 48, dtype=torch.long)
    modality[:, 25:36] = IMAGE
    inputs = make_inputs(batch=2, seq=48, is_real=is_real, modality=modality)
    press = get_press(method, 0.5, **({"hcc": False} if method == "madakv" else {}))
    selection = press.select(inputs)
    kept = selection.lengths if method != "pyramidkv" else selection.lengths.float().mean(-1, keepdim=True)
    assert kept[0].tolist() == [14] * kept.shape[1] and kept[1].tolist() == [24] * kept.shape[1]
    for b, h in [(0, 0), (0, 1)]:
        assert all(is_real[b, i] for i in selection.indices[b, h, : selection.lengths[b, h]].tolist())
