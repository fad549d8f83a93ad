from dataclasses import dataclass, field

import torch

from modalkv.presses.base import PrefillInputs, Press, Selection, WrapperPress, selection_from_mask, tokens_for_budget
from modalkv.presses.scoring import keeps_everything
from modalkv.presses.snapkv import SnapKVPress


@dataclass
class AdaKVPress(WrapperPress):
    """AdaKV: head-wise adaptive budgets around any scoring press (`adakv:<press>` in the CLI).

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference",
    https://arxiv.org/abs/2407.11550. As kvpress 0.5 (`adakv_press.py`): each KV head first keeps its top
    `alpha_safeguard` share of the per-head budget, then the rest of the layer's budget (num_kv_heads x per-head
    budget) goes to the highest scores across all heads of the layer, so heads that concentrate their attention give
    budget to heads that spread it. The inner press's always-kept tokens (e.g. SnapKV's window) are kept first.
    Unlike kvpress, which masks evicted keys in a full-size cache, each head really stores only what it keeps.
    """

    press: Press = field(default_factory=SnapKVPress)
    alpha_safeguard: float = 0.2
    name = "adakv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")

    def select(self, inputs: PrefillInputs) -> Selection:
        is_real = inputs.is_real
        batch, heads, seq = inputs.keys.shape[:3]
        if keeps_everything(self.budget, is_real):
            return Press.select(self, inputs)  # nothing to evict: keep all, exactly as every press does
        per_head = tokens_for_budget(self.budget, is_real.sum(-1))  # [B]
        scores = self.press.ranking(inputs, self.press.score(inputs).float())
        top = torch.finfo(scores.dtype).max
        safe = (per_head * self.alpha_safeguard).long()  # [B]
        if int(safe.max()) > 0:
            best = scores.topk(int(safe.max()), dim=-1).indices  # [B, H, safe_max]
            is_safe = torch.arange(best.shape[-1], device=best.device) < safe[:, None, None]
            scores = scores.scatter(-1, best, torch.where(is_safe, top, scores.gather(-1, best)))
        total = heads * per_head  # [B] tokens the whole layer keeps
        flat_top = scores.reshape(batch, heads * seq).topk(int(total.max()), dim=-1).indices
        flat_top = flat_top.masked_fill(torch.arange(flat_top.shape[-1], device=flat_top.device) >= total[:, None], -1)
        keep = torch.zeros(batch, heads * seq + 1, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, flat_top % (heads * seq + 1), True)  # the -1 entries land in the spare last column
        return selection_from_mask(keep[:, :-1].view(batch, heads, seq))
