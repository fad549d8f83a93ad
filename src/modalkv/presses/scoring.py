"""Scoring helpers shared by presses: the one home of what several methods compute alike.

Prefill (`PrefillInputs`): the attention of a window of the last prompt queries (SnapKV, TOVA, MadaKV, RetentiveKV),
the attention each key gets from all prompt queries (H2O, LOOK-M), the recent-window and sink masks, a top-k within
a subset.
Decoding (`DecodeView`): the running sum of the new queries' attention and the decode-time recent window. GQA
throughout: a KV head's score averages (or stacks) the query heads of its group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modalkv.policy import DecodeView, PrefillInputs
from modalkv.presses.base import tokens_for_budget

# Logits per step of the accumulated-attention pass (16 MiB of float32): a step's logits stay in the CPU's cache
# through its masking, softmax and sum (at 8k tokens, 2.4x faster than 256 queries a step) and its memory is bounded.
_CHUNK_ELEMENTS = 1 << 22


def check_window(window_size: int) -> None:
    """Raises ValueError unless `window_size` (a count of recent tokens) is at least 1."""
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")


def check_kernel(kernel_size: int) -> None:
    """Raises ValueError unless `kernel_size` (a pooling kernel centred on each token) is a positive odd number."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")


def keeps_everything(budget: float | int, is_real: torch.Tensor) -> bool:
    """True when `budget` keeps every real token of every row (is_real: [B, S]): nothing to score or evict."""
    num_real = is_real.sum(-1)
    return bool((tokens_for_budget(budget, num_real) == num_real).all())


def recent_window(is_real: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the last `count` real tokens of each row (count: an int or [B] per row).

    Ranked among the row's real tokens, so a row keeps `count` tokens whatever its padding."""
    rank_from_end = is_real.flip(-1).long().cumsum(-1).flip(-1)  # 1 for the last real token, 2 for the one before...
    count = torch.as_tensor(count, device=is_real.device)
    return is_real & (rank_from_end <= (count[:, None] if count.dim() else count))


def sink_tokens(is_real: torch.Tensor, count: int) -> torch.Tensor:
    """[B, S] bool: the first `count` real tokens of each row (attention sinks), after any left padding."""
    return is_real & (is_real.long().cumsum(-1) <= count)


def window_logits(inputs: PrefillInputs, window_size: int) -> torch.Tensor:
    """The scaled logits of the last `window_size` queries over all keys, -inf where a query cannot see a key.

    Returns [B, H_kv, G * w] x S float32, the G query heads of each KV group stacked (query index g * w + t)."""
    batch, num_heads, seq, dim = inputs.queries.shape
    kv_heads = inputs.num_kv_heads
    w = min(window_size, seq)
    queries = inputs.queries[:, :, -w:].reshape(batch, kv_heads, (num_heads // kv_heads) * w, dim)
    logits = torch.matmul(queries.float(), inputs.keys.float().transpose(-1, -2)) * inputs.scaling
    query_columns = torch.arange(seq - w, seq, device=logits.device).repeat(num_heads // kv_heads)
    visible = torch.arange(seq, device=logits.device) <= query_columns[:, None]  # [G * w, S]
    visible = visible & inputs.is_real[:, None, None, :]  # [B, 1, G * w, S]
    return logits.masked_fill(~visible, float("-inf"))


def window_attention(inputs: PrefillInputs, window_size: int) -> torch.Tensor:
    """Softmax attention of the last `window_size` prompt queries over all keys: [B, H_kv, G * w, S] float32, causal
    within the window and zero on padding. A padding query (a left-padded row shorter than the window) sees no key:
    its row is all zero."""
    return window_logits(inputs, window_size).softmax(dim=-1).nan_to_num_(0.0)


def pooled_window_attention(inputs: PrefillInputs, window_size: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """SnapKV's score [B, H_kv, S] float32: the last `window_size` queries' attention to each key before the window,
    averaged over them and the KV group's query heads, then pooled over neighbouring keys (`pooling` "avg" or "max",
    odd `kernel_size`) within that prefix only, as kvpress does; the window's own tokens score 0."""
    batch, kv_heads, seq, _ = inputs.keys.shape
    prefix = max(seq - window_size, 0)
    if prefix == 0:  # the whole prompt is the window
        return inputs.keys.new_zeros(batch, kv_heads, seq, dtype=torch.float32)
    attention = window_attention(inputs, window_size)[..., :prefix]  # [B, H_kv, G * w, prefix]
    groups = inputs.queries.shape[1] // kv_heads
    scores = attention.view(batch, kv_heads, groups, -1, prefix).mean(dim=(2, 3))
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    scores = pool(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return F.pad(scores, (0, seq - prefix))


def accumulated_attention(inputs: PrefillInputs) -> torch.Tensor:
    """[B, H_kv, S] attention each key receives, summed over all (real) prompt queries and averaged over the query
    heads of its KV group. Computed in chunks of queries, each against the keys it can see (causal: half the
    products of a full S x S pass): memory O(chunk * S), not O(S^2), the chunk sized to stay in cache. Kept in
    `inputs.derived`, so the presses of a replayed prefill (H2O and LOOK-M at every budget of a grid) pay this O(S^2)
    pass once per layer; each caller gets its own copy (a press may change its scores in place)."""
    if "accumulated_attention" in inputs.derived:
        return inputs.derived["accumulated_attention"].clone()
    batch, num_heads, seq, dim = inputs.queries.shape
    kv_heads = inputs.num_kv_heads
    groups = num_heads // kv_heads
    keys_t = inputs.keys.float().transpose(-1, -2)
    total = inputs.keys.new_zeros((batch, kv_heads, seq), dtype=torch.float32)
    key_columns = torch.arange(seq, device=keys_t.device)
    chunk = max(1, _CHUNK_ELEMENTS // (batch * num_heads * seq))  # queries per step
    for start in range(0, seq, chunk):
        stop = min(start + chunk, seq)
        queries = inputs.queries[:, :, start:stop].float().reshape(batch, kv_heads, groups * (stop - start), dim)
        visible = key_columns[:stop] <= torch.arange(start, stop, device=keys_t.device)[:, None]  # [c, stop] causal
        visible = visible.repeat(groups, 1) & inputs.is_real[:, None, None, :stop]  # [B, 1, G * c, stop]
        logits = torch.matmul(queries, keys_t[..., :stop]).mul_(inputs.scaling).masked_fill_(~visible, float("-inf"))
        weights = logits.softmax(dim=-1).nan_to_num_(0.0)  # padding queries see nothing: rows of NaN -> 0
        total[..., :stop] += weights.sum(dim=2) / groups
    inputs.derived["accumulated_attention"] = total
    return total.clone()


def top_within(scores: torch.Tensor, members: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, H, S] mask of the top-`counts` [B, H] tokens by `scores` [B, H, S] among `members` [B, S]."""
    batch, heads, seq = scores.shape
    keep = torch.zeros(batch, heads, seq + 1, dtype=torch.bool, device=scores.device)
    if int(counts.max()) > 0:
        top = scores.masked_fill(~members[:, None], float("-inf")).topk(int(counts.max()), dim=-1).indices
        top = top.masked_fill(torch.arange(top.shape[-1], device=top.device) >= counts[..., None], seq)
        keep.scatter_(-1, top, True)
    return keep[..., :seq]


def share(total: torch.Tensor, weights: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Splits integer `total` [...] into parts [..., k] proportional to `weights`, each at most `capacity`, summing
    exactly to `total` (which must not exceed capacity.sum(-1)): capped parts are fixed and the rest re-split, then
    floors plus largest remainders."""
    weights = weights.double().clamp(min=0) + 1e-9  # a part with zero weight still takes what others cannot
    fixed = torch.zeros_like(capacity, dtype=torch.bool)
    for _ in range(capacity.shape[-1]):
        free = (total - (capacity * fixed).sum(-1)).double()
        open_weights = torch.where(fixed, 0.0, weights)
        ideal = torch.where(fixed, capacity.double(), free[..., None] * open_weights / open_weights.sum(-1, True))
        over = ~fixed & (ideal > capacity)
        if not bool(over.any()):
            break
        fixed |= over
    part = ideal.floor().long().minimum(capacity)
    short = total - part.sum(-1)
    remainder = torch.where(part < capacity, ideal - part, -1.0)
    rank = remainder.argsort(dim=-1, descending=True).argsort(dim=-1)
    return part + (rank < short[..., None]).long()


def add_decode_attention(view: DecodeView) -> None:
    """Adds the new queries' attention, summed over them and averaged over the group, to every slot's "scores"."""
    view.slot("scores").add_(view.attention.sum(dim=1), alpha=1 / view.query_groups)


def decode_recent(view: DecodeView, count: int | torch.Tensor) -> torch.Tensor:
    """[pages, width] bool: the slots holding one of the last `count` sequence columns (count: an int or [pages, 1])."""
    return view.slot("columns") >= view.seen - count
