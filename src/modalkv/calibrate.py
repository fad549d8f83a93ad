"""`modalkv calibrate`: measures a model's head statistics once and stores them where SparseMM and MixKV read them
(`modalkv.head_statistics`).

- **Visual scores** (SparseMM), by its authors' criterion carried over to pictures we generate. Their OCR pass feeds
  an image of text and, for each generated token found in exactly one box of the image, adds 1 / (image tokens in
  the box) to every head whose strongest attention (of the query that produced the token) lands in the box. Ours:
  `pictures` pictures from the synthetic suite's photos (`modalkv.eval.synthetic`), one of them a photo over 4 x 4
  patches of a grey 7 x 7 canvas at a random place, the others crops of photos not named; the question "Which object
  is in these pictures?", then, fed as the answer, "The object is a <photo's name>". For each token of the name, each
  query head whose largest attention logit (over everything before) falls on the photo's patches scores 1 / (patches
  of the photo). A head's score is its mean over the examples.
- **Redundancy** (MixKV): the mean pairwise cosine similarity of each KV head's keys over a prompt, averaged over
  the examples (text-only models: over passkey-style prompts of `tokens` tokens).

What it stands for: on the mini-VLM a "visual head" is one that looks at the photo it is naming, the same act the
authors measure with text in images; it is measured on six photos and a vision tower whose patches are class
posteriors (docs/mini-vlm.md), so it is a faithful procedure on a small test bed, not the authors' head scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from modalkv.cache import CompressedCache
from modalkv.compat import CACHE_KWARG
from modalkv.eval.synthetic import ANSWER_PREFIX, ANSWERS, CONFUSED, QUESTION, region, variant
from modalkv.eval.tasks import IMAGE_PLACEHOLDER, Example, encode_example, tokenizer_of
from modalkv.head_statistics import HeadStatistics, head_shape, model_key
from modalkv.modality import TEXT, infer_patches
from modalkv.multimodal import is_processor
from modalkv.presses.base import PrefillInputs, Press, Selection

CELLS, GRID = 4, 7  # the named photo covers CELLS x CELLS patches of a GRID x GRID canvas


@dataclass
class HeadRecorder(Press):
    """Records one prompt's statistics per layer at prefill and keeps a single token per head (its cache is thrown
    away). `named`: positions of the queries that produce the photo's name; `region`: [S] bool, the photo's
    tokens; `prompt_length`: the tokens before the answer (the keys the redundancy is measured over)."""

    prompt_length: int = 1
    named: list[int] = field(default_factory=list)
    region: torch.Tensor | None = None
    visual: dict[int, torch.Tensor] = field(default_factory=dict)  # model layer -> [H]
    redundancy: dict[int, torch.Tensor] = field(default_factory=dict)  # model layer -> [H_kv]
    name = "calibration-recorder"

    def select(self, inputs: PrefillInputs) -> Selection:
        layer = inputs.module.layer_idx
        keys = inputs.keys[0].float()  # [H_kv, S, D]
        unit = F.normalize(keys[:, : self.prompt_length], dim=-1)
        count = unit.shape[1]
        # Mean cosine similarity over pairs of distinct tokens: (|sum u|^2 - n) / (n (n - 1)).
        self.redundancy[layer] = ((unit.sum(1).pow(2).sum(-1) - count) / max(count * (count - 1), 1)).cpu()
        if self.region is not None:
            heads = inputs.queries.shape[1]
            named = torch.tensor(self.named, device=keys.device)
            queries = inputs.queries[0][:, named].float()  # [H, Q, D]
            logits = queries @ keys.repeat_interleave(heads // keys.shape[0], dim=0).transpose(-1, -2)  # [H, Q, S]
            visible = torch.arange(keys.shape[1], device=keys.device) <= named[:, None]
            strongest = logits.masked_fill(~visible, float("-inf")).argmax(-1)  # [H, Q]
            region = self.region.to(keys.device)
            self.visual[layer] = (region[strongest].float().sum(-1) / region.sum()).cpu()
        lengths = torch.ones(inputs.keys.shape[:2], dtype=torch.long, device=keys.device)
        return Selection(torch.zeros_like(lengths)[..., None], lengths)


def _picture_example(index: int, pictures: int, seed: int) -> tuple[Example, str, tuple[int, int, int]]:
    """Calibration example `index`: the example, the photo named, and (picture, row, column) of its top-left patch."""
    from modalkv.vlm.images import PHOTOS

    rng = random.Random(f"calibration/{seed}/{index}")
    target = rng.choice(sorted(PHOTOS))
    others = [p for p in sorted(PHOTOS) if p != target and frozenset({p, target}) not in CONFUSED]
    place = (rng.randrange(pictures), rng.randrange(GRID - CELLS + 1), rng.randrange(GRID - CELLS + 1))
    images = [
        region(target, CELLS, place[1], place[2], GRID) if i == place[0] else variant(rng.choice(others), rng)
        for i in range(pictures)
    ]
    prompt = IMAGE_PLACEHOLDER * pictures + QUESTION
    return Example("calibration", str(index), prompt, ANSWERS[target], images=tuple(images)), target, place


def _region(patches: torch.Tensor, place: tuple[int, int, int]) -> torch.Tensor:
    """[S] bool: the tokens of picture place[0] whose patch centre lies on the photo (any grid the processor made)."""
    image, row, col = patches[0].unbind(-1)
    mine = image == place[0]
    height, width = int(row[mine].max()) + 1, int(col[mine].max()) + 1
    centre_row, centre_col = (row.float() + 0.5) * GRID / height, (col.float() + 0.5) * GRID / width
    inside_row = (centre_row >= place[1]) & (centre_row < place[1] + CELLS)
    inside_col = (centre_col >= place[2]) & (centre_col < place[2] + CELLS)
    return mine & inside_row & inside_col


def _with_answer(inputs: dict[str, torch.Tensor], answer: list[int]) -> dict[str, torch.Tensor]:
    """`inputs` (one row) with the answer's tokens appended: its ids, a mask of ones, zeros in other per-token maps."""
    length = inputs["input_ids"].shape[1]
    extended = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length):
            tail = answer if key == "input_ids" else [1 if key == "attention_mask" else 0] * len(answer)
            value = torch.cat([value, torch.tensor([tail], dtype=value.dtype, device=value.device)], dim=1)
        extended[key] = value
    return extended


@torch.no_grad()
def calibrate(
    model: PreTrainedModel,
    processor: Any,
    examples: int = 64,
    pictures: int = 8,
    tokens: int = 1024,
    seed: int = 0,
    on_example: Callable[[int], None] | None = None,
) -> HeadStatistics:
    """The head statistics of `model` over `examples` prompts (see the module docstring): pictures with a named photo
    when `processor` is a vision-language processor, else passkey-style text of `tokens` tokens."""
    from modalkv.eval.passkey import passkey_example

    layers, heads, kv_heads = head_shape(model.config)
    with_pictures = is_processor(processor)
    tokenizer = tokenizer_of(processor)
    visual, redundancy = torch.zeros(layers, heads), torch.zeros(layers, kv_heads)
    for index in range(examples):
        recorder = HeadRecorder()
        if with_pictures:
            example, target, place = _picture_example(index, pictures, seed)
            inputs, modality, _ = encode_example(model, processor, example)
            patches = inputs.pop("patches", None)
            patches = infer_patches(modality) if patches is None else patches
            prefix = tokenizer(ANSWER_PREFIX, add_special_tokens=False).input_ids
            name = tokenizer(f" {ANSWERS[target]}", add_special_tokens=False).input_ids
            length, answer = inputs["input_ids"].shape[1], len(prefix) + len(name)
            inputs = _with_answer(inputs, prefix + name)
            recorder.region = F.pad(_region(patches, place), (0, answer))
            recorder.named = list(range(length + len(prefix) - 1, length + answer - 1))
            modality = F.pad(modality, (0, answer), value=TEXT)
            patches = F.pad(patches, (0, 0, 0, answer), value=-1)
        else:
            text = passkey_example(tokenizer, tokens, depth=random.Random(f"{seed}/{index}").random(), seed=index).text
            inputs = {"input_ids": torch.tensor([tokenizer(text).input_ids[:tokens]])}
            modality = patches = None
            length = inputs["input_ids"].shape[1]
        recorder.prompt_length = length
        inputs = {key: value.to(model.device) if torch.is_tensor(value) else value for key, value in inputs.items()}
        cache = CompressedCache(recorder, modality=modality, patches=patches)
        with recorder.attach(model):
            model(**inputs, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1)
        for layer, scores in recorder.redundancy.items():
            redundancy[layer] += scores / examples
        for layer, scores in recorder.visual.items():
            visual[layer] += scores / examples
        if on_example is not None:
            on_example(index)
    if with_pictures:
        source = f"{examples} prompts of {pictures} pictures, one photo named (seed {seed}); modalkv calibrate"
    else:
        source = f"{examples} passkey-style prompts of {tokens} tokens (seed {seed}); modalkv calibrate"
    return HeadStatistics(
        model=model_key(model.config),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        redundancy=redundancy.tolist(),
        visual=visual.tolist() if with_pictures else None,
        examples=examples,
        source=source,
    )
