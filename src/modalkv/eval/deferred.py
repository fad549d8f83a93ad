"""Deferred importance on text: a fact the prompt's last queries ignore, needed only some tokens into decoding.

A pass key sits at a random depth of a passkey haystack (`passkey.passkey_example`), but the prompt asks to list
the text's facts "starting with the colours", so an observation window looks at the colour sentences, not at the
key. The continuation is teacher-forced (`modalkv.eval.forced`): three colour sentences, then "The pass key is
<key>.", so the key is needed about 20 tokens into decoding. An example is recovered when every key token is the
compressed model's top-1 prediction; the KL to the full cache at the key's tokens and over the whole continuation
come with it. Text models; the multimodal counterpart is `--tasks haystack`'s `deferred` family.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from modalkv.eval.forced import ForcedTokens, TeacherForcedTask, kl_divergence
from modalkv.eval.passkey import QUESTION, passkey_example
from modalkv.eval.tasks import Example, Failure, tokenizer_of

ASK = "\nList the facts of the text in order, starting with the colours."
CONTINUATION = " The grass is green. The sky is blue. The sun is yellow. The pass key is {key}."


@dataclass
class DeferredTask(TeacherForcedTask):
    """`--tasks deferred`: `samples` prompts of about `tokens` tokens; score = the key recovered at its step."""

    tokens: int = 2000
    samples: int = 20
    seed: int = 0
    name: ClassVar[str] = "deferred"
    in_average: ClassVar[bool] = True  # recovered or not: an accuracy

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.tokens < 100:
            raise ValueError(
                f"tokens must be at least 100 (the question and the continuation's lead-in), got {self.tokens}"
            )

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        tokenizer = tokenizer_of(processor)
        examples = []
        for index in range(self.samples):
            seed = self.seed + index
            depth = random.Random(seed).uniform(0.1, 0.7)
            passkey = passkey_example(tokenizer, self.tokens, depth, seed)
            prompt = passkey.text.removesuffix(QUESTION) + ASK
            prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
            continuation = tokenizer(CONTINUATION.format(key=passkey.answer), add_special_tokens=False).input_ids
            key_tokens = len(tokenizer(f" {passkey.answer}.", add_special_tokens=False).input_ids) - 1  # not the "."
            example_id = f"{self.tokens}#{index}"
            self._tokens[example_id] = ForcedTokens(tuple(prompt_ids + continuation), len(prompt_ids))
            end = len(continuation) - 1
            examples.append(
                Example(
                    task=self.name,
                    id=example_id,
                    prompt=prompt,
                    reference=passkey.answer,
                    chat=False,
                    info={"depth": round(depth, 3), "key_steps": [end - key_tokens, end]},
                )
            )
        return examples, []

    def measure(self, full: torch.Tensor, compressed: torch.Tensor, example: Example) -> tuple[float, dict[str, float]]:
        """Recovered: every key token is the compressed model's top-1; KL at the key's steps and over all steps."""
        tokens = self._tokens[example.id]
        target = torch.tensor(tokens.ids[tokens.prompt_tokens :], device=compressed.device)
        at_key = slice(*example.info["key_steps"])
        recovered = bool((compressed[at_key].argmax(-1) == target[at_key]).all())
        kl = kl_divergence(full, compressed)
        return float(recovered), {"kl_key": kl[at_key].mean().item(), "kl": kl.mean().item()}


TASK = DeferredTask
