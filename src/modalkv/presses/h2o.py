from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press, tokens_for_budget

_QUERY_CHUNK = 256  # prompt queries per step of the accumulated-attention pass (bounds its memory)


def accumulated_attention(inputs: PrefillInputs) -> torch.Tensor:
    """[B, H_kv, S] attention each key receives, summed over all (real) prompt queries and averaged over the query
    heads of its KV group. Computed in chunks of queries: memory O(chunk * S), not O(S^2)."""
    batch, num_heads, seq, dim = inputs.queries.shape
    kv_heads = inputs.num_kv_heads
    groups = num_heads // kv_heads
    keys_t = inputs.keys.float().transpose(-1, -2)
    total = inputs.keys.new_zeros((batch, kv_heads, seq), dtype=torch.float32)
    key_columns = torch.arange(seq, device=keys_t.device)
    for start in range(0, seq, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, seq)
        queries = inputs.queries[:, :, start:stop].float().reshape(batch, kv_heads, groups * (stop - start), dim)
        visible = key_columns <= torch.arange(start, stop, device=keys_t.device)[:, None]  # [c, S] causal
        visible = visible.repeat(groups, 1) & inputs.is_real[:, None, None, :]  # [B, 1, G * c, S]
        logits = torch.matmul(queries, keys_t).mul_(inputs.scaling).masked_fill_(~visible, float("-inf"))
        weights = logits.softmax(dim=-1).nan_to_num_(0.0)  # padding queries see nothing: rows of NaN -> 0
        total += weights.sum(dim=2) / groups
    return total


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
        seq = inputs.is_real.shape[-1]
        return torch.arange(seq, device=recent.device) >= seq - recent[:, None]

    def observe(self, view: DecodeView) -> None:
        # The new queries' attention, summed over them and averaged over the group, joins every slot's total.
        view.slot("scores").add_(view.attention.sum(dim=1), alpha=1 / view.query_groups)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        recent = view.constant("h2o.recent", lambda: (view.page_limits() * self.recent_ratio).long())  # [pages, 1]
        is_recent = view.slot("columns") >= view.seen - recent
        return view.slot("scores").masked_fill(is_recent, float("inf"))
