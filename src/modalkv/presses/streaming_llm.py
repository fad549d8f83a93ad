from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press


@dataclass
class StreamingLLMPress(Press):
    """Attention sinks + recent window: keeps the first `num_sinks` tokens and the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", https://arxiv.org/abs/2309.17453.
    Default `num_sinks=4` as in the paper and kvpress. The recent window is whatever the budget leaves after the
    sinks, so every head keeps the same tokens. With `evict_every=1` (the default, as the method is defined)
    the window slides while generating: each new token evicts the oldest non-sink token, so the cache never
    exceeds its budget.
    """

    evict_every: int = 1
    num_sinks: int = 4
    name = "streaming_llm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        # Recency as the score: the top-k of positions is exactly the most recent window.
        positions = torch.arange(inputs.keys.shape[2], device=inputs.keys.device, dtype=torch.float32)
        return positions.expand(inputs.keys.shape[:3])

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        real_rank = inputs.is_real.cumsum(-1) - 1  # sinks are the first REAL tokens, after any left padding
        return inputs.is_real & (real_rank < self.num_sinks)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        block = view.block
        columns = block.columns[:, : block.max_length].float()
        past_end = torch.arange(block.max_length, device=columns.device) >= block.lengths[:, None]
        columns = columns.masked_fill(past_end, float("inf"))
        num_sinks = min(self.num_sinks, block.min_length)
        if num_sinks == 0:
            return columns
        sink_limit = columns.kthvalue(num_sinks, dim=-1).values  # the sinks are each row's oldest tokens
        return columns.masked_fill(columns <= sink_limit[:, None], float("inf"))
