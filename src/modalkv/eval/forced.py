"""Teacher-forced tasks: a prompt prefilled through the press, then a fixed continuation fed one token per step through
the same cache (presses that evict while decoding keep evicting), each step's next-token distribution compared with
the uncompressed model's over the same tokens (transformers' own cache, one forward over prompt and continuation).

No generation is involved, so small differences that accuracy hides show up, and a fact needed only some tokens
into decoding can be asked for at exactly that step (`--tasks deferred`). `fidelity` and `deferred` are the two.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from modalkv.api import check_prompt_length
from modalkv.compat import CACHE_KWARG
from modalkv.eval.tasks import Example, Latest, Outcome, tokenizer_of
from modalkv.generation import SharedPrefill, prefill_cache, share_prefill
from modalkv.presses import Press


@dataclass(frozen=True)
class ForcedTokens:
    """One example's token ids: the prompt, then the continuation fed step by step."""

    ids: tuple[int, ...]
    prompt_tokens: int


@dataclass
class Reference:
    """What every press compared on the examples in hand (one, or a batch of equal shape) shares: the uncompressed
    model's log-probabilities [B, T, V] at the positions that predict the continuation, and the prompts' prefill
    recorded for replay (None where it cannot be shared)."""

    full: torch.Tensor
    shared: SharedPrefill | None


@dataclass
class TeacherForcedTask:
    """Subclasses (dataclasses) define `load()`, which keeps each example's `ForcedTokens` in `self._tokens[id]`,
    and `measure()`, which turns the full and the compressed log-probabilities into the score and metrics."""

    in_average: ClassVar[bool] = False
    _tokens: dict[str, ForcedTokens] = field(default_factory=dict, init=False, repr=False, compare=False)  # by id
    _reference: Latest[Reference] = field(default_factory=Latest, init=False, repr=False, compare=False)

    def measure(self, full: torch.Tensor, compressed: torch.Tensor, example: Example) -> tuple[float, dict[str, float]]:
        """(score, metrics) of one example from its [T, V] log-probabilities, full and compressed."""
        raise NotImplementedError

    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome:
        return self._forced(model, processor, press, [example])[0]

    def evaluate_batch(
        self, model: PreTrainedModel, processor: Any, press: Press, examples: list[Example]
    ) -> list[Outcome] | None:
        """`examples` fed together on one shared prefill: each Outcome is the one `evaluate` gives that example alone,
        with the batch's timings. None where they cannot be fed together: a press whose rows depend on each other
        (`Press.batch_invariant`), or examples of different prompt or continuation lengths (no padding)."""
        shapes = {(len(self._tokens[e.id].ids), self._tokens[e.id].prompt_tokens) for e in examples}
        if not press.batch_invariant or len(shapes) != 1:
            return None
        return self._forced(model, processor, press, examples)

    def _make_reference(self, model: PreTrainedModel, ids: torch.Tensor, prompt_tokens: int) -> Reference:
        logits = model(ids[:, :-1], logits_to_keep=ids.shape[1] - prompt_tokens).logits  # under `_forced`'s no_grad
        shared = share_prefill(model, {"input_ids": ids[:, :prompt_tokens]})
        return Reference(F.log_softmax(logits.float(), dim=-1), shared)

    def _reference_of(self, key: tuple[str, ...]) -> Reference | None:
        """One example's row of the batch's reference in hand (`Latest.row_of`), else None."""
        row = self._reference.row_of(key)
        if row is None:
            return None
        batch = self._reference.value
        return Reference(batch.full[row : row + 1], None if batch.shared is None else batch.shared.row(row))

    @torch.no_grad()
    def _forced(self, model: PreTrainedModel, processor: Any, press: Press, examples: list[Example]) -> list[Outcome]:
        tokens = [self._tokens[example.id] for example in examples]
        ids = torch.tensor([t.ids for t in tokens], device=model.device)
        prompt_tokens = tokens[0].prompt_tokens
        check_prompt_length(model, ids.shape[1])
        key = tuple(example.id for example in examples)
        reference = self._reference_of(key) or self._reference.get(
            key, lambda: self._make_reference(model, ids, prompt_tokens)
        )
        steps = []
        with press.attach(model):
            cache, last, prefill_seconds, replayed = prefill_cache(
                model, press, {"input_ids": ids[:, :prompt_tokens]}, shared=reference.shared
            )
            logits = [last]
            for column in range(prompt_tokens, ids.shape[1] - 1):
                start = time.perf_counter()
                logits.append(model(ids[:, column : column + 1], **{CACHE_KWARG: cache}).logits[:, -1])
                steps.append(time.perf_counter() - start)
        compressed = F.log_softmax(torch.stack(logits, dim=1).float(), dim=-1)  # [B, T, V]
        held = cache.sequence_bytes(torch.zeros(len(examples), dtype=torch.long))
        tokenizer = tokenizer_of(processor)
        outcomes = []
        for row, example in enumerate(examples):
            score, metrics = self.measure(reference.full[row], compressed[row], example)
            outcomes.append(
                Outcome(
                    prediction=tokenizer.decode(compressed[row].argmax(-1)[:16]),
                    score=score,
                    metrics=metrics,
                    prompt_tokens=prompt_tokens,
                    cache_bytes=held[row].cache,
                    full_cache_bytes=held[row].full_cache,
                    global_cache_bytes=held[row].global_cache,
                    global_full_cache_bytes=held[row].global_full_cache,
                    prefill_seconds=prefill_seconds,
                    decode_ms_per_token=1000 * statistics.median(steps) if steps else None,
                    shared_prefill=replayed,
                    batch=len(examples),
                )
            )
        return outcomes


def kl_divergence(full: torch.Tensor, compressed: torch.Tensor) -> torch.Tensor:
    """KL(full || compressed) per position, from [..., V] log-probabilities."""
    return (full.exp() * (full - compressed)).sum(-1)
