"""The contract every method ("press") follows: a scoring rule plus a budget rule.

A press sees one layer at a time, right after that layer's prefill attention (`PrefillInputs`), and returns which
tokens each KV head keeps. Most presses only define `score()`; the base class applies the budget, the always-kept
tokens and padding, and does the top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import ClassVar, get_type_hints

import torch
from transformers import PretrainedConfig, PreTrainedModel

from modalkv import api
from modalkv.head_statistics import CalibrationError, HeadStatistics, load_statistics
from modalkv.policy import DecodeView, LeavingTokens, PrefillInputs, Selection

__all__ = ["CalibratedPress", "DecodeView", "LeavingTokens", "PrefillInputs", "Press", "Selection", "WrapperPress"]


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
    absorbs_leaving: ClassVar[bool] = False  # absorb() sees each token leaving while decoding
    batch_invariant: ClassVar[bool] = True  # a batch row keeps what it would keep alone (not so for random draws)
    keeps_running_scores: ClassVar[bool] = False  # score() is also the running score stored per token ("scores")
    decode_fill: ClassVar[dict[str, float]] = {}  # per-slot data of decoded tokens other than 0 (Selection.slot_data)

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
            if f.init and f.name != "budget" and getattr(self, f.name) != f.default
        ]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def score(self, inputs: PrefillInputs) -> torch.Tensor:
        """[B, H_kv, S] importance of each token for each KV head; higher is kept first."""
        raise NotImplementedError(f"{type(self).__name__} must define score()")

    def observe(self, view: DecodeView) -> None:
        """Called after every decoding step when rows have a limit (e.g. to accumulate attention)."""

    def decode_scores(self, view: DecodeView) -> torch.Tensor:
        """[pages, width] keep-scores of the layer's slots, every `evict_every` decoding steps: every row over its
        limit (its prefill size, or the absolute budget) loses its lowest-scoring slots."""
        raise NotImplementedError(f"{type(self).__name__} defines no decode-time eviction")

    def absorb(self, view: DecodeView, tokens: LeavingTokens) -> None:
        """Called with each token about to leave a layer while decoding, when the press `absorbs_leaving` (into its
        memory, `Selection.memory`, or into the kept tokens)."""

    def read_memory(
        self, view: DecodeView, queries: torch.Tensor, output: torch.Tensor, log_mass: torch.Tensor
    ) -> torch.Tensor:
        """[R, G * q, D] the attention output of a decoding step with the layer's memory read in (only called when
        the layer has one). queries: [R, G * q, D]; log_mass: [R, G * q] log-sum-exp of the scaled logits over the
        stored tokens (None unless `needs_decode_attention`)."""
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
        return Selection(indices, kept, {} if running is None else {"scores": running})

    def prompt_state(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor | None,
        is_real: torch.Tensor,
        modality: torch.Tensor | None,
    ) -> dict:
        """What `select()` needs beyond one layer's inputs, made from the model and the whole prompt before the prefill
        (KVzip: its reconstruction scores), for the cache's press state. input_ids, is_real, modality: [B, S] (ids
        None where the prompt came as embeddings). Whatever the budget, it is the same or empty (a budget that keeps
        every token needs nothing), so a replayed prefill makes it once for every budget (`SharedPrefill.replay`).
        Default: nothing."""
        return {}

    def using(self, model: PreTrainedModel) -> AbstractContextManager[None]:
        """What the press needs from `model` while attached, entered by `attach` and `generate` for their block
        (KVzip's reconstruction pass, SparseMM's head statistics). Default: nothing."""
        return nullcontext()

    def attach(self, model: PreTrainedModel) -> AbstractContextManager[PreTrainedModel]:
        """Routes `model`'s attention through modalkv for the duration of a `with` block (restored afterwards).
        Only a `CompressedCache` is compressed; any other cache (or none) gets plain sdpa attention."""
        return _attached(self, model)

    def generate(
        self,
        model: PreTrainedModel,
        modality: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
        compile: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """`model.generate(**kwargs)` with a compressed cache (pass `cache=CompressedCache(press)` -- or
        `past_key_values=` -- to inspect it afterwards). `modality`: the prompt's modality map (default: from the
        model's image/video token ids, if any); `patches`: its patch map (default: inferred from the modality map, see
        modality.py). `compile`: decode with a torch.compile'd forward (CUDA graphs on a GPU; the first steps pay
        the compilation). Returns what `generate` returns."""
        with self.using(model):
            return api.generate(self, model, modality, patches, compile, **kwargs)


@contextmanager
def _attached(press: Press, model: PreTrainedModel) -> Iterator[PreTrainedModel]:
    with api.attach(press, model), press.using(model):
        yield model


@dataclass
class CalibratedPress(Press):
    """A press that reads the model's head statistics (`modalkv.head_statistics`, made by `modalkv calibrate`).

    They are read from `calibration` (a JSON file; default: the model's own place) the first time a prefill needs
    them while the press is attached (`attach` / `generate`); a budget that keeps everything never reads them.
    """

    calibration: str = ""
    _config: PretrainedConfig | None = field(default=None, init=False, repr=False, compare=False)
    _statistics: HeadStatistics | None = field(default=None, init=False, repr=False, compare=False)

    @contextmanager
    def using(self, model: PreTrainedModel) -> Iterator[None]:
        previous = self._config, self._statistics
        self._config, self._statistics = model.config, None
        try:
            yield
        finally:
            self._config, self._statistics = previous

    def statistics(self) -> HeadStatistics:
        """The attached model's head statistics; CalibrationError naming the command when there are none."""
        if self._statistics is None:
            if self._config is None:
                raise CalibrationError(
                    f"{self.name} reads the model's head statistics, and this press is not attached to a model: use "
                    "press.generate(model, ...) or `with press.attach(model):` with the press the cache was made with"
                )
            self._statistics = load_statistics(self._config, self.calibration or None)
        return self._statistics


@dataclass
class WrapperPress(Press):
    """A press around a scoring press (`<name>:<press>`, e.g. `adakv:snapkv`): the wrapper decides how many tokens
    each head (or chunk) keeps, the inner press which ones, by its `score()` and `always_kept()`. The inner press
    compresses at prefill only: the wrapper's counts would not survive its decode-time eviction. Subclasses give
    `press` its default (a field of their own)."""

    press: Press | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.press, Press) or isinstance(self.press, WrapperPress) or not _scores(self.press):
            raise ValueError(f"{self.name} needs a scoring press inside, got {type(self.press).__name__}")
        if self.press.evict_every:
            raise ValueError(f"{self.name} chooses what each head keeps at prefill: no decode-time eviction inside it")

    def using(self, model: PreTrainedModel) -> AbstractContextManager[None]:
        return self.press.using(model)

    # A wrapper only counts per head or chunk, row by row: what its inner press cannot do, it cannot either.
    @property
    def batch_invariant(self) -> bool:
        return self.press.batch_invariant

    def label(self) -> str:
        """'<name>:<inner label>' with the wrapper's own parameters that differ from their defaults."""
        own = [f for f in fields(self) if f.init and f.name not in {g.name for g in fields(Press)} | {"press"}]
        changed = [f"{f.name}={getattr(self, f.name)}" for f in own if getattr(self, f.name) != f.default]
        return f"{self.name}:{self.press.label()}" + (f"({', '.join(changed)})" if changed else "")


def _scores(press: Press) -> bool:
    return type(press).score is not Press.score
