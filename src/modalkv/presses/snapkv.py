from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press, Selection
from modalkv.presses.scoring import (
    add_decode_attention,
    check_kernel,
    check_window,
    decode_recent,
    pooled_window_attention,
    recent_window,
)


@dataclass
class SnapKVPress(Press):
    """SnapKV: tokens the last `window_size` prompt queries attend to, smoothed by pooling over neighbours.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", https://arxiv.org/abs/2404.14469.
    Defaults as kvpress 0.5 (window 64, average pooling with kernel 5); the window itself is always kept. GQA:
    scores are averaged over the query heads of each KV group (kvpress, SnapKV issue #22).

    With `evict_every=N` (off by default; SnapKV itself compresses once) the same idea runs while decoding: the N
    tokens generated since the last eviction are the observation window, their attention (summed over them,
    averaged over the group) scores the stored tokens, and every N steps each row drops back to its budget,
    keeping the window. No pooling there: stored slots are not in sequence order.
    """

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"
    name = "snapkv"
    needs_decode_attention = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window_size)
        check_kernel(self.kernel_size)
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        return pooled_window_attention(inputs, self.window_size, self.kernel_size, self.pooling)

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        return recent_window(inputs.is_real, self.window_size)

    def select(self, inputs: PrefillInputs) -> Selection:
        selection = super().select(inputs)
        if self.evict_every:  # a per-slot sum of the decode-time window's attention
            selection.slot_data["scores"] = inputs.keys.new_zeros(inputs.keys.shape[:3], dtype=torch.float32)
        return selection

    def observe(self, view: DecodeView) -> None:
        add_decode_attention(view)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        running = view.slot("scores")
        scores = running.masked_fill(decode_recent(view, self.evict_every), float("inf"))
        running.zero_()  # the next observation window starts now
        return scores
