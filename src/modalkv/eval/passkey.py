"""Passkey retrieval: a number hidden at some depth of a long, repetitive text (Mohtashami & Jaggi, 2023)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from modalkv.eval.tasks import Example, Failure, GenerationTask, tokenizer_of

_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there.\n"
)
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyExample:
    text: str  # the user message (no chat template applied)
    answer: str  # the passkey, five digits
    depth: float  # where the needle sits, 0 = start, 1 = end


def passkey_example(tokenizer: PreTrainedTokenizerBase, num_tokens: int, depth: float = 0.5, seed: int = 0):
    """A passkey prompt of about `num_tokens` tokens (measured with `tokenizer`) with the key at `depth`."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(random.Random(seed).randint(10_000, 99_999))
    needle = _NEEDLE.format(key=key)
    fixed = len(tokenizer(_INTRO + needle + QUESTION, add_special_tokens=False).input_ids)
    per_filler = len(tokenizer(_FILLER * 10, add_special_tokens=False).input_ids) / 10
    repeats = max(1, round((num_tokens - fixed) / per_filler))
    before = round(repeats * depth)
    text = _INTRO + _FILLER * before + needle + _FILLER * (repeats - before) + QUESTION
    return PasskeyExample(text=text, answer=key, depth=depth)


@dataclass
class PasskeyTask(GenerationTask):
    """`--tasks passkey`: one prompt per (length, depth), read raw (no chat template); exact match of the key."""

    lengths: tuple[int, ...] = (1024, 2048)  # prompt tokens
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seed: int = 0
    max_new_tokens: int = 10
    name: ClassVar[str] = "passkey"

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        tokenizer = tokenizer_of(processor)
        examples = []
        for i, (length, depth) in enumerate((n, d) for n in self.lengths for d in self.depths):
            example = passkey_example(tokenizer, length, depth, seed=self.seed + i)
            examples.append(
                Example(
                    task=self.name,
                    id=f"{length}@{depth}",
                    prompt=example.text,
                    reference=example.answer,
                    chat=False,
                    max_new_tokens=self.max_new_tokens,
                    info={"length": length, "depth": depth},
                )
            )
        return examples, []

    def score(self, prediction: str, example: Example) -> float:
        """1.0 if the first number in the answer is exactly the key (a longer or shorter number is wrong)."""
        number = re.search(r"\d+", prediction)
        return float(number is not None and number.group() == example.reference)


TASK = PasskeyTask
