"""Ragged decode attention against a naive float64 reference over each row's kept tokens."""

import pytest
import torch

from modalkv.attention import ragged_attention, real_tokens
from modalkv.cache import CompressedCache, take_pending
from modalkv.presses import FullPress
from modalkv.presses.base import Selection


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
    ("lengths", "spans"),
    [
        ([[5, 30, 31], [12, 40, 2]], [None, None]),  # each block's rows interleave: gathers and scatters
        ([[2, 5, 30], [31, 40, 35]], [slice(0, 2), slice(2, 6)]),  # consecutive rows: views
    ],
)
def test_ragged_attention_matches_naive_attention_for_several_blocks_and_queries(lengths, spans):
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, groups, dim, seq, q = 2, 3, 2, 8, 40, 3
    cache = CompressedCache(FullPress())
    keys = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    values = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    cache.update(keys, values, 0)
    take_pending(0)  # this test stores by hand what the attention function would
    layer = cache.layers[0]
    lengths = torch.tensor(lengths)
    order = torch.stack([torch.randperm(seq, generator=gen) for _ in range(batch * kv_heads)]).view(
        batch, kv_heads, seq
    )
    indices = order.sort(dim=-1).values  # any ascending subset per row: take the first `lengths` of a permutation
    for b in range(batch):
        for h in range(kv_heads):
            chosen = order[b, h, : lengths[b, h]].sort().values
            indices[b, h, : len(chosen)] = chosen
    layer.store_prefill(keys, values, Selection(indices, lengths))
    assert [block.span for block in layer.blocks] == spans  # rows of 2-12 and of 30-40 tokens: two padded buffers

    new_keys = torch.randn(batch, kv_heads, q, dim, generator=gen)
    new_values = torch.randn(batch, kv_heads, q, dim, generator=gen)
    layer.append(new_keys, new_values, start_column=seq)
    query = torch.randn(batch, kv_heads * groups, q, dim, generator=gen)
    out, _, _ = ragged_attention(layer, query, scaling=0.3, start_column=seq)

    rows = [
        [
            (
                torch.cat([keys[b, h, indices[b, h, : lengths[b, h]]], new_keys[b, h]]),
                torch.cat([values[b, h, indices[b, h, : lengths[b, h]]], new_values[b, h]]),
                torch.cat([indices[b, h, : lengths[b, h]], torch.arange(seq, seq + q)]),
            )
            for h in range(kv_heads)
        ]
        for b in range(batch)
    ]
    assert out.shape == (batch, q, kv_heads * groups, dim)
    assert torch.allclose(out.double(), naive_attention(query, rows, 0.3), atol=1e-5)


def test_real_tokens_reads_padding_from_bool_and_float_masks():
    key = torch.zeros(2, 1, 4, 2)
    allowed = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool_mask = (causal[None] & allowed[:, None, :])[:, None]
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(real_tokens(bool_mask, key), allowed)
    assert torch.equal(real_tokens(float_mask, key), allowed)
    assert real_tokens(None, key).all()
