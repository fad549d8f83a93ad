"""Modality maps: which tokens of a prompt are text, image or video.

A modality map is a LongTensor [B, S] aligned with the prompt's token columns (padding included): `TEXT`, `IMAGE`
or `VIDEO` per token. Presses read it from `PrefillInputs.modality`; text-only prompts have none (all text).

A patch map is a LongTensor [B, S, 3] beside it: for each visual token, (image index within its row, patch row, patch
column) on that image's grid; -1 on every other token. Processors know the grids (`patches_from_grids`); without one,
`infer_patches` treats each run of visual tokens as one image on the squarest grid that fits.
"""

from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


def modality_from_input_ids(config: PretrainedConfig, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The map of a prompt whose image / video tokens are marked by the model's `image_token_id` /
    `video_token_id` (Llava, Qwen2-VL, Idefics3, ...); None for a model with no such tokens."""
    image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    video_id = getattr(config, "video_token_id", None)
    if image_id is None and video_id is None:
        return None
    modality = torch.full_like(input_ids, TEXT)
    if image_id is not None:
        modality[input_ids == image_id] = IMAGE
    if video_id is not None:
        modality[input_ids == video_id] = VIDEO
    return modality


def check_modality(modality: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Raises ValueError unless `modality` is a [batch, seq] map of known codes; returns it as long."""
    if modality.shape != (batch, seq):
        raise ValueError(
            f"the modality map has shape {tuple(modality.shape)} but the prompt is {batch} x {seq} tokens; "
            "give one modality code per prompt token (padding included)"
        )
    if modality.numel() and not bool(((modality >= TEXT) & (modality <= VIDEO)).all()):
        raise ValueError(f"modality codes must be {TEXT} (text), {IMAGE} (image) or {VIDEO} (video)")
    return modality.long()


def check_patches(patches: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Raises ValueError unless `patches` is a [B, S, 3] map that places exactly the visual tokens of `modality`."""
    if patches.shape != (*modality.shape, 3):
        raise ValueError(
            f"the patch map has shape {tuple(patches.shape)} but the prompt is "
            f"{modality.shape[0]} x {modality.shape[1]} tokens; give (image, row, column) per token, -1 off images"
        )
    placed = (patches >= 0).all(-1)
    if not torch.equal(placed, modality != TEXT) or bool(((patches < 0) & placed[..., None]).any()):
        raise ValueError("the patch map must give (image, row, column) >= 0 on exactly the image/video tokens")
    return patches.long()


def patches_from_grids(modality: torch.Tensor, grids: list[list[tuple[int, int]]]) -> torch.Tensor:
    """The patch map of prompts whose images are laid out row-major, one after another: `grids[b]` lists row b's
    images as (rows, columns), in order. Raises ValueError when the grids do not account for the visual tokens."""
    patches = torch.full((*modality.shape, 3), -1, dtype=torch.long, device=modality.device)
    for row, row_grids in enumerate(grids):
        columns = (modality[row] != TEXT).nonzero().flatten()
        expected = sum(rows * cols for rows, cols in row_grids)
        if expected != len(columns):
            raise ValueError(
                f"row {row} has {len(columns)} visual tokens but its image grids {row_grids} hold {expected}"
            )
        start = 0
        for image, (rows, cols) in enumerate(row_grids):
            place = columns[start : start + rows * cols]
            cell = torch.arange(rows * cols, device=modality.device)
            patches[row, place] = torch.stack([torch.full_like(cell, image), cell // cols, cell % cols], dim=-1)
            start += rows * cols
    return patches


def infer_patches(modality: torch.Tensor) -> torch.Tensor:
    """A patch map when no processor gave one: each maximal run of visual tokens is one image, on the squarest grid
    (rows <= columns) whose cells it fills exactly."""
    grids = []
    for row in modality:
        visual = (row != TEXT).long()
        starts = (visual.diff(prepend=visual.new_zeros(1)) == 1).nonzero().flatten().tolist()
        ends = (visual.diff(append=visual.new_zeros(1)) == -1).nonzero().flatten().tolist()
        grids.append([squarest_grid(end - start + 1) for start, end in zip(starts, ends, strict=True)])
    return patches_from_grids(modality, grids)


def squarest_grid(cells: int) -> tuple[int, int]:
    """(rows, columns) with rows * columns == cells and rows the largest divisor <= sqrt(cells)."""
    rows = max(d for d in range(1, math.isqrt(cells) + 1) if cells % d == 0)
    return rows, cells // rows
