"""Fidelity: how far a compressed cache moves the model's next-token distribution, with no labels needed.

A long real text is cut into windows of `context_tokens` + `continuation_tokens`. The context is prefilled through
the press, then the continuation is teacher-forced through the same cache (`modalkv.eval.forced`), and each step's
distribution is compared with the uncompressed model's: KL(full || compressed) and top-1 agreement. Windows are all
the same length, so `--batch-size` feeds them together.

The text (`data/python_reference.txt`) is chapters of the Python Language Reference as shipped in CPython 3.11's
`pydoc_data/topics.py` (execution model, expressions, naming, types, calls, class and function definitions, import,
try), copied once so that every Python version reads the same words. Python Software Foundation License.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from modalkv.eval.forced import ForcedTokens, TeacherForcedTask, kl_divergence
from modalkv.eval.tasks import Example, Failure, tokenizer_of

TEXT = Path(__file__).parent / "data" / "python_reference.txt"


@dataclass
class FidelityTask(TeacherForcedTask):
    """`--tasks fidelity`: `samples` windows of the reference text; score = top-1 agreement, plus KL."""

    context_tokens: int = 2048
    continuation_tokens: int = 64
    samples: int = 4
    name: ClassVar[str] = "fidelity"

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
            self._tokens[example_id] = ForcedTokens(tuple(ids[start : start + window]), self.context_tokens)
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

    def measure(self, full: torch.Tensor, compressed: torch.Tensor, example: Example) -> tuple[float, dict[str, float]]:
        agreement = (full.argmax(-1) == compressed.argmax(-1)).float().mean().item()
        return agreement, {"kl": kl_divergence(full, compressed).mean().item(), "top1": agreement}


TASK = FidelityTask
