"""Every registered press at budget 1.0, then KnormPress, RandomPress, TOVAPress and PyramidKVPress on hand-made
tensors."""

import pytest
import torch
from prefill import kept_sets, make_inputs

from modalkv.presses import PRESSES, get_press
from modalkv.presses.knorm import KnormPress
from modalkv.presses.pyramidkv import PyramidKVPress
from modalkv.presses.random_press import RandomPress
from modalkv.presses.snapkv import SnapKVPress
from modalkv.presses.tova import TOVAPress


@pytest.mark.parametrize("name", PRESSES)
def test_budget_one_keeps_every_real_token(name):
    is_real = torch.tensor([[False] * 3 + [True] * 17, [True] * 20])
    for layer_idx in range(4):
        sets = kept_sets(get_press(name, budget=1.0), make_inputs(batch=2, is_real=is_real, layer_idx=layer_idx))
        assert sets == [[list(range(3, 20))] * 2, [list(range(20))] * 2]


def test_names_and_kvpress_defaults():
    assert [p.name for p in (KnormPress, RandomPress, TOVAPress, PyramidKVPress)] == [
        "knorm",
        "random",
        "tova",
        "pyramidkv",
    ]
    press = PyramidKVPress()
    assert (press.window_size, press.kernel_size, press.pooling, press.beta) == (64, 5, "avg", 20)
    assert RandomPress().seed is None


def test_knorm_keeps_the_lowest_key_norms():
    inputs = make_inputs(kv_heads=2, seq=6, dim=2)
    # Norms, head 0: 5, 1, 2, 0.5, 10, 3.  Head 1: 2, 5, 2, 7, 1, 9 (a tie at 2, both inside the kept set).
    inputs.keys = torch.tensor(
        [
            [[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.5], [6.0, 8.0], [0.0, 3.0]],
            [[0.0, 2.0], [4.0, 3.0], [2.0, 0.0], [0.0, 7.0], [1.0, 0.0], [9.0, 0.0]],
        ]
    )[None]
    assert kept_sets(KnormPress(budget=3), inputs) == [[[1, 2, 3], [0, 2, 4]]]
    assert kept_sets(KnormPress(budget=0.5), inputs) == [[[1, 2, 3], [0, 2, 4]]]


def test_knorm_ignores_padding_even_with_small_keys():
    is_real = torch.tensor([[False, False, True, True, True, True]])
    inputs = make_inputs(kv_heads=1, heads=2, seq=6, dim=1, is_real=is_real)
    inputs.keys = torch.tensor([0.0, 0.0, 4.0, 1.0, 3.0, 2.0]).view(1, 1, 6, 1)
    assert kept_sets(KnormPress(budget=2), inputs) == [[[3, 5]]]


def test_random_seed_is_reproducible_and_seeds_differ():
    inputs = make_inputs(seq=40)
    first = kept_sets(RandomPress(budget=0.5, seed=1), inputs)
    assert kept_sets(RandomPress(budget=0.5, seed=1), inputs) == first
    assert kept_sets(RandomPress(budget=0.5, seed=2), inputs) != first
    assert first[0][0] != first[0][1]  # each KV head draws its own scores


def test_random_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    for seed in (None, 3):
        RandomPress(budget=0.5, seed=seed).select(make_inputs(seq=40))
    assert torch.equal(torch.get_rng_state(), state)


def test_random_without_seed_varies():
    inputs = make_inputs(seq=40)  # two equal draws of 20 among 40 tokens: probability 1 / C(40, 20) per head
    assert kept_sets(RandomPress(budget=20), inputs) != kept_sets(RandomPress(budget=20), inputs)


def test_random_never_keeps_padding():
    is_real = torch.tensor([[False] * 10 + [True] * 20, [True] * 30])
    inputs = make_inputs(batch=2, seq=30, is_real=is_real)
    for seed in range(20):
        sets = kept_sets(RandomPress(budget=0.9, seed=seed), inputs)
        assert [len(head) for head in sets[0]] == [18, 18] and [len(head) for head in sets[1]] == [27, 27]
        assert all(min(head) >= 10 for head in sets[0])


@pytest.mark.parametrize("seed", [True, 1.5, "1"])
def test_random_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed must be an int or None"):
        RandomPress(budget=0.5, seed=seed)


def tova_inputs():
    """Last-query attention = p / 16 per query head, from keys log(p) and one-hot last queries (scaling 1).

    Heads 0, 1 (KV head 0) attend with p = [6, 1, 1, 5, 1, 2]; heads 2, 3 (KV head 1) with [4, 1, 7, .5, 1.5, 2],
    at positions 2..7. Row 1 has two left-padding tokens whose keys would win every head if they were not masked;
    in row 0 they are real tokens with negligible attention.
    """
    p_kv0 = torch.tensor([6.0, 1.0, 1.0, 5.0, 1.0, 2.0])
    p_kv1 = torch.tensor([4.0, 1.0, 7.0, 0.5, 1.5, 2.0])
    keys = torch.zeros(2, 2, 8, 2)
    keys[:, 0, 2:] = p_kv0.log()[:, None]
    keys[:, 1, 2:] = p_kv1.log()[:, None]
    keys[0, :, :2] = -30.0
    keys[1, :, :2] = 10.0
    is_real = torch.tensor([[True] * 8, [False] * 2 + [True] * 6])
    inputs = make_inputs(batch=2, heads=4, kv_heads=2, seq=8, dim=2, is_real=is_real)
    inputs.keys, inputs.scaling = keys, 1.0
    inputs.queries[:, :, -1] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    return inputs, (p_kv0 + p_kv1) / 32


def test_tova_scores_are_the_last_query_attention_averaged_over_all_heads():
    inputs, expected = tova_inputs()
    scores = TOVAPress(budget=3).score(inputs)
    assert torch.allclose(scores[:, :, 2:], expected.expand(2, 2, 6), atol=1e-6)
    assert (scores[1, :, :2] == 0).all()


def test_tova_keeps_the_same_tokens_for_every_kv_head_and_the_last_token():
    inputs, _ = tova_inputs()
    # Averages [10, 2, 8, 5.5, 2.5, 4] / 32 at positions 2..7: the last (7) plus the two best, 2 and 4. Averaged
    # per KV group instead, KV head 0 would keep 2 and 5.
    assert kept_sets(TOVAPress(budget=3), inputs) == [[[2, 4, 7]] * 2] * 2
    # With one slot (floor(0.2 * 8) = floor(0.2 * 6) = 1) the last token wins over the best-scored one.
    assert kept_sets(TOVAPress(budget=0.2), inputs) == [[[7]] * 2] * 2


def kvpress_layer_budget(q_len, target, window_size, beta, num_layers, layer_idx):
    """kvpress 0.5 PyramidKVPress.get_layer_budget, with q_len * (1 - compression_ratio) = target."""
    max_capacity_prompt = window_size + target
    min_num = (max_capacity_prompt - window_size) / beta
    max_num = (max_capacity_prompt - window_size) * 2 - min_num
    if max_num >= q_len - window_size:
        max_num = q_len - window_size
        min_num = (max_capacity_prompt - window_size) * 2 - max_num
    if not (q_len >= max_num >= min_num >= window_size):
        return round(target)
    steps = (max_num - min_num) / (num_layers - 1)
    return round(max_num - layer_idx * steps)


def pyramid_counts(press, is_real):
    """[layer][row] tokens kept, checked equal over the KV heads."""
    counts = []
    for layer in range(4):
        inputs = make_inputs(batch=len(is_real), seq=is_real.shape[1], dim=4, is_real=is_real, layer_idx=layer)
        kept = press.num_kept(inputs)
        assert kept.shape == (len(is_real), 2) and (kept == kept[:, :1]).all()
        counts.append(kept[:, 0].tolist())
    return counts


@pytest.mark.parametrize(
    ("budget", "target", "expected"),
    [
        (0.25, 100, [195, 132, 68, 5]),
        (100, 100, [195, 132, 68, 5]),
        (0.75, 300, [396, 332, 268, 204]),
        (204, 204, [396, 268, 140, 12]),  # 1.95 * 204 = 397.8 >= 400 - 4: layer 0 is capped
    ],
)
def test_pyramidkv_layer_counts(budget, target, expected):
    counts = pyramid_counts(PyramidKVPress(budget=budget, window_size=4), torch.ones(1, 400, dtype=torch.bool))
    assert counts == [[c] for c in expected]
    assert expected == [kvpress_layer_budget(400, target, 4, 20, 4, layer) for layer in range(4)]
    assert sum(expected) == 4 * target and expected == sorted(expected, reverse=True) and expected[-1] >= 4


def test_pyramidkv_budget_per_row():
    # Row 1: 79 pad + 321 real -> floor(0.25 * 321) = 80 tokens on average: 156, 105, 55, 4 (sum 320).
    is_real = torch.tensor([[True] * 400, [False] * 79 + [True] * 321])
    counts = pyramid_counts(PyramidKVPress(budget=0.25, window_size=4), is_real)
    assert counts == [[195, 156], [132, 105], [68, 55], [5, 4]]
    assert [row[1] for row in counts] == [kvpress_layer_budget(321, 80, 4, 20, 4, layer) for layer in range(4)]


def test_pyramidkv_falls_back_to_snapkv_when_the_last_layer_cannot_hold_the_window():
    # min = 10 / 20 < window 4: every layer keeps the SnapKV budget.
    counts = pyramid_counts(PyramidKVPress(budget=10, window_size=4), torch.ones(1, 40, dtype=torch.bool))
    assert counts == [[10]] * 4
    assert [kvpress_layer_budget(40, 10, 4, 20, 4, layer) for layer in range(4)] == [10] * 4
    one_layer = make_inputs(seq=40, layer_idx=0, num_layers=1)  # no pyramid with a single layer
    assert PyramidKVPress(budget=0.25, window_size=4, beta=1).num_kept(one_layer).tolist() == [[10, 10]]


def test_pyramidkv_keeps_the_snapkv_choice_at_each_layer_budget():
    for layer, count in enumerate([195, 132, 68, 5]):
        inputs = make_inputs(seq=400, dim=4, layer_idx=layer)
        sets = kept_sets(PyramidKVPress(budget=0.25, window_size=4), inputs)
        assert sets == kept_sets(SnapKVPress(budget=count, window_size=4), inputs)
        assert all(len(head) == count and head[-4:] == [396, 397, 398, 399] for head in sets[0])


@pytest.mark.parametrize("beta", [0, -1, 2.0, True])
def test_pyramidkv_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be"):
        PyramidKVPress(budget=0.5, beta=beta)
