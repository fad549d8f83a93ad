from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press
from modalkv.presses.scoring import window_attention


@dataclass
class TOVAPress(Press):
    """TOVA: keeps the tokens the last prompt token attends to most; the last token itself is always kept.

    Oren et al., "Transformers are Multi-State RNNs", https://arxiv.org/abs/2401.06104. As kvpress 0.5
    (`tova_press.py`): no hyperparameters besides the budget. GQA: the last query's attention is averaged over ALL
    query heads (not per KV group), so every KV head keeps the same tokens. With `evict_every=1` (default, as
    TOVA is defined) each new token's attention, averaged the same way, evicts the lowest-scoring cached token.
    """

    evict_every: int = 1
    name = "tova"
    needs_decode_attention = True

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        attention = window_attention(inputs, 1)  # [B, H_kv, G, S]: the last query of each query head
        scores = attention.mean(dim=(1, 2))  # [B, S]
        return scores[:, None, :].expand(inputs.keys.shape[:3])

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        # kvpress pads the last token with the maximum score for the same effect.
        is_last = torch.zeros_like(inputs.is_real)
        is_last[:, -1] = True
        return inputs.is_real & is_last

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        pages, width = view.attention.shape[0], view.attention.shape[-1]
        latest = view.attention.view(pages, view.query_groups, -1, width)[:, :, -1].mean(dim=1)  # [pages, width]
        # Every KV head of a batch row holds the same tokens in the same slots (same budget, same scores, same
        # moves), so a slot's score is its mean over the row's KV heads: its page's counterparts in the other heads.
        heads = view.num_kv_heads
        if view.rows.uniform_length is not None:  # one page per row, rows in (batch, head) order
            return latest.view(-1, heads, width).mean(dim=1, keepdim=True).expand(-1, heads, -1).reshape(pages, width)
        layout = view.rows.layout
        batch, most_pages = len(layout.capacities) // heads, max(layout.capacities) // width
        counterpart = view.constant(  # (batch row, page within the row): the same for every KV head of the row
            "tova.counterpart", lambda: (view.page_row // heads) * most_pages + layout.page_offset // width
        )
        sums = latest.new_zeros((batch * most_pages, width)).index_add_(0, counterpart, latest)
        return sums.index_select(0, counterpart) / heads
