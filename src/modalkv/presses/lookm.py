from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modalkv.modality import TEXT
from modalkv.presses.base import PrefillInputs, Press, Selection, tokens_for_budget
from modalkv.presses.scoring import accumulated_attention, recent_window

MERGES = ("pivotal", "average", "weighted", "none")
_ROW_CHUNK = 256  # tokens per step of the similarity pass (bounds its memory to O(chunk * S))


@dataclass
class LookMPress(Press):
    """LOOK-M: keeps every text token, the top accumulated-attention image/video tokens and a recent window, then
    merges each evicted token into its most similar kept one.

    Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference",
    https://arxiv.org/abs/2406.18139 (Eq. 4-12; code github.com/SUSTechBruce/LOOK-M). Look-once: compressed at
    prefill only. Scores are H2O's attention summed over all prompt queries (GQA: averaged over the group). The
    recent window is the last M = int(recent_ratio * L) real tokens, the important set the top N = int(hh_ratio * L)
    of the other tokens with text pushed first (A_s[T] += max A_s), and every text token is kept: N is spent on text
    first, the rest on image/video tokens, so a row can keep more than N + M tokens, and a text-only prompt
    (no modality map) keeps everything, as in the paper. With `hh_ratio`/`recent_ratio` None (the paper's alpha2 /
    alpha1, fractions of each row's real length L), the budget's token count is split in two (the window gets the
    smaller half; 0.2 gives the paper's alpha1 = alpha2 = 0.1).

    Merging, per (row, KV head): each evicted token goes to the kept token with the most similar key (cosine, fp32),
    many to one; values follow the keys' matching. For kept c with L_sim matches k_i: `pivotal` k_c <- (k_c +
    sum (k_i + k_c) / 2) / (L_sim + 1), `average` (k_c + sum k_i) / (L_sim + 1), `weighted` (k_c + sum s_ic k_i) /
    (L_sim + 1), `none` keeps K/V as they are. As in the official code, `average` and `weighted` merge only the
    evicted tokens whose best similarity, averaged over the heads that evict them, reaches the mean best similarity
    of the row's evicted tokens; we pair each token with its own match (the code's averaged merge misaligns them).
    Keys are merged after RoPE, as in the paper.
    """

    hh_ratio: float | None = None
    recent_ratio: float | None = None
    merge: str = "pivotal"
    name = "lookm"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("hh_ratio", "recent_ratio"):
            value = getattr(self, name)
            is_number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (is_number and 0 <= value <= 1):
                raise ValueError(f"{name} must be a ratio in [0, 1] or None (half the budget), got {value!r}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {self.merge!r}")

    def split(self, num_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N important, M recent) tokens per row, each [B], from each row's real length `num_real` [B]."""
        total = tokens_for_budget(self.budget, num_real)
        recent = total // 2 if self.recent_ratio is None else (num_real.double() * self.recent_ratio).long()
        important = total - total // 2 if self.hh_ratio is None else (num_real.double() * self.hh_ratio).long()
        return important, recent.masked_fill((important + recent) == 0, 1)  # keep at least the last token

    def select(self, inputs: PrefillInputs) -> Selection:
        is_real = inputs.is_real  # [B, S]
        batch, heads, seq = inputs.keys.shape[:3]
        num_real = is_real.sum(-1)
        important, recent = self.split(num_real)
        window = recent_window(is_real, recent)
        is_text = is_real if inputs.modality is None else is_real & (inputs.modality == TEXT)
        keep = (is_text | window)[:, None, :].expand(batch, heads, seq).clone()  # [B, H_kv, S]
        candidates = is_real & ~keep[:, 0]  # image/video tokens outside the window
        slots = (important - (is_text & ~window).sum(-1)).clamp(min=0)  # N left after the text tokens
        if bool((candidates.sum(-1) <= slots).all()):
            keep |= candidates[:, None, :]  # everything fits: no scores needed
        else:
            scores = accumulated_attention(inputs).masked_fill(~candidates[:, None, :], float("-inf"))
            top = scores.topk(int(slots.max()), dim=-1)
            in_budget = torch.arange(top.indices.shape[-1], device=keep.device) < slots[:, None, None]
            is_top = in_budget & (top.values > float("-inf"))  # -inf: a row with fewer candidates than slots
            keep.scatter_(-1, top.indices, is_top | keep.gather(-1, top.indices))
        lengths = keep.sum(-1)
        positions = torch.arange(seq, device=keep.device)
        indices = torch.where(keep, positions, seq).sort(dim=-1).values[..., : int(lengths.max())]
        evicted = is_real[:, None, :] & ~keep
        keys = values = None
        if self.merge != "none" and bool(evicted.any()):
            keys, values = self.merged(inputs.keys, inputs.values, keep, evicted)
        return Selection(indices.clamp(max=seq - 1), lengths, keys=keys, values=values)

    def merged(
        self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of keys, values [B, H_kv, S, D] with each kept token merged with the evicted tokens matched to it.
        keep, evicted: [B, H_kv, S] bool."""
        similarity, closest = nearest_kept(keys, keep)  # [B, H_kv, S] each
        merging = evicted
        if self.merge in ("average", "weighted"):
            best = similarity.masked_fill(~evicted, 0.0)
            per_token = best.sum(1) / evicted.sum(1).clamp(min=1)  # [B, S] averaged over the heads evicting it
            threshold = best.sum((1, 2)) / evicted.sum((1, 2)).clamp(min=1)  # [B] mean over (head, token)
            merging = evicted & (per_token >= threshold[:, None])[:, None, :]
        batch, heads, seq, dim = keys.shape
        index = torch.where(merging, closest, seq)[..., None].expand(-1, -1, -1, dim)  # seq: a spare slot
        result = []
        for tensor in (keys, values):
            tensor = tensor.float()
            if self.merge == "pivotal":
                source = (tensor + tensor.gather(2, closest[..., None].expand(-1, -1, -1, dim))) / 2
            else:
                source = tensor * similarity[..., None] if self.merge == "weighted" else tensor
            spare = torch.cat([tensor, tensor.new_zeros(batch, heads, 1, dim)], dim=2)
            spare.scatter_reduce_(2, index, source, reduce="mean", include_self=True)
            result.append(spare[:, :, :seq].to(keys.dtype))
        return result[0], result[1]


def nearest_kept(keys: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every token, the cosine similarity [B, H_kv, S] of its key to the most similar kept key, and that kept
    token's index [B, H_kv, S]. keys: [B, H_kv, S, D]; keep: [B, H_kv, S] bool. In fp32, by chunks of tokens."""
    unit = F.normalize(keys.float(), dim=-1)
    unit_t = unit.transpose(-1, -2)
    similarity, closest = [], []
    for start in range(0, keys.shape[2], _ROW_CHUNK):
        chunk = torch.matmul(unit[:, :, start : start + _ROW_CHUNK], unit_t)  # [B, H_kv, c, S]
        best = chunk.masked_fill_(~keep[:, :, None, :], float("-inf")).max(dim=-1)
        similarity.append(best.values)
        closest.append(best.indices)
    return torch.cat(similarity, dim=-1), torch.cat(closest, dim=-1)
