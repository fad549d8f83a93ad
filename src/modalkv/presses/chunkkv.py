from dataclasses import dataclass, field

import torch

from modalkv.presses.base import PrefillInputs, Press, Selection, WrapperPress, selection_from_mask, tokens_for_budget
from modalkv.presses.scoring import keeps_everything, top_within
from modalkv.presses.snapkv import SnapKVPress


@dataclass
class ChunkKVPress(WrapperPress):
    """ChunkKV: keeps whole chunks of `chunk_length` consecutive tokens, ranked by a scoring press (`chunkkv:<press>`).

    Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference",
    https://arxiv.org/abs/2502.00299. As kvpress 0.5.5 (`chunkkv_press.py`, default `chunk_length=20`): the inner
    press's scores (its always-kept tokens, e.g. SnapKV's window, get the row's top score + 1, as kvpress pads them)
    are summed over the KV heads and averaged over each chunk (the last one may be shorter); the top chunks are kept
    whole, the same in every head. A ratio budget keeps floor(ratio * chunks) chunks (kvpress: int(chunks * (1 -
    compression_ratio))), at least one; a token budget keeps budget // chunk_length chunks (so never more tokens than
    the budget), or everything if the prompt fits. A prompt shorter than one chunk is left to the inner press.
    kvpress has no default inner press; ours is SnapKV (the paper scores chunks by observation-window attention).
    Our resolution for batches: chunks start at each row's first real token, so left padding changes nothing.
    """

    press: Press = field(default_factory=SnapKVPress)
    chunk_length: int = 20
    name = "chunkkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1, got {self.chunk_length}")

    def num_chunks_kept(self, num_chunks: torch.Tensor, num_real: torch.Tensor) -> torch.Tensor:
        """[B] chunks each row keeps, of its `num_chunks` [B] (the last one possibly partial)."""
        if self.budget <= 1:
            return tokens_for_budget(self.budget, num_chunks)
        whole = torch.full_like(num_chunks, max(int(self.budget) // self.chunk_length, 1))
        return torch.where(num_real <= self.budget, num_chunks, whole.minimum(num_chunks))

    def select(self, inputs: PrefillInputs) -> Selection:
        is_real = inputs.is_real
        if keeps_everything(self.budget, is_real):
            return Press.select(self, inputs)
        raw = self.press.score(inputs).float()  # [B, H_kv, S]
        scores = raw
        protected = self.press.always_kept(inputs)
        if protected is not None:
            top = raw.masked_fill(~is_real[:, None], float("-inf")).amax(dim=(1, 2), keepdim=True)
            scores = torch.where(protected[:, None], top + 1, raw)
        num_real = is_real.sum(-1)
        chunk = ((is_real.long().cumsum(-1) - 1) // self.chunk_length).masked_fill(~is_real, 0)  # [B, S]
        num_chunks = (num_real + self.chunk_length - 1) // self.chunk_length
        totals = scores.new_zeros(scores.shape[0], int(num_chunks.max()))
        totals.scatter_add_(1, chunk, (scores * is_real[:, None]).sum(1))
        sizes = torch.zeros_like(totals).scatter_add_(1, chunk, is_real.float())
        means = (totals / sizes.clamp(min=1)).masked_fill(sizes == 0, float("-inf"))  # [B, chunks]
        kept = self.num_chunks_kept(num_chunks, num_real)
        best = means.topk(int(kept.max()), dim=-1).indices
        chosen = torch.zeros_like(means, dtype=torch.bool)
        chosen.scatter_(1, best, torch.arange(best.shape[-1], device=best.device) < kept[:, None])
        keep = (chosen.gather(1, chunk) & is_real)[:, None].expand_as(scores)
        short = num_real < self.chunk_length  # [B]
        if bool(short.any()):  # a row shorter than one chunk: the inner press's own top tokens, per head
            count = torch.minimum(tokens_for_budget(self.budget, num_real), num_real)
            by_token = top_within(self.press.ranking(inputs, raw), is_real, count[:, None].expand(raw.shape[:2]))
            keep = torch.where(short[:, None, None], by_token, keep)
        return selection_from_mask(keep)
