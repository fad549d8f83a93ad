from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press, tokens_for_budget
from modalkv.presses.scoring import accumulated_attention, add_decode_attention, decode_recent, recent_window


@dataclass
class H2OPress(Press):
    """H2O, Heavy-Hitter Oracle: keeps the tokens with the largest accumulated attention plus the recent ones.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs",
    https://arxiv.org/abs/2306.14048. The budget is split between heavy hitters and the most recent tokens
    (`recent_ratio`, 0.5 as in the paper's equal split). Scores are the paper's plain sums of attention over all
    queries so far (not normalised by the number of queries that could see a token). GQA: the attention of the
    query heads of a KV group is averaged. With `evict_every=1` (default) each new token's attention is added to
    the running scores and the lowest-scoring token outside the recent window is evicted, so the cache stays at its
    budget while generating.
    """

    evict_every: int = 1
    recent_ratio: float = 0.5
    name = "h2o"
    needs_decode_attention = True
    keeps_running_scores = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.recent_ratio <= 1:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        return accumulated_attention(inputs)

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        recent = (tokens_for_budget(self.budget, inputs.is_real.sum(-1)) * self.recent_ratio).long()  # [B]
        return recent_window(inputs.is_real, recent)

    def observe(self, view: DecodeView) -> None:
        add_decode_attention(view)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        recent = view.constant("h2o.recent", lambda: (view.page_limits() * self.recent_ratio).long())  # [pages, 1]
        return view.slot("scores").masked_fill(decode_recent(view, recent), float("inf"))
