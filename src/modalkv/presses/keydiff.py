from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modalkv.presses.base import PrefillInputs, Press


@dataclass
class KeyDiffPress(Press):
    """KeyDiff: keeps the keys least similar to the layer's mean key direction (the most distinctive ones).

    Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
    Resource-Constrained Environments", https://arxiv.org/abs/2504.15364. As kvpress 0.5.5 (`keydiff_press.py`):
    score = -cos(k, a) with the anchor a the mean of the unit-normalised keys of the KV head, no hyperparameters
    besides the budget, queries not used. Our resolution: the anchor averages the real tokens only (kvpress averages
    every column, padding included, which it never has with batch 1). The paper evicts block by block while the
    prompt streams in; kvpress (and we) score the whole prompt at once.
    """

    name = "keydiff"

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        keys = inputs.keys.float()  # [B, H_kv, S, D]
        real = inputs.is_real[:, None, :, None]
        anchor = (F.normalize(keys, dim=-1) * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)  # [B, H_kv, S]
