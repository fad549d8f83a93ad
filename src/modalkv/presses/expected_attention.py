from dataclasses import dataclass

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.scoring import sink_tokens


def rotary_tables(config, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] of the model's RoPE (transformers' rotate-half layout, attention scaling included) at
    `positions` [...], from its config as its rotary embedding computes them."""
    params, layer_type = config.rope_parameters, None
    if "full_attention" in params:  # RoPE per layer type (Gemma 3): presses compress the full-attention layers
        layer_type, params = "full_attention", params["full_attention"]
    if "mrope_section" in params:
        raise ValueError("expected_attention needs 1-D rotary positions; a 3-D (multimodal) RoPE is not supported")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
        inv_freq, scaling = 1.0 / params["rope_theta"] ** exponents, 1.0
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, positions.device, layer_type=layer_type)
    if 2 * inv_freq.numel() != head_dim:
        raise ValueError("expected_attention needs RoPE over the whole head (no partial rotary factor)")
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@dataclass
class ExpectedAttentionPress(Press):
    """Expected Attention: keeps the tokens that the queries still to come are expected to attend to, weighted by
    their value norms; the first `n_sink` tokens are always kept.

    Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
    Distribution", https://arxiv.org/abs/2510.00636. As kvpress 0.5.5 (`expected_attention_press.py`, defaults
    `n_future_positions=512`, `n_sink=4`, `use_covariance=True`, `use_vnorm=True`, `epsilon=0.0`): the prompt's
    queries before RoPE (sinks left out) give a mean mu and covariance Sigma per query head; both are moved by R, the
    RoPE rotation averaged over the next `n_future_positions` positions; each non-sink key scores softmax_k(R mu . k
    / sqrt(d) + k^T R Sigma R^T k / 2d), averaged over the KV group's query heads, times (score + epsilon) * ||v||.

    Our resolution: kvpress recomputes pre-RoPE queries from the layer's hidden states; a press sees the rotated
    queries, so we rotate them back with the positions generate() gives a prompt (0, 1, ... over each row's real
    tokens) and the RoPE of the model's config (default and transformers' scaled types; 3-D multimodal RoPE and
    partial rotary are refused with an error). Padding is left out of the statistics and of the softmax.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    name = "expected_attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be >= 1, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        return sink_tokens(inputs.is_real, self.n_sink)

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        batch, num_heads, seq, dim = inputs.queries.shape
        groups = num_heads // inputs.num_kv_heads
        config = inputs.module.config
        positions = (inputs.is_real.long().cumsum(-1) - 1).clamp(min=0)  # [B, S]
        cos, sin = rotary_tables(config, positions, dim)  # [B, S, D]
        scale = cos[..., :1] ** 2 + sin[..., :1] ** 2  # the RoPE's attention scaling, squared
        rotated = inputs.queries.float()
        queries = (rotated * cos[:, None] - rotate_half(rotated) * sin[:, None]) / scale[:, None]  # before RoPE
        observed = (inputs.is_real & ~self.always_kept(inputs))[:, None, :, None].float()  # [B, 1, S, 1]
        count = observed.sum(2, keepdim=True).clamp(min=1)
        mean = (queries * observed).sum(2, keepdim=True) / count  # [B, H, 1, D]
        future = inputs.is_real.sum(-1, keepdim=True) + torch.arange(self.n_future_positions, device=positions.device)
        cos, sin = rotary_tables(config, future, dim)  # [B, n, D]
        eye = torch.eye(dim, device=cos.device)
        swap = rotate_half(eye).T  # P, with P x = rotate_half(x)
        rotation = (cos.mean(1)[:, :, None] * eye + sin.mean(1)[:, :, None] * swap)[:, None]  # [B, 1, D, D]
        keys = inputs.keys.float().repeat_interleave(groups, dim=1)  # [B, H, S, D]
        logits = keys @ (rotation @ mean.transpose(-1, -2)) / dim**0.5  # [B, H, S, 1]
        if self.use_covariance:
            centred = (queries - mean) * observed
            covariance = rotation @ (centred.transpose(-1, -2) @ centred / count) @ rotation.transpose(-1, -2)
            logits = logits + ((keys @ covariance) * keys).sum(-1, keepdim=True) / dim / 2
        candidates = inputs.is_real & ~self.always_kept(inputs)
        logits = logits[..., 0].masked_fill(~candidates[:, None], float("-inf"))
        scores = logits.softmax(dim=-1).nan_to_num_(0.0).view(batch, inputs.num_kv_heads, groups, seq).mean(2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * inputs.values.float().norm(dim=-1)
        return scores
