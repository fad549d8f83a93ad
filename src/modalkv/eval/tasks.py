"""What every evaluation task provides, how a prompt becomes model inputs, and the registry of tasks by CLI name.

A task is a dataclass (its fields are its options, set with `-t TASK.FIELD=VALUE`) with a `load()` that returns its
examples and an `evaluate()` that runs one example with one press. A module `modalkv/eval/<name>.py` that defines
`TASK = <the class>` is the task `<name>` on the command line: adding a task means adding one module.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from transformers import PreTrainedModel

from modalkv.generation import (
    GenerationResult,
    SharedPrefill,
    encode_prompt,
    generate_shared,
    generate_timed,
    share_prefill,
)
from modalkv.multimodal import is_processor
from modalkv.presses import Press

IMAGE_PLACEHOLDER = "<ImageHere>"  # where an image goes in `Example.prompt` (MileBench's own marker)
IMAGE_STANDIN = "[image]"  # what a text-only model reads in place of each image
T = TypeVar("T")

# Tasks named in the plan whose module has not landed yet: asked for, they get this message instead of "unknown".
PLANNED: dict[str, str] = {}


@dataclass(frozen=True)
class Example:
    """One prompt and what a correct answer is. `task` is the column it counts in (e.g. "milebench/WebQA")."""

    task: str
    id: str
    prompt: str  # images sit at IMAGE_PLACEHOLDER, in order
    reference: str
    images: tuple[Path, ...] = ()
    chat: bool = True  # wrap in the model's chat template; False: tokenise exactly as given
    max_new_tokens: int = 32
    info: dict[str, Any] = field(default_factory=dict)  # what the record should show (depth, dataset, ...)


@dataclass(frozen=True)
class Failure:
    """An example (or a whole data file) that could not be loaded or prepared; the run goes on without it."""

    task: str
    item: str  # the example id, or the file that failed
    error: str


@dataclass
class Outcome:
    """What one (example, press) evaluation produced; the runner adds the keys and writes it as a record."""

    prediction: str
    score: float  # the task's main number, higher is better, in [0, 1]
    prompt_tokens: int
    cache_bytes: int
    full_cache_bytes: int
    prefill_seconds: float
    decode_ms_per_token: float | None
    global_cache_bytes: int | None = None  # the layers the press compresses (hybrid models: the global ones)
    global_full_cache_bytes: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # secondary numbers (e.g. fidelity's KL)
    image_input: str = "none"  # "none", "processor" or "stand-in" (text-only model: images replaced by IMAGE_STANDIN)
    shared_prefill: bool = False  # the model's prefill forward was shared with the example's other presses
    batch: int = 1  # examples decoded together (`evaluate_batch`): the timings are the batch's


class Task(Protocol):
    """The contract the runner relies on; `GenerationTask` implements `evaluate` for generate-then-score tasks. A task
    that can decode several examples together also has `evaluate_batch(model, processor, press, examples)`, giving
    each example's Outcome as `evaluate` would, or None where it cannot (the runner then takes them one by one)."""

    name: ClassVar[str]
    in_average: ClassVar[bool]  # whether its score counts in the summary's average (accuracy-like tasks only)

    def load(self, processor: Any) -> tuple[list[Example], list[Failure]]: ...

    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome: ...


class Latest(Generic[T]):
    """One value, made for the latest key and kept while the runner takes every press on the same example (or batch)
    in a row (its order: every press of one, then the next); a new key frees the old value before making its own."""

    def __init__(self) -> None:
        self.key: Hashable | None = None
        self.value: T | None = None

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        if key != self.key:
            self.key, self.value = None, None
            self.value, self.key = make(), key
        return self.value

    def row_of(self, key: tuple) -> int | None:
        """Where the one example of `key` sits in the batch held (a key of several examples), else None: a press
        that takes a batch's examples one by one, after the others (`runner.pending`), reuses the batch's value."""
        if len(key) != 1 or self.value is None or len(self.key) == 1 or key[0] not in self.key:
            return None
        return self.key.index(key[0])


@dataclass
class GenerationTask:
    """Greedy generation then `score()`; subclasses (dataclasses) define `load()` and `score()`."""

    in_average: ClassVar[bool] = True
    _shared_prefill: Latest[SharedPrefill | None] = field(default_factory=Latest, init=False, repr=False, compare=False)

    def score(self, prediction: str, example: Example) -> float:
        raise NotImplementedError

    def evaluate(self, model: PreTrainedModel, processor: Any, press: Press, example: Example) -> Outcome:
        inputs, modality, image_input = encode_example(model, processor, example)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        modality = None if modality is None else modality.to(model.device)
        shared = self.shared_prefill(model, [example], inputs) if image_input != "processor" else None
        result = generate_timed(
            model,
            tokenizer_of(processor),
            press,
            inputs,
            example.max_new_tokens,
            min_new_tokens=1,
            modality=modality,
            shared=shared,
        )
        return self.outcome(result, example, image_input)

    def evaluate_batch(
        self, model: PreTrainedModel, processor: Any, press: Press, examples: list[Example]
    ) -> list[Outcome] | None:
        """`examples` decoded together, left-padded, on one shared prefill (`generate_shared`): each Outcome is the
        one `evaluate` gives that example alone, with the batch's timings. None where they cannot be decoded together:
        a press whose rows depend on each other (`Press.batch_invariant`), images given through a processor, or
        examples asking for different answer lengths."""
        if not press.batch_invariant:
            return None
        if len({example.max_new_tokens for example in examples}) != 1:
            return None
        encoded = [encode_example(model, processor, example) for example in examples]
        if any(image_input == "processor" for _, _, image_input in encoded):
            return None
        tokenizer = tokenizer_of(processor)
        inputs = left_padded([ids for ids, _, _ in encoded], tokenizer.pad_token_id or 0)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        shared = self.shared_prefill(model, examples, inputs)
        if shared is None:
            return None
        results = generate_shared(
            model, tokenizer, press, inputs, examples[0].max_new_tokens, min_new_tokens=1, shared=shared
        )
        return [
            self.outcome(result, example, image_input)
            for result, example, (_, _, image_input) in zip(results, examples, encoded, strict=True)
        ]

    def outcome(self, result: GenerationResult, example: Example, image_input: str) -> Outcome:
        prediction = result.text.strip()
        return Outcome(
            prediction=prediction,
            score=self.score(prediction, example),
            prompt_tokens=result.prompt_tokens,
            cache_bytes=result.cache_bytes,
            full_cache_bytes=result.full_cache_bytes,
            global_cache_bytes=result.global_cache_bytes,
            global_full_cache_bytes=result.global_full_cache_bytes,
            prefill_seconds=result.prefill_seconds,
            decode_ms_per_token=result.decode_ms_per_token,
            image_input=image_input,
            shared_prefill=result.shared_prefill,
            batch=result.batch,
        )

    def shared_prefill(
        self, model: PreTrainedModel, examples: list[Example], inputs: dict[str, torch.Tensor]
    ) -> SharedPrefill | None:
        """The examples' text prompts (one, or a left-padded batch) prefilled once for all the presses the runner
        takes on them in a row; one example of the batch in hand gets its row of the batch's, which is its own."""
        key = tuple((example.task, example.id) for example in examples)
        row = self._shared_prefill.row_of(key)
        if row is not None:
            return self._shared_prefill.value.row(row)  # a copy of one row: cheap beside a prefill
        return self._shared_prefill.get(key, lambda: share_prefill(model, inputs))


def left_padded(prompts: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One-row token-id inputs as a left-padded batch, as generate() pads: the padding masked out."""
    width = max(prompt["input_ids"].shape[1] for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        length = prompt["input_ids"].shape[1]
        ids[row, width - length :] = prompt["input_ids"][0]
        mask[row, width - length :] = 1 if "attention_mask" not in prompt else prompt["attention_mask"][0]
    return {"input_ids": ids, "attention_mask": mask}


def tokenizer_of(processor: Any) -> Any:
    return processor.tokenizer if is_processor(processor) else processor


def open_image(path: Path) -> Any:
    """The image as an RGB PIL image; ValueError naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read the image {path}: {error}") from None


def encode_example(
    model: PreTrainedModel, processor: Any, example: Example
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, str]:
    """Model inputs, modality map (None: derived from the model) and how the images were given.

    With a processor, the images go where their placeholders are (one user turn of text and image parts through the
    processor's chat template, or the processor's image token in place with `chat=False`), and the modality and patch
    maps come from `modalkv.multimodal`. A text-only model reads IMAGE_STANDIN in place of each image.
    """
    if not example.images:
        return encode_prompt(tokenizer_of(processor), example.prompt, raw=not example.chat), None, "none"
    if not is_processor(processor):
        text = example.prompt.replace(IMAGE_PLACEHOLDER, IMAGE_STANDIN)
        return encode_prompt(processor, text, raw=not example.chat), None, "stand-in"
    from modalkv.multimodal import multimodal_inputs

    pieces = example.prompt.split(IMAGE_PLACEHOLDER)
    if example.chat and processor.chat_template is not None:
        content = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            content += [{"type": "image"}, {"type": "text", "text": piece}]
        messages = [{"role": "user", "content": [part for part in content if part.get("text") != ""]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = processor.image_token.join(pieces)
    bos = tokenizer_of(processor).bos_token
    special = not (bos is not None and text.startswith(bos))  # a template that wrote BOS gets no second one
    images = [open_image(path) for path in example.images]
    outputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=special)
    inputs = multimodal_inputs(model, dict(outputs))
    return inputs, inputs.pop("modality"), "processor"


@dataclass
class PreparedPrompt:
    """One example's prompt as every press of a grid reads it, made once (`prepare_prompt`, kept in a `Latest`): the
    model's inputs (a mini-VLM's images already embedded: the vision tower is no part of what a press changes), the
    modality and patch maps, and the prefill forward recorded for replay (`generation.share_prefill`; None where it
    cannot be shared)."""

    inputs: dict[str, torch.Tensor]
    modality: torch.Tensor | None
    patches: torch.Tensor | None
    shared: SharedPrefill | None


def prepare_prompt(model: PreTrainedModel, processor: Any, example: Example) -> PreparedPrompt:
    inputs, modality, _ = encode_example(model, processor, example)
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    if hasattr(model, "embed") and "pixel_values" in inputs:
        inputs["inputs_embeds"] = model.embed(inputs.pop("input_ids"), inputs.pop("pixel_values"))
    modality = None if modality is None else modality.to(model.device)
    patches = inputs.pop("patches", None)
    shared = share_prefill(model, inputs, modality, patches)
    return PreparedPrompt(inputs, modality, patches, shared)


# -- the registry ---------------------------------------------------------------------------------------------------


def available_tasks() -> dict[str, type]:
    """CLI name -> task class, for every module of `modalkv.eval` that defines `TASK`."""
    import modalkv.eval

    found = {}
    for module in pkgutil.iter_modules(modalkv.eval.__path__):
        task = getattr(importlib.import_module(f"modalkv.eval.{module.name}"), "TASK", None)
        if task is not None:
            found[task.name] = task
    return found


def _convert(text: str, hint: Any, where: str) -> Any:
    """A task option from its text, by the field's type: int, float, str, Path, bool, tuples of those, or None."""
    if get_origin(hint) in (Union, types.UnionType):
        if text.lower() == "none" and type(None) in get_args(hint):
            return None
        hint = next(h for h in get_args(hint) if h is not type(None))
    if get_origin(hint) is tuple:
        return tuple(_convert(part, get_args(hint)[0], where) for part in text.split(",") if part)
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{where} must be true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return hint(text)
    except ValueError:
        raise ValueError(f"{where} must be {hint.__name__}, got {text!r}") from None


def build_task(spec: str, options: dict[str, str]) -> Task:
    """The task of a `--tasks` entry ("passkey", "milebench:PATH", ...) with its `-t` options (FIELD -> text)."""
    name, _, argument = spec.partition(":")
    tasks = available_tasks()
    if name not in tasks:
        if name in PLANNED:
            raise ValueError(PLANNED[name])
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(sorted(tasks))} (milebench:PATH)")
    cls = tasks[name]
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values = {}
    if argument:
        values[names[0]] = _convert(argument, hints[names[0]], f"{name}'s {names[0]}")
    for key, text in options.items():
        if key not in names:
            raise ValueError(f"task {name} has no option {key!r}; options: {', '.join(names)}")
        values[key] = _convert(text, hints[key], f"{name}.{key}")
    try:
        return cls(**values)
    except TypeError as error:  # a required field (e.g. milebench's path) is missing
        raise ValueError(f"task {name}: {error}") from None


def task_options(task: Task) -> dict[str, Any]:
    """The task's options as JSON-ready values (recorded with the run, so a resumed run can check them)."""
    options = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.init}
    return json.loads(json.dumps(options, default=str))
