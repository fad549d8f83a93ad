"""The synthetic multimodal long-context suite: `--tasks synthetic`, generated from a seed for the mini-VLM.

Each example is a run of pictures: exactly one shows a photo that is one of `choices` answer options (photo names
such as "cat", "camera"); every other picture is a crop or mirror image of a photo that is NOT among the options. The
question is "Which object is in these pictures?", and the answer is the option with the highest log-likelihood, not a
generated text: the prompt is prefilled once through the method's press (compressed exactly as for generation), the
answer prefix "The object is a" and then each option are fed as decode-phase tokens through that cache (the options
come after the compressed prompt, so every option sees the same compression), and the option's log-likelihood minus
its log-likelihood after the question with no pictures (the language model's prior for that word, the same for every
method) picks the answer. Score 1.0 when that is the shown photo's name: chance is 1 / `choices` (1/4 by default).
The record's `margin` metric is the shown photo's calibrated log-likelihood minus the best other option's, in nats
(> 0 exactly when the answer is right; it moves before the accuracy does).

The prompt holds about `tokens` tokens, so the number of pictures follows from the processor's patches per image.
Three columns:

- `synthetic/deferred`: the answer photo is image 1, read first and followed by every distractor, so it drew little
  attention when read; only the question at the end needs it.
- `synthetic/spatial`: the answer photo covers 4 x 4 adjacent patches of a grey 7 x 7 canvas, at a random place and
  a random position in the run: the answer lives in that one region of one picture.
- `synthetic/distractor`: the answer photo at a random position after the first, among the distractor pictures.

Why this form (measured with the full cache while making the suite, docs/mini-vlm.md): the 135M language model
cannot pick a picture by number nor retell image k, and free answers about several pictures mostly describe another
one; listing the options in the question makes it repeat the first listed option; with filler text it retells the
text. Which of a few names fits the pictures best it can tell. Derived images (crops, canvases) are written once as PNG
files under `modalkv.models.cache_dir() / "synthetic"`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import PreTrainedModel

from modalkv.api import check_prompt_length
from modalkv.compat import CACHE_KWARG
from modalkv.eval.tasks import (
    IMAGE_PLACEHOLDER,
    Example,
    Failure,
    Latest,
    Outcome,
    PreparedPrompt,
    encode_example,
    prepare_prompt,
    tokenizer_of,
)
from modalkv.generation import SharedPrefill, prefill_cache
from modalkv.multimodal import is_processor
from modalkv.presses import Press
from modalkv.presses.full import FullPress

FAMILIES = ("deferred", "spatial", "distractor")
# The option naming each photo: one word, one token of SmolLM2's vocabulary with its leading space.
ANSWERS = {
    "cat": "cat",
    "coffee": "coffee",
    "rocket": "rocket",
    "space_shuttle": "shuttle",
    "helmet": "helmet",
    "tripod": "camera",
}
CONFUSED = {frozenset({"rocket", "space_shuttle"})}  # the tower reads both as rockets: never both options or in view
QUESTION = "Which object is in these pictures?"
ANSWER_PREFIX = "The object is a"  # fed after the compressed prompt, before each option
_TEMPLATE_TOKENS = 30  # the chat template around the user turn
_LABEL_TOKENS = 6  # "Image N: " and a newline the chat template writes around each image


@dataclass(frozen=True)
class Layout:
    """One example before tokenisation: the pictures, the options and which photo is the answer."""

    images: list[Path]
    target: str  # the photo shown (a key of PHOTOS), the one option that is right
    options: list[str]  # photo keys, in the order offered; the others are not in any picture
    target_index: int  # which of `images` shows the target
    distractors: list[str]  # the photo each other picture is cut from, in picture order


def _photos() -> dict:
    from modalkv.vlm.images import PHOTOS

    return PHOTOS


def _saved(image: Image.Image, name: str) -> Path:
    """The image as `cache_dir()/synthetic/<name>.png`, written once (names encode how it was made)."""
    from modalkv.models import cache_dir

    path = cache_dir() / "synthetic" / f"{name}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{random.getrandbits(32)}.png")
        image.save(tmp)
        tmp.replace(path)
    return path


def variant(name: str, rng: random.Random) -> Path:
    """A crop of 70-100% of the photo's sides at a random place, mirrored half the time."""
    from modalkv.vlm.images import load_photo

    photo = load_photo(name)
    scale, flip = rng.uniform(0.7, 1.0), rng.random() < 0.5
    width, height = round(photo.width * scale), round(photo.height * scale)
    left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
    image = photo.crop((left, top, left + width, top + height))
    return _saved(ImageOps.mirror(image) if flip else image, f"{name}-{left}-{top}-{width}x{height}-{int(flip)}")


def region(target: str, cells: int, row: int, col: int, grid: int = 7, cell: int = 32) -> Path:
    """The target photo over `cells` x `cells` patches at (row, col) of a grey `grid` x `grid` patch canvas."""
    from modalkv.vlm.images import load_photo

    image = Image.new("RGB", (grid * cell, grid * cell), (128, 128, 128))
    image.paste(load_photo(target, cells * cell), (col * cell, row * cell))
    return _saved(image, f"region-{target}-{cells}-{row}-{col}-{grid}x{cell}")


def _confused(a: str, b: str) -> bool:
    return frozenset({a, b}) in CONFUSED


def layout(family: str, rng: random.Random, num_images: int, choices: int = 4) -> Layout:
    """The pictures of one example, its options and its answer (see the module docstring)."""
    photos = sorted(_photos())
    target = rng.choice(photos)
    while True:  # options: the target and choices - 1 others, no two of them confusable
        options = [target, *rng.sample([p for p in photos if p != target], choices - 1)]
        if not any(_confused(a, b) for a in options for b in options):
            break
    pool = [p for p in photos if p not in options and not any(_confused(p, o) for o in options)]
    if family == "deferred":
        index, image = 0, _photos()[target].path
    elif family == "spatial":
        cells = 4
        index, image = (
            rng.randrange(num_images),
            region(target, cells, rng.randrange(8 - cells), rng.randrange(8 - cells)),
        )
    elif family == "distractor":
        index, image = rng.randrange(1, num_images), _photos()[target].path
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    distractors = [rng.choice(pool) for _ in range(num_images - 1)]
    others = iter(distractors)
    images = [image if i == index else variant(next(others), rng) for i in range(num_images)]
    rng.shuffle(options)
    return Layout(images, target, options, index, distractors)


# -- likelihood scoring through a compressed cache -------------------------------------------------------------------


@dataclass
class OptionScores:
    """What `option_log_likelihoods` measured."""

    log_likelihoods: torch.Tensor  # [n] float32, one per option: sum of the option tokens' log-probabilities
    prompt_tokens: int
    cache_bytes: int  # after the prompt and the shared prefix, before the options (one copy)
    full_cache_bytes: int
    prefill_seconds: float
    shared_prefill: bool = False


@torch.no_grad()
def option_log_likelihoods(
    model: PreTrainedModel,
    press: Press,
    inputs: dict[str, torch.Tensor],
    prefix: list[int],
    options: list[list[int]],
    modality: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
    shared: SharedPrefill | None = None,
) -> OptionScores:
    """The log-likelihood of each option's tokens after the prompt and `prefix`, under the cache `press` makes.

    The prompt (`inputs`: one row, the model's keyword inputs; `modality`, `patches`: its maps) is prefilled once
    through the press, as `generate` would; `prefix` (token ids shared by every option, e.g. "The answer is") follows
    as one decode-phase forward; then the cache is copied once per option (batch rows) and every option is fed in one
    forward, right-padded (causal attention: a padding token never affects an earlier one). Options are decode-phase
    tokens, so the prompt's compression is the same for each. The first option token is read from the forward before
    it, so single-token options need no forward of their own. `shared`: this prompt's recorded prefill
    (`generation.share_prefill`), replayed instead of the model's prefill where the press allows.
    """
    if not options or any(not option for option in options):
        raise ValueError("give at least one option, each of at least one token")
    prompt = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if prompt.shape[0] != 1:
        raise ValueError(f"score one prompt at a time, got a batch of {prompt.shape[0]}")
    width = max(len(option) for option in options)
    check_prompt_length(model, prompt.shape[1], len(prefix) + width)
    device = prompt.device
    with press.attach(model):
        cache, logits, prefill_seconds, replayed = prefill_cache(model, press, inputs, modality, patches, shared)
        if prefix:
            ids = torch.tensor([prefix], device=device)
            logits = model(input_ids=ids, **{CACHE_KWARG: cache}, logits_to_keep=1).logits[:, -1]
        cache_bytes, full_cache_bytes = cache.cache_bytes(), cache.full_cache_bytes()
        first = F.log_softmax(logits[0].float(), dim=-1)
        scores = first[torch.tensor([option[0] for option in options], device=device)]
        if width > 1:
            count = len(options)
            cache.batch_repeat_interleave(count)  # the rows and the prompt's maps, one copy per option
            fed = torch.tensor([o[:-1] + [o[-1]] * (width - len(o)) for o in options], device=device)
            wanted = torch.tensor([o[1:] + [o[-1]] * (width - len(o)) for o in options], device=device)
            real = torch.tensor([[k < len(o) - 1 for k in range(width - 1)] for o in options], device=device)
            log_probs = F.log_softmax(model(input_ids=fed, **{CACHE_KWARG: cache}).logits.float(), dim=-1)
            scores = scores + (log_probs.gather(-1, wanted[..., None])[..., 0] * real).sum(-1)
    return OptionScores(scores.cpu(), prompt.shape[1], cache_bytes, full_cache_bytes, prefill_seconds, replayed)


# -- the task --------------------------------------------------------------------------------------------------------


@dataclass
class SyntheticTask:
    """`--tasks synthetic`: `samples` examples per family, each about `tokens` prompt tokens with `choices` options,
    from `seed`; score 1.0 when the most likely option (calibrated, see the module docstring) is the shown photo."""

    tokens: int = 300  # prompt tokens, images included
    samples: int = 20  # per family
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    choices: int = 4  # answer options per question: chance is 1 / choices
    name: ClassVar[str] = "synthetic"
    in_average: ClassVar[bool] = True
    _prior: dict[str, float] = field(default_factory=dict, init=False, repr=False)  # option -> log-likelihood
    _prompt: Latest[PreparedPrompt] = field(default_factory=Latest, init=False, repr=False)  # the example in hand

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families must be among {', '.join(FAMILIES)}, got {', '.join(unknown)}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be a positive token count, got {self.tokens}")
        if not 2 <= self.choices <= 4:  # six photos, two of them confusable: 4 options leave at least one distractor
            raise ValueError(f"choices must be 2, 3 or 4, got {self.choices}")

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        if not is_processor(processor) or not hasattr(processor, "grid"):
            raise ValueError("the synthetic suite asks about images: run it with --model mini-vlm")
        rows, cols = processor.grid
        examples = []
        for family in self.families:
            for i in range(self.samples):
                examples.append(self.example(family, i, tokenizer_of(processor), rows * cols))
        return examples, []

    def example(self, family: str, index: int, tokenizer: Any, image_tokens: int) -> Example:
        """Example `index` of `family`: the same (seed, family, index, tokens, choices) always gives the same one."""
        rng = random.Random(f"{self.seed}/{family}/{index}")
        fixed = len(tokenizer(QUESTION, add_special_tokens=False).input_ids) + _TEMPLATE_TOKENS
        num_images = max(2, round((self.tokens - fixed) / (image_tokens + _LABEL_TOKENS)))
        plan = layout(family, rng, num_images, self.choices)
        return Example(
            task=f"{self.name}/{family}",
            id=f"{family}-{index}",
            prompt=IMAGE_PLACEHOLDER * num_images + QUESTION,
            reference=ANSWERS[plan.target],
            images=tuple(plan.images),
            max_new_tokens=0,  # scored by likelihood: nothing is generated
            info={
                "family": family,
                "options": [ANSWERS[o] for o in plan.options],
                "target": plan.target,
                "target_index": plan.target_index,
                "distractors": plan.distractors,
            },
        )

    def score(self, prediction: str, example: Example) -> float:
        """1.0 when the chosen option is the shown photo's."""
        return float(prediction == example.reference)

    def prior(self, model: PreTrainedModel, processor: Any) -> dict[str, float]:
        """Each option's log-likelihood after the question with no pictures (uncompressed; computed once)."""
        if not self._prior:
            tokenizer = tokenizer_of(processor)
            inputs, _, _ = encode_example(model, processor, Example(self.name, "prior", QUESTION, ""))
            inputs = {name: value.to(model.device) for name, value in inputs.items()}
            words = list(ANSWERS.values())
            options = [_ids(tokenizer, f" {word}") for word in words]
            scores = option_log_likelihoods(model, FullPress(), inputs, _ids(tokenizer, ANSWER_PREFIX), options)
            self._prior = dict(zip(words, scores.log_likelihoods.tolist(), strict=True))
        return self._prior

    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome:
        tokenizer = tokenizer_of(processor)
        prompt = self._prompt.get((example.task, example.id), lambda: prepare_prompt(model, processor, example))
        words = example.info["options"]
        options = [_ids(tokenizer, f" {word}") for word in words]
        prefix = _ids(tokenizer, ANSWER_PREFIX)
        result = option_log_likelihoods(
            model, press, prompt.inputs, prefix, options, prompt.modality, prompt.patches, prompt.shared
        )
        prior = self.prior(model, processor)
        calibrated = result.log_likelihoods - torch.tensor([prior[word] for word in words])
        prediction = words[int(calibrated.argmax())]
        right = words.index(example.reference)
        margin = calibrated[right] - torch.cat([calibrated[:right], calibrated[right + 1 :]]).max()
        return Outcome(
            prediction=prediction,
            score=self.score(prediction, example),
            prompt_tokens=result.prompt_tokens,
            cache_bytes=result.cache_bytes,
            full_cache_bytes=result.full_cache_bytes,
            prefill_seconds=result.prefill_seconds,
            decode_ms_per_token=None,  # nothing is generated
            metrics={"margin": float(margin)},
            image_input="processor",
            shared_prefill=result.shared_prefill,
        )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


TASK = SyntheticTask
