from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press, Selection
from modalkv.presses.scoring import sink_tokens


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
        return sink_tokens(inputs.is_real, self.num_sinks)

    def select(self, inputs: PrefillInputs) -> Selection:
        selection = super().select(inputs)
        if self.evict_every:  # the sinks never leave: +inf on top of their column while decoding
            sinks = self.always_kept(inputs)[:, None].expand(inputs.keys.shape[:3])
            scores = torch.zeros(sinks.shape, device=sinks.device)
            selection.slot_data["scores"] = scores.masked_fill(sinks, float("inf"))
        return selection

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.slot("columns").float() + view.slot("scores")  # the oldest goes first
