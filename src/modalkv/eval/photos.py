"""What the mini-VLM answers about the shipped photos (`modalkv.vlm.images.PHOTOS`): `--tasks photos`, one photo or
several at a time, greedy answers of up to 16 tokens through the chat template. Columns:

- `photos/single`: each photo alone, "What is shown in the image?"; correct when the answer contains one of the
  photo's accepted words (`Photo.words`). Chance: an answer that ignored the image would be the same for every
  photo and name at most one of the six, 1/6.
- `photos/which-N` (N = 2..5 photos): "Which image shows <subject>? Answer with the image number."; correct when
  the first number the answer gives ("2", "Image 2", "the second") is the target's. Chance 1/N.
- `photos/nth-N`: "What is shown in image <k>?"; correct when the answer names photo k. Chance about 1/N.

Photos drawn for several-image questions are distinct, never the rocket beside the space shuttle (which stands on
rocket boosters), and the targets rotate over the positions so that no position bias scores above chance. The
prompts are short (49 patch tokens per photo): a measure of the test bed's full cache (docs/mini-vlm.md), not of
compression.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from modalkv.eval.tasks import IMAGE_PLACEHOLDER, Example, Failure, GenerationTask

SINGLE_QUESTION = "What is shown in the image?"
WHICH_QUESTION = "Which image shows {subject}? Answer with the image number."
NTH_QUESTION = "What is shown in image {k}?"
AMBIGUOUS = (frozenset({"rocket", "space_shuttle"}),)  # never asked together
ORDINALS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
ORDINALS |= {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
IMAGE_COUNTS = (2, 3, 4, 5)


def _photos() -> dict:
    """`modalkv.vlm.images.PHOTOS`, imported when a task needs it (listing the tasks imports this module)."""
    from modalkv.vlm.images import PHOTOS

    return PHOTOS


def first_number(text: str) -> int | None:
    """The first image number an answer names ("2", "Image 2", "the second image"), or None."""
    match = re.search(r"\b([1-9]|" + "|".join(ORDINALS) + r")\b", text.lower())
    return None if match is None else int(ORDINALS.get(match.group(1), match.group(1)))


@dataclass
class PhotosTask(GenerationTask):
    """`--tasks photos`: the six photos alone, and `per_count` questions of each kind per number of photos (2-5)."""

    per_count: int = 25
    seed: int = 0
    max_new_tokens: int = 16
    name: ClassVar[str] = "photos"

    def __post_init__(self) -> None:
        if self.per_count < 1:
            raise ValueError(f"per_count must be at least 1, got {self.per_count}")

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        examples = [self._example("single", name, [name], name, SINGLE_QUESTION) for name in sorted(_photos())]
        for kind in ("which", "nth"):
            for count in IMAGE_COUNTS:
                rng = random.Random(f"{self.seed}/photos/{kind}-{count}")
                for index in range(self.per_count):
                    shown = self._draw(rng, count)
                    position = index % count  # the targets rotate over the positions
                    target = shown[position]
                    question = (
                        WHICH_QUESTION.format(subject=_photos()[target].subject)
                        if kind == "which"
                        else NTH_QUESTION.format(k=position + 1)
                    )
                    reference = str(position + 1) if kind == "which" else target
                    examples.append(self._example(f"{kind}-{count}", str(index), shown, reference, question))
        return examples, []

    def _example(self, column: str, index: str, shown: list[str], reference: str, question: str) -> Example:
        return Example(
            task=f"{self.name}/{column}",
            id=f"{column}/{index}",
            prompt=IMAGE_PLACEHOLDER * len(shown) + question,
            reference=reference,
            images=tuple(_photos()[name].path for name in shown),
            max_new_tokens=self.max_new_tokens,
            info={"photos": shown},
        )

    @staticmethod
    def _draw(rng: random.Random, count: int) -> list[str]:
        while True:
            shown = rng.sample(sorted(_photos()), count)
            if not any(pair <= set(shown) for pair in AMBIGUOUS):
                return shown

    def score(self, prediction: str, example: Example) -> float:
        if example.task.startswith(f"{self.name}/which"):
            return float(first_number(prediction) == int(example.reference))
        return float(_photos()[example.reference].is_named_in(prediction))


TASK = PhotosTask
