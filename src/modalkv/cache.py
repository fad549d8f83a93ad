"""A transformers `Cache` that stores, per batch row and KV head, only the tokens a press keeps.

The storage itself (ragged rows in padded blocks, bounded slack, amortised growth) is in `storage.py`; this module
is the transformers side: the cache and layer contract, the logical length, byte accounting, beam reordering, and
the hand-off to the attention function.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from modalkv.storage import RowBlock, build_blocks

if TYPE_CHECKING:
    from modalkv.presses.base import Press, Selection


@dataclass
class PendingUpdate:
    """What `CompressedLayer.update` hands to the attention function of the same layer."""

    layer: CompressedLayer
    layer_idx: int
    keys: torch.Tensor  # [B, H_kv, q, D], rotated
    values: torch.Tensor  # [B, H_kv, q, D]
    start_column: int  # sequence column of the first new token


# Set by `update()`, consumed by the attention function of the same layer right after: the only link between the
# cache and attention, since transformers passes neither the cache nor unknown kwargs to attention functions.
_pending: contextvars.ContextVar[PendingUpdate | None] = contextvars.ContextVar("modalkv_pending", default=None)


def take_pending(layer_idx: int) -> PendingUpdate | None:
    """Returns and clears the update left by a compressed layer for `layer_idx`, or None if there is none."""
    pending = _pending.get()
    if pending is None:
        return None
    _pending.set(None)
    if pending.layer_idx != layer_idx:
        raise RuntimeError(
            f"modalkv attention ran for layer {layer_idx} right after the cache was updated for layer "
            f"{pending.layer_idx}; this model does not pair each cache update with its own attention call"
        )
    return pending


class CompressedLayer(CacheLayerMixin):
    """One layer of a `CompressedCache`: ragged per-row storage of the kept keys and values."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: CompressedCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.seen = 0  # logical length: sequence columns seen, padding included
        self.blocks: list[RowBlock] = []
        self.memory: dict[str, torch.Tensor] = {}  # a press's per-row state beside the tokens ([B * H_kv, ...])
        self.batch_size = 0
        self.num_kv_heads = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Registers new tokens for the attention call that follows; storage happens there (see `attention.py`)."""
        stale = _pending.get()
        if stale is not None and stale.layer.cache is self.cache:
            raise RuntimeError(
                f"the cache update for layer {stale.layer_idx} was never consumed by modalkv attention: the model's "
                "attention does not run through modalkv. Use press.generate(model, ...) or `with press.attach(model):`"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _pending.set(PendingUpdate(self, self.layer_idx, key_states, value_states, self.seen))
        self.seen += key_states.shape[-2]
        return key_states, value_states

    # -- storage -------------------------------------------------------------------------------------------------

    def store_prefill(self, keys: torch.Tensor, values: torch.Tensor, selection: Selection) -> None:
        """Stores the kept tokens of a prefill. keys, values: [B, H_kv, S, D], the whole prefill of this layer."""
        batch, heads, seq, dim = keys.shape
        flat_idx = selection.indices.reshape(batch * heads, -1)
        gather_idx = flat_idx[..., None].expand(-1, -1, dim)
        if selection.keys is not None:  # a merging press replaced some kept keys and values
            keys, values = selection.keys, selection.values
        kept = {
            "keys": keys.reshape(batch * heads, seq, dim).gather(1, gather_idx),
            "values": values.reshape(batch * heads, seq, dim).gather(1, gather_idx),
            "columns": flat_idx.to(torch.int32),
        }
        if selection.running_scores is not None:
            kept["scores"] = selection.running_scores.reshape(batch * heads, seq).gather(1, flat_idx)
        lengths = selection.lengths.reshape(-1).to(torch.long)
        budget, limits = self.cache.press.budget, None
        if self.cache.press.evict_every and budget != 1:  # rows stay at their budget while decoding
            limits = torch.full_like(lengths, int(budget)) if budget > 1 else lengths.clone()
        self.blocks = build_blocks(kept, lengths, limits)
        self.memory = selection.memory

    def append(self, keys: torch.Tensor, values: torch.Tensor, start_column: int) -> None:
        """Appends new tokens [B, H_kv, q, D] to every row (decoding, or a follow-up forward)."""
        batch, heads, q, dim = keys.shape
        flat = {"keys": keys.reshape(batch * heads, q, dim), "values": values.reshape(batch * heads, q, dim)}
        columns = torch.arange(start_column, start_column + q, device=keys.device, dtype=torch.int32)
        for block in self.blocks:
            rows = {name: t[block.index] for name, t in flat.items()}
            block.append({**rows, "columns": columns})

    # -- accounting ----------------------------------------------------------------------------------------------

    def kept_lengths(self) -> torch.Tensor:
        """[B, H_kv] number of tokens stored per row."""
        lengths = torch.zeros(self.batch_size * self.num_kv_heads, dtype=torch.long)
        for block in self.blocks:
            lengths[block.rows.cpu()] = block.lengths.cpu()
        return lengths.view(self.batch_size, self.num_kv_heads)

    def kept_columns(self) -> list[list[list[int]]]:
        """Sorted sequence columns stored per batch row and KV head."""
        per_row: dict[int, list[int]] = {}
        for block in self.blocks:
            for i, row in enumerate(block.rows.tolist()):
                per_row[row] = sorted(block.columns[i, : int(block.lengths[i])].tolist())
        heads = self.num_kv_heads
        return [[per_row.get(b * heads + h, []) for h in range(heads)] for b in range(self.batch_size)]

    def bytes_per_token(self) -> int:
        """Bytes of one token's key and value in one KV head."""
        return 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def cache_bytes(self) -> int:
        """Bytes of the kept keys and values (what the storage must hold, without slack)."""
        return int(self.kept_lengths().sum()) * self.bytes_per_token() if self.is_initialized else 0

    def allocated_bytes(self) -> int:
        """Bytes actually allocated: kept tokens plus padding, growth reserve and the int32 columns."""
        return sum(block.nbytes() for block in self.blocks)

    def memory_bytes(self) -> int:
        """Bytes of the press's state beside the tokens (RetentiveKV's state matrices); not in `cache_bytes`."""
        return sum(t.numel() * t.element_size() for t in self.memory.values())

    def full_cache_bytes(self) -> int:
        """Bytes an uncompressed DynamicCache would hold for the same inputs (padding included, as it stores it)."""
        if not self.is_initialized:
            return 0
        return self.batch_size * self.num_kv_heads * self.seen * self.bytes_per_token()

    # -- the transformers Cache-layer contract ------------------------------------------------------------------

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Before compression this is a normal causal mask. After it, attention builds its own masks from the
        # stored columns, so the model only needs the mask over the new tokens (same for every layer).
        return (query_length, self.seen) if self.seen else (query_length, 0)

    def reset(self) -> None:
        self.seen = 0
        self.blocks = []
        self.memory = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New batch row i is old row indices[i] (beam search reorders and duplicates rows this way)."""
        heads = self.num_kv_heads
        new_rows = torch.arange(len(indices) * heads)
        source_rows = indices.cpu().repeat_interleave(heads) * heads + torch.arange(heads).repeat(len(indices))
        blocks = []
        for block in self.blocks:
            local = torch.full((self.batch_size * heads,), -1, dtype=torch.long)
            local[block.rows.cpu()] = torch.arange(len(block.rows))
            picked = local[source_rows]
            take = picked >= 0
            if take.any():
                device = block.keys.device
                blocks.append(block.take_rows(picked[take].to(device), new_rows[take].to(device)))
        self.blocks = blocks
        self.memory = {name: state[source_rows.to(state.device)] for name, state in self.memory.items()}
        self.batch_size = len(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a compressed cache cannot be cropped (assisted / speculative decoding): evicted tokens are gone"
        )


class CompressedCache(Cache):
    """A transformers `Cache` whose layers keep only the tokens chosen by `press`.

    Pass it as `past_key_values` to `model.generate()` or a forward call of a model attached with
    `press.attach(model)` (or use `press.generate(model, ...)`, which does both).

    Args:
        press: the method that picks which tokens each layer and KV head keeps.
        modality: [B, S] the prompt's modality map (`modality.py`), for presses that read it; None: all text.
        patches: [B, S, 3] the prompt's patch map (`modality.py`); None: inferred from `modality` when needed.
    """

    def __init__(self, press: Press, modality: torch.Tensor | None = None, patches: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.press = press
        self.modality = modality
        self.patches = patches
        self.press_state: dict = {}  # what a press carries from one layer's prefill to the next (e.g. budgets)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    # Beam search duplicates and reorders batch rows: the prompt's maps follow them, as the layers' rows do.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.select_map_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.modality is not None:
            self.select_map_rows(torch.arange(self.modality.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.select_map_rows(indices)

    def select_map_rows(self, indices: torch.Tensor) -> None:
        """New row i of the modality and patch maps is old row indices[i]."""
        if self.modality is not None:
            self.modality = self.modality[indices.to(self.modality.device)]
        if self.patches is not None:
            self.patches = self.patches[indices.to(self.patches.device)]

    def cache_bytes(self) -> int:
        """Bytes of the kept keys and values over all layers."""
        return sum(layer.cache_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes allocated by the storage (kept tokens + bounded slack, see the module docstring)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def memory_bytes(self) -> int:
        """Bytes of the presses' state beside the kept tokens (RetentiveKV's memories), over all layers."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def full_cache_bytes(self) -> int:
        """Bytes an uncompressed cache (DynamicCache) would hold for the same inputs."""
        return sum(layer.full_cache_bytes() for layer in self.layers)

    def kept_positions(self) -> list[list[list[list[int]]]]:
        """Kept sequence positions per layer, batch row and KV head: `[layer][row][head] -> sorted list`."""
        return [layer.kept_columns() for layer in self.layers]
