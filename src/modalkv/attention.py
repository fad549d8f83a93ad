"""The `modalkv` attention function, registered through transformers' `AttentionInterface`.

Prefill (a layer's cache is empty): attention is transformers' own sdpa, then the cache's press chooses the tokens
each KV head keeps and the layer stores only those -- right here, so prefill holds the compressed cache plus one
layer at full length. Later forwards (decoding, follow-up prompts): new tokens are appended and attention runs over
the ragged storage, one sdpa call per block of similar-length rows, with masks built from what the layer stores
rather than from the one mask transformers sizes for all layers.

With no compressed layer pending (another cache, or `use_cache=False`) the function is plain sdpa.
"""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from modalkv.cache import CompressedLayer, take_pending
from modalkv.modality import check_modality, check_patches, infer_patches
from modalkv.presses.base import DecodeView, PrefillInputs

ATTENTION_NAME = "modalkv"
# glibc keeps freed blocks in its heap while a small long-lived allocation (a compressed layer) sits above them, so a
# long prefill's resident memory would grow by every layer's freed activations (docs/benchmark.md: 643 MiB instead
# of ~300 at 8k tokens). Returning them after each compressed layer of a long CPU prefill costs a few ms.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None
TRIM_FROM_TOKENS = 2048


def register() -> None:
    """Makes `attn_implementation="modalkv"` available (idempotent; called by `Press.attach`)."""
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
    if pending is None or pending.start_column == 0:
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if pending is not None:  # the prefill of a compressed layer: keep only what the press chooses
            modality, patches = pending.layer.cache.modality, pending.layer.cache.patches
            if modality is not None:
                modality = check_modality(modality.to(key.device), key.shape[0], key.shape[2])
                if patches is None:  # inferred once, at the first layer
                    patches = pending.layer.cache.patches = infer_patches(modality)
                patches = check_patches(patches.to(key.device), modality)
            elif patches is not None:
                raise ValueError("a patch map was given without a modality map")
            inputs = PrefillInputs(
                module=module,
                layer_idx=module.layer_idx,
                queries=query,
                keys=key,
                values=value,
                is_real=real_tokens(attention_mask, key),
                scaling=scaling if scaling is not None else key.shape[-1] ** -0.5,
                modality=modality,
                patches=patches,
                state=pending.layer.cache.press_state,
            )
            pending.layer.store_prefill(key, value, pending.layer.cache.press.select(inputs))
            if _malloc_trim is not None and key.is_cpu and key.shape[0] * key.shape[2] >= TRIM_FROM_TOKENS:
                _malloc_trim(0)
        return output, None
    if attention_mask is not None and not bool(real_tokens(attention_mask, key).all()):
        raise ValueError("padding among the new tokens of a forward on a compressed cache is not supported")
    layer, press = pending.layer, pending.layer.cache.press
    layer.append(key, value, pending.start_column)
    # Only rows with a limit evict: none at budget 1.0, so that budget stays exactly `full` (and plain sdpa).
    interval = press.evict_every if any(block.limits is not None for block in layer.blocks) else 0
    with_weights = bool(interval or layer.memory) and press.needs_decode_attention
    output, weights, log_masses = ragged_attention(layer, query, scaling, pending.start_column, with_weights)
    if layer.memory:
        output = press.read_memory(layer, query, output, weights, log_masses)
    if interval:
        groups = query.shape[1] // layer.num_kv_heads
        for block, attention in zip(layer.blocks, weights, strict=True):
            view = DecodeView(layer, block, attention, layer.num_kv_heads, groups, layer.seen)
            press.observe(view)
            fewest, most = block.excess()
            if most >= interval:  # back to the budget
                leaving = block.over_limit(press.decode_scores(view), fewest, most)
                press.release(view, leaving)
                block.remove(leaving, every_row=fewest == most)
    return output, None


def real_tokens(attention_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor:
    """[B, S] True for real tokens, False for padding, read from the prefill's 4-D mask (None: no padding)."""
    batch, _, seq, _ = key.shape
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=key.device)
    # The last query row sees every real key and no padding key, for left and right padding alike.
    last_row = attention_mask[:, 0, -1, -seq:]
    if last_row.dtype != torch.bool:
        last_row = last_row > torch.finfo(last_row.dtype).min / 2
    return last_row.expand(batch, seq)


def ragged_attention(
    layer: CompressedLayer, query: torch.Tensor, scaling: float | None, start_column: int, with_weights: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Attention of new queries over a layer's ragged storage (new tokens already appended).

    The G query heads of a KV group are stacked as G * q queries of a single head, so each block is one sdpa call
    on [rows, 1, G * q, D] against [rows, 1, L, D] with no key repetition.

    Returns:
        output: [B, q, H, D].
        weights: per block, [n, G * q, L] attention weights when `with_weights` (computed explicitly instead of
            by sdpa), else None.
        log_masses: per block, [n, G * q] log-sum-exp of the scaled logits when `with_weights`, else None.
    """
    batch, num_heads, q, dim = query.shape
    kv_heads = layer.num_kv_heads
    groups = num_heads // kv_heads
    row_queries = query.reshape(batch * kv_heads, 1, groups * q, dim)
    output = None if len(layer.blocks) == 1 else row_queries.new_empty(row_queries.shape)
    weights: list[torch.Tensor | None] = []
    log_masses: list[torch.Tensor | None] = []
    for block in layer.blocks:
        length = block.max_length
        mask = None
        if q > 1:  # new tokens attend causally among themselves; everything stored earlier is in their past
            query_columns = torch.arange(start_column, start_column + q, device=query.device, dtype=torch.int32)
            mask = block.columns[:, None, :length] <= query_columns[:, None]  # [n, q, L]
            mask = mask[:, None].expand(-1, groups, -1, -1).reshape(len(block.rows), 1, groups * q, length)
        if block.min_length < length:
            valid = torch.arange(length, device=query.device) < block.lengths[:, None]  # [n, L]
            mask = valid[:, None, None] if mask is None else mask & valid[:, None, None]
        block_queries = row_queries[block.index]
        keys, values = block.keys[:, None, :length], block.values[:, None, :length]
        if with_weights:
            logits = torch.matmul(block_queries, keys.transpose(-1, -2)) * (scaling or dim**-0.5)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            log_mass = logits.logsumexp(dim=-1, keepdim=True)
            probabilities = (logits - log_mass).exp()
            result = torch.matmul(probabilities, values)
            weights.append(probabilities[:, 0])
            log_masses.append(log_mass[:, 0, :, 0])
        else:
            result = torch.nn.functional.scaled_dot_product_attention(
                block_queries, keys, values, attn_mask=mask, scale=scaling
            )
            weights.append(None)
            log_masses.append(None)
        if output is None:
            output = result
        else:
            output[block.index] = result
    return output.reshape(batch, num_heads, q, dim).transpose(1, 2).contiguous(), weights, log_masses
