from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modalkv.presses.base import CalibratedPress, PrefillInputs
from modalkv.presses.scoring import check_kernel, check_window, pooled_window_attention, recent_window


def _rescaled(values: torch.Tensor, members: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`values` [B, H, S] min-max normalised over `members` [B, S], then scaled so that their mean over the members
    is `mean` [B, H, 1] (how MixKV puts its terms on the attention's scale)."""
    inside = members[:, None]
    low = values.masked_fill(~inside, float("inf")).amin(-1, keepdim=True)
    high = values.masked_fill(~inside, float("-inf")).amax(-1, keepdim=True)
    normalised = ((values - low) / (high - low + 1e-8)).masked_fill(~inside, 0.0)
    normalised_mean = normalised.sum(-1, keepdim=True) / inside.sum(-1, keepdim=True).clamp(min=1)
    return normalised * mean / (normalised_mean + 1e-8)


@dataclass
class MixKVPress(CalibratedPress):
    """MixKV: importance mixed with diversity per KV head, weighted by the head's redundancy (needs a calibration).

    Liu et al., "Mixing Importance with Diversity: Joint Optimization for KV Cache Compression in Large
    Vision-Language Models", ICLR 2026, https://arxiv.org/abs/2510.20707 (code github.com/xuyang-liu16/MixKV). As its
    authors' head-wise scoring: over the tokens before the last `window_size` (which are kept),
    - importance = SnapKV's pooled window attention (window 32, average pooling with kernel 5, GQA mean) plus the
      value norm (intrinsic importance);
    - diversity = minus each key's cosine similarity to the mean of the prompt's normalised keys;
    the value norm and the diversity are min-max normalised and scaled to the attention's mean, and a head keeps
    its top r_h * diversity + (1 - r_h) * importance, r_h being the head's redundancy: the mean pairwise cosine
    similarity of its keys, measured once per model by `modalkv calibrate` (`modalkv.head_statistics`) as the
    authors ship per-model priors. Heads whose keys are alike (visual ones, mostly) are spread out; the others keep
    what they attend to.

    Budgets: uniform per head (MixKV on SnapKV); `sparsemm:mixkv` puts it on SparseMM's head budgets and
    `adakv:mixkv` on AdaKV's, as the paper does. Our resolutions: padding and the window are left out of every
    normalisation and mean; r_h is clamped to [0, 1].
    """

    window_size: int = 32
    kernel_size: int = 5
    name = "mixkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window_size)
        check_kernel(self.kernel_size)

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        is_real = inputs.is_real
        scored = is_real & ~recent_window(is_real, self.window_size)  # [B, S]
        count = scored.sum(-1)[:, None, None].clamp(min=1)
        attention = pooled_window_attention(inputs, self.window_size, self.kernel_size, "avg")  # [B, H_kv, S]
        mean = (attention * scored[:, None]).sum(-1, keepdim=True) / count
        value_norm = _rescaled(inputs.values.float().norm(dim=-1), scored, mean)
        keys = F.normalize(inputs.keys.float(), dim=-1) * is_real[:, None, :, None]
        mean_key = keys.sum(2, keepdim=True) / is_real.sum(-1)[:, None, None, None].clamp(min=1)  # [B, H_kv, 1, D]
        diversity = _rescaled(-(keys * mean_key).sum(-1), scored, mean)
        redundancy = self.statistics().redundancy_scores()[inputs.module.layer_idx].clamp(0, 1)
        redundancy = redundancy.to(attention.device)[None, :, None]  # [1, H_kv, 1]
        return redundancy * diversity + (1 - redundancy) * (attention + value_norm)

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        return recent_window(inputs.is_real, self.window_size)
