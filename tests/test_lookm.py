"""LOOK-M: text-prior eviction and key-similarity merging, on hand-made tensors and end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from modalkv import CompressedCache, get_press
from modalkv.modality import IMAGE, TEXT, VIDEO
from modalkv.presses.base import PrefillInputs
from modalkv.presses.scoring import accumulated_attention

CODES = {"T": TEXT, "I": IMAGE, "V": VIDEO}


def make_inputs(modality=None, is_real=None, batch=1, kv_heads=2, groups=2, seq=12, dim=4, seed=0) -> PrefillInputs:
    if modality is not None:  # one string per row, one letter per token: "TIIT" = text, image, image, text
        modality = torch.tensor([[CODES[c] for c in row] for row in modality])
        batch, seq = modality.shape
    gen = torch.Generator().manual_seed(seed)
    return PrefillInputs(
        module=None,
        layer_idx=0,
        queries=torch.randn(batch, kv_heads * groups, seq, dim, generator=gen),
        keys=torch.randn(batch, kv_heads, seq, dim, generator=gen),
        values=torch.randn(batch, kv_heads, seq, dim, generator=gen),
        is_real=torch.ones(batch, seq, dtype=torch.bool) if is_real is None else is_real,
        scaling=1 / math.sqrt(dim),
        modality=modality,
    )


def kept_sets(selection):
    indices, lengths = selection.indices, selection.lengths
    return [[indices[b, h, : lengths[b, h]].tolist() for h in range(lengths.shape[1])] for b in range(len(lengths))]


def fix_scores(monkeypatch, scores):
    """Replaces the accumulated attention with hand-made scores [B, H_kv, S]."""
    scores = torch.tensor(scores, dtype=torch.float32)
    monkeypatch.setattr("modalkv.presses.lookm.accumulated_attention", lambda inputs: scores)


def test_text_first_then_top_images_then_window(monkeypatch):
    # Budget 0.5. Row 0: L = 12, M = 6 // 2 = 3, N = 3; 5 text tokens outside the window eat all of N (and more):
    # the high-scoring images 2, 4 are evicted and the row keeps 5 + 3 = 8 > N + M.
    # Row 1: 2 padding tokens, L = 10, M = 2, N = 3; one text token outside the window, so 2 images join.
    modality = ["TTITITIITIII", "TTTIIIIIIIIT"]
    is_real = torch.tensor([[True] * 12, [False] * 2 + [True] * 10])
    row0 = [0, 0, 9, 0, 9, 0, 1, 2, 0, 0, 0, 0]
    fix_scores(
        monkeypatch,
        [[row0, row0], [[99, 99, 0, 5, 1, 7, 2, 3, 0, 9, 9, 0], [99, 99, 0, 1, 6, 2, 8, 0, 3, 0, 0, 0]]],
    )
    selection = get_press("lookm", budget=0.5).select(make_inputs(modality, is_real))
    assert kept_sets(selection) == [
        [[0, 1, 3, 5, 8, 9, 10, 11]] * 2,
        [[2, 5, 9, 10, 11], [2, 4, 6, 10, 11]],  # per KV head; padding 0, 1 never kept despite its score
    ]
    assert selection.lengths.tolist() == [[8, 8], [5, 5]]


def test_video_tokens_are_evictable_like_images(monkeypatch):
    fix_scores(monkeypatch, [[[0, 5, 1, 2, 0, 0]] * 2])
    selection = get_press("lookm", budget=4).select(make_inputs(["TVVIIT"]))  # M = 2, N = 2
    assert kept_sets(selection) == [[[0, 1, 4, 5]] * 2]


def test_uses_h2o_accumulated_attention():
    inputs = make_inputs(["T" + "I" * 19], seq=20)
    scores = accumulated_attention(inputs)[0]  # [H_kv, S]
    selection = get_press("lookm", budget=0.4, merge="none").select(inputs)  # M = 4, N = 4: text + 3 images
    for head, kept in enumerate(kept_sets(selection)[0]):
        top = scores[head, 1:16].topk(3).indices + 1
        assert kept == sorted([0, *top.tolist(), 16, 17, 18, 19])


def test_text_only_prompt_keeps_every_real_token():
    is_real = torch.tensor([[False] * 4 + [True] * 8, [True] * 12])
    for modality in (None, ["T" * 12] * 2):
        inputs = make_inputs(modality, is_real, batch=2)
        selection = get_press("lookm", budget=0.2).select(inputs)
        assert kept_sets(selection) == [[list(range(4, 12))] * 2, [list(range(12))] * 2]
        assert selection.keys is None  # nothing evicted, nothing merged


def test_budget_one_keeps_everything():
    selection = get_press("lookm", budget=1.0).select(make_inputs(["I" * 11], seq=11))
    assert kept_sets(selection) == [[list(range(11))] * 2]


def test_budget_split_and_explicit_alphas():
    num_real = torch.tensor([100, 105, 12, 1])
    important, recent = get_press("lookm", budget=0.2).split(num_real)
    assert (important.tolist(), recent.tolist()) == ([10, 11, 1, 1], [10, 10, 1, 0])
    important, recent = get_press("lookm", budget=7).split(num_real)
    assert (important.tolist(), recent.tolist()) == ([4, 4, 4, 1], [3, 3, 3, 0])
    important, recent = get_press("lookm", budget=0.2, hh_ratio=0.3, recent_ratio=0.05).split(num_real)
    assert (important.tolist(), recent.tolist()) == ([30, 31, 3, 0], [5, 5, 0, 1])  # at least one token kept


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hh_ratio": 1.5}, "hh_ratio must be a ratio in \\[0, 1\\] or None"),
        ({"recent_ratio": -0.1}, "recent_ratio must be a ratio in \\[0, 1\\] or None"),
        ({"merge": "max"}, "merge must be one of pivotal, average, weighted, none, got 'max'"),
        ({"evict_every": 1}, "lookm defines no decode-time eviction"),
    ],
)
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        get_press("lookm", budget=0.2, **params)


def reference_merge(keys, values, kept, merge):
    """Paper Eq. 9-12 for one batch row, written out token by token. keys, values: [H, S, D]; kept: [set per head].
    average/weighted merge only tokens whose best similarity (averaged over the heads evicting them) reaches the
    mean best similarity over all (head, evicted token) pairs."""
    heads, seq, _ = keys.shape
    match = {}  # (head, evicted token) -> (closest kept token, its cosine similarity)
    for h in range(heads):
        for i in set(range(seq)) - kept[h]:
            sims = {j: float(F.cosine_similarity(keys[h, i], keys[h, j], dim=0)) for j in kept[h]}
            best = max(sims, key=sims.get)
            match[h, i] = (best, sims[best])
    merging = set(match)
    if merge != "pivotal":
        threshold = sum(s for _, s in match.values()) / len(match)
        per_token = {i: [s for (_, t), (_, s) in match.items() if t == i] for _, i in match}
        merging = {(h, i) for h, i in match if sum(per_token[i]) / len(per_token[i]) >= threshold}
    out = []
    for tensor in (keys, values):
        tensor = tensor.clone()
        for h in range(heads):
            for c in kept[h]:
                group = [i for (hh, i) in merging if hh == h and match[h, i][0] == c]
                own = tensor[h, c].clone()
                if merge == "pivotal":
                    parts = [(tensor[h, i] + own) / 2 for i in group]
                elif merge == "average":
                    parts = [tensor[h, i] for i in group]
                else:
                    parts = [match[h, i][1] * tensor[h, i] for i in group]
                tensor[h, c] = (own + sum(parts, torch.zeros_like(own))) / (len(group) + 1)
        out.append(tensor)
    return out, merging, match


@pytest.mark.parametrize("merge", ["pivotal", "average", "weighted"])
def test_merged_keys_and_values_follow_the_paper(monkeypatch, merge):
    # Per-head scores, so the heads keep different images. M = N = 3: window 9-11, text 0, 2 images per head.
    fix_scores(monkeypatch, [[[0, 9, 8, 0, 1, 2, 0, 3, 0, 1, 0, 0], [0, 0, 1, 7, 0, 2, 9, 0, 3, 0, 0, 0]]])
    inputs = make_inputs(["T" + "I" * 11], dim=3, seed=3)
    selection = get_press("lookm", budget=0.5, merge=merge).select(inputs)
    kept = [set(head) for head in kept_sets(selection)[0]]
    assert kept == [{0, 1, 2, 9, 10, 11}, {0, 3, 6, 9, 10, 11}]
    (keys, values), merging, match = reference_merge(inputs.keys[0], inputs.values[0], kept, merge)
    assert len({c for c, _ in match.values()}) < len(match)  # many-to-one: some kept token takes several
    if merge != "pivotal":
        assert 0 < len(merging) < len(match)  # the similarity filter drops some evicted tokens, not all
    torch.testing.assert_close(selection.keys[0], keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(selection.values[0], values, rtol=0, atol=1e-6)
    assert not torch.equal(selection.keys, inputs.keys)


def test_pivotal_merge_by_hand(monkeypatch):
    # One head: kept 0 (text), 3 (window); evicted 1 -> 0 and 2 -> 0 (cosine 1 and 0.8 against 0 and 0.6 vs 3).
    fix_scores(monkeypatch, [[[0, 0, 0, 0]]])
    inputs = make_inputs(["TIII"], kv_heads=1, dim=2)
    inputs.keys = torch.tensor([[[[1.0, 0.0], [2.0, 0.0], [4.0, 3.0], [0.0, 1.0]]]])
    inputs.values = torch.tensor([[[[1.0, 1.0], [3.0, 3.0], [5.0, 7.0], [9.0, 9.0]]]])
    selection = get_press("lookm", budget=2).select(inputs)  # M = 1, N = 1 (spent on the text token)
    assert kept_sets(selection) == [[[0, 3]]]
    # k_0 <- (k_0 + (k_1 + k_0) / 2 + (k_2 + k_0) / 2) / 3
    assert selection.keys[0, 0, 0].tolist() == pytest.approx([(1 + 1.5 + 2.5) / 3, 0.5])
    assert selection.values[0, 0, 0].tolist() == pytest.approx([(1 + 2 + 3) / 3, (1 + 2 + 4) / 3])
    assert selection.keys[0, 0, 3].tolist() == [0.0, 1.0]  # nothing matched: unchanged


def test_merge_none_stores_the_original_keys_and_values(monkeypatch):
    fix_scores(monkeypatch, [[[0, 9, 8, 0, 1, 2, 0, 3, 0, 1, 0, 0]] * 2])
    selection = get_press("lookm", budget=0.5, merge="none").select(make_inputs(["T" + "I" * 11]))
    assert selection.keys is None and selection.values is None
    assert selection.lengths.tolist() == [[6, 6]]


def two_rows_with_images(prompt):
    """Row 0: 48 tokens, text 0-7 and 40-47, images between; row 1: 8 padding tokens, text 8-11, images after."""
    input_ids = torch.cat([prompt, torch.cat([torch.zeros(1, 8, dtype=torch.long), prompt[:, 8:]], dim=1)])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :8] = 0
    modality = torch.full_like(input_ids, IMAGE)
    modality[0, :8] = modality[0, 40:] = modality[1, :12] = TEXT
    return input_ids, attention_mask, modality


@pytest.mark.parametrize("merge", ["pivotal", "none"])
def test_end_to_end_kept_counts_and_stored_keys(model, prompt, merge):
    input_ids, attention_mask, modality = two_rows_with_images(prompt)
    press = get_press("lookm", budget=0.25, merge=merge)
    cache = CompressedCache(press, modality=modality)
    out = press.generate(
        model, input_ids=input_ids, attention_mask=attention_mask, modality=modality, past_key_values=cache,
        max_new_tokens=8, do_sample=False,
    )  # fmt: skip
    assert out.shape == (2, 56)
    # Row 0: L = 48, M = N = 6, 10 text tokens outside the window -> 10 + 6. Row 1: L = 40, M = N = 5,
    # 4 text tokens outside the window -> 4 + 1 image + 5. Plus 7 generated tokens (the 8th is never fed).
    expected = torch.tensor([[16 + 7] * 2, [10 + 7] * 2])
    assert all(torch.equal(layer.kept_lengths(), expected) for layer in cache.layers)
    full = DynamicCache()
    with torch.no_grad():
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        model(input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=full, use_cache=True)
    changed = False
    for layer, reference in zip(cache.layers, full.layers, strict=True):
        padded, lengths = layer.rows.padded(), layer.rows.lengths.tolist()
        for row, length in enumerate(lengths):
            num_prompt = length - 7  # the prompt's kept tokens come first, then the new ones
            columns = padded["columns"][row, :num_prompt].long()
            stored = padded["keys"][row, :num_prompt]
            original = reference.keys[row // 2, row % 2, columns]
            changed |= not torch.allclose(stored, original, atol=1e-6)
            if merge == "none":
                torch.testing.assert_close(stored, original, rtol=0, atol=1e-6)
    assert changed == (merge == "pivotal")


def test_wrong_modality_shape_is_named(model, prompt):
    with pytest.raises(ValueError, match=r"modality map has shape \(1, 47\) but the prompt is 1 x 48 tokens"):
        get_press("lookm", budget=0.25).generate(
            model, input_ids=prompt, modality=torch.zeros(1, 47, dtype=torch.long), max_new_tokens=8
        )
