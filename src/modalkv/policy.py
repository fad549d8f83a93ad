"""What passes between the cache and a method ("press"): the press is a policy the cache calls, never the reverse.

At prefill the cache hands a press one layer (`PrefillInputs`) and stores what it returns (`Selection`). While
decoding the cache owns the step -- append, attention, memory read-out, eviction -- and shows the press only the
layer's slots as pages (`DecodeView`): the press updates its running scores, scores the slots, and (for a press with
a memory) absorbs the tokens that leave (`LeavingTokens`) and reads its memory back into the attention output; a
merging press (CAM) folds a leaving token into the kept ones instead.

A sliding-window layer of a hybrid model (Gemma 3, gpt-oss) is not given to the press: its policy is `SlidingWindow`,
transformers' own window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs

from modalkv.storage import RaggedRows


@dataclass
class PrefillInputs:
    """One layer's prefill, as a press sees it. Queries and keys are rotated (RoPE applied)."""

    module: nn.Module  # the attention module (layer_idx, config, num_key_value_groups)
    layer_idx: int  # depth among the layers the press compresses (the model's layer index if all use full attention)
    queries: torch.Tensor  # [B, H, S, D]
    keys: torch.Tensor  # [B, H_kv, S, D]
    values: torch.Tensor  # [B, H_kv, S, D]
    is_real: torch.Tensor  # [B, S] bool, False for padding
    scaling: float
    modality: torch.Tensor | None = None  # [B, S] long: TEXT, IMAGE or VIDEO per token (modality.py); None: text
    patches: torch.Tensor | None = None  # [B, S, 3] long: (image, row, column) of visual tokens, else -1; with modality
    state: dict = field(default_factory=dict)  # per cache, shared by its layers (budgets carried layer to layer)
    # Budget-free results computed from this layer's queries and keys (e.g. accumulated attention), by name. A replayed
    # prefill (`CompressedCache.replay_prefill`) hands every press the same dict, so a grid computes them once. A
    # `dataclasses.replace` that changes the tensors must pass `derived={}`.
    derived: dict[str, torch.Tensor] = field(default_factory=dict)
    num_compressed_layers: int | None = None  # layers the press compresses (hybrid models: the global ones)

    @property
    def num_layers(self) -> int:
        """How many layers the press compresses: per-layer budget rules (PyramidKV, MadaKV) spread over these."""
        if self.num_compressed_layers is not None:
            return self.num_compressed_layers
        return self.module.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]


@dataclass
class Selection:
    """What a press keeps of one layer's prefill."""

    indices: torch.Tensor  # [B, H_kv, K] kept token indices, ascending within the first `lengths` entries
    lengths: torch.Tensor  # [B, H_kv] number of kept tokens per row
    slot_data: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token data to store, [B, H_kv, S] each
    keys: torch.Tensor | None = None  # [B, H_kv, S, D] replacement keys to store (merging presses), else the layer's
    values: torch.Tensor | None = None
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row state beside the tokens, [B * H_kv, ...]


@dataclass
class DecodeView:
    """A layer's slots right after a decoding step's tokens were appended and attended to, as pages.

    Every per-slot tensor is [pages, width]: with alike rows a page is a whole row and `width` its length; else pages
    of `page_size` slots, some of them not holding a token (`holds`). What a press returns for slots that hold no
    token is ignored.
    """

    rows: RaggedRows
    attention: torch.Tensor | None  # [pages, G * q, width] the new queries' softmax weights, if the press asked
    memory: dict[str, torch.Tensor]  # the press's per-row state (read and updated in place), [R, ...]
    num_kv_heads: int
    query_groups: int  # G, query heads per KV head
    seen: int  # sequence columns seen so far (the next token's column)
    state: dict = field(default_factory=dict)  # per cache, shared by its layers (PrefillInputs.state)

    def slot(self, name: str) -> torch.Tensor:
        """The per-slot buffer `name` ("keys", "values", "columns", "scores", ...) as [pages, width, ...], a view:
        writing to it writes the storage."""
        return self.rows.window(name)

    @property
    def page_row(self) -> torch.Tensor:
        """[pages] the row (batch row * H_kv + KV head) each page belongs to."""
        return self.rows.layout.page_row

    def constant(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A tensor that depends only on the layer's layout, made once (e.g. per-page limits): no per-step cost."""
        return self.rows.layout.constant(name, make)

    def page_limits(self) -> torch.Tensor:
        """[pages, 1] the limit of each page's row."""
        return self.constant("limits", lambda: self.rows.limits.index_select(0, self.page_row)[:, None])

    def holds(self) -> torch.Tensor | None:
        """[pages, width] which slots hold a token; None when all do (alike rows)."""
        return None if self.rows.uniform_length is not None else self.rows.holds()

    def sum_by_row(self, per_page: torch.Tensor) -> torch.Tensor:
        """[R, ...] the values of each row's pages ([pages, ...]) summed (alike rows: a page is its row)."""
        if self.rows.uniform_length is not None:
            return per_page
        return per_page.new_zeros((self.rows.num_rows, *per_page.shape[1:])).index_add_(0, self.page_row, per_page)

    def by_page(self, per_row: torch.Tensor) -> torch.Tensor:
        """[pages, ...] each page's value of its row's ([R, ...]) (alike rows: a page is its row)."""
        return per_row if self.rows.uniform_length is not None else per_row.index_select(0, self.page_row)


@dataclass
class LeavingTokens:
    """The tokens leaving a layer in one removal, one per row at most, gathered before they go."""

    keys: torch.Tensor  # [R, D]
    values: torch.Tensor  # [R, D]
    slot: torch.Tensor  # [R] flat slot index
    leaving: torch.Tensor | None  # [R] bool, which rows lose their token; None: every row


class Policy(Protocol):
    """The calls a `CompressedCache` makes on its press (implemented by `presses.base.Press`)."""

    budget: float | int
    evict_every: int
    needs_decode_attention: bool
    absorbs_leaving: bool  # absorb() sees each token leaving while decoding

    def select(self, inputs: PrefillInputs) -> Selection: ...
    def observe(self, view: DecodeView) -> None: ...
    def decode_scores(self, view: DecodeView) -> torch.Tensor: ...
    def absorb(self, view: DecodeView, tokens: LeavingTokens) -> None: ...
    def read_memory(self, view: DecodeView, queries: torch.Tensor, output: torch.Tensor, log_mass: torch.Tensor):
        """[R, G * q, D] the attention output with the memory read in."""


@dataclass(frozen=True)
class SlidingWindow:
    """The policy of a sliding-window layer: what transformers' `DynamicSlidingWindowLayer` holds, the last `size - 1`
    real tokens between forwards, so that a new token attends to them and itself (the last `size` columns, as the
    sliding mask `kv_idx > q_idx - size` allows). Every decoding step each row over `size - 1` loses its oldest token.

    Presses leave sliding layers to this window: the memory they hold is bounded by the window already.
    """

    size: int
    evict_every: int = 1
    needs_decode_attention = False
    absorbs_leaving = False
    decode_fill = {}  # noqa: RUF012 (read only, as on a Press)

    @property
    def limit(self) -> int:
        """Tokens a row holds between forwards."""
        return self.size - 1

    def select(self, inputs: PrefillInputs) -> Selection:
        """The real tokens among the prompt's last `size - 1` columns (no host read: the width is known)."""
        seq = inputs.is_real.shape[-1]
        columns = torch.arange(seq, device=inputs.is_real.device)
        keep = inputs.is_real & (columns >= seq - self.limit)  # [B, S]
        width = min(seq, self.limit)
        indices = torch.where(keep, columns, seq).sort(dim=-1).values[:, :width].clamp(max=seq - 1)
        heads = inputs.num_kv_heads
        return Selection(indices[:, None].expand(-1, heads, -1), keep.sum(-1)[:, None].expand(-1, heads))

    def observe(self, view: DecodeView) -> None:
        pass

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """Newer tokens score higher: the oldest leaves."""
        return view.slot("columns").float()


SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def attention_windows(config: PretrainedConfig) -> list[int | None]:
    """Per layer of a language model's config, its sliding window (None: full attention), read as transformers'
    DynamicCache reads it. Raises ValueError for other kinds of layers (chunked, linear, shared KV, ...)."""
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise ValueError(
            f"the model has {unsupported} layers; modalkv supports full-attention and sliding-window layers "
            f"({', '.join(SUPPORTED_LAYER_TYPES)})"
        )
    return [kwargs.get("sliding_window") for kwargs in layer_kwargs]
