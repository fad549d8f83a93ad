"""MileBench (arXiv 2404.18532) in its real on-disk format: `--tasks milebench:PATH`.

PATH is the MileBench root (`PATH/<Dataset>/<Dataset>.json` and `PATH/<Dataset>/images/...`, as in the
`FreedomIntelligence/MileBench` dataset) or one dataset folder. Prompts are built as the official `utils.py` builds
them (instruction first, choice list for multiple-choice, `{image#i}` / `{table#i}` to `<ImageHere>`, the context
truncated from its start so that the instruction + context fit `max_context_len` with `tokens_per_image` per image),
then as its LLaVA worker does (`<ImageHere><ImageHere>` gets newlines, the model's chat template, greedy decoding,
at least one new token). Each dataset is scored with its own metric (`metrics.py`) and reported as its own column
`milebench/<Dataset>`.

A text-only model reads "[image]" (`IMAGE_STANDIN`) where each image was, and an image then costs the stand-in's
tokens in the truncation budget unless `tokens_per_image` is given; records say `image_input: stand-in`.

A file that cannot be parsed, a sample missing a field and a missing image are failures: each is reported with the
file it concerns, and the run goes on with the remaining samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from modalkv.eval import metrics
from modalkv.eval.tasks import (
    IMAGE_PLACEHOLDER,
    IMAGE_STANDIN,
    Example,
    Failure,
    GenerationTask,
    tokenizer_of,
)
from modalkv.multimodal import is_processor


def build_prompt(
    tokenizer: Any,
    instruction: str,
    context: str,
    images: list[str],
    max_context_len: int,
    tokens_per_image: int,
    choices: list[str] | None = None,
    letters: bool = True,
) -> tuple[str, list[str]]:
    """MileBench's prompt and the images it keeps (`MileBenchDataset.__getitem__`, without combined images).

    The context is walked from its end: each text fragment, then the image before it, until the next piece would
    overflow `max_context_len` minus the instruction's tokens. A first fragment that is already too long keeps its
    last tokens. The question at the end and the instruction at the start are always kept.
    """
    if choices is not None:
        listed = [(f"{chr(65 + i)}. " if letters else "") + f"{c}" for i, c in enumerate(choices)]
        context += "\nChoice list: \n" + "\n".join(listed) + "\nYour answer is: "
    for i in range(len(images)):
        context = context.replace(f"{{image#{i + 1}}}", IMAGE_PLACEHOLDER)
        context = context.replace(f"{{table#{i + 1}}}", IMAGE_PLACEHOLDER)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    room = max_context_len - len(encode(instruction))
    remaining, kept, chunks, used, image_start = list(images), [], [], 0, False
    for fragment in context.split(IMAGE_PLACEHOLDER)[::-1]:
        ids = encode(fragment)
        if len(ids) + used > room:
            if not chunks:
                chunks.insert(0, ids[-room:])
            break
        image_start = False
        chunks.insert(0, ids)
        used += len(ids)
        if tokens_per_image + used > room:
            break
        if remaining:
            image_start = True
            kept.insert(0, remaining.pop(-1))
            used += tokens_per_image
    text = "".join(tokenizer.decode(chunk) + IMAGE_PLACEHOLDER for chunk in chunks[:-1]) + tokenizer.decode(chunks[-1])
    if image_start:
        text = IMAGE_PLACEHOLDER + text
    return instruction + "\n" + text, kept


def scorer_of(dataset: str, question_type: str) -> str:
    """The metric `evaluate.py` applies to a dataset: needle, substring, rouge_l or multiple_choice."""
    if "NeedleInAHaystack" in dataset:
        return "needle"
    if "MMCoQA" in dataset:
        return "substring"
    if question_type == "open-ended":
        return "rouge_l"
    if question_type == "multi-choice":
        return "multiple_choice"
    raise ValueError(f"question_type {question_type!r} is neither 'multi-choice' nor 'open-ended'")


@dataclass
class MileBenchTask(GenerationTask):
    """`--tasks milebench:PATH`: every dataset under PATH (or `datasets`), each scored by its own metric."""

    path: Path
    datasets: tuple[str, ...] = ()  # default: every dataset folder under path
    max_context_len: int = 4096  # LLaVA-1.5's setting, as in LOOK-M
    tokens_per_image: int | None = None  # default: the model's image token count, or the stand-in's tokens
    max_new_tokens: int = 512
    name: ClassVar[str] = "milebench"

    def _folders(self) -> list[Path]:
        if not self.path.is_dir():
            raise ValueError(f"MileBench folder not found: {self.path} (expected <Dataset>/<Dataset>.json inside)")
        if (self.path / f"{self.path.name}.json").is_file():
            return [self.path]
        if self.datasets:
            return [self.path / name for name in self.datasets]
        return sorted(p for p in self.path.iterdir() if p.is_dir())

    def _image_cost(self, processor: Any) -> int:
        if self.tokens_per_image is not None:
            return self.tokens_per_image
        if is_processor(processor):
            count = getattr(processor, "num_image_tokens", None)
            if count is None:
                raise ValueError(
                    "set -t milebench.tokens_per_image=N: the processor does not say how many tokens an image costs"
                )
            return count
        return len(tokenizer_of(processor)(IMAGE_STANDIN, add_special_tokens=False).input_ids)

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]:
        examples: list[Example] = []
        failures: list[Failure] = []
        image_cost = self._image_cost(processor)
        for folder in self._folders():
            task = f"{self.name}/{folder.name}"
            file = folder / f"{folder.name}.json"
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                meta, samples = data["meta_data"], data["data"]
                scorer = scorer_of(folder.name, meta["question_type"])
            except FileNotFoundError:
                failures.append(Failure(task, str(file), f"missing file {file}"))
                continue
            except json.JSONDecodeError as error:
                failures.append(Failure(task, str(file), f"{file} is not valid JSON: {error}"))
                continue
            except (KeyError, TypeError, ValueError) as error:
                failures.append(Failure(task, str(file), f"{file}: bad meta_data or data ({error!r})"))
                continue
            for index, sample in enumerate(samples):
                try:
                    examples.append(
                        self._example(task, folder, meta, sample, scorer, tokenizer_of(processor), image_cost)
                    )
                except (KeyError, TypeError, IndexError, ValueError) as error:
                    item = str(sample.get("sample_id", f"#{index}")) if isinstance(sample, dict) else f"#{index}"
                    message = str(error) if isinstance(error, ValueError) else f"missing or bad field {error!r}"
                    failures.append(Failure(task, item, f"{file}, sample {item}: {message}"))
        return examples, failures

    def _example(
        self, task: str, folder: Path, meta: dict, sample: dict, scorer: str, tokenizer: Any, image_cost: int
    ) -> Example:
        instance = sample["task_instance"]
        images = [folder / "images" / p for p in instance["images_path"]]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise ValueError(f"image file not found: {', '.join(missing)}")
        choices = instance.get("choice_list")
        if scorer == "multiple_choice" and metrics.normalize(str(sample["response"])) not in [
            metrics.normalize(c) for c in choices or []
        ]:
            raise ValueError(f"the answer {sample['response']!r} is not one of the choice_list")
        prompt, kept = build_prompt(
            tokenizer,
            meta["task_instruction"][sample["task_instruction_id"]],
            instance["context"],
            [str(p) for p in images],
            self.max_context_len,
            image_cost,
            choices,
            letters=folder.name != "GPR1200",
        )
        prompt = prompt.replace(IMAGE_PLACEHOLDER * 2, f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\n")
        return Example(
            task=task,
            id=str(sample["sample_id"]),
            prompt=prompt,
            reference=str(sample["response"]),
            images=tuple(Path(p) for p in kept),
            max_new_tokens=self.max_new_tokens,
            info={
                "dataset": folder.name,
                "metric": scorer,
                "choices": choices,
                "images_total": len(images),
                "image_quantity_level": sample.get("image_quantity_level"),
            },
        )

    def score(self, prediction: str, example: Example) -> float:
        metric = example.info["metric"]
        if metric == "multiple_choice":
            return metrics.multiple_choice_score(prediction, example.reference, example.info["choices"])
        if metric == "rouge_l":
            return metrics.open_ended_score(prediction, example.reference)
        if metric == "needle":
            return metrics.needle_score(prediction, example.reference)
        return metrics.substring_score(prediction, example.reference)


TASK = MileBenchTask
