"""Accuracy of the mini-VLM with the full cache on the shipped photos (modalkv.vlm.images.PHOTOS).

    python tools/eval_minivlm.py [--image-size 224] [--per-size 12] [--seed 0]

- single image: "What is shown in the image?", correct when the answer contains an accepted word of the photo;
  chance: a model answering the same words for every photo names one photo of the set, 1/6;
- which image: 2-5 photos, "Which image shows <subject>? Answer with the image number.", correct when the first
  number in the answer is the target's; chance 1/n;
- image k of n: 2-5 photos, "What is shown in image <k>?", correct when the answer names photo k (an accepted
  word); "other" counts answers that name another photo shown instead (picking one of the n at random: 1/n correct);
- image dependence: the same questions with the images shuffled (single: each photo replaced by another one; which:
  the order permuted): how many answers change, and the accuracy against the original photos (if the answers did
  not look at the images, it would stay the same).

Greedy decoding, batches of 8, max 16 new tokens. Prints one line per setting; docs/mini-vlm.md holds the figures.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Iterator

import torch

from modalkv.vlm import MiniVLM, MiniVLMProcessor, load_mini_vlm
from modalkv.vlm.images import PHOTOS, load_photo

SINGLE_QUESTION = "What is shown in the image?"
WHICH_QUESTION = "Which image shows {subject}? Answer with the image number."
NTH_QUESTION = "What is shown in image {k}?"
AMBIGUOUS = {frozenset({"rocket", "space_shuttle"})}  # the shuttle stands on rocket boosters: never asked together
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "first": 1, "second": 2, "third": 3, "fourth": 4}
NUMBERS["fifth"] = 5


def answer(model: MiniVLM, processor: MiniVLMProcessor, prompts: list[tuple[list[str], str]], batch: int = 8):
    """Greedy answers to (photo names, question) prompts, the photos shown in that order before the question."""
    answers = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [*({"type": "image"} for _ in names), {"type": "text", "text": q}]}],
                add_generation_prompt=True,
            )
            for names, q in chunk
        ]
        images = [[load_photo(n) for n in names] for names, _ in chunk]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def first_number(text: str) -> int | None:
    """The first image number an answer names ("2", "Image 2", "the second image"), or None."""
    match = re.search(r"\b([1-9]|" + "|".join(NUMBERS) + r")\b", text.lower())
    return None if match is None else int(NUMBERS.get(match.group(1), match.group(1)))


def which_questions(num_images: int, count: int, rng: random.Random) -> Iterator[tuple[list[str], str]]:
    """`count` (photos, target) draws of `num_images` distinct photos, never two ambiguous ones together."""
    made = 0
    while made < count:
        names = rng.sample(sorted(PHOTOS), num_images)
        if any(pair <= set(names) for pair in AMBIGUOUS):
            continue
        made += 1
        yield names, names[made % num_images]  # targets rotate over the positions: no position bias helps


def named(replies: list[str], targets: list[str]) -> str:
    """ "x/N correct, y/N other": answers naming their target photo, and answers naming none of it but another one."""
    correct = [PHOTOS[t].is_named_in(r) for r, t in zip(replies, targets, strict=True)]
    other = [not ok and any(p.is_named_in(r) for p in PHOTOS.values()) for r, ok in zip(replies, correct, strict=True)]
    return f"{sum(correct)}/{len(replies)} correct, {sum(other)}/{len(replies)} other"


def derangement(items: list[str], rng: random.Random) -> list[str]:
    """A shuffle of `items` in which no item stays in place."""
    while True:
        shuffled = rng.sample(items, len(items))
        if all(a != b for a, b in zip(items, shuffled, strict=True)):
            return shuffled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--per-size", type=int, default=12, help="which-image questions per number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", action="store_true", help="print every answer")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = load_mini_vlm(image_size=args.image_size)
    rng = random.Random(args.seed)
    names = sorted(PHOTOS)

    single = answer(model, processor, [([n], SINGLE_QUESTION) for n in names])
    moved = derangement(names, rng)
    shuffled = answer(model, processor, [([m], SINGLE_QUESTION) for m in moved])
    hits = [PHOTOS[n].is_named_in(a) for n, a in zip(names, single, strict=True)]
    still = [PHOTOS[n].is_named_in(a) for n, a in zip(names, shuffled, strict=True)]
    changed = sum(a != b for a, b in zip(single, shuffled, strict=True))
    print(
        f"single image: {sum(hits)}/{len(names)} correct (chance 1/{len(names)}); images replaced: "
        f"{changed}/{len(names)} answers change, {sum(still)}/{len(names)} still name the original photo"
    )
    if args.show:
        for n, a, m, b in zip(names, single, moved, shuffled, strict=True):
            print(f"  {n}: {a!r} | shown {m} instead: {b!r}")

    for num_images in range(2, 6):
        questions = list(which_questions(num_images, args.per_size, rng))
        prompts = [(shown, WHICH_QUESTION.format(subject=PHOTOS[t].subject)) for shown, t in questions]
        replies = answer(model, processor, prompts)
        correct = [first_number(r) == shown.index(t) + 1 for (shown, t), r in zip(questions, replies, strict=True)]
        orders = [derangement(shown, rng) for shown, _ in questions]
        permuted = answer(model, processor, [(o, q) for o, (_, q) in zip(orders, prompts, strict=True)])
        follows = [first_number(r) == o.index(t) + 1 for o, (_, t), r in zip(orders, questions, permuted, strict=True)]
        stays = [first_number(r) == shown.index(t) + 1 for (shown, t), r in zip(questions, permuted, strict=True)]
        print(
            f"which image of {num_images}: {sum(correct)}/{len(questions)} correct (chance 1/{num_images}); "
            f"order shuffled: {sum(follows)}/{len(questions)} correct, {sum(stays)}/{len(questions)} "
            "still give the original position"
        )
        if args.show:
            for (shown, t), r in zip(questions, replies, strict=True):
                print(f"  {shown} -> {t}: {r!r}")

    for num_images in range(2, 6):
        questions = list(which_questions(num_images, args.per_size, rng))
        prompts = [(shown, NTH_QUESTION.format(k=shown.index(t) + 1)) for shown, t in questions]
        replies = answer(model, processor, prompts)
        orders = [derangement(shown, rng) for shown, _ in questions]
        permuted = answer(model, processor, [(o, q) for o, (_, q) in zip(orders, prompts, strict=True)])
        k_th = [shown.index(t) for shown, t in questions]
        now_shown = [o[k] for o, k in zip(orders, k_th, strict=True)]
        print(
            f"image k of {num_images}: {named(replies, [t for _, t in questions])} "
            f"(chance 1/{num_images}); order shuffled: {named(permuted, now_shown)}, "
            f"{sum(PHOTOS[t].is_named_in(r) for (_, t), r in zip(questions, permuted, strict=True))}"
            f"/{len(questions)} still name the original image k"
        )
        if args.show:
            for (shown, t), r in zip(questions, replies, strict=True):
                print(f"  {shown} image {shown.index(t) + 1}: {r!r}")


if __name__ == "__main__":
    main()
