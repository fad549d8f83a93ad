"""The embedded mini-VLM: EfficientNet-Lite0 (ImageNet) patches read by SmolLM2-135M-Instruct, offline.

`load_mini_vlm()` (or `modalkv.load_model("mini-vlm")`) returns `(MiniVLM, MiniVLMProcessor)`; `images.PHOTOS` is
the small set of real photos it is evaluated on. What it can and cannot do: docs/mini-vlm.md.
"""

from __future__ import annotations

import torch

from modalkv.pretrained import load_pretrained
from modalkv.vlm.encoder import load_encoder
from modalkv.vlm.model import MiniVLM, MiniVLMConfig
from modalkv.vlm.processor import MiniVLMProcessor
from modalkv.vlm.projector import ClassPosteriorProjector, class_name_embeddings

__all__ = ["MiniVLM", "MiniVLMConfig", "MiniVLMProcessor", "load_mini_vlm"]


def load_mini_vlm(
    *,
    image_size: int = 224,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[MiniVLM, MiniVLMProcessor]:
    """Builds the mini-VLM from the embedded SmolLM2-135M-Instruct and EfficientNet-Lite0's ImageNet weights.

    Args:
        image_size: pixels per image side (a multiple of 32): 224 gives 7x7 = 49 image tokens per image (the
            resolution the vision tower was trained at, and the default), 448 gives 14x14 = 196.
        dtype: the language model's dtype (the vision tower runs in float32).
        attn_implementation: the language model's attention implementation.
        device: where to put the model.
    """
    language_model, tokenizer = load_pretrained("smollm2-135m", dtype=dtype, attn_implementation=attn_implementation)
    encoder = load_encoder()
    names = class_name_embeddings(language_model.get_input_embeddings().weight.detach().float(), tokenizer)
    projector = ClassPosteriorProjector(encoder._fc, names)
    model = MiniVLM(encoder, projector, language_model, image_size=image_size)
    return model.to(device).eval(), MiniVLMProcessor(tokenizer, image_size=image_size)
