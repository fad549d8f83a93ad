from dataclasses import dataclass

import torch

from modalkv.presses.base import DecodeView, PrefillInputs, Press


@dataclass
class KnormPress(Press):
    """Key norm: keeps the keys with the smallest L2 norm.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    https://arxiv.org/abs/2406.11430. As kvpress 0.5 (`knorm_press.py`): score = -||key||, no hyperparameters
    besides the budget. GQA: keys belong to KV heads, so each KV head ranks its own keys; queries are not used.
    With `evict_every=N` the same rule evicts the largest-norm stored keys every N decoding steps.
    """

    name = "knorm"

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        # In float32: half-precision norms round to few distinct values, and the ties would decide the kept set.
        return -inputs.keys.float().norm(dim=-1)  # [B, H_kv, S]

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return -view.slot("keys").float().norm(dim=-1)
