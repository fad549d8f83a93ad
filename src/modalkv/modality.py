"""Modality maps: which tokens of a prompt are text, image or video.

A modality map is a LongTensor [B, S] aligned with the prompt's token columns (padding included): `TEXT`, `IMAGE`
or `VIDEO` per token. Presses read it from `PrefillInputs.modality`; text-only prompts have none (all text).
"""

from __future__ import annotations

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
