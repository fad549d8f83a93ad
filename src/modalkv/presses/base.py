"""The contract every method ("press") follows: a scoring rule plus a budget rule.

A press sees one layer at a time, right after that layer's prefill attention (`PrefillInputs`), and returns which
tokens each KV head keeps. Most presses only define `score()`; the base class applies the budget, the always-kept
tokens and padding, and does the top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar, get_type_hints

import torch
from torch import nn
from transformers import PreTrainedModel

from modalkv.storage import RowBlock

if TYPE_CHECKING:
    from modalkv.cache import CompressedLayer


@dataclass
class PrefillInputs:
    """One layer's prefill, as a press sees it. Queries and keys are rotated (RoPE applied)."""

    module: nn.Module  # the attention module (layer_idx, config, num_key_value_groups)
    layer_idx: int
    queries: torch.Tensor  # [B, H, S, D]
    keys: torch.Tensor  # [B, H_kv, S, D]
    values: torch.Tensor  # [B, H_kv, S, D]
    is_real: torch.Tensor  # [B, S] bool, False for padding
    scaling: float
    modality: torch.Tensor | None = None  # [B, S] long: TEXT, IMAGE or VIDEO per token (modality.py); None: text
    patches: torch.Tensor | None = None  # [B, S, 3] long: (image, row, column) of visual tokens, else -1; with modality
    state: dict = field(default_factory=dict)  # per cache, shared by its layers (budgets carried layer to layer)

    @property
    def num_layers(self) -> int:
        return self.module.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]


@dataclass
class Selection:
    """What a press keeps of one layer's prefill."""

    indices: torch.Tensor  # [B, H_kv, K] kept token indices, ascending within the first `lengths` entries
    lengths: torch.Tensor  # [B, H_kv] number of kept tokens per row
    running_scores: torch.Tensor | None = None  # [B, H_kv, S] for presses that update a score while decoding
    keys: torch.Tensor | None = None  # [B, H_kv, S, D] replacement keys to store (merging presses), else the layer's
    values: torch.Tensor | None = None
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row state beside the tokens, [B * H_kv, ...]


@dataclass
class DecodeView:
    """One storage block right after new tokens were appended and attended to, as a press sees it."""

    layer: CompressedLayer  # the layer the block belongs to (its memory, its cache's modality map)
    block: RowBlock
    attention: torch.Tensor | None  # [n, G * q, L] the new queries' attention over the block's slots, if asked for
    num_kv_heads: int
    query_groups: int  # G, query heads per KV head
    seen: int  # sequence columns seen so far (the next token's column)


def selection_from_mask(keep: torch.Tensor) -> Selection:
    """The `Selection` of a [B, H_kv, S] keep mask (any number of tokens per row)."""
    seq = keep.shape[-1]
    lengths = keep.sum(-1)
    positions = torch.arange(seq, device=keep.device)
    indices = torch.where(keep, positions, seq).sort(dim=-1).values[..., : max(int(lengths.max()), 1)]
    return Selection(indices.clamp(max=seq - 1), lengths)


def check_budget(budget: float | int) -> None:
    """Raises ValueError unless `budget` is a ratio in (0, 1] or an integer token count > 1."""
    is_number = isinstance(budget, int | float) and not isinstance(budget, bool)
    if is_number and (0 < budget <= 1 or (budget > 1 and float(budget).is_integer())):
        return
    raise ValueError(f"budget must be a ratio in (0, 1] or an integer token count > 1, got {budget!r}")


def tokens_for_budget(budget: float | int, num_real: torch.Tensor) -> torch.Tensor:
    """Tokens to keep per row: floor(ratio * length) (at least 1), or min(count, length). num_real: [B]."""
    if budget > 1:
        return num_real.clamp(max=int(budget))
    # float64 plus a hair: 180 * 0.65 is 116.99998 in float32 and 90 * 0.7 is 62.99999999999999 in float64; both
    # are whole numbers of tokens that a plain floor would round one token short.
    return (num_real.double() * float(budget) + 1e-9).floor().long().clamp(min=1)


@dataclass
class Press:
    """Base press: keeps the top-`budget` tokens by `score()` per KV head, plus `always_kept()` tokens.

    Args:
        budget: what is KEPT, as a ratio of each prompt's length in (0, 1] or an absolute number of tokens (> 1).
            Always-kept tokens count within the budget. Padding is never kept.
    """

    budget: float | int = 1.0
    evict_every: int = 0
    name: ClassVar[str] = ""
    needs_decode_attention: ClassVar[bool] = False  # observe() / decode_scores() read DecodeView.attention
    keeps_running_scores: ClassVar[bool] = False  # score() is also the running score stored per token

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.evict_every < 0:
            raise ValueError(f"evict_every must be >= 0 (0: no eviction while decoding), got {self.evict_every}")
        if self.evict_every and type(self).decode_scores is Press.decode_scores:
            raise ValueError(f"{self.name} defines no decode-time eviction; evict_every must be 0")
        for name, kind in get_type_hints(type(self)).items():
            value = getattr(self, name)
            if kind in (int, str, bool) and (type(value) is not kind):
                raise ValueError(f"{self.name}: {name} must be {kind.__name__}, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{self.name}: {name} must be a number, got {value!r}")

    def label(self) -> str:
        """The method name with the parameters that differ from their defaults, e.g. 'snapkv(pooling=max)'."""
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            if f.name != "budget" and getattr(self, f.name) != f.default
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        """[B, H_kv, S] importance of each token for each KV head; higher is kept first."""
        raise NotImplementedError(f"{type(self).__name__} must define score()")

    def observe(self, view: DecodeView) -> None:
        """Called after every decoding step when `evict_every` > 0 (e.g. to accumulate attention)."""

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """[n, L] keep-scores of the block's slots, every `evict_every` decoding steps: every row over its limit (its
        prefill size, or the absolute budget) loses its lowest-scoring slots."""
        raise NotImplementedError(f"{type(self).__name__} defines no decode-time eviction")

    def release(self, view: DecodeView, slots: torch.Tensor) -> None:
        """Called with the slots [n, m] (-1: none) about to leave the block while decoding, still in place."""

    def read_memory(
        self, layer: CompressedLayer, query: torch.Tensor, output: torch.Tensor, attention: list, log_masses: list
    ) -> torch.Tensor:
        """The attention output [B, q, H, D] of a decoding step, given the layer's memory (only called when the
        layer has one). `attention` / `log_masses`: per block, the queries' weights [n, G * q, L] and their
        log-sum-exp of scaled logits [n, G * q] over the stored tokens."""
        return output

    def always_kept(self, inputs: PrefillInputs) -> torch.Tensor | None:
        """[B, S] bool of tokens kept whatever their score (e.g. the observation window), or None."""
        return None

    def ranking(self, inputs: PrefillInputs, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [B, H_kv, S] with always-kept tokens first (float max) and padding last (-inf)."""
        protected = self.always_kept(inputs)
        if protected is not None:
            scores = scores.masked_fill(protected[:, None, :], torch.finfo(scores.dtype).max)
        return scores.masked_fill(~inputs.is_real[:, None, :], float("-inf"))

    def num_kept(self, inputs: PrefillInputs) -> torch.Tensor:
        """[B, H_kv] tokens each row keeps (the budget rule; presses with per-layer or per-head budgets override)."""
        per_row = tokens_for_budget(self.budget, inputs.is_real.sum(-1))
        return per_row[:, None].expand(-1, inputs.num_kv_heads)

    def select(self, inputs: PrefillInputs) -> Selection:
        """Chooses the kept tokens of one layer: the budget rule, then the top scores with always-kept tokens first."""
        is_real = inputs.is_real
        num_real = is_real.sum(-1)
        kept = torch.minimum(self.num_kept(inputs), num_real[:, None])
        batch, heads = kept.shape
        seq = is_real.shape[-1]
        running = self.score(inputs).float() if self.keeps_running_scores else None
        if bool((kept == num_real[:, None]).all()):  # nothing to evict: skip scoring (and keep exactly all)
            scores = is_real[:, None, :].expand(batch, heads, seq).float()
        else:
            scores = self.ranking(inputs, running if running is not None else self.score(inputs).float())
        top = scores.topk(int(kept.max()), dim=-1, sorted=True).indices
        beyond = torch.arange(top.shape[-1], device=top.device) >= kept[..., None]
        indices = top.masked_fill(beyond, seq).sort(dim=-1).values.clamp(max=seq - 1)
        return Selection(indices, kept, running)

    @contextmanager
    def attach(self, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
        """Routes `model`'s attention through modalkv for the duration of the block (restored afterwards).

        Only a `CompressedCache` is compressed; any other cache (or none) gets plain sdpa attention.
        """
        from modalkv.attention import ATTENTION_NAME, register

        check_model(model)
        register()
        text_config = model.config.get_text_config()
        previous = text_config._attn_implementation
        # Only the language model's attention: a VLM's vision tower keeps its own (it has no cache to compress).
        key = next((k for k in model.config.sub_configs if getattr(model.config, k) is text_config), None)
        model.set_attn_implementation({key: ATTENTION_NAME} if key else ATTENTION_NAME)
        try:
            if text_config._attn_implementation != ATTENTION_NAME:
                raise ValueError(
                    f"{type(model).__name__} does not route its attention through transformers' "
                    "AttentionInterface, so modalkv cannot compress its cache"
                )
            yield model
        finally:
            model.set_attn_implementation({key: previous} if key else previous)

    def generate(
        self,
        model: PreTrainedModel,
        modality: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`model.generate(**kwargs)` with a compressed cache (pass `past_key_values=CompressedCache(press)` to
        inspect it afterwards). `modality`: the prompt's modality map (default: from the model's image/video
        token ids, if any); `patches`: its patch map (default: inferred from the modality map, see modality.py).
        Returns what `generate` returns."""
        from modalkv.cache import CompressedCache
        from modalkv.modality import modality_from_input_ids

        if modality is None and "input_ids" in kwargs:
            modality = modality_from_input_ids(model.config, kwargs["input_ids"])
        cache = kwargs.setdefault("past_key_values", CompressedCache(self))
        if not isinstance(cache, CompressedCache):
            raise ValueError(f"past_key_values must be a CompressedCache, got {type(cache).__name__}")
        if modality is not None and cache.modality is None:
            cache.modality = modality
        elif modality is not None and not torch.equal(modality, cache.modality):
            raise ValueError("two different modality maps: one given to generate(), another held by the cache")
        if patches is not None:
            cache.patches = patches
        # generate() repeats each prompt row before the prefill for beams or several returned sequences: so do the maps.
        config = kwargs.get("generation_config", model.generation_config)
        beams = kwargs.get("num_beams", config.num_beams) or 1
        copies = beams if beams > 1 else kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        if copies > 1 and cache.modality is not None:
            cache.batch_repeat_interleave(copies)  # nothing is stored yet: only the maps are repeated
        prompt = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is not None:
            check_prompt_length(model, prompt.shape[1], kwargs.get("max_new_tokens", 0))
        with self.attach(model):
            return model.generate(**kwargs)


def check_model(model: PreTrainedModel) -> None:
    """Raises ValueError for models the engine cannot serve correctly."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # older configs: Qwen2 sets sliding_window but only uses it with use_sliding_window
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        layer_types = ["sliding_attention" if sliding else "full_attention"]
    if set(layer_types) != {"full_attention"}:
        raise ValueError(
            f"{type(model).__name__} has {sorted(set(layer_types))} layers; modalkv supports models whose layers "
            "all use full attention"
        )


def check_prompt_length(model: PreTrainedModel, num_tokens: int, max_new_tokens: int = 0) -> None:
    """Raises ValueError for an empty prompt or one that cannot fit the model's positions with the new tokens."""
    if num_tokens == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and num_tokens + max_new_tokens > limit:
        raise ValueError(
            f"the prompt has {num_tokens} tokens and {max_new_tokens} new tokens were asked for, but the model "
            f"handles at most {limit} positions"
        )
