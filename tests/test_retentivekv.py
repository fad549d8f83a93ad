"""RetentiveKV: the state recurrence against explicit sums, the read-out against exact attention, ablations and
budgets while decoding."""

import math

import pytest
import torch
from prefill import make_inputs

from modalkv import CompressedCache, get_press
from modalkv.cache import CompressedLayer
from modalkv.kernels import ragged_attention
from modalkv.modality import IMAGE, TEXT, patches_from_grids
from modalkv.presses.base import DecodeView, LeavingTokens
from modalkv.presses.retentivekv import absorb, feature_map, gated_weights


def naive_recurrence(keys, values, injection, retention, order):
    """S <- h_i S + a_i phi(k_i)^T v_i and z <- h_i z + a_i phi(k_i), one absorbed token at a time, in order."""
    dim = keys.shape[-1]
    state, norm = torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    for i in order:
        if injection[i] == 0:
            continue
        phi = feature_map(keys[i]).double()
        state = retention[i] * state + injection[i] * torch.outer(phi, values[i].double())
        norm = retention[i] * norm + injection[i] * phi
    return state, norm


def test_gated_weights_equal_the_recurrence_token_by_token():
    gen = torch.Generator().manual_seed(0)
    seq, dim = 30, 8
    keys, values = torch.randn(seq, dim, generator=gen), torch.randn(seq, dim, generator=gen)
    injection = torch.rand(seq, generator=gen) * (torch.rand(seq, generator=gen) > 0.3)
    retention = 0.5 + 0.5 * torch.rand(seq, generator=gen)
    order = torch.randperm(seq, generator=gen)
    log_retention = retention.log() * (injection > 0)
    absorbed = absorb(keys, values, gated_weights(injection, log_retention, order))
    state, norm = absorbed[:, :dim], absorbed[:, dim]
    ref_state, ref_norm = naive_recurrence(keys, values, injection, retention, order.argsort().tolist())
    assert torch.allclose(state.double(), ref_state, atol=1e-5, rtol=1e-5)
    assert torch.allclose(norm.double(), ref_norm, atol=1e-5, rtol=1e-5)


def multimodal_inputs(seed=0):
    """16 text tokens, a 3 x 4 image, 4 text tokens, a 2 x 2 image, 8 text tokens (the window)."""
    kinds = [TEXT] * 16 + [IMAGE] * 12 + [TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 8
    modality = torch.tensor([kinds])
    inputs = make_inputs(seq=len(kinds), dim=8, seed=seed, modality=modality)
    inputs.patches = patches_from_grids(modality, [[(3, 4), (2, 2)]])
    return inputs


def test_visual_state_is_the_average_of_two_manhattan_weighted_scans():
    press = get_press("retentivekv", budget=0.4, window_size=8, absorb_quantile=0.0, decay_bias=1.0)
    inputs = multimodal_inputs()
    kept = press.select(inputs)
    memory = kept.memory
    keep = torch.zeros(1, 2, inputs.keys.shape[2], dtype=torch.bool)
    for h in range(2):
        keep[0, h, kept.indices[0, h, : kept.lengths[0, h]]] = True
    patches = inputs.patches[0]
    for head in range(2):
        # Reference, written out: per image, the root is the kept patch with the largest alpha (tied: any).
        alpha, entropy, absorbed = reference_scores(press, inputs, keep)
        visual = (inputs.modality[0] != TEXT) & absorbed[head]
        count = absorbed[head].sum()
        a = alpha[head] * absorbed[head] / ((alpha[head] * absorbed[head]).sum() / count)
        mean = (entropy[head] * absorbed[head]).sum() / count
        std = (((entropy[head] - mean) ** 2 * absorbed[head]).sum() / count).sqrt()
        h = torch.sigmoid((entropy[head] - mean) / std + 1.0)
        spatial = torch.zeros_like(a)
        for token in visual.nonzero().flatten().tolist():
            image, row, col = patches[token].tolist()
            members = ((patches[:, 0] == image) & keep[0, head]).nonzero().flatten()
            root = members[alpha[head, members].argmax()]
            distance = abs(row - patches[root, 1].item()) + abs(col - patches[root, 2].item())
            spatial[token] = a[token] * 0.9**distance
        extent = 4
        by_rows = (patches[:, 0] * extent + patches[:, 1]) * extent + patches[:, 2]
        by_cols = (patches[:, 0] * extent + patches[:, 2]) * extent + patches[:, 1]
        keys, values = inputs.keys[0, head], inputs.values[0, head]
        states = [naive_recurrence(keys, values, spatial, h, o.argsort().tolist()) for o in (by_rows, by_cols)]
        state = (states[0][0] + states[1][0]) / 2
        assert torch.allclose(memory["visual"][head, :, :-1].double(), state, atol=1e-4, rtol=1e-4)


def reference_scores(press, inputs, keep):
    """alpha, entropy and the absorbed mask of batch row 0, from the definitions (loops over groups)."""
    seq = inputs.keys.shape[2]
    w = press.window_size
    window = torch.arange(seq) >= seq - w
    alpha = torch.zeros(2, seq)
    for kv in range(2):
        for g in range(2):
            head = kv * 2 + g
            logits = inputs.queries[0, head, -w:] @ inputs.keys[0, kv].T * inputs.scaling
            causal = torch.arange(seq)[None] <= torch.arange(seq - w, seq)[:, None]
            probabilities = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            text = inputs.modality[0, -w:] == TEXT
            alpha[kv] += probabilities[text].mean(0) / 2
    candidates = ~window
    group = torch.where(inputs.modality[0] != TEXT, inputs.patches[0, :, 0] + 1, 0)
    entropy = torch.zeros(2, seq)
    for kv in range(2):
        for g in group.unique():
            members = (group == g) & candidates
            p = alpha[kv, members] / alpha[kv, members].sum()
            entropy[kv, members] = -p * p.log()
    retention = 0.5 * alpha * candidates / (alpha * candidates).amax(-1, keepdim=True) + 0.5 * entropy / entropy.amax(
        -1, keepdim=True
    )
    evicted = candidates & ~keep[0]
    absorbed = torch.zeros_like(evicted)
    for kv in range(2):
        threshold = torch.quantile(retention[kv, evicted[kv]], press.absorb_quantile)
        absorbed[kv] = evicted[kv] & (retention[kv] >= threshold)
    return alpha, entropy, absorbed


def test_convex_read_out_with_identical_absorbed_keys_is_exact_attention_over_all_tokens():
    """Absorbed tokens that share one key are one 'extra key' with their summed mass: the calibrated read-out must
    then give exactly the softmax attention of the window query over every token, evicted ones included."""
    seq, dim = 12, 8
    inputs = make_inputs(heads=1, kv_heads=1, seq=seq, dim=dim, seed=3)
    query = inputs.queries[0, 0, -1]
    low_key = -query / query.norm() * 0.5  # little attention: these tokens are evicted and absorbed
    inputs.keys[0, 0, :8] = low_key
    inputs.keys[0, 0, 8:11] = query / query.norm() * 3  # much attention: kept
    press = get_press(
        "retentivekv", budget=4, window_size=1, absorb_quantile=0.0, decay_bias=40.0, gate_bias=40.0, evict_every=0
    )
    selection = press.select(inputs)
    assert selection.indices[0, 0, : selection.lengths[0, 0]].tolist() == [8, 9, 10, 11]
    layer = CompressedLayer(CompressedCache(press), 0)
    layer.lazy_initialization(inputs.keys, inputs.values)
    layer.seen = seq
    layer.store_prefill(inputs)
    q = inputs.queries[0, :, -1:]  # [R = 1, G * q = 1, D]
    result = ragged_attention(layer.rows, q, inputs.scaling, seq - 1, with_weights=True)
    view = DecodeView(layer.rows, result.weights, layer.memory, num_kv_heads=1, query_groups=1, seen=seq)
    combined = press.read_memory(view, q, result.output, result.log_mass)
    exact = torch.softmax(inputs.keys[0, 0] @ q[0, 0] * inputs.scaling, -1) @ inputs.values[0, 0]
    assert not torch.allclose(result.output[0, 0], exact, atol=1e-3)  # eviction alone loses something
    assert torch.allclose(combined[0, 0], exact, atol=1e-5)


def test_at_full_budget_there_is_no_memory_and_outputs_equal_full(model, prompt):
    reference = get_press("full").generate(model, input_ids=prompt, max_new_tokens=10, do_sample=False)
    press = get_press("retentivekv", budget=1.0)
    cache = CompressedCache(press)
    out = press.generate(model, input_ids=prompt, past_key_values=cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, reference) and cache.memory_bytes() == 0


def decode_logits(model, prompt, press, steps=20):
    cache = CompressedCache(press)
    logits = []
    with press.attach(model), torch.no_grad():
        logits.append(model(prompt, past_key_values=cache, use_cache=True).logits[:, -1])
        for _ in range(steps):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits), cache


def test_a_closed_gate_is_plain_eviction_with_the_same_kept_set(model, prompt):
    plain, plain_cache = decode_logits(model, prompt, get_press("retentivekv", budget=0.25, readout=False))
    closed, closed_cache = decode_logits(model, prompt, get_press("retentivekv", budget=0.25, gate_bias=-1e4))
    reading, _ = decode_logits(model, prompt, get_press("retentivekv", budget=0.25))
    assert closed_cache.kept_positions() == plain_cache.kept_positions()
    assert torch.equal(closed, plain)
    assert (reading - plain).abs().max() > 1e-3  # the read-out does change the outputs


def test_exact_cache_stays_at_budget_and_memory_is_constant_in_sequence_length(model):
    gen = torch.Generator().manual_seed(1)
    sizes = {}
    for length in (40, 120):
        ids = torch.randint(3, 128, (1, length), generator=gen)
        press = get_press("retentivekv", budget=0.25, window_size=8)
        cache = CompressedCache(press)
        press.generate(model, input_ids=ids, past_key_values=cache, max_new_tokens=60, do_sample=False)
        for layer in cache.layers:
            assert layer.kept_lengths().flatten().tolist() == [int(0.25 * length)] * 2
        sizes[length] = cache.memory_bytes()
        dim = model.config.head_dim
        assert sizes[length] == 2 * 2 * (dim * dim + dim + 1) * 4  # layers x KV heads x (one state, norm, scale)
    assert sizes[40] == sizes[120]


def leaving(layer, slots: list[int | None]) -> tuple[DecodeView, LeavingTokens]:
    """A view of `layer` and the tokens at slots[r] of each row r (None: the row releases nothing)."""
    rows = layer.rows
    flat = rows.layout.row_start + torch.tensor([0 if s is None else s for s in slots])
    tokens = LeavingTokens(
        rows.slots["keys"][flat], rows.slots["values"][flat], flat, torch.tensor([s is not None for s in slots])
    )
    return DecodeView(rows, None, layer.memory, 2, 2, layer.seen), tokens


def test_tokens_leaving_while_decoding_join_the_recall_state_by_the_recurrence(model, prompt):
    press = get_press("retentivekv", budget=16, window_size=4)
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    layer = cache.layers[1]
    before = {name: t.clone() for name, t in layer.memory.items()}
    view, tokens = leaving(layer, [3, None])  # row 0 releases slot 3; row 1 nothing
    press.absorb(view, tokens)
    h = 1 / (1 + math.exp(-press.decay_bias))
    expected = h * before["recall"][0] + torch.outer(
        feature_map(tokens.keys[0]), torch.cat([tokens.values[0], torch.ones(1)])
    )
    assert torch.allclose(layer.memory["recall"][0], expected, atol=1e-5)  # the last column: the normaliser
    assert torch.equal(layer.memory["recall"][1], before["recall"][1])


def test_a_leaving_image_patch_joins_the_visual_state_and_a_text_token_the_recall_state(model, prompt):
    modality = torch.zeros_like(prompt)
    modality[0, 4:20] = IMAGE
    press = get_press("retentivekv", budget=16, window_size=4)
    cache = CompressedCache(press, modality=modality)
    with press.attach(model), torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    layer = cache.layers[1]
    assert {"recall", "visual"} <= set(layer.memory)
    padded = layer.rows.padded()
    is_visual = padded["visual"][:, : int(layer.rows.lengths.min())]
    assert bool(is_visual[0].any()) and bool((~is_visual[1]).any())
    visual_slot, text_slot = int(is_visual[0].nonzero()[0]), int((~is_visual[1]).nonzero()[0])
    assert modality[0, padded["columns"][0, visual_slot]] == IMAGE
    before = {name: t.clone() for name, t in layer.memory.items()}
    press.absorb(*leaving(layer, [visual_slot, text_slot]))
    changed = {name: [not torch.equal(layer.memory[name][r], before[name][r]) for r in range(2)] for name in before}
    assert changed["visual"] == [True, False]
    assert changed["recall"] == [False, True]


def test_images_get_a_visual_state_and_text_only_prompts_do_not(model, prompt):
    modality = torch.zeros_like(prompt)
    modality[0, 10:30] = IMAGE
    press = get_press("retentivekv", budget=0.25)
    with_images, text_only = CompressedCache(press, modality=modality), CompressedCache(press)
    press.generate(model, input_ids=prompt, past_key_values=with_images, max_new_tokens=5, do_sample=False)
    press.generate(model, input_ids=prompt, past_key_values=text_only, max_new_tokens=5, do_sample=False)
    assert set(with_images.layers[0].memory) == {"recall", "visual", "log_scale"}
    assert set(text_only.layers[0].memory) == {"recall", "log_scale"}
    single = CompressedCache(get_press("retentivekv", budget=0.25, dual_state=False), modality=modality)
    get_press("retentivekv", budget=0.25, dual_state=False).generate(
        model, input_ids=prompt, past_key_values=single, max_new_tokens=5, do_sample=False
    )
    assert "visual" not in single.layers[0].memory


def test_counting_the_states_in_the_budget_keeps_fewer_tokens():
    inputs = make_inputs(seq=400, dim=8)
    plain = get_press("retentivekv", budget=0.5).select(inputs).lengths
    counted = get_press("retentivekv", budget=0.5, count_state_in_budget=True).select(inputs).lengths
    state_tokens = math.ceil(((8 * 8 + 8) * 4 + 4) / (2 * 8 * 4))
    assert (plain - counted).tolist() == [[state_tokens, state_tokens]]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"combine": "sum"}, "combine must be"),
        ({"attention_weight": 1.5}, "attention_weight must be in"),
        ({"spatial_decay": 0.0}, "spatial_decay must be in"),
        ({"window_size": 0}, "window_size must be"),
    ],
)
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        get_press("retentivekv", budget=0.2, **params)
