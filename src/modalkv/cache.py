"""A transformers `Cache` that stores, per batch row and KV head, only the tokens a press keeps, and owns a layer's
decoding step.

The storage itself (ragged rows in paged buffers, bounded slack, amortised growth) is in `storage.py`; this module is
the transformers side -- the cache and layer contract, the logical length, byte accounting, beam reordering -- and the
protocol around the press (`policy.py`): a layer stores the press's selection at prefill, and runs each later forward
as one step: append, attention (`kernels.py`), the press's memory read-out, the press's decode-time eviction.

Hybrid models (Gemma 3, gpt-oss) mix full-attention ("global") and sliding-window layers. The cache reads each layer's
kind from the model's config exactly as transformers' own DynamicCache does (`policy.attention_windows`): global
layers are compressed by the press, sliding layers keep transformers' window (`policy.SlidingWindow`, the last
`sliding_window - 1` tokens between forwards) in the same ragged storage, so their decoding step is the same
sync-free step. Budgets apply to global layers; byte counts cover both (`include_sliding`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

from modalkv.kernels import ragged_attention
from modalkv.modality import check_modality, check_patches, infer_patches
from modalkv.policy import DecodeView, LeavingTokens, Policy, PrefillInputs, SlidingWindow, attention_windows
from modalkv.storage import GROWTH_MIN, RaggedRows


@dataclass
class PendingUpdate:
    """What `CompressedLayer.update` hands to the attention function of the same layer."""

    layer: CompressedLayer
    layer_idx: int
    keys: torch.Tensor  # [B, H_kv, q, D], rotated
    values: torch.Tensor  # [B, H_kv, q, D]
    start_column: int  # sequence column of the first new token


class _PendingSlot(threading.local):
    """Set by `update()`, consumed by the attention function of the same layer right after: the only link between
    the cache and attention, since transformers passes neither the cache nor unknown kwargs to attention functions.
    Per thread, and a plain attribute that torch.compile traces (a ContextVar would break its graph)."""

    update: PendingUpdate | None = None


_pending = _PendingSlot()


def take_pending(layer_idx: int) -> PendingUpdate | None:
    """Returns and clears the update left by a compressed layer for `layer_idx`, or None if there is none."""
    pending = _pending.update
    if pending is None:
        return None
    _pending.update = None
    if pending.layer_idx != layer_idx:
        raise RuntimeError(
            f"modalkv attention ran for layer {layer_idx} right after the cache was updated for layer "
            f"{pending.layer_idx}; this model does not pair each cache update with its own attention call"
        )
    return pending


class SequenceBytes(NamedTuple):
    """One sequence's bytes in a cache (`CompressedCache.sequence_bytes`)."""

    cache: int  # kept keys and values, every layer
    full_cache: int  # what transformers' own cache would hold for it (sliding layers: their window)
    global_cache: int  # the same two over the layers the press compresses
    global_full_cache: int
    memory: int  # the press's state beside the tokens


class CompressedLayer(CacheLayerMixin):
    """One layer of a `CompressedCache`: ragged per-row storage of the kept keys and values. A sliding-window layer
    (known at its prefill) keeps `window`'s tokens instead of the press's."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: CompressedCache, layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.seen = 0  # logical length: sequence columns seen, padding included
        self.rows: RaggedRows | None = None  # None until the prefill is stored
        self.memory: dict[str, torch.Tensor] = {}  # a press's per-row state beside the tokens ([B * H_kv, ...])
        self.batch_size = 0
        self.num_kv_heads = 0
        self.window: SlidingWindow | None = None

    @property
    def is_sliding(self) -> bool:
        return self.window is not None

    @property
    def policy(self) -> Policy | SlidingWindow:
        """Who decides what this layer keeps: its window if it is a sliding layer, else the cache's press."""
        return self.window or self.cache.press

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Registers new tokens for the attention call that follows; storage happens there (see `attention.py`)."""
        stale = _pending.update
        if stale is not None and stale.layer.cache is self.cache:
            raise RuntimeError(
                f"the cache update for layer {stale.layer_idx} was never consumed by modalkv attention: the model's "
                "attention does not run through modalkv. Use press.generate(model, ...) or `with press.attach(model):`"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _pending.update = PendingUpdate(self, self.layer_idx, key_states, value_states, self.seen)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    # -- prefill and decoding -----------------------------------------------------------------------------------

    def store_prefill(self, inputs: PrefillInputs) -> None:
        """Stores what the press (or, on a sliding layer, the window) keeps of this layer's prefill
        (inputs.keys/values: [B, H_kv, S, D])."""
        if self.cache.recorded_prefill is not None:
            self.cache.recorded_prefill.append(inputs)
        windows = self.cache.layer_windows(inputs.module.config)
        size = windows[self.layer_idx]
        self.window = None if size is None else SlidingWindow(size)
        if size is None:  # the press sees the global layers only: depth and count among them
            global_layers = [i for i, w in enumerate(windows) if w is None]
            depth = global_layers.index(self.layer_idx)
            inputs = replace(inputs, layer_idx=depth, num_compressed_layers=len(global_layers))
        policy = self.policy
        selection = policy.select(inputs)
        batch, heads, seq, dim = inputs.keys.shape
        flat_idx = selection.indices.reshape(batch * heads, -1)
        gather_idx = flat_idx[..., None].expand(-1, -1, dim)
        keys, values = inputs.keys, inputs.values
        if selection.keys is not None:  # a merging press replaced some kept keys and values
            keys, values = selection.keys, selection.values
        kept = {
            "keys": keys.reshape(batch * heads, seq, dim).gather(1, gather_idx),
            "values": values.reshape(batch * heads, seq, dim).gather(1, gather_idx),
            "columns": flat_idx.to(torch.int32),
        }
        for name, data in selection.slot_data.items():
            kept[name] = data.reshape(batch * heads, seq).gather(1, flat_idx)
        lengths = selection.lengths.reshape(-1).to(torch.long)
        limits, reserve = None, self.cache.reserve
        if self.window is not None:
            limits, reserve = torch.full_like(lengths, self.window.limit), self.window.evict_every
        elif policy.evict_every and policy.budget != 1:  # rows stay at their budget while decoding
            limits = torch.full_like(lengths, int(policy.budget)) if policy.budget > 1 else lengths.clone()
            reserve = policy.evict_every
        self.rows = RaggedRows.build(kept, lengths, limits, reserve)
        self.memory = selection.memory

    def decode(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        scaling: float,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One forward's new tokens on a stored layer: append, attend, read the memory, evict.

        query: [B, H, q, D]; keys, values: [B, H_kv, q, D], rotated; sinks: [H] attention-sink logits (gpt-oss) or
        None. Returns [B, q, H, D]."""
        press, rows = self.policy, self.rows
        batch, num_heads, q, dim = query.shape
        num_rows, groups = batch * self.num_kv_heads, num_heads // self.num_kv_heads
        start_column = self.seen - q
        rows.append({"keys": keys.reshape(-1, dim), "values": values.reshape(-1, dim)}, start_column, press.decode_fill)
        # Stacked queries [R, G * q, D]: a row's G query heads, each with its q tokens (one token: a view).
        queries = query.reshape(num_rows, groups * q, dim)
        query_columns = start_column  # one new token sees everything stored; several attend causally among themselves
        if q > 1:
            query_columns = torch.arange(start_column, self.seen, device=query.device, dtype=torch.int32).repeat(groups)
        if sinks is not None:  # [H] -> [R, G * q]: query head (KV head, g) of every row, each of its q tokens
            sinks = sinks.float().view(1, self.num_kv_heads, groups, 1).expand(batch, -1, -1, q).reshape(num_rows, -1)
        evicting = rows.limits is not None
        with_weights = (evicting or bool(self.memory)) and press.needs_decode_attention
        window = None if self.window is None else self.window.size
        result = ragged_attention(rows, queries, scaling, query_columns, with_weights, window, sinks)
        output = result.output
        if self.memory or evicting:
            view = DecodeView(
                rows, result.weights, self.memory, self.num_kv_heads, groups, self.seen, self.cache.press_state
            )
            if self.memory:
                output = press.read_memory(view, queries, output, result.log_mass)
            if evicting:
                press.observe(view)
                if self.window is not None and q > 1:  # several tokens: what left the window goes at once
                    self.rows = rows.keep_from_column(self.seen - self.window.limit)
                elif rows.unevicted >= press.evict_every:
                    rows.evict(press.decode_scores(view), self._absorb(view) if press.absorbs_leaving else None)
        if q == 1:  # [R, G, D] is already [B, 1, H, D] in memory
            return output.view(batch, 1, num_heads, dim)
        return output.view(batch, num_heads, q, dim).transpose(1, 2)

    def _absorb(self, view: DecodeView):
        """The storage's release hook: gathers each leaving token and hands it to the press."""
        rows = self.rows

        def release(slot: torch.Tensor, leaving: torch.Tensor | None) -> None:
            tokens = LeavingTokens(
                rows.slots["keys"].index_select(0, slot), rows.slots["values"].index_select(0, slot), slot, leaving
            )
            self.cache.press.absorb(view, tokens)  # sliding layers absorb nothing

        return release

    # -- accounting ----------------------------------------------------------------------------------------------

    def kept_lengths(self) -> torch.Tensor:
        """[B, H_kv] number of tokens stored per row."""
        return self.rows.lengths.cpu().view(self.batch_size, self.num_kv_heads)

    def kept_columns(self) -> list[list[list[int]]]:
        """Sorted sequence columns stored per batch row and KV head."""
        columns = self.rows.padded()["columns"].tolist()
        lengths = self.rows.lengths.tolist()
        per_row = [sorted(row[:n]) for row, n in zip(columns, lengths, strict=True)]
        heads = self.num_kv_heads
        return [per_row[b * heads : (b + 1) * heads] for b in range(self.batch_size)]

    def bytes_per_token(self) -> int:
        """Bytes of one token's key and value in one KV head."""
        return 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def cache_bytes(self) -> int:
        """Bytes of the kept keys and values (what the storage must hold, without slack)."""
        return int(self.kept_lengths().sum()) * self.bytes_per_token() if self.rows is not None else 0

    def allocated_bytes(self) -> int:
        """Bytes actually allocated: kept tokens plus padding, growth reserve and the int32 columns."""
        return self.rows.nbytes() if self.rows is not None else 0

    def memory_bytes(self) -> int:
        """Bytes of the press's state beside the tokens (RetentiveKV's state matrices); not in `cache_bytes`."""
        return sum(t.numel() * t.element_size() for t in self.memory.values())

    def full_cache_bytes(self) -> int:
        """Bytes transformers' own DynamicCache would hold for the same inputs (padding included, as it stores it;
        a sliding layer: its window's last `sliding_window - 1` columns)."""
        if not self.is_initialized:
            return 0
        held = self.seen if self.window is None else min(self.seen, self.window.limit)
        return self.batch_size * self.num_kv_heads * held * self.bytes_per_token()

    def sequence_bytes(self, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per batch row ([B] tensors): its kept K/V bytes and what transformers' cache would hold for that sequence
        alone (its `padding` left columns, [B], not stored); and one row's share of the press's state (every row
        carries the same-sized state)."""
        bytes_per_token = self.bytes_per_token()
        kept = self.kept_lengths().sum(1) * bytes_per_token
        held = self.seen - padding.cpu()
        if self.window is not None:
            held = held.clamp(max=self.window.limit)
        return kept, self.num_kv_heads * held * bytes_per_token, self.memory_bytes() // max(self.batch_size, 1)

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
        self.rows = None
        self.memory = {}
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """New batch row i is old row indices[i] (beam search reorders and duplicates rows this way)."""
        heads = self.num_kv_heads
        source_rows = indices.repeat_interleave(heads) * heads + torch.arange(heads, device=indices.device).repeat(
            len(indices)
        )
        if self.rows is not None:
            self.rows = self.rows.select_rows(source_rows.to(self.rows.lengths.device))
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
        reserve: free slots per row after the prefill, for the tokens decoded without eviction (rows grow by 1/16
            when full; reserving the whole generation keeps decoding shapes static, e.g. under torch.compile).
        compileable: tells transformers' generate() that its decoding steps may run compiled (`api.generate` with
            `compile=True`): the step has no graph break, no host sync, and shapes that change only with growth.
        record_prefill: keep every layer's prefill inputs (`recorded_prefill`), for `replay_prefill`.
    """

    def __init__(
        self,
        press: Policy,
        modality: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        reserve: int = GROWTH_MIN,
        compileable: bool = False,
        record_prefill: bool = False,
    ):
        super().__init__(layers=[])
        self.compileable = compileable
        self.press = press
        self.modality = modality
        self.patches = patches
        self.reserve = reserve
        self.press_state: dict = {}  # what a press carries from one layer's prefill to the next (e.g. budgets)
        self.maps_checked: tuple | None = None  # the prefill shape the maps were last checked against
        self.windows: list[int | None] | None = None  # per layer: its sliding window, None for full attention
        self.recorded_prefill: list[PrefillInputs] | None = [] if record_prefill else None

    def replay_prefill(self, recorded: list[PrefillInputs]) -> None:
        """Fills this empty cache with what its press keeps of a prefill that another cache recorded
        (`record_prefill=True`): each layer's prefill inputs are handed to the press in layer order, as the attention
        function would hand them, without running the model again. Exact, because a layer's prefill output never
        depends on the press (prefill attention is over the whole prompt; the press only chooses what is stored), so
        the recorded inputs are the ones this press would see in its own prefill. A press that needs more than a layer's
        inputs (KVzip's scores) finds its `Press.prompt_state` in `press_state`, put there first by the caller
        (`SharedPrefill.replay`). Run it where the press is attached or `using` the model, as a prefill would be."""
        if self.layers:
            raise ValueError("a prefill is replayed into an empty cache")
        self.modality, self.patches = recorded[0].modality, recorded[0].patches
        for inputs in recorded:
            if inputs.layer_idx != len(self.layers):
                raise ValueError("a recorded prefill holds every layer once, in order")
            layer = CompressedLayer(self, inputs.layer_idx)
            layer.lazy_initialization(inputs.keys, inputs.values)
            layer.seen = inputs.keys.shape[2]
            self.layers.append(layer)
            layer.store_prefill(replace(inputs, state=self.press_state))

    def layer_windows(self, config: PretrainedConfig) -> list[int | None]:
        """Per layer, its sliding window or None (full attention), read from the model's config once."""
        if self.windows is None:
            self.windows = attention_windows(config)
        return self.windows

    def prefill_maps(self, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        """The prompt's modality and patch maps on `device`, checked against the prefill's shape once (at its first
        layer) and kept for the others."""
        if self.modality is None:
            if self.patches is not None:
                raise ValueError("a patch map was given without a modality map")
            return None, None
        if self.maps_checked != (batch, seq, device):
            self.modality = check_modality(self.modality.to(device), batch, seq)
            patches = infer_patches(self.modality) if self.patches is None else self.patches.to(device)
            self.patches = check_patches(patches, self.modality)
            self.maps_checked = (batch, seq, device)
        return self.modality, self.patches

    @property
    def is_compileable(self) -> bool:
        # Asked by generate() before the prefill, when no layer exists yet: the cache's own setting decides.
        return self.compileable

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
        self.maps_checked = None
        if self.modality is not None:
            self.modality = self.modality[indices.to(self.modality.device)]
        if self.patches is not None:
            self.patches = self.patches[indices.to(self.patches.device)]

    def cache_bytes(self, include_sliding: bool = True) -> int:
        """Bytes of the kept keys and values over all layers (`include_sliding=False`: the global layers only, those
        the press compresses; their ratio to `full_cache_bytes(False)` is the budget's)."""
        return sum(layer.cache_bytes() for layer in self.layers if include_sliding or not layer.is_sliding)

    def allocated_bytes(self) -> int:
        """Bytes allocated by the storage (kept tokens + bounded slack, see the module docstring)."""
        return sum(layer.allocated_bytes() for layer in self.layers)

    def memory_bytes(self) -> int:
        """Bytes of the presses' state beside the kept tokens (RetentiveKV's memories), over all layers."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def full_cache_bytes(self, include_sliding: bool = True) -> int:
        """Bytes transformers' own DynamicCache would hold for the same inputs (its sliding layers hold their window
        only), over all layers or (`include_sliding=False`) the global ones."""
        return sum(layer.full_cache_bytes() for layer in self.layers if include_sliding or not layer.is_sliding)

    def sequence_bytes(self, padding: torch.Tensor) -> list[SequenceBytes]:
        """Per batch row, what a cache of that sequence alone would report: a batch of left-padded prompts (`padding`:
        [B], each row's pad columns) decoded together gives each prompt the figures it has decoded alone."""
        kept_all, full_all, kept_global, full_global, memory = 0, 0, 0, 0, 0
        for layer in self.layers:
            kept, full, state = layer.sequence_bytes(padding)
            kept_all, full_all, memory = kept_all + kept, full_all + full, memory + state
            if not layer.is_sliding:
                kept_global, full_global = kept_global + kept, full_global + full
        return [
            SequenceBytes(*(int(total[row]) for total in (kept_all, full_all, kept_global, full_global)), memory)
            for row in range(len(padding))
        ]

    def kept_positions(self) -> list[list[list[list[int]]]]:
        """Kept sequence positions per layer, batch row and KV head: `[layer][row][head] -> sorted list`."""
        return [layer.kept_columns() for layer in self.layers]
