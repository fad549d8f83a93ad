from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from modalkv.modality import TEXT
from modalkv.presses.base import PrefillInputs, Press
from modalkv.presses.scoring import sink_tokens


def rope_parameters(config) -> dict:
    """The RoPE parameters of the layers presses compress (Gemma 3 has one set per layer type: the full-attention's)."""
    params = config.rope_parameters
    return params.get("full_attention", params)


def is_multimodal_rope(config) -> bool:
    """Whether the model rotates by 3-D positions (temporal, height, width: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    return "mrope_section" in rope_parameters(config)


def rotary_tables(config, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] of the model's RoPE (transformers' rotate-half layout, attention scaling included) at
    `positions` [...], from its config as its rotary embedding computes them. A 3-D (multimodal) RoPE: the tables of
    tokens whose three positions are equal (text), for which its sections do not matter."""
    params = rope_parameters(config)
    layer_type = "full_attention" if "full_attention" in config.rope_parameters else None
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
    tokens) and the RoPE of the model's config (default and transformers' scaled types; partial rotary is refused
    with an error). A 3-D (multimodal) RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) gives image tokens positions that only
    the model computes: while the press is attached (`using`), a hook on the language model's rotary embedding keeps
    the prompt's own positions and tables, which undo the rotation exactly; future tokens are text, with three equal
    positions after the prompt's largest. Padding is left out of the statistics and of the softmax.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    name = "expected_attention"
    # The latest forward's (positions, cos, sin) from the model's rotary embedding, for a 3-D RoPE (see `using`).
    _rotary: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_future_positions < 1:
            raise ValueError(f"n_future_positions must be >= 1, got {self.n_future_positions}")
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        return sink_tokens(inputs.is_real, self.n_sink)

    @contextmanager
    def using(self, model: PreTrainedModel) -> Iterator[None]:
        rotary = getattr(model.get_decoder(), "rotary_emb", None)
        if not is_multimodal_rope(model.config.get_text_config()) or rotary is None:
            yield
            return

        def keep(module, args, kwargs, output) -> None:
            positions = args[1] if len(args) > 1 else kwargs["position_ids"]
            self._rotary = (positions, *output)

        previous, handle = self._rotary, rotary.register_forward_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._rotary = previous

    def pre_rope_queries(self, inputs: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H, S, D] the prompt's queries before RoPE (float32) and [B] the next position of each row."""
        cos, sin, next_position = self.prompt_rotation(inputs)  # [B, S, D], [B, S, D], [B]
        scale = cos[..., :1] ** 2 + sin[..., :1] ** 2  # the RoPE's attention scaling, squared
        rotated = inputs.queries.float()
        return (rotated * cos[:, None] - rotate_half(rotated) * sin[:, None]) / scale[:, None], next_position

    def prompt_rotation(self, inputs: PrefillInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin [B, S, D] of the prompt's own RoPE and [B] the next position of each row."""
        config, (batch, _, seq, dim) = inputs.module.config, inputs.queries.shape
        if not is_multimodal_rope(config):
            positions = (inputs.is_real.long().cumsum(-1) - 1).clamp(min=0)  # [B, S], as generate() gives them
            return *rotary_tables(config, positions, dim), inputs.is_real.sum(-1)
        if self._rotary is not None and self._rotary[1].shape[:2] == (batch, seq):
            positions, cos, sin = self._rotary  # positions: [3, B, S] (or [B, S])
            last = positions[..., -1].reshape(-1, batch).amax(0).to(inputs.queries.device)
            return cos.float().to(inputs.queries.device), sin.float().to(inputs.queries.device), last + 1
        if inputs.modality is not None and bool((inputs.modality != TEXT).any()):
            raise ValueError(
                "expected_attention needs the 3-D RoPE positions of an image prompt, which the model computes: use "
                "press.generate(model, ...) or `with press.attach(model):` so that the press can read them"
            )
        positions = (inputs.is_real.long().cumsum(-1) - 1).clamp(min=0)  # text only: three equal positions
        return *rotary_tables(config, positions, dim), inputs.is_real.sum(-1)

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        batch, num_heads, seq, dim = inputs.queries.shape
        groups = num_heads // inputs.num_kv_heads
        config = inputs.module.config
        queries, next_position = self.pre_rope_queries(inputs)
        observed = (inputs.is_real & ~self.always_kept(inputs))[:, None, :, None].float()  # [B, 1, S, 1]
        count = observed.sum(2, keepdim=True).clamp(min=1)
        mean = (queries * observed).sum(2, keepdim=True) / count  # [B, H, 1, D]
        future = next_position[:, None] + torch.arange(self.n_future_positions, device=queries.device)
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
