"""The embedded mini-VLMs: EfficientNet-Lite0 (ImageNet) patches read by an embedded language model, offline.

`load_mini_vlm(name)` (or `modalkv.load_model(name)`) returns `(MiniVLM, MiniVLMProcessor)`: "mini-vlm" on
SmolLM2-135M-Instruct (chat), "mini-vlm-gemma3" on Gemma 3 270M (base model, sliding-window layers, long context).
`images.PHOTOS` is the small set of real photos they are evaluated on. What they can and cannot do: docs/mini-vlm.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modalkv.pretrained import load_pretrained
from modalkv.vlm.encoder import load_encoder
from modalkv.vlm.model import MiniVLM, MiniVLMConfig
from modalkv.vlm.processor import MiniVLMProcessor
from modalkv.vlm.projector import ClassPosteriorProjector, class_name_embeddings

__all__ = ["RECIPES", "MiniVLM", "MiniVLMConfig", "MiniVLMProcessor", "Recipe", "load_mini_vlm"]


@dataclass(frozen=True, slots=True)
class Recipe:
    """How one mini-VLM is put together (the projector's options: `projector.py`)."""

    language_model: str  # the embedded language model (`pretrained.EMBEDDED_MODELS`)
    image_token: str  # a token of its vocabulary that text never writes, standing for one patch
    word: str  # how a class name is written: "mean" of its tokens or its "head" token
    weighted: bool  # patch embeddings scaled by the class probability


RECIPES = {
    # `<empty_output>`: a Jupyter marker the chat model never writes.
    "mini-vlm": Recipe("smollm2-135m", "<empty_output>", word="mean", weighted=True),
    # `<unused0>`: reserved, never trained as text. Full-size head words: measured in docs/mini-vlm.md.
    "mini-vlm-gemma3": Recipe("gemma3-270m", "<unused0>", word="head", weighted=False),
}


def load_mini_vlm(
    name: str = "mini-vlm",
    *,
    image_size: int = 224,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[MiniVLM, MiniVLMProcessor]:
    """Builds a mini-VLM from an embedded language model and EfficientNet-Lite0's ImageNet weights.

    Args:
        name: a key of `RECIPES`.
        image_size: pixels per image side (a multiple of 32): 224 gives 7x7 = 49 image tokens per image (the
            resolution the vision tower was trained at, and the default), 448 gives 14x14 = 196.
        dtype: the language model's dtype (the vision tower runs in float32).
        attn_implementation: the language model's attention implementation.
        device: where to put the model.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown mini-VLM {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    language_model, tokenizer = load_pretrained(
        recipe.language_model, dtype=dtype, attn_implementation=attn_implementation
    )
    image_token_id = tokenizer.convert_tokens_to_ids(recipe.image_token)
    if tokenizer.convert_ids_to_tokens(image_token_id) != recipe.image_token:
        raise ValueError(f"{recipe.language_model}'s vocabulary has no {recipe.image_token!r} token")
    encoder = load_encoder()
    names = class_name_embeddings(language_model.get_input_embeddings(), tokenizer, word=recipe.word)
    projector = ClassPosteriorProjector(encoder._fc, names, weighted=recipe.weighted)
    model = MiniVLM(encoder, projector, language_model, image_token_id, image_size=image_size, name=name)
    return model.to(device).eval(), MiniVLMProcessor(tokenizer, image_token_id, image_size=image_size)
