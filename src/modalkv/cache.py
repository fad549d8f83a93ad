"""A KV cache that stores, per batch row and KV head, only the tokens a press keeps.

Storage is ragged: after compression each (batch row, KV head) pair -- a "row" below -- holds its own number of
tokens. Rows of similar length share one padded buffer (a `_Block`), so a layer costs a handful of tensors, decode
attention costs one `sdpa` call per block, and the padding is bounded:

* within a block, a row's length is at least 8/9 of the longest row's minus 16 tokens (`_BLOCK_SLACK`);
* each block reserves `_GROWTH_MIN` free slots after compression and grows by 1/8 when full, so decoding never
  copies the cache per token (amortised growth).

Keys are stored after rotary embedding, as transformers' own caches do, so kept tokens keep their original
positions. Each stored token also records its column in the sequence (int32), which is what lets several new
tokens attend causally to a compressed past, and what `kept_positions()` reports.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from modalkv.presses.base import Press

_GROWTH_MIN = 16  # free slots reserved per block after compression, and the least a block grows by
_BLOCK_SLACK = 8  # a block accepts rows down to 1/(1 + 1/_BLOCK_SLACK) of its longest row (minus _GROWTH_MIN)


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


@dataclass
class _Block:
    """Rows of one layer that share a padded buffer; only the first `lengths[i]` slots of row i are valid."""

    rows: torch.Tensor  # [n] long, indices into batch * kv_heads, ascending
    keys: torch.Tensor  # [n, capacity, D]
    values: torch.Tensor  # [n, capacity, D]
    columns: torch.Tensor  # [n, capacity] int32, sequence column of each stored token
    lengths: torch.Tensor  # [n] long
    max_length: int  # lengths.max() and lengths.min(), kept as ints to slice and branch without a sync
    min_length: int
    covers_all_rows: bool  # rows == arange(batch * kv_heads): no gather/scatter needed

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.keys, self.values, self.columns))

    def grow(self, needed: int) -> None:
        """Reallocates with room for at least `needed` slots per row (amortised: +1/8, at least _GROWTH_MIN)."""
        capacity = needed + max(_GROWTH_MIN, needed // 8)
        n, _, dim = self.keys.shape
        for name in ("keys", "values", "columns"):
            old = getattr(self, name)
            # Zeroed, not empty: padding slots are masked out, but 0 * NaN garbage would still poison the output.
            new = old.new_zeros((n, capacity, dim) if old.dim() == 3 else (n, capacity))
            new[:, : self.max_length] = old[:, : self.max_length]
            setattr(self, name, new)

    def append(self, keys: torch.Tensor, values: torch.Tensor, columns: torch.Tensor) -> None:
        """Appends q tokens to every row. keys/values: [n, q, D]; columns: [q]."""
        q = keys.shape[1]
        if self.max_length + q > self.capacity:
            self.grow(self.max_length + q)
        if self.min_length == self.max_length:  # every row ends at the same slot: plain slice writes
            end = self.max_length + q
            self.keys[:, self.max_length : end] = keys
            self.values[:, self.max_length : end] = values
            self.columns[:, self.max_length : end] = columns
        else:
            slots = self.lengths[:, None] + torch.arange(q, device=keys.device)  # [n, q]
            index = torch.arange(len(self.rows), device=keys.device)[:, None]
            self.keys[index, slots] = keys
            self.values[index, slots] = values
            self.columns[index, slots] = columns
        self.lengths += q
        self.max_length += q
        self.min_length += q


def _group_rows(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Splits rows into blocks of similar length (see module docstring). Returns ascending row indices per block."""
    order = torch.argsort(lengths, stable=True).tolist()
    values = lengths.tolist()
    groups: list[list[int]] = []
    for row in order:
        if groups and values[row] <= values[groups[-1][0]] * (1 + 1 / _BLOCK_SLACK) + _GROWTH_MIN:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [torch.tensor(sorted(g), dtype=torch.long) for g in groups]


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
        self.blocks: list[_Block] = []
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

    def store_prefill(self, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, lengths: torch.Tensor):
        """Stores the kept tokens of a prefill.

        Args:
            keys, values: [B, H_kv, S, D] the whole prefill of this layer.
            indices: [B, H_kv, K] kept token indices, ascending in the first `lengths` entries.
            lengths: [B, H_kv] how many tokens each row keeps.
        """
        batch, heads, seq, dim = keys.shape
        flat_idx = indices.reshape(batch * heads, -1)
        gather_idx = flat_idx[..., None].expand(-1, -1, dim)
        kept_keys = keys.reshape(batch * heads, seq, dim).gather(1, gather_idx)
        kept_values = values.reshape(batch * heads, seq, dim).gather(1, gather_idx)
        flat_lengths = lengths.reshape(-1).to(torch.long).cpu()
        self.blocks = []
        for rows in _group_rows(flat_lengths):
            block_lengths = flat_lengths[rows]
            longest = int(block_lengths.max())
            capacity = longest + _GROWTH_MIN
            covers_all = len(rows) == batch * heads
            block = _Block(
                rows=rows.to(keys.device),
                keys=keys.new_zeros((len(rows), capacity, dim)),
                values=values.new_zeros((len(rows), capacity, dim)),
                columns=torch.zeros((len(rows), capacity), dtype=torch.int32, device=keys.device),
                lengths=block_lengths.to(keys.device),
                max_length=longest,
                min_length=int(block_lengths.min()),
                covers_all_rows=covers_all,
            )
            source = slice(None) if covers_all else block.rows
            block.keys[:, :longest] = kept_keys[source, :longest]
            block.values[:, :longest] = kept_values[source, :longest]
            block.columns[:, :longest] = flat_idx[source, :longest].to(torch.int32)
            self.blocks.append(block)

    def append(self, keys: torch.Tensor, values: torch.Tensor, start_column: int) -> None:
        """Appends new tokens [B, H_kv, q, D] to every row (decoding, or a follow-up forward)."""
        batch, heads, q, dim = keys.shape
        flat_keys = keys.reshape(batch * heads, q, dim)
        flat_values = values.reshape(batch * heads, q, dim)
        columns = torch.arange(start_column, start_column + q, device=keys.device, dtype=torch.int32)
        for block in self.blocks:
            if block.covers_all_rows:
                block.append(flat_keys, flat_values, columns)
            else:
                block.append(flat_keys[block.rows], flat_values[block.rows], columns)

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
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New batch row i is old row indices[i] (beam search reorders and duplicates rows this way)."""
        if not self.blocks:
            self.batch_size = len(indices)
            return
        heads = self.num_kv_heads
        new_rows = torch.arange(len(indices) * heads)
        source_rows = indices.cpu().repeat_interleave(heads) * heads + torch.arange(heads).repeat(len(indices))
        for block in self.blocks:
            local = torch.full((self.batch_size * heads,), -1, dtype=torch.long)
            local[block.rows.cpu()] = torch.arange(len(block.rows))
            picked = local[source_rows]
            take = picked >= 0
            select = picked[take].to(block.keys.device)
            block.rows = new_rows[take].to(block.keys.device)
            block.keys, block.values = block.keys[select], block.values[select]
            block.columns, block.lengths = block.columns[select], block.lengths[select]
            block.covers_all_rows = len(block.rows) == len(new_rows)
        self.blocks = [b for b in self.blocks if len(b.rows)]
        for block in self.blocks:
            block.max_length, block.min_length = int(block.lengths.max()), int(block.lengths.min())
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
    """

    def __init__(self, press: Press):
        super().__init__(layers=[])
        self.press = press

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(CompressedLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    def cache_bytes(self) -> int:
        """Bytes of the kept keys and values over all layers."""
        return sum(layer.cache_bytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes allocated by the storage (kept tokens + bounded slack, see the module docstring)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def full_cache_bytes(self) -> int:
        """Bytes an uncompressed cache (DynamicCache) would hold for the same inputs."""
        return sum(layer.full_cache_bytes() for layer in self.layers)

    def kept_positions(self) -> list[list[list[list[int]]]]:
        """Kept sequence positions per layer, batch row and KV head: `[layer][row][head] -> sorted list`."""
        return [layer.kept_columns() for layer in self.layers]
