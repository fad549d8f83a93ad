from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press
from modalkv.presses.snapkv import window_attention


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
        rows, length = len(view.block.rows), view.block.max_length
        latest = view.attention.view(rows, view.query_groups, -1, length)[:, :, -1].mean(dim=1)  # [n, L]
        # Every KV head of a batch row holds the same tokens in the same slots, so slots can be averaged.
        batch_of_row = view.block.rows // view.num_kv_heads
        sums = latest.new_zeros((int(batch_of_row.max()) + 1, length)).index_add_(0, batch_of_row, latest)
        return (sums / torch.bincount(batch_of_row).clamp(min=1)[:, None])[batch_of_row]
