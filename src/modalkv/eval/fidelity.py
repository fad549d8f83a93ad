"""Fidelity: how far a compressed cache moves the model's next-token distribution, with no labels needed.

A long real text is cut into windows of `context_tokens` + `continuation_tokens`. The context is prefilled through
the press (the compressed cache), then the continuation is fed one token at a time through the same cache (teacher
forcing: presses that evict while decoding keep evicting), and each step's distribution is compared with the
uncompressed model's (transformers' own DynamicCache, one forward over the whole window): KL(full || compressed) and
top-1 agreement. Small differences that accuracy hides show up here.

The text (`data/python_reference.txt`) is chapters of the Python Language Reference as shipped in CPython 3.11's
`pydoc_data/topics.py` (execution model, expressions, naming, types, calls, class and function definitions, import,
try), copied once so that every Python version reads the same words. Python Software Foundation License.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from modalkv.api import check_prompt_length
from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.eval.tasks import Example, Failure, Outcome, tokenizer_of
from modalkv.presses import Press

TEXT = Path(__file__).parent / "data" / "python_reference.txt"


@dataclass
class FidelityTask:
    """`--tasks fidelity`: `samples` windows of the reference text; score = top-1 agreement, plus KL."""

    context_tokens: int = 2048
    continuation_tokens: int = 64
    samples: int = 4
    name: ClassVar[str] = "fidelity"
    in_average: ClassVar[bool] = False  # agreement with the full cache is not accuracy
    _windows: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False)  # example id -> tokens
    _reference: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        tokenizer = tokenizer_of(processor)
        ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
        window = self.context_tokens + self.continuation_tokens
        if self.samples * window > len(ids):
            raise ValueError(
                f"the fidelity text has {len(ids)} tokens: {self.samples} windows of {window} do not fit; "
                "ask for fewer samples or shorter windows"
            )
        examples = []
        for start in range(0, self.samples * window, window):
            example_id = f"{start}+{self.context_tokens}"
            self._windows[example_id] = ids[start : start + window]
            examples.append(
                Example(
                    task=self.name,
                    id=example_id,
                    prompt=tokenizer.decode(ids[start : start + self.context_tokens]),
                    reference=tokenizer.decode(ids[start + self.context_tokens : start + window]),
                    chat=False,
                    info={"start_token": start, "context_tokens": self.context_tokens},
                )
            )
        return examples, []

    def _full_log_probs(self, model: PreTrainedModel, example_id: str, ids: torch.Tensor) -> torch.Tensor:
        """[T, V] log-probabilities of the uncompressed model at the positions that predict the continuation."""
        if example_id not in self._reference:
            self._reference.clear()  # the runner takes every press for one example in a row: keep only that one
            logits = model(ids[:, :-1], logits_to_keep=self.continuation_tokens).logits[0]
            self._reference[example_id] = F.log_softmax(logits.float(), dim=-1)
        return self._reference[example_id]

    @torch.no_grad()
    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome:
        ids = torch.tensor([self._windows[example.id]], device=model.device)
        check_prompt_length(model, ids.shape[1])
        full = self._full_log_probs(model, example.id, ids)
        cache = CompressedCache(press)
        steps = []
        with press.attach(model):
            start = time.perf_counter()
            logits = [model(ids[:, : self.context_tokens], **{CACHE_KWARG: cache}, logits_to_keep=1).logits[0, -1]]
            prefill_seconds = time.perf_counter() - start
            for column in range(self.context_tokens, ids.shape[1] - 1):
                start = time.perf_counter()
                logits.append(model(ids[:, column : column + 1], **{CACHE_KWARG: cache}).logits[0, -1])
                steps.append(time.perf_counter() - start)
        compressed = F.log_softmax(torch.stack(logits).float(), dim=-1)  # [T, V]
        kl = (full.exp() * (full - compressed)).sum(-1).mean().item()
        agreement = (full.argmax(-1) == compressed.argmax(-1)).float().mean().item()
        return Outcome(
            prediction=tokenizer_of(processor).decode(compressed.argmax(-1)[:16]),
            score=agreement,
            metrics={"kl": kl, "top1": agreement},
            prompt_tokens=self.context_tokens,
            cache_bytes=cache.cache_bytes(),
            full_cache_bytes=cache.full_cache_bytes(),
            global_cache_bytes=cache.cache_bytes(include_sliding=False),
            global_full_cache_bytes=cache.full_cache_bytes(include_sliding=False),
            prefill_seconds=prefill_seconds,
            decode_ms_per_token=1000 * statistics.median(steps) if steps else None,
        )


TASK = FidelityTask
