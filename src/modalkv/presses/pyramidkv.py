from dataclasses import dataclass

import torch

from modalkv.presses.base import PrefillInputs, tokens_for_budget
from modalkv.presses.snapkv import SnapKVPress


def pyramid_budget(
    target: torch.Tensor, num_real: torch.Tensor, window_size: int, beta: int, num_layers: int, layer_idx: int
) -> torch.Tensor:
    """kvpress 0.5's PyramidKV layer budget, per row.

    Args:
        target: [B] average number of tokens kept per layer (kvpress: q_len * (1 - compression_ratio)).
        num_real: [B] prompt length of each row (kvpress: q_len).

    Returns:
        [B] int64 tokens kept by layer `layer_idx`, the observation window included. Falls back to `target` (plain
        SnapKV) unless the pyramid's smallest layer still holds the window.
    """
    q_len, target = num_real.double(), target.double()
    min_num = target / beta
    max_num = 2 * target - min_num
    is_capped = max_num >= q_len - window_size  # layer 0 cannot keep more than the prefix before the window
    max_num = torch.where(is_capped, q_len - window_size, max_num)
    min_num = torch.where(is_capped, 2 * target - max_num, min_num)
    is_pyramid = (max_num >= min_num) & (min_num >= window_size) & (num_layers > 1)
    steps = (max_num - min_num) / max(num_layers - 1, 1)
    # Nearest integer, ties to even as Python's round() in kvpress.
    return torch.where(is_pyramid, max_num - layer_idx * steps, target).round().long()


@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV: SnapKV scores with per-layer budgets that shrink linearly with depth.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    https://arxiv.org/abs/2406.02069. Defaults and layer budgets as kvpress 0.5 (`pyramidkv_press.py`):
    `window_size=64`, `kernel_size=5`, `pooling=avg`, `beta=20`. The layer counts fall linearly from layer 0 to
    the last layer, which keeps `1/beta` of the average (more when layer 0 is capped at the prompt minus the
    window); their mean is the budget. If the last layer would keep less than the window, every layer keeps the
    average, as SnapKV does. GQA as SnapKV (group-averaged scores); all KV heads of a layer keep the same number
    of tokens.

    The average per layer is the budget's token count of each row (`tokens_for_budget`: floor(ratio * length) for
    a ratio, min(count, length) for a token count) where kvpress uses the unrounded q_len * (1 - compression_ratio).
    Each layer's count is rounded to the nearest token; the rounding errors of layers l and L-1-l cancel, so the
    mean over layers equals the budget (up to float ties).
    """

    beta: int = 20
    name = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def num_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        num_real = inputs.is_real.sum(-1)
        target = tokens_for_budget(self.budget, num_real)
        per_row = pyramid_budget(target, num_real, self.window_size, self.beta, inputs.num_layers, inputs.layer_idx)
        return per_row[:, None].expand(-1, inputs.num_kv_heads)
