"""ExpectedAttentionPress on hand-made tensors: kvpress 0.5.5's formula on pre-RoPE queries, from rotated ones."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from architectures import IMAGES, PROMPT, build
from prefill import kept_sets, make_inputs
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from modalkv import CompressedCache, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.modality import IMAGE, TEXT
from modalkv.multimodal import encode_multimodal
from modalkv.presses import ExpectedAttentionPress

CONFIG = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)


def rotated_inputs(seq: int, pad: int = 0, seed: int = 0):
    """Inputs whose queries and keys are rotated by Llama's RoPE at positions 0.. over the real tokens; returns them
    with the pre-RoPE queries [B, H, S, D]."""
    inputs = make_inputs(seq=seq + pad, dim=8, seed=seed, is_real=torch.tensor([[False] * pad + [True] * seq]))
    inputs.module = SimpleNamespace(config=CONFIG)
    positions = (torch.arange(seq + pad) - pad).clamp(min=0)[None]
    cos, sin = LlamaRotaryEmbedding(CONFIG)(inputs.keys, positions)
    pre_rope = inputs.queries.clone()
    inputs.queries, inputs.keys = apply_rotary_pos_emb(inputs.queries, inputs.keys, cos, sin)
    return inputs, pre_rope


def kvpress_scores(inputs, pre_rope, n_future=512, n_sink=4) -> torch.Tensor:
    """kvpress 0.5.5 ExpectedAttentionPress.score (batch 1, no padding), from the pre-RoPE queries."""
    seq, dim = pre_rope.shape[2], pre_rope.shape[3]
    queries = pre_rope[:, :, n_sink:]
    mu = queries.mean(dim=2, keepdim=True)
    cov = torch.einsum("bnsi,bnsj->bnij", queries - mu, queries - mu) / queries.shape[2]
    cos, sin = LlamaRotaryEmbedding(CONFIG)(mu, torch.arange(seq, seq + n_future)[None])
    cos, sin = cos[0], sin[0]
    eye, swap = torch.eye(dim), torch.zeros(dim, dim)
    swap[dim // 2 :, : dim // 2], swap[: dim // 2, dim // 2 :] = torch.eye(dim // 2), -torch.eye(dim // 2)
    rotation = (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * swap).mean(dim=0)
    mu, cov = torch.matmul(mu.squeeze(2), rotation.T), torch.matmul(rotation, torch.matmul(cov, rotation.T))
    keys = inputs.keys[:, :, n_sink:].repeat_interleave(2, dim=1).transpose(2, 3)
    scores = torch.matmul(mu.unsqueeze(2), keys).squeeze(2) / math.sqrt(dim)
    scores += torch.einsum("bhin, bhij, bhjn->bhn", keys, cov, keys) / dim / 2
    scores = F.softmax(scores, dim=-1).view(1, 2, 2, seq - n_sink).mean(dim=2)
    return scores * inputs.values[:, :, n_sink:].norm(dim=-1)


def test_scores_equal_kvpress_from_the_pre_rope_queries():
    inputs, pre_rope = rotated_inputs(seq=40)
    press = get_press("expected_attention", budget=0.3)
    ours = press.score(inputs)
    assert torch.allclose(ours[..., 4:], kvpress_scores(inputs, pre_rope), atol=1e-6)
    kept = kept_sets(press, inputs)[0]
    expected = kvpress_scores(inputs, pre_rope)[0].topk(12 - 4).indices + 4
    assert kept == [[0, 1, 2, 3, *sorted(head.tolist())] for head in expected]


def test_left_padding_changes_nothing():
    alone, _ = rotated_inputs(seq=30, seed=2)
    padded, _ = rotated_inputs(seq=30, pad=5, seed=2)
    padded.queries[..., 5:, :], padded.keys[..., 5:, :] = alone.queries, alone.keys
    padded.values[..., 5:, :] = alone.values
    press = get_press("expected_attention", budget=0.4)
    assert kept_sets(press, padded) == [[[p + 5 for p in head] for head in kept_sets(press, alone)[0]]]


def test_without_covariance_or_value_norms():
    inputs, _ = rotated_inputs(seq=40, seed=3)
    plain = get_press("expected_attention", budget=0.3, use_covariance=False, use_vnorm=False).score(inputs)
    assert torch.allclose(plain[..., 4:].sum(-1), torch.ones(1, 2))  # a softmax over the non-sink tokens


class Probe(ExpectedAttentionPress):
    """Keeps what the first layer's scoring saw: its pre-RoPE queries and next positions."""

    def score(self, inputs):
        if inputs.layer_idx == 0:
            self.seen = self.pre_rope_queries(inputs)
        return super().score(inputs)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
def test_a_3d_rope_image_prompt_is_unrotated_exactly(name):
    """Qwen's image tokens have (temporal, height, width) positions only the model computes: read from its rotary
    embedding while attached, they give back the queries before RoPE, and the future starts after the largest."""
    model, processor = build(name)
    inputs = encode_multimodal(model, processor, PROMPT, IMAGES)
    plain = {k: v for k, v in inputs.items() if k not in ("modality", "patches")}
    attention = model.get_decoder().layers[0].self_attn
    captured = []
    last = getattr(attention, "q_norm", attention.q_proj)  # Qwen3's queries are normalised before RoPE
    hook = last.register_forward_hook(lambda module, args, output: captured.append(output))
    press = Probe(budget=0.5)
    try:
        with press.using(model), press.attach(model), torch.no_grad():
            model(**plain, **{CACHE_KWARG: CompressedCache(press, inputs["modality"], inputs["patches"])})
    finally:
        hook.remove()
    batch, seq = captured[0].shape[:2]
    expected = captured[0].reshape(batch, seq, -1, attention.head_dim).transpose(1, 2)
    queries, next_position = press.seen
    torch.testing.assert_close(queries, expected.float(), rtol=1e-4, atol=1e-5)
    keys = ("mm_token_type_ids", "image_grid_thw", "attention_mask")
    positions, _ = model.model.get_rope_index(inputs["input_ids"], **{k: inputs[k] for k in keys if k in inputs})
    assert next_position.tolist() == (positions.amax(dim=(0, 2)) + 1).tolist()
    assert not torch.equal(positions[0], positions[1])  # the prompt's positions really are 3-D


def test_an_image_prompt_with_3d_rope_needs_the_press_attached():
    inputs, _ = rotated_inputs(seq=20)
    rope = {"rope_type": "default", "rope_theta": 500.0, "mrope_section": [2]}
    inputs.module = SimpleNamespace(config=SimpleNamespace(rope_parameters=rope))
    inputs.modality = torch.zeros(1, 20, dtype=torch.long)
    inputs.modality[0, 5:9] = IMAGE
    with pytest.raises(ValueError, match="3-D RoPE positions"):
        get_press("expected_attention", budget=0.5).score(inputs)
    inputs.modality[:] = TEXT  # a text prompt's three positions are equal: its own tables serve
    get_press("expected_attention", budget=0.5).score(inputs)
