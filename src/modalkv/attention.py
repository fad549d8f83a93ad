"""The `modalkv` attention function, registered through transformers' `AttentionInterface`: a thin adapter from
transformers' attention call to the cache, which owns the layer.

Prefill (a layer's cache is empty): attention is transformers' own sdpa, then the layer stores what its press keeps
-- right here, so prefill holds the compressed cache plus one layer at full length. Later forwards (decoding,
follow-up prompts): the layer's decoding step (`CompressedLayer.decode`) appends, attends, reads and evicts.

With no compressed layer pending (another cache, or `use_cache=False`) the function is plain sdpa. Either way a
sliding layer's many queries attend in blocks of its window (`windowed_attention`), not over every key.

Attention sinks (gpt-oss passes `s_aux`, one logit per query head) are honoured everywhere: transformers' sdpa would
drop them silently, so a prefill with sinks runs `sdpa_with_sinks`. A logit soft-cap (Gemma 2) is refused.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from modalkv.cache import take_pending
from modalkv.policy import PrefillInputs

ATTENTION_NAME = "modalkv"
# glibc keeps freed blocks in its heap while a small long-lived allocation (a compressed layer) sits above them, so a
# long prefill's resident memory would grow by every layer's freed activations (docs/benchmark.md: 643 MiB instead
# of ~300 at 8k tokens). Returning them after each compressed layer of a long CPU prefill costs a few ms.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None
TRIM_FROM_TOKENS = 2048


def register() -> None:
    """Makes `attn_implementation="modalkv"` available (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, modalkv_attention)
    # Without a mask function of the same name, transformers would build no mask at all (padding silently lost).
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def modalkv_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with the sdpa signature. query: [B, H, q, D]; key/value: [B, H_kv, q, D]. Returns [B, q, H, D]."""
    pending = take_pending(module.layer_idx)
    scaling = scaling if scaling is not None else key.shape[-1] ** -0.5
    if kwargs.get("softcap") is not None:
        raise ValueError("modalkv attention does not support a logit soft-cap (softcap); this model needs eager")
    sinks = kwargs.pop("s_aux", None)  # [H] attention-sink logits
    if pending is not None and pending.start_column > 0:
        # One new token is never padding (generate() pads prompts only); checking several reads the device once.
        if query.shape[2] > 1 and attention_mask is not None and not bool(seen_keys(attention_mask).all()):
            raise ValueError("padding among the new tokens of a forward on a compressed cache is not supported")
        return pending.layer.decode(query, key, value, scaling, sinks), None

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if sinks is not None:
            return sdpa_with_sinks(query, key, value, mask, scaling, sinks)
        return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)[0]

    window = kwargs.get("sliding_window")
    if window and attention_mask is not None and attention_mask.dim() == 4 and query.shape[2] > 2 * window:
        output = windowed_attention(attend, query, key, value, attention_mask, window)
    else:
        output = attend(query, key, value, attention_mask)
    if pending is not None:  # the prefill of a compressed layer: keep only what the press chooses
        cache = pending.layer.cache
        modality, patches = cache.prefill_maps(key.shape[0], key.shape[2], key.device)
        inputs = PrefillInputs(
            module=module,
            layer_idx=module.layer_idx,
            queries=query,
            keys=key,
            values=value,
            is_real=real_tokens(attention_mask, key),
            scaling=scaling,
            modality=modality,
            patches=patches,
            state=cache.press_state,
        )
        pending.layer.store_prefill(inputs)
        if _malloc_trim is not None and key.is_cpu and key.shape[0] * key.shape[2] >= TRIM_FROM_TOKENS:
            _malloc_trim(0)
    return output, None


def windowed_attention(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """A sliding layer's attention over many queries, a block of `window` queries at a time against only the keys
    within `window` of the block: the same result as `attend` over everything (the mask hides every other key), at
    O(S * window) instead of O(S^2) -- at 8k tokens and a 512 window, an eighth of a Gemma 3 sliding layer's sdpa.
    Where the mask lets a query see later tokens of its window (Gemma 3's images), the keys up to `window` ahead are
    included too (one read of the mask). query: [B, H, S, D]; key/value: [B, H_kv, K, D], the last S keys are the
    queries' own; attention_mask: [B, 1, S, K] bool or additive. Returns [B, S, H, D]."""
    seq, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - seq  # keys before the first query's own (a past held by another cache)
    ahead = window - 1 if bool(allowed(attention_mask)[:, 0].triu(offset + 1).any()) else 0
    blocks = []
    for start in range(0, seq, window):
        end = min(start + window, seq)
        first, last = max(0, offset + start - window + 1), min(kv_len, offset + end + ahead)
        mask = attention_mask[:, :, start:end, first:last]
        blocks.append(attend(query[:, :, start:end], key[:, :, first:last], value[:, :, first:last], mask))
    return torch.cat(blocks, dim=1)


def sdpa_with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """sdpa with one sink logit per query head in the softmax (gpt-oss), as one more key that every query sees with a
    zero value. One extra feature gives it exactly that logit and leaves the others alone: queries carry
    sinks[h] / scaling there, real keys 0, the sink key 1. query: [B, H, S, D]; key/value: [B, H_kv, K, D];
    attention_mask: [B, 1, S, K] bool or additive, or None (causal). Returns [B, S, H, D]."""
    batch, heads, seq, _ = query.shape
    kv_len = key.shape[2]
    sink_feature = (sinks.to(query.dtype) / scaling).view(1, heads, 1, 1).expand(batch, heads, seq, 1)
    query = torch.cat([query, sink_feature], dim=-1)
    key = F.pad(F.pad(key, (0, 1)), (0, 0, 0, 1))  # [B, H_kv, K + 1, D + 1]: a zero feature, then the sink key
    key[:, :, -1, -1] = 1
    value = F.pad(value, (0, 0, 0, 1))  # the sink contributes nothing
    if attention_mask is None:  # causal, aligned to the last keys (as transformers' masks are)
        attention_mask = torch.ones(seq, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - seq)
        attention_mask = attention_mask.expand(batch, 1, seq, kv_len)
    sink_column = 0 if attention_mask.dtype != torch.bool else True
    attention_mask = F.pad(attention_mask, (0, 1), value=sink_column)
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=heads != key.shape[1]
    )
    return output.transpose(1, 2).contiguous()


def allowed(attention_mask: torch.Tensor) -> torch.Tensor:
    """A mask as bool, True where a query sees a key, whether it came as bool or additive (0 / the dtype's minimum)."""
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def seen_keys(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, K] which keys of a 4-D mask some query sees: padding is seen by none (sliding windows hide real ones from
    some queries, never from all, as every token sees itself)."""
    return allowed(attention_mask)[:, 0].any(-2)


def real_tokens(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """[B, S] True for real tokens, False for padding, read from the prefill's 4-D mask (None: no padding). On a
    sliding layer it is right over the last query's window, the only columns the window keeps."""
    batch, _, seq, _ = key.shape
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=key.device)
    # The last query row sees every real key and no padding key, for left and right padding alike.
    return allowed(attention_mask[:, 0, -1, -seq:]).expand(batch, seq)
