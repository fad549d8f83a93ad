from dataclasses import dataclass

import torch

from modalkv.modality import TEXT
from modalkv.presses.base import PrefillInputs, Press, Selection, selection_from_mask, tokens_for_budget
from modalkv.presses.scoring import (
    check_window,
    keeps_everything,
    recent_window,
    share,
    top_within,
    window_attention,
)


def coverage(psi: torch.Tensor, members: torch.Tensor, theta: float) -> torch.Tensor:
    """[B, H] fewest tokens of `members` [B, S] whose psi [B, H, S] mass reaches theta of the members' mass."""
    mass = psi.masked_fill(~members[:, None], 0).sort(dim=-1, descending=True).values.cumsum(-1)
    needed = (mass < theta * mass[..., -1:]).sum(-1) + 1
    return torch.minimum(needed, members.sum(-1)[:, None])


@dataclass
class MadaKVPress(Press):
    """MadaKV: modality-adaptive eviction (Modality Preference Adaptation + Hierarchical Compression Compensation).

    Li et al., "MadaKV: Adaptive Modality-Perception KV Cache Eviction for Efficient Multimodal Long-Context
    Inference", ACL 2025, https://arxiv.org/abs/2506.15724 (no public code; our resolutions of the paper's
    ambiguities A1-A14 are in docs/madakv.md). Importance psi = attention of the last `window_size` prompt tokens
    (the proxies, kept within the budget), summed over them, averaged over the query heads of a KV group.

    MPA (`mpa`): each KV head splits what it keeps between visual (image/video) and text tokens in proportion to its
    psi mass on each, and keeps the top psi within each modality. HCC (`hcc`): each head's demand is the fewest
    tokens covering `theta` of its psi mass per modality; a layer spends its heads' demand (each head clamped to
    [proxies + 1, 2 phi^l]) and the budget recursion phi^{l+1} = phi^l - (K^l / H) / (L - l), K^l = sum_h (spent -
    phi^l), passes the difference on, so all layers and heads together keep exactly L * H * budget tokens (the last
    layer takes the remainder; a layer never takes so much or so little that later layers cannot meet it).
    `literal_hcc` instead keeps phi^l per head in every layer and applies phi^{l+1} = phi^l - K^l / (L - l) with
    K^l = sum_h (demand - phi^l), as the equations read literally (total not preserved). `ends` > 0 follows the
    paper's observation that the first and last layers need more: layer l's share of what is left is weighted by
    1 + ends * |2 l / (L - 1) - 1| (the ends get 1 + ends times the middle's weight), with HCC on or off; the total is
    still L * H * budget (exactly with HCC, up to rounding without). Text-only prompts have no visual mass: MPA keeps
    the plain top psi.
    """

    window_size: int = 32
    theta: float = 0.9
    mpa: bool = True
    hcc: bool = True
    literal_hcc: bool = False
    ends: float = 0.0
    name = "madakv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window_size)
        if not 0 < self.theta <= 1:
            raise ValueError(f"theta must be in (0, 1], got {self.theta}")
        if self.ends < 0 or (self.ends and self.literal_hcc):
            raise ValueError(f"ends must be >= 0, and 0 with literal_hcc; got {self.ends}")

    def importance(self, inputs: PrefillInputs) -> torch.Tensor:
        """psi [B, H_kv, S]: proxy attention summed over the proxies, averaged over the KV group's query heads."""
        batch, heads, seq = inputs.keys.shape[:3]
        attention = window_attention(inputs, self.window_size)  # [B, H_kv, G * w, S]
        groups = inputs.queries.shape[1] // heads
        return attention.view(batch, heads, groups, -1, seq).sum(dim=3).mean(dim=2)

    def select(self, inputs: PrefillInputs) -> Selection:
        is_real = inputs.is_real
        if keeps_everything(self.budget, is_real):
            return Press.select(self, inputs)  # nothing to evict
        target = tokens_for_budget(self.budget, is_real.sum(-1))  # [B] kept per head, on average over layers and heads
        # The proxies count within the budget and are kept while it allows (at most budget - 1 of them).
        proxy = recent_window(is_real, (target - 1).clamp(max=self.window_size))
        candidates = is_real & ~proxy
        visual = candidates & (inputs.modality != TEXT) if inputs.modality is not None else torch.zeros_like(candidates)
        text = candidates & ~visual
        psi = self.importance(inputs)
        spend = self.layer_spend(inputs, psi, visual, text, target, proxy.sum(-1))  # [B, H], proxies included
        selectable = spend - proxy.sum(-1)[:, None]
        if not self.mpa:
            return selection_from_mask(proxy[:, None] | top_within(psi, candidates, selectable))
        mass = torch.stack([(psi * visual[:, None]).sum(-1), (psi * text[:, None]).sum(-1)], dim=-1)
        # For `modalkv heads`: each head's visual preference w_v / (w_v + w_t) and what it keeps, per layer.
        stats = inputs.state.setdefault("heads", {})
        stats[inputs.layer_idx] = ((mass[..., 0] / mass.sum(-1).clamp(min=1e-30)).cpu(), spend.cpu())
        sizes = torch.stack([visual.sum(-1), text.sum(-1)], dim=-1)[:, None].expand_as(mass)
        parts = share(selectable, mass, sizes)  # [B, H, 2]: visual, text
        keep = top_within(psi, visual, parts[..., 0]) | top_within(psi, text, parts[..., 1])
        return selection_from_mask(proxy[:, None] | keep)

    def layer_spend(self, inputs, psi, visual, text, target, num_proxy) -> torch.Tensor:
        """[B, H] tokens each head of this layer keeps (HCC), updating the budgets carried to the next layer."""
        heads, layers, index = psi.shape[1], inputs.num_layers, inputs.layer_idx
        num_real = inputs.is_real.sum(-1)
        state = inputs.state
        if index == 0:
            state["phi"], state["remaining"] = target.double(), layers * heads * target
        if self.ends:  # this layer's weighted share of what is left, per head
            position = torch.linspace(-1, 1, layers, dtype=torch.float64) if layers > 1 else torch.zeros(1)
            weights = 1 + self.ends * position.abs()
            state["phi"] = state["remaining"] / heads * float(weights[index] / weights[index:].sum())
        phi, remaining, left = state["phi"], state["remaining"], layers - index
        low, high = (num_proxy + 1).minimum(num_real), num_real
        demand = coverage(psi, visual, self.theta) + coverage(psi, text, self.theta) + num_proxy[:, None]
        if self.literal_hcc or not self.hcc:
            spend = phi.round().long().clamp(low, high)[:, None].expand_as(demand)
            if self.literal_hcc and left > 1:
                state["phi"] = phi - (demand - phi[:, None]).sum(-1) / (left - 1)
            state["remaining"] = remaining - spend.sum(-1)
            return spend
        wanted = demand.clamp(low[:, None], torch.minimum(high, (2 * phi).long())[:, None])
        total = remaining if left == 1 else wanted.sum(-1)
        floor = torch.maximum(heads * low, remaining - (left - 1) * heads * high)
        total = total.clamp(floor, torch.minimum(heads * high, remaining - (left - 1) * heads * low))
        spend = low[:, None] + share(
            total - heads * low, wanted - low[:, None], (high - low)[:, None].expand_as(wanted)
        )
        if left > 1:  # phi^{l+1} = phi^l - (K^l / H) / (L - l): the running-total form of the paper's recursion
            state["phi"] = phi - (spend.sum(-1) - heads * phi) / heads / (left - 1)
        state["remaining"] = remaining - spend.sum(-1)
        return spend
