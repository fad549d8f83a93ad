"""RetentiveKV: entropy-guided retention; evicted tokens are absorbed into state-space memories read while decoding.

Liu et al., "RetentiveKV: State-Space Memory for Uncertainty-Aware Multimodal KV Cache Eviction", ACL 2026 Findings,
https://arxiv.org/abs/2605.04075. No code was published: this is a reconstruction from the paper's equations as
known (abstract, authors' blog); docs/retentivekv.md lists each ambiguity (B1-B14) and our resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modalkv.modality import TEXT, infer_patches
from modalkv.presses.base import DecodeView, LeavingTokens, PrefillInputs, Press, Selection, selection_from_mask
from modalkv.presses.scoring import check_window, decode_recent, recent_window, top_within, window_logits


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi = elu + 1: a positive feature map, so that the state's normaliser phi(q) . z stays positive (B8)."""
    return F.elu(x.float()) + 1


def gated_weights(injection: torch.Tensor, log_retention: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Each token's weight in a state built by the recurrence S <- h_i S + a_i phi(k_i)^T v_i, run over the tokens
    in ascending `order`: a_i times the product of h_j over the tokens absorbed after it.

    Args:
        injection: [..., S] a_i, 0 for tokens not absorbed.
        log_retention: [..., S] log h_i, 0 for tokens not absorbed (they take no step of the recurrence).
        order: [..., S] absorption order keys.
    """
    perm = order.argsort(dim=-1, stable=True)
    in_order = log_retention.gather(-1, perm)
    after = in_order.flip(-1).cumsum(-1).flip(-1) - in_order  # sum of log h over the tokens absorbed later
    return injection * torch.empty_like(after).scatter_(-1, perm, after).exp()


def with_one(values: torch.Tensor) -> torch.Tensor:
    """[..., D + 1] float32 values with a constant 1 appended: its state column is the normaliser z."""
    return F.pad(values.float(), (0, 1), value=1.0)


def absorb(keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[..., D, D + 1]: the state sum_i w_i phi(k_i)^T v_i in the first D columns and its normaliser
    z = sum_i w_i phi(k_i) in the last (the state of a constant value 1), so that one matmul reads both."""
    weighted = feature_map(keys) * weights[..., None]
    return weighted.transpose(-1, -2) @ with_one(values)


@dataclass
class RetentiveKVPress(Press):
    """RetentiveKV: keeps the top tokens by retention R = lambda * alpha + (1 - lambda) * H plus the observation
    window; absorbs evicted tokens with high R into a visual and a recall state instead of dropping them, and reads
    those states back at every decoding step.

    Prefill, per layer and KV head: alpha is the attention the window's text queries pay each token (averaged over
    the queries and the group's heads); H = -p log p with p = alpha renormalised within the token's image (text tokens
    within the text); both are max-normalised. Evicted tokens whose R reaches the `absorb_quantile` of the evicted
    tokens' R are absorbed, the rest dropped. Absorption runs S <- h S + a phi(k)^T v, z <- h z + a phi(k) over
    post-rotary keys with a = alpha / mean(alpha of the absorbed) and h = sigmoid(decay_slope * zscore(H) +
    decay_bias). Text goes into the recall state in sequence order; image patches into the visual state, weighted by
    `spatial_decay` ** (Manhattan distance to the image's root patch, its most attended kept patch), as the average of
    a row-major and a column-major scan.

    Decoding: every step reads the states. With `combine="convex"` (default) they act as extra keys whose softmax mass
    is c * phi(q) . z, c calibrated per row at prefill so that the window queries see the absorbed tokens' true
    softmax mass: O = (m O_local + g c phi(q) S) / (m + g c phi(q) . z), m the softmax mass over the kept tokens.
    `combine="additive"` is the blog's O_local + g phi(q) S / (phi(q) . z). The gate g = sigmoid(gate_weight * H_q
    + gate_bias), H_q the normalised entropy of the query's attention over the kept image tokens (all kept tokens
    when a row keeps fewer than two). Each step a row over its budget moves its lowest token by an attention moving
    average (outside the last `window_size` columns) into the recall (text) or visual state, so the exact cache stays
    at its budget however long the generation.

    Ablations: `readout=False` (no read-out: plain eviction with the same kept set), `dual_state=False` (one state,
    sequence order, no spatial weighting), `attention_weight=1.0` (R from attention only; h without entropy).
    `count_state_in_budget`: the states' bytes are taken from each row's token budget.
    """

    window_size: int = 32
    attention_weight: float = 0.5
    absorb_quantile: float = 0.5
    decay_slope: float = 1.0
    decay_bias: float = 6.0
    spatial_decay: float = 0.9
    gate_weight: float = 1.0
    gate_bias: float = 0.0
    combine: str = "convex"
    readout: bool = True
    dual_state: bool = True
    count_state_in_budget: bool = False
    evict_every: int = 1
    name = "retentivekv"
    needs_decode_attention = True
    absorbs_leaving = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_window(self.window_size)
        for field_name in ("attention_weight", "absorb_quantile"):
            if not 0 <= getattr(self, field_name) <= 1:
                raise ValueError(f"{field_name} must be in [0, 1], got {getattr(self, field_name)}")
        if not 0 < self.spatial_decay <= 1:
            raise ValueError(f"spatial_decay must be in (0, 1], got {self.spatial_decay}")
        if self.combine not in ("convex", "additive"):
            raise ValueError(f"combine must be 'convex' or 'additive', got {self.combine!r}")

    # -- prefill ---------------------------------------------------------------------------------------------------

    def num_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        kept = super().num_kept(inputs)
        if not self.count_state_in_budget:
            return kept
        dim = inputs.keys.shape[-1]
        state_bytes = self.num_states(inputs) * (dim * dim + dim) * 4 + 4  # float32 states, norms and the scale
        token_bytes = 2 * dim * inputs.keys.element_size()
        return (kept - math.ceil(state_bytes / token_bytes)).clamp(min=1)

    def num_states(self, inputs: PrefillInputs) -> int:
        has_visual = inputs.modality is not None and bool((inputs.modality != TEXT).any())
        return 2 if self.dual_state and has_visual else 1

    def select(self, inputs: PrefillInputs) -> Selection:
        if self.budget == 1:
            return super().select(inputs)  # keeps everything: no memory, exactly `full`
        if inputs.modality is not None and inputs.patches is None:
            inputs.patches = infer_patches(inputs.modality)
        is_real = inputs.is_real
        budget = torch.minimum(self.num_kept(inputs), is_real.sum(-1)[:, None])  # [B, H_kv], equal over heads
        # The window is kept within the budget: a row whose budget is smaller keeps its most recent tokens only.
        window = recent_window(is_real, budget[:, 0].clamp(max=self.window_size))
        candidates = is_real & ~window
        logits = window_logits(inputs, self.window_size)  # [B, H_kv, G * w, S]
        log_mass = logits.logsumexp(dim=-1)  # [B, H_kv, G * w]
        probabilities = (logits - log_mass[..., None]).exp().nan_to_num_(0.0)
        asks = self.text_queries(inputs, logits.shape[2])  # [B, G * w]
        alpha = (probabilities * asks[:, None, :, None]).sum(2) / asks.sum(-1)[:, None, None]  # [B, H_kv, S]
        entropy = self.entropy(inputs, alpha, candidates)
        retention = self.retention(alpha, entropy, candidates)
        keep = window[:, None] | top_within(retention, candidates, budget - window.sum(-1)[:, None])
        evicted = candidates[:, None] & ~keep
        threshold = torch.nanquantile(retention.masked_fill(~evicted, float("nan")), self.absorb_quantile, dim=-1)
        absorbed = evicted & (retention >= threshold.nan_to_num(float("inf"))[..., None])
        selection = selection_from_mask(keep)
        selection.slot_data["scores"] = alpha
        if inputs.modality is not None:  # which stored tokens are image or video ones (decoded tokens are text)
            selection.slot_data["visual"] = (inputs.modality != TEXT)[:, None].expand_as(alpha)
        selection.memory = self.memory(inputs, alpha, entropy, keep, absorbed, probabilities, log_mass, asks)
        return selection

    def text_queries(self, inputs: PrefillInputs, num_queries: int) -> torch.Tensor:
        """[B, G * w] float: the window queries that ask (text ones; all real ones if a row's window has no text)."""
        w = num_queries // (inputs.queries.shape[1] // inputs.num_kv_heads)
        real = inputs.is_real[:, -w:]
        text = real if inputs.modality is None else real & (inputs.modality[:, -w:] == TEXT)
        asks = torch.where(text.any(-1, keepdim=True), text, real)
        return asks.repeat(1, num_queries // w).float()  # query index g * w + t

    def entropy(self, inputs: PrefillInputs, alpha: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, S] -p log p, p = alpha renormalised within the token's image (text: within the text)."""
        group = torch.zeros_like(candidates, dtype=torch.long)
        if inputs.patches is not None:
            group = inputs.patches[..., 0] + 1  # image index + 1 on visual tokens; 0 on text
        group = group.masked_fill(~candidates, 0)[:, None].expand_as(alpha)
        mass = alpha * candidates[:, None]
        totals = torch.zeros(*alpha.shape[:2], int(group.max()) + 1, device=alpha.device)
        totals.scatter_add_(-1, group, mass)
        p = mass / totals.gather(-1, group).clamp(min=1e-30)
        return -(p * p.clamp(min=1e-30).log())

    def retention(self, alpha: torch.Tensor, entropy: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, S] R = lambda * alpha / max alpha + (1 - lambda) * H / max H, the maxima over the row's
        candidates."""
        weight = self.attention_weight
        return weight * max_normalised(alpha, candidates) + (1 - weight) * max_normalised(entropy, candidates)

    def memory(
        self,
        inputs: PrefillInputs,
        alpha: torch.Tensor,
        entropy: torch.Tensor,
        keep: torch.Tensor,
        absorbed: torch.Tensor,
        probabilities: torch.Tensor,
        log_mass: torch.Tensor,
        asks: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The layer's states from its absorbed tokens, flattened to rows [B * H_kv, ...]."""
        batch, heads, seq, dim = inputs.keys.shape
        count = absorbed.sum(-1, keepdim=True).clamp(min=1)
        injection = alpha * absorbed / ((alpha * absorbed).sum(-1, keepdim=True) / count).clamp(min=1e-30)
        log_retention = torch.zeros_like(alpha)
        if self.attention_weight < 1:
            mean = (entropy * absorbed).sum(-1, keepdim=True) / count
            std = (((entropy - mean) ** 2 * absorbed).sum(-1, keepdim=True) / count).sqrt().clamp(min=1e-12)
            log_retention = F.logsigmoid(self.decay_slope * (entropy - mean) / std + self.decay_bias)
        else:
            log_retention += F.logsigmoid(torch.tensor(self.decay_bias))
        log_retention = log_retention * absorbed
        positions = torch.arange(seq, device=alpha.device).expand_as(alpha)
        dual = self.num_states(inputs) == 2
        visual = (inputs.modality != TEXT)[:, None].expand_as(absorbed) if dual else torch.zeros_like(absorbed)
        recall_weights = gated_weights(injection * (absorbed & ~visual), log_retention * ~visual, positions)
        states = {"recall": absorb(inputs.keys, inputs.values, recall_weights)}
        weights = recall_weights
        if dual:
            visual_weights = self.visual_weights(inputs, alpha, keep, absorbed & visual, injection, log_retention)
            states["visual"] = absorb(inputs.keys, inputs.values, visual_weights)
            weights = weights + visual_weights
        scale = self.calibration(inputs, weights, absorbed, probabilities, log_mass, asks)
        memory = {"log_scale": scale.reshape(batch * heads, 1, 1).clamp(min=1e-30).log()}
        for name, state in states.items():
            memory[name] = state.reshape(batch * heads, dim, dim + 1)
        return memory

    def visual_weights(self, inputs, alpha, keep, absorbed, injection, log_retention) -> torch.Tensor:
        """[B, H_kv, S] weights of the absorbed patches in the visual state: Manhattan decay from each image's root
        patch times the average of the row-major and column-major scans' gate products."""
        image, row, col = (inputs.patches[..., i][:, None].expand_as(alpha) for i in range(3))
        extent = int(inputs.patches[..., 1:].max()) + 1
        num_images = int(image.max()) + 1
        # Root patch per (row, image): the kept patch with the largest alpha, or the image's centre if none is kept.
        flat = (image.clamp(min=0) * extent + row.clamp(min=0)) * extent + col.clamp(min=0)
        kept_visual = keep & (image >= 0)
        best = torch.full((*alpha.shape[:2], num_images), float("-inf"), device=alpha.device)
        best.scatter_reduce_(-1, image.clamp(min=0), alpha.masked_fill(~kept_visual, float("-inf")), "amax")
        is_root = kept_visual & (alpha == best.gather(-1, image.clamp(min=0)))
        root = torch.full_like(best, -1, dtype=torch.long)
        root.scatter_reduce_(-1, image.clamp(min=0), flat.masked_fill(~is_root, -1), "amax")
        rows = torch.zeros_like(best, dtype=torch.long).scatter_reduce_(-1, image.clamp(min=0), row, "amax") + 1
        cols = torch.zeros_like(best, dtype=torch.long).scatter_reduce_(-1, image.clamp(min=0), col, "amax") + 1
        centre = (rows // 2) * extent + cols // 2
        root = torch.where(root >= 0, root % (extent * extent), centre).gather(-1, image.clamp(min=0))
        distance = (row - root // extent).abs() + (col - root % extent).abs()
        spatial = injection * self.spatial_decay ** distance.float() * absorbed
        order_rows = (image * extent + row) * extent + col
        order_cols = (image * extent + col) * extent + row
        retention = log_retention * absorbed
        return (gated_weights(spatial, retention, order_rows) + gated_weights(spatial, retention, order_cols)) / 2

    def calibration(self, inputs, weights, absorbed, probabilities, log_mass, asks) -> torch.Tensor:
        """[B, H_kv] c such that c * phi(q) . z matches, for the window's asking queries (geometric mean), the
        softmax mass sum_i w_i exp(q . k_i * scaling) of the absorbed tokens; a row that absorbed nothing is
        calibrated on all its tokens with weight 1."""
        has_any = absorbed.any(-1, keepdim=True)
        weights = torch.where(has_any, weights, inputs.is_real[:, None].float())
        norm = (feature_map(inputs.keys) * weights[..., None]).sum(-2)  # [B, H_kv, D]
        batch, heads = weights.shape[:2]
        groups = inputs.queries.shape[1] // heads
        w = probabilities.shape[2] // groups
        queries = inputs.queries[:, :, -w:].reshape(batch, heads, groups * w, -1)
        estimate = (feature_map(queries) @ norm[..., None])[..., 0]  # [B, H_kv, G * w]
        target = log_mass + (probabilities * weights[:, :, None]).sum(-1).clamp(min=1e-30).log()
        log_ratio = (target - estimate.clamp(min=1e-30).log()).masked_fill(asks[:, None] == 0, 0.0)
        return (log_ratio.sum(-1) / asks.sum(-1)[:, None]).exp()

    # -- decoding --------------------------------------------------------------------------------------------------

    def observe(self, view: DecodeView) -> None:
        # An exponential moving average (span `window_size`) of the attention each stored token receives.
        view.slot("scores").lerp_(view.attention.mean(dim=1), 1 / self.window_size)

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        return view.slot("scores").masked_fill(decode_recent(view, self.window_size), float("inf"))

    def absorb(self, view: DecodeView, tokens: LeavingTokens) -> None:
        """Absorbs a leaving token per row into the recall state (image patches into the visual state) with a = 1
        and h = the decay at average entropy: S <- h S + phi(k)^T v. Rows that release nothing are untouched
        (weight 0, decay 1): no boolean indexing, no host sync. A layer that kept every token has no memory: what
        leaves it later is dropped."""
        memory = view.memory
        if not memory:
            return
        retain = 1 / (1 + math.exp(-self.decay_bias))
        phi, value = (
            feature_map(tokens.keys)[:, :, None],
            with_one(tokens.values)[:, None, :],
        )  # [R, D, 1], [R, 1, D + 1]
        if tokens.leaving is None and "visual" not in memory:  # every row's token joins the one state
            memory["recall"].baddbmm_(phi, value, beta=retain)
            return
        joins = torch.ones_like(tokens.slot, dtype=torch.float32) if tokens.leaving is None else tokens.leaving.float()
        if "visual" in memory:
            visual = view.rows.slots["visual"].index_select(0, tokens.slot).float()
            self.join(memory["visual"], phi, value, joins * visual, retain)
            joins = joins * (1 - visual)
        self.join(memory["recall"], phi, value, joins, retain)

    @staticmethod
    def join(state: torch.Tensor, phi: torch.Tensor, value: torch.Tensor, joins: torch.Tensor, retain: float) -> None:
        """state [R, D, D + 1] <- h^j state + j phi^T value, j [R] in {0, 1}."""
        joins = joins[:, None, None]
        state.mul_(1 - (1 - retain) * joins).baddbmm_(phi * joins, value)  # decay: retain where a token joins, else 1

    def read_memory(self, view, queries, output, log_mass) -> torch.Tensor:
        if not self.readout:
            return output
        dim = queries.shape[-1]
        memory = view.memory
        state = memory["recall"] + memory["visual"] if "visual" in memory else memory["recall"]
        read = torch.bmm(feature_map(queries), state)  # [R, G * q, D + 1]: phi(q) S and phi(q) . z
        numerator, denominator = read[..., :dim], read[..., dim:].clamp(min=1e-30)
        log_gate = F.logsigmoid(self.gate_logit(view))  # [R, G * q, 1]
        local = output.float()
        if self.combine == "additive":
            combined = torch.addcmul(local, log_gate.exp(), numerator / denominator)
        else:  # the states as extra keys: softmax mass m over the kept tokens, c * phi(q) . z over the absorbed
            relative = (log_gate + memory["log_scale"] - log_mass[..., None]).exp()  # g c / m
            combined = torch.addcmul(local, relative, numerator) / (relative * denominator + 1)
        return combined.to(output.dtype)

    def gate_logit(self, view: DecodeView) -> torch.Tensor:
        """[R, G * q, 1] gate_weight * H_q + gate_bias, H_q the entropy of each query's attention over the row's
        kept image tokens (all kept tokens when the row keeps fewer than two), divided by its maximum (the log of
        their number)."""
        weights, rows = view.attention, view.rows
        if "visual" not in rows.slots and rows.uniform_length is not None:  # text, alike rows: one normaliser
            scale = -self.gate_weight / math.log(max(rows.uniform_length, 2))
            return torch.add(self.gate_bias, torch.special.xlogy(weights, weights).sum(-1, keepdim=True), alpha=scale)
        holds = view.holds()
        if "visual" not in rows.slots:  # text: the weights are already a distribution over the stored tokens
            members, counts = None, rows.lengths
        else:
            visual = view.slot("visual") if holds is None else view.slot("visual") & holds
            counts = view.sum_by_row(visual.sum(-1))
            by_visual = counts >= 2  # [R]
            members = torch.where(view.by_page(by_visual)[:, None], visual, True if holds is None else holds)
            counts = torch.where(by_visual, counts, rows.lengths)
        p = weights if members is None else weights * members[:, None]
        # Per row, before normalising p: its total T and sum p log p.
        total = view.sum_by_row(p.sum(-1)).clamp(min=1e-30)
        plogp = view.sum_by_row(torch.special.xlogy(p, p).sum(-1))
        entropy = total.log() - plogp / total  # -sum (p / T) log (p / T) = log T - (sum p log p) / T
        return (self.gate_weight * entropy / counts.clamp(min=2).float().log()[:, None] + self.gate_bias)[..., None]


def max_normalised(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """x / max of x over `members` [B, S], per row; 0 off members."""
    x = x * members[:, None]
    return x / x.amax(dim=-1, keepdim=True).clamp(min=1e-30)
