"""The synthetic multimodal long-context suite: `--tasks synthetic`, generated from a seed for the mini-VLM.

Each example is a run of pictures, crops and mirror images of one distractor photo with one other picture among
them, and the question "What is shown in image k?" about that one; the answer is correct when it names its photo
(`Photo.is_named_in`). The prompt holds about `tokens` tokens, so the number of pictures follows from the
processor's patches per image. Three columns:

- `synthetic/deferred`: the asked-about photo is image 1, read first and followed by every distractor, so it drew
  little attention when read; only the question at the end needs it.
- `synthetic/spatial`: the asked-about photo covers 4 x 4 adjacent patches of a grey 7 x 7 canvas, at a random
  place and a random position in the run: the answer lives in that one region.
- `synthetic/distractor`: the asked-about photo at a random position after the first, among the distractor's crops.

No filler text: with any between or before the pictures, the 135M language model retells the text instead of the
picture (measured while making the suite), and it cannot pick a picture by its content ("one of the images is
different: what does it show?"), only by number (docs/mini-vlm.md). Derived images (crops, canvases) are written
once as PNG files under `modalkv.models.cache_dir() / "synthetic"`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageOps

from modalkv.eval.tasks import IMAGE_PLACEHOLDER, Example, Failure, GenerationTask, tokenizer_of
from modalkv.multimodal import is_processor

FAMILIES = ("deferred", "spatial", "distractor")
# Asked-about photos: the ones the mini-VLM names alone with the full cache (helmet and tripod it does not).
TARGETS = ("cat", "coffee", "rocket", "space_shuttle")
CONFUSED = {frozenset({"rocket", "space_shuttle"})}  # the tower reads both as rockets: never paired
_TEMPLATE_TOKENS = 30  # the chat template around the user turn
_LABEL_TOKENS = 6  # "Image N: " and a newline the chat template writes around each image


@dataclass(frozen=True)
class Layout:
    """One example before tokenisation: text pieces around the images, and which photo is the answer."""

    images: list[Path]
    target: str  # the odd photo (a key of PHOTOS)
    distractor: str
    target_index: int  # which of `images` holds the odd photo


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


def layout(family: str, rng: random.Random, num_images: int) -> Layout:
    """The pictures of one example and which of them the question asks about (see the module docstring)."""
    photos = _photos()
    target = rng.choice(TARGETS)
    distractor = rng.choice([p for p in photos if p != target and frozenset({p, target}) not in CONFUSED])
    if family == "deferred":
        index, image = 0, photos[target].path
    elif family == "spatial":
        cells = 4
        index, image = (
            rng.randrange(num_images),
            region(target, cells, rng.randrange(8 - cells), rng.randrange(8 - cells)),
        )
    elif family == "distractor":
        index, image = rng.randrange(1, num_images), photos[target].path
    else:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    images = [image if i == index else variant(distractor, rng) for i in range(num_images)]
    return Layout(images, target, distractor, index)


QUESTION = "What is shown in image {number}?"


@dataclass
class SyntheticTask(GenerationTask):
    """`--tasks synthetic`: `samples` examples per family, each about `tokens` prompt tokens, from `seed`."""

    tokens: int = 512  # prompt tokens, images included
    samples: int = 6  # per family
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    max_new_tokens: int = 8  # "The image 1 shows a cat" fits
    name: ClassVar[str] = "synthetic"

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families must be among {', '.join(FAMILIES)}, got {', '.join(unknown)}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be a positive token count, got {self.tokens}")

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
        """Example `index` of `family`: the same (seed, family, index, tokens) always gives the same example."""
        rng = random.Random(f"{self.seed}/{family}/{index}")
        fixed = len(tokenizer(QUESTION.format(number=99), add_special_tokens=False).input_ids) + _TEMPLATE_TOKENS
        num_images = max(3, round((self.tokens - fixed) / (image_tokens + _LABEL_TOKENS)))
        plan = layout(family, rng, num_images)
        return Example(
            task=f"{self.name}/{family}",
            id=f"{family}-{index}",
            prompt=IMAGE_PLACEHOLDER * num_images + QUESTION.format(number=plan.target_index + 1),
            reference=plan.target,
            images=tuple(plan.images),
            max_new_tokens=self.max_new_tokens,
            info={"family": family, "distractor": plan.distractor, "target_index": plan.target_index},
        )

    def score(self, prediction: str, example: Example) -> float:
        """1.0 when the answer names the odd photo (one of its accepted words)."""
        return float(_photos()[example.reference].is_named_in(prediction))


TASK = SyntheticTask
