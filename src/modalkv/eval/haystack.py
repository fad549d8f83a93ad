"""Long multimodal haystacks: `--tasks haystack`, generated from a seed, for the Gemma 3 mini-VLM (1k-8k tokens).

Each prompt is a raw (base-model) run of tens to ~160 pictures, about `tokens` tokens in all, with one decisive
item. Three columns:

- `haystack/needle`: a pass-key sentence sits among the pictures at a random depth; the prompt ends with the
  question "What is the pass key? The pass key is". A text needle in a visual haystack (MileBench's
  TextNeedleInAHaystack at our scale): a method must keep a few text tokens among thousands of visual ones.
- `haystack/deferred`: the same haystack without the question: the prompt is compressed first, and the question
  comes afterwards, as decode-phase tokens through the compressed cache. Nothing in the prompt's end points at the
  needle, so a method must keep what the prompt itself ignores (deferred importance; query-agnostic compression, as
  when a cached multi-image context is asked several questions).
- `haystack/image`: every picture is followed by its own 5-digit code ("<picture> Code: 48213."); the prompt ends
  with "Which code goes with this picture?", a repeat of one of them, and "Code:". The key is visual: the code can
  only be found by matching the repeated picture's patches to its first occurrence. The pictures are photos pasted
  at distinct places and sizes on a grey canvas, so no two are alike.

The answer is read greedily: the example is right when greedy decoding writes the whole key first (each key token
the argmax after the ones before it, one decode step each, stopped at the first other token). The prediction is
what greedy decoding wrote up to and including that token. Chance is ~0 (a 5-digit key).

What it stands for: retrieval of one fact from a long context of real photos' patch tokens, on a model that reads
each patch as the ImageNet class word the vision tower gives it (docs/mini-vlm.md). It does not test whether a
model understands the pictures; its picture-level questions ("which picture shows...") the 270M model cannot
answer even as text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from modalkv.api import check_prompt_length
from modalkv.compat import CACHE_KWARG
from modalkv.eval.synthetic import region, variant
from modalkv.eval.tasks import IMAGE_PLACEHOLDER, Example, Latest, Outcome, PreparedPrompt, prepare_prompt, tokenizer_of
from modalkv.generation import SharedPrefill, prefill_cache
from modalkv.multimodal import is_processor
from modalkv.presses import Press

FAMILIES = ("needle", "deferred", "image")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
IMAGE_LINE = " Code: {key}.\n"  # after each picture of the image family
IMAGE_QUESTION = "Which code goes with this picture?\n"
_REGION_SIZES = (3, 4, 5)  # a photo over s x s patches of the 7 x 7 canvas: 25 + 16 + 9 places per photo


def _photo_names() -> list[str]:
    from modalkv.vlm.images import PHOTOS

    return sorted(PHOTOS)


def _key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _regions(rng: random.Random, count: int) -> list[Path]:
    """`count` distinct pictures: a photo at a random size and place on the grey canvas."""
    photos = _photo_names()
    places = [(p, s, r, c) for p in photos for s in _REGION_SIZES for r in range(8 - s) for c in range(8 - s)]
    if count > len(places):
        raise ValueError(f"the image family has {len(places)} distinct pictures, {count} were asked for")
    return [region(p, s, r, c) for p, s, r, c in rng.sample(places, count)]


@dataclass
class HaystackTask:
    """`--tasks haystack`: `samples` examples per family of about `tokens` prompt tokens each, from `seed` (see the
    module docstring); score 1.0 when greedy decoding writes the key."""

    tokens: int = 2000  # prompt tokens, images included
    samples: int = 20  # per family
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    name: ClassVar[str] = "haystack"
    in_average: ClassVar[bool] = True
    _prompt: Latest[PreparedPrompt] = field(default_factory=Latest, init=False, repr=False)  # the example in hand

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families must be among {', '.join(FAMILIES)}, got {', '.join(unknown)}")
        if self.tokens < 200:
            raise ValueError(f"tokens must be at least 200 (a few pictures and the question), got {self.tokens}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")

    def load(self, processor: Any) -> tuple[list[Example], list]:
        if not is_processor(processor) or not hasattr(processor, "grid"):
            raise ValueError("the haystack suite is made of pictures: run it with --model mini-vlm-gemma3")
        rows, cols = processor.grid
        tokenizer = tokenizer_of(processor)
        examples = [
            self.example(family, i, tokenizer, rows * cols) for family in self.families for i in range(self.samples)
        ]
        return examples, []

    def example(self, family: str, index: int, tokenizer: Any, image_tokens: int) -> Example:
        """Example `index` of `family`: the same (seed, family, index, tokens) always gives the same one."""
        rng = random.Random(f"{self.seed}/haystack/{family}/{index}")

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        key = _key(rng)
        if family == "image":
            line = count(IMAGE_LINE.format(key=key))  # every key has 5 digits: one line's tokens stand for all
            fixed = count(IMAGE_QUESTION) + image_tokens + count(" Code:") + 1
            num_images = max(2, round((self.tokens - fixed) / (image_tokens + line)))
            pictures = _regions(rng, num_images)
            keys = [_key(rng) for _ in pictures]
            target = rng.randrange(num_images)
            body = "".join(IMAGE_PLACEHOLDER + IMAGE_LINE.format(key=k) for k in keys)
            prompt = f"{body}{IMAGE_QUESTION}{IMAGE_PLACEHOLDER} Code:"
            images = (*pictures, pictures[target])
            key, info = keys[target], {"target_index": target}
        else:
            needle = NEEDLE.format(key=key)
            fixed = count(needle) + count(QUESTION) + 1
            num_images = max(1, round((self.tokens - fixed) / (image_tokens + count("\n"))))
            photos = _photo_names()
            images = tuple(variant(rng.choice(photos), rng) for _ in range(num_images))
            depth = rng.randrange(num_images + 1)  # the needle goes before picture `depth` (after the last: n)
            lines = [IMAGE_PLACEHOLDER + "\n"] * num_images
            prompt = "".join(lines[:depth]) + needle + "".join(lines[depth:])
            if family == "needle":
                prompt += QUESTION
            elif family != "deferred":
                raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
            info = {"depth": depth / num_images, "needle_before_image": depth}
        return Example(
            task=f"{self.name}/{family}",
            id=f"{family}-{index}",
            prompt=prompt,
            reference=key,
            images=tuple(images),
            chat=False,  # a base model: the raw text, tokenised as given
            max_new_tokens=0,  # the key is read greedily, token by token (see `evaluate`)
            info={"family": family, "images": len(images), **info},
        )

    def score(self, prediction: str, example: Example) -> float:
        """1.0 when greedy decoding wrote the key first (`evaluate` stops at the first token that is not the key's)."""
        return float(prediction.strip().startswith(example.reference))

    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome:
        tokenizer = tokenizer_of(processor)
        prompt = self._prompt.get((example.task, example.id), lambda: prepare_prompt(model, processor, example))
        deferred = example.info["family"] == "deferred"
        question = tokenizer(QUESTION, add_special_tokens=False).input_ids if deferred else []
        answer = tokenizer(" " + example.reference, add_special_tokens=False).input_ids
        prompt_tokens = prompt.inputs["inputs_embeds"].shape[1]
        check_prompt_length(model, prompt_tokens, len(question) + len(answer))
        maps = prompt.modality, prompt.patches, prompt.shared
        written, seconds, cache, replayed = read_key(model, press, prompt.inputs, *maps, question, answer)
        prediction = tokenizer.decode(written)
        return Outcome(
            prediction=prediction,
            score=self.score(prediction, example),
            prompt_tokens=prompt_tokens,
            cache_bytes=cache[0],
            full_cache_bytes=cache[1],
            prefill_seconds=seconds,
            decode_ms_per_token=None,  # a few steps, stopped early: not a decode speed
            global_cache_bytes=cache[2],
            global_full_cache_bytes=cache[3],
            metrics={"key_tokens_right": sum(a == b for a, b in zip(written, answer, strict=False)) / len(answer)},
            image_input="processor",
            shared_prefill=replayed,
        )


@torch.no_grad()
def read_key(
    model: PreTrainedModel,
    press: Press,
    inputs: dict[str, torch.Tensor],
    modality: torch.Tensor | None,
    patches: torch.Tensor | None,
    shared: SharedPrefill | None,
    question: list[int],
    answer: list[int],
) -> tuple[list[int], float, tuple[int, int, int, int], bool]:
    """Greedy decoding of `answer` after the prompt compressed by `press` (and `question`, fed after compression as
    one decode-phase forward), one step per token, stopped at the first token that is not the answer's.

    Returns:
        (the tokens greedy decoding wrote, the prefill's seconds, the cache's bytes (held, full, held and full over
        the compressed layers) after the prompt and the question, whether the prefill was replayed).
    """
    device = model.device
    with press.attach(model):
        cache, logits, seconds, replayed = prefill_cache(model, press, inputs, modality, patches, shared)
        if question:
            ids = torch.tensor([question], device=device)
            logits = model(input_ids=ids, **{CACHE_KWARG: cache}, logits_to_keep=1).logits[:, -1]
        sizes = (
            cache.cache_bytes(),
            cache.full_cache_bytes(),
            cache.cache_bytes(include_sliding=False),
            cache.full_cache_bytes(include_sliding=False),
        )
        written: list[int] = []
        for step, token in enumerate(answer):
            written.append(int(logits[0].argmax()))
            if written[-1] != token or step == len(answer) - 1:
                break
            ids = torch.tensor([[token]], device=device)
            logits = model(input_ids=ids, **{CACHE_KWARG: cache}, logits_to_keep=1).logits[:, -1]
    return written, seconds, sizes, replayed


TASK = HaystackTask
