"""Ragged decode attention against a naive float64 reference over each row's kept tokens."""

import pytest
import torch
import torch.nn.functional as F

from modalkv.attention import real_tokens, sdpa_with_sinks, windowed_attention
from modalkv.kernels import ragged_attention
from modalkv.storage import RaggedRows


def naive_attention(query, rows, scaling):
    """query: [B, H, q, D]; rows[b][h] = (keys [L, D], values [L, D], columns [L]); new tokens are the last q."""
    batch, num_heads, q, dim = query.shape
    kv_heads = len(rows[0])
    out = torch.empty(batch, q, num_heads, dim, dtype=torch.float64)
    for b in range(batch):
        for head in range(num_heads):
            keys, values, columns = rows[b][head // (num_heads // kv_heads)]
            for i in range(q):
                visible = columns <= columns[-q + i]
                logits = (keys[visible].double() @ query[b, head, i].double()) * scaling
                out[b, i, head] = logits.softmax(-1) @ values[visible].double()
    return out


@pytest.mark.parametrize(
    "lengths",
    [
        [[5, 30, 31], [12, 40, 2]],  # ragged: paged rows, one combine per row
        [[20, 20, 20], [20, 20, 20]],  # alike: one page per row, plain sdpa
    ],
)
@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("with_weights", [False, True])
def test_ragged_attention_matches_naive_attention(lengths, q, with_weights):
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, seq = 2, 3, 2, 8, 40
    keys = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    values = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    lengths = torch.tensor(lengths)
    # Any subset per row, in any order (slot order carries no meaning).
    indices = torch.stack([torch.randperm(seq, generator=gen) for _ in range(batch * kv_heads)])
    flat_keys, flat_values = keys.reshape(-1, seq, dim), values.reshape(-1, seq, dim)
    kept = {
        "keys": flat_keys.gather(1, indices[..., None].expand(-1, -1, dim)),
        "values": flat_values.gather(1, indices[..., None].expand(-1, -1, dim)),
        "columns": indices.int(),
    }
    rows = RaggedRows.build(kept, lengths.flatten(), None, reserve=16)
    assert (rows.uniform_length is None) == (len(set(lengths.flatten().tolist())) > 1)
    new_keys = torch.randn(batch, kv_heads, q, dim, generator=gen)
    new_values = torch.randn(batch, kv_heads, q, dim, generator=gen)
    new = {"keys": new_keys.reshape(-1, dim), "values": new_values.reshape(-1, dim)}
    rows.append(new, start_column=seq, fill={})
    query = torch.randn(batch, kv_heads * groups, q, dim, generator=gen)
    columns = torch.arange(seq, seq + q, dtype=torch.int32).repeat(groups) if q > 1 else seq
    result = ragged_attention(rows, query.reshape(batch * kv_heads, groups * q, dim), 0.3, columns, with_weights)
    out = result.output.view(batch, num_heads := kv_heads * groups, q, dim).transpose(1, 2)

    stored = [
        [
            (
                torch.cat([keys[b, h, indices[b * kv_heads + h, : lengths[b, h]]], new_keys[b, h]]),
                torch.cat([values[b, h, indices[b * kv_heads + h, : lengths[b, h]]], new_values[b, h]]),
                torch.cat([indices[b * kv_heads + h, : lengths[b, h]], torch.arange(seq, seq + q)]),
            )
            for h in range(kv_heads)
        ]
        for b in range(batch)
    ]
    assert out.shape == (batch, q, num_heads, dim)
    assert torch.allclose(out.double(), naive_attention(query, stored, 0.3), atol=1e-5)
    if with_weights:  # the weights of each row's slots sum to one per query; log-masses are finite
        holds = rows.holds() if rows.uniform_length is None else torch.ones(result.weights.shape[0], 1, dtype=bool)
        assert torch.all(result.weights[~holds[:, None, :].expand_as(result.weights)] == 0)
        totals = torch.zeros(batch * kv_heads, groups * q).index_add_(0, rows.layout.page_row, result.weights.sum(-1))
        assert torch.allclose(totals, torch.ones_like(totals), atol=1e-5)
        assert torch.isfinite(result.log_mass).all()


def test_alike_rows_keep_cudnn_attention_out_of_decoding(monkeypatch):
    """cuDNN builds a plan per shape (~62 ms of host time on an H200) and a decoding step's key length is new every
    step: the alike-row sdpa must run with cuDNN excluded (on a CPU the flag is all that can be seen)."""
    import modalkv.kernels

    seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(modalkv.kernels.F, "scaled_dot_product_attention", recording_sdpa)
    gen = torch.Generator().manual_seed(0)
    kept = {name: torch.randn(4, 20, 8, generator=gen) for name in ("keys", "values")}
    kept["columns"] = torch.arange(20, dtype=torch.int32).expand(4, -1)
    rows = RaggedRows.build(kept, torch.full((4,), 20), None, reserve=4)
    rows.append({name: torch.randn(4, 8, generator=gen) for name in ("keys", "values")}, start_column=20, fill={})
    ragged_attention(rows, torch.randn(4, 2, 8, generator=gen), 0.3, 20)
    assert seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored for everything else


def test_real_tokens_reads_padding_from_bool_and_float_masks():
    key = torch.zeros(2, 1, 4, 2)
    allowed = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool_mask = (causal[None] & allowed[:, None, :])[:, None]
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(real_tokens(bool_mask, key), allowed)
    assert torch.equal(real_tokens(float_mask, key), allowed)
    assert real_tokens(None, key).all()


def sliding_mask(batch: int, seq: int, kv_len: int, window: int, padding: list[int], images: list[tuple[int, int]]):
    """[B, 1, seq, kv_len] bool: causal within `window` (the last `seq` keys are the queries'), left `padding` per row
    unseen, and each (start, end) column range an image whose tokens see each other inside the window (Gemma 3)."""
    columns = torch.arange(kv_len)
    rows = columns[-seq:, None]
    distance = rows - columns[None]
    allowed = (distance >= 0) & (distance < window)
    for start, end in images:
        inside = (rows >= start) & (rows < end) & (columns[None] >= start) & (columns[None] < end)
        allowed |= inside & (distance.abs() < window)
    real = columns[None] >= torch.tensor(padding)[:, None]  # [B, K]
    return (allowed[None] & real[:, None, :])[:, None]


@pytest.mark.parametrize("images", [[], [(30, 52)]])
@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("additive", [False, True])
def test_windowed_attention_equals_attention_over_every_key(images, past, with_sinks, additive):
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, dim, seq, window = 2, 4, 2, 8, 70, 9
    kv_len = seq + past
    query = torch.randn(batch, heads, seq, dim, generator=gen)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    value = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    mask = sliding_mask(batch, seq, kv_len, window, padding=[0, 11], images=images)
    real = mask[:, 0].any(-1)  # [B, seq]: queries that see something (a padding query's output is undefined)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    sinks = torch.randn(heads, generator=gen)

    def attend(query, key, value, mask):
        if with_sinks:
            return sdpa_with_sinks(query, key, value, mask, 0.3, sinks)
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.3, enable_gqa=True)
        return output.transpose(1, 2)

    expected = attend(query, key, value, mask)
    windowed = windowed_attention(attend, query, key, value, mask, window)
    assert windowed.shape == expected.shape
    torch.testing.assert_close(windowed[real], expected[real], rtol=1e-5, atol=1e-5)
