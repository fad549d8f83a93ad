"""Ragged decode attention against a naive float64 reference over each row's kept tokens."""

import pytest
import torch

from modalkv.attention import real_tokens
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


def test_real_tokens_reads_padding_from_bool_and_float_masks():
    key = torch.zeros(2, 1, 4, 2)
    allowed = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    bool_mask = (causal[None] & allowed[:, None, :])[:, None]
    float_mask = torch.zeros(bool_mask.shape).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(real_tokens(bool_mask, key), allowed)
    assert torch.equal(real_tokens(float_mask, key), allowed)
    assert real_tokens(None, key).all()
