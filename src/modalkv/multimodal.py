"""Multimodal prompts for vision-language models with a transformers processor: text + images in, the model's
inputs out, with the modality map and patch map (`modality.py`) that the presses read.

Both maps are derived from what the processor returned and the model's config (no model classes), unless the
processor already gives them (`modality`, `patches`, as modalkv's own mini-VLM processor does):

- modality: tokens equal to `config.image_token_id` are IMAGE, `video_token_id` VIDEO (for Qwen2-VL this is exactly
  its `mm_token_type_ids`: 0 text, 1 image, 2 video). A prompt with pixels but no such tokens is refused.
- patch grids, by architecture:
  - `image_grid_thw` / `video_grid_thw` (Qwen2-VL, Qwen2.5-VL): an image of (t, h, w) patches becomes
    (h / m) x (w / m) tokens after the spatial merge m (`vision_config.spatial_merge_size`); a video gives t grids,
    one per temporal patch (t = frames / temporal_patch_size). Its tokens are frame-major, each frame row-major (as
    Qwen's 3-D rope places them), and each frame is its own entry of the patch map's image index, which counts grids
    in prompt order within the row: an image followed by a video of t = 2 gives index 0 (the image), 1 and 2 (the
    frames).
  - tiled images (Idefics3, SmolVLM: `config.scale_factor`): every run of image tokens is one square grid of side
    image_size / patch_size / scale_factor. An image split into r x c tiles gives r * c + 1 grids: its tiles in
    row-major order, then its downscaled global view. So on these models the patch map's "image index" counts grids
    (tiles and global views) in prompt order within the row, not the user's images.
  - tiles pixel-shuffled by `config.downsample_ratio` r (InternVL): every tile (and the thumbnail) is its own grid of
    (image_size / patch_size * r) tokens a side, as for Idefics3.
  - merged patches in rows (Mistral 3 / Pixtral: `config.spatial_merge_size` m and `image_sizes`, the processed size
    of each image of the batch in order): (H / (p * m)) x (W / (p * m)) tokens, each row of them followed by a break
    token that is not an image token (so an image is several runs).
  - pooled images (Gemma 3: `config.mm_tokens_per_image`): every image is a square grid of that many tokens.
  - "anyres" images (LLaVA-OneVision: `config.image_grid_pinpoints` and `image_sizes`): two grids per image, its base
    view (s x s patches) then its high-resolution tiles unpadded to the image's aspect ratio (and, past
    `vision_aspect_ratio`'s "anyres_max_N", shrunk to about N base views), each row ended by a newline token: a grid
    of rows x (columns + 1), the newline tokens its last column. An image of a prompt with several images
    (`batch_num_images`) has its base view only, then one newline token: a 1 x 1 grid. The image index counts grids.
  - 4-D `pixel_values` [N, C, H, W] (Llava): image i is (H / p) x (W / p) patches (`vision_config.patch_size`).
  - anything else: each run of visual tokens on the squarest grid that fits (`modality.infer_patches`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import select_best_resolution

from modalkv.modality import (
    IMAGE,
    TEXT,
    VIDEO,
    check_modality,
    check_patches,
    infer_patches,
    modality_from_input_ids,
    patches_from_grids,
)

Grids = list[list[tuple[int, int]]]  # per batch row, (rows, columns) of each image grid in prompt order


def encode_multimodal(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    text: str,
    images: Sequence[Image.Image] = (),
    raw: bool = False,
) -> dict[str, torch.Tensor]:
    """One user turn (the images, then `text`) through the processor's chat template, or with `raw` (or no template)
    the processor's image placeholders followed by `text` as is. Returns the processor's outputs plus `modality` and
    `patches`, ready for `press.generate(model, **inputs)`."""
    if not text.strip():
        raise ValueError("the prompt is empty: give at least one token")
    tokenizer_kwargs = {}
    if raw or processor.chat_template is None:
        placeholder = getattr(processor, "image_token", None)
        if images and placeholder is None:
            raise ValueError(f"{type(processor).__name__} has no chat template and no image token to place images with")
        prompt = (placeholder or "") * len(images) + text
    else:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = processor.tokenizer.bos_token
        if bos is not None and prompt.startswith(bos):  # the template wrote it: do not add a second one
            tokenizer_kwargs["add_special_tokens"] = False
    outputs = processor(text=prompt, images=list(images) or None, return_tensors="pt", **tokenizer_kwargs)
    return multimodal_inputs(model, dict(outputs))


def multimodal_inputs(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` (a processor's outputs, batched and padded or not) with `modality` [B, S] and `patches` [B, S, 3]
    added where the processor did not give them. Raises ValueError when images were given but their tokens cannot be
    found: then pass an explicit modality map (`modality=` / `--modality-file`)."""
    inputs = dict(inputs)
    input_ids = inputs["input_ids"]
    batch, seq = input_ids.shape
    if "modality" in inputs:
        modality = check_modality(inputs["modality"], batch, seq)
    else:
        modality = modality_from_input_ids(model.config, input_ids)
        has_pixels = any(inputs.get(key) is not None for key in ("pixel_values", "pixel_values_videos"))
        if has_pixels and (modality is None or not bool((modality != TEXT).any())):
            raise ValueError(
                f"images were given but no image tokens were found in the prompt of {type(model).__name__} (its config "
                "names no image_token_id, or the processor did not insert it); pass an explicit modality map "
                "(modality= in Python, --modality-file on the command line)"
            )
        if modality is None:  # a text-only prompt on a model without image tokens: nothing to add
            return inputs
    inputs["modality"] = modality
    if "patches" in inputs:
        inputs["patches"] = check_patches(inputs["patches"], modality)
        return inputs
    grids = image_grids(model, inputs, modality)
    inputs["patches"] = patches_from_grids(modality, grids) if grids is not None else infer_patches(modality)
    return inputs


def image_grids(model: PreTrainedModel, inputs: dict[str, torch.Tensor], modality: torch.Tensor) -> Grids | None:
    """The (rows, columns) of every image grid per batch row, from the processor's outputs (see the module
    docstring), or None when the architecture does not say (the caller infers them)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if vision is None or not bool((modality != TEXT).any()):
        return None
    if inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None:
        return merged_grids(modality, inputs, vision.spatial_merge_size)
    if getattr(config, "scale_factor", None) is not None:  # tiles and global views, all of one square size
        side = vision.image_size // vision.patch_size // config.scale_factor
        return uniform_grids(modality, (side, side))
    ratio = getattr(config, "downsample_ratio", None)
    if ratio is not None:  # tiles of image_size, their patches pixel-shuffled by the ratio
        (height, width), (patch_h, patch_w) = _pair(vision.image_size), _pair(vision.patch_size)
        return uniform_grids(modality, (round(height // patch_h * ratio), round(width // patch_w * ratio)))
    if getattr(config, "image_grid_pinpoints", None) and inputs.get("image_sizes") is not None:
        per_prompt = inputs.get("batch_num_images")
        alone = [True] * len(inputs["image_sizes"])  # each image is its prompt's only one
        if per_prompt is not None:
            alone = [int(n) == 1 for n in per_prompt for _ in range(int(n))]
        return anyres_grids(config, modality, inputs["image_sizes"].tolist(), alone)
    merge = getattr(config, "spatial_merge_size", None)
    if merge is not None and inputs.get("image_sizes") is not None:
        step = _pair(vision.patch_size)[0] * merge
        return per_image_grids(modality, [(h // step, w // step) for h, w in inputs["image_sizes"].tolist()])
    tokens_per_image = getattr(config, "mm_tokens_per_image", None)
    if tokens_per_image is not None:  # the vision tower's patches average-pooled to a square of this many tokens
        side = math.isqrt(tokens_per_image)
        return uniform_grids(modality, (side, side))
    pixels = inputs.get("pixel_values")
    patch = getattr(vision, "patch_size", None)
    if pixels is not None and pixels.dim() == 4 and patch:
        (patch_h, patch_w) = _pair(patch)
        return uniform_grids(modality, (pixels.shape[-2] // patch_h, pixels.shape[-1] // patch_w))
    return None


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int or two (vision configs write both)."""
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def anyres_grids(config: Any, modality: torch.Tensor, image_sizes: list[list[int]], alone: list[bool]) -> Grids:
    """LLaVA-OneVision's grids (see the module docstring): image_sizes lists every image of the batch in prompt order
    as its original (height, width), `alone` whether it is its prompt's only image (else: base view + a newline);
    the base side s is image_size / patch_size."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    max_views = int(str(getattr(config, "vision_aspect_ratio", "anyres_max_0")).removeprefix("anyres_max_"))
    queue = list(zip(image_sizes, alone, strict=True))
    grids: Grids = []
    for row in modality:
        row_grids = []
        for start, end in visual_runs(row):
            left = end - start
            while left > 0:
                if not queue:
                    raise ValueError("the prompt has more image tokens than image sizes")
                size, is_alone = queue.pop(0)
                if not is_alone:
                    row_grids += [(side, side), (1, 1)]
                    left -= side * side + 1
                    continue
                rows, columns = _unpadded_grid(size, side, config.image_grid_pinpoints, vision.image_size)
                ratio = math.sqrt(rows * columns / (max_views * side**2)) if max_views else 0.0
                if ratio > 1.1:  # OneVision interpolates the patches down to about max_views base views
                    rows, columns = int(rows // ratio), int(columns // ratio)
                row_grids += [(side, side), (rows, columns + 1)]
                left -= side * side + rows * (columns + 1)
        grids.append(row_grids)
    return grids


def _unpadded_grid(size: tuple[int, int], side: int, pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, columns) of an image's high-resolution patches: its best tiling among `pinpoints`, with the padding
    that kept its aspect ratio removed (as transformers' LLaVA-NeXT / OneVision unpad them)."""
    height, width = size
    best_height, best_width = select_best_resolution((height, width), pinpoints)
    rows, columns = side * (best_height // tile), side * (best_width // tile)
    if width / height > columns / rows:
        padding = (rows - int(round(height * (columns / width), 7))) // 2
        return rows - 2 * padding, columns
    padding = (columns - int(round(width * (rows / height), 7))) // 2
    return rows, columns - 2 * padding


def per_image_grids(modality: torch.Tensor, sizes: list[tuple[int, int]]) -> Grids:
    """The grids of every image of the batch in prompt order, dealt to the rows by their visual-token counts."""
    queue, grids = list(sizes), []
    for count in (modality != TEXT).sum(-1).tolist():
        row_grids = []
        while count > 0:
            if not queue:
                raise ValueError("the prompt has more image tokens than image sizes")
            row_grids.append(queue.pop(0))
            count -= row_grids[-1][0] * row_grids[-1][1]
        grids.append(row_grids)
    return grids


def uniform_grids(modality: torch.Tensor, grid: tuple[int, int]) -> Grids | None:
    """Every image on the same grid, or None when a row's visual tokens are not a whole number of such grids (e.g.
    Llava keeping its CLS token with "full" features)."""
    cells = grid[0] * grid[1]
    counts = (modality != TEXT).sum(-1).tolist()
    if any(count % cells for count in counts):
        return None
    return [[grid] * (count // cells) for count in counts]


def merged_grids(modality: torch.Tensor, inputs: dict[str, torch.Tensor], merge: int) -> Grids:
    """Qwen-style grids: `image_grid_thw` / `video_grid_thw` list every image / video of the batch in prompt order as
    (t, h, w) patches, merged m x m into tokens."""
    queues = {
        kind: [tuple(int(n) for n in thw) for thw in (inputs.get(key) if inputs.get(key) is not None else [])]
        for kind, key in ((IMAGE, "image_grid_thw"), (VIDEO, "video_grid_thw"))
    }
    grids: Grids = []
    for row in modality:
        row_grids = []
        for start, end in visual_runs(row):  # one run can hold several images placed back to back
            kind, left = int(row[start]), end - start
            while left > 0:
                if not queues[kind]:
                    raise ValueError(f"the prompt has more {'image' if kind == IMAGE else 'video'} tokens than grids")
                frames, height, width = queues[kind].pop(0)
                row_grids += [(height // merge, width // merge)] * (frames if kind == VIDEO else 1)
                left -= frames * height * width // merge**2
            if left < 0:
                raise ValueError(f"a run of {end - start} visual tokens does not match the grids given for it")
        grids.append(row_grids)
    return grids


def visual_runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) columns, end exclusive, of each maximal run of same-modality visual tokens in a [S] map."""
    changes = [*(row.diff(prepend=row.new_full((1,), TEXT)) != 0).nonzero().flatten().tolist(), len(row)]
    return [(start, end) for start, end in itertools.pairwise(changes) if row[start] != TEXT]


def is_processor(processor: Any) -> bool:
    """True for a vision-language model's processor (transformers' or modalkv's mini-VLM one: anything that wraps a
    tokenizer), False for a tokenizer."""
    return not isinstance(processor, PreTrainedTokenizerBase) and hasattr(processor, "tokenizer")
