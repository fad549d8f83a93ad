"""MiniVLMProcessor: chat text with `<image>` placeholders + PIL images -> the mini-VLM's inputs and the engine's maps.

It follows transformers' processors: `apply_chat_template` renders `{"type": "image"}` items as the placeholder,
and `__call__` expands each placeholder into one image token per patch, pads on the left and returns, beside
input_ids / attention_mask / pixel_values, the modality map and the patch map that compression methods read.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PreTrainedTokenizerBase

from modalkv.modality import IMAGE, TEXT, patches_from_grids
from modalkv.vlm.encoder import STRIDE

IMAGE_PLACEHOLDER = "<image>"


def image_to_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: the whole image resized (no crop, so nothing in it is cut away). The weights
    classify [-1, 1] inputs slightly better than ImageNet mean/std ones."""
    resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


class MiniVLMProcessor:
    """Tokenizer + image preprocessing of the mini-VLM.

    Args:
        tokenizer: the language model's tokenizer (left padding).
        image_token_id: the model's placeholder token for one patch (`MiniVLMConfig.image_token_id`).
        image_size: images are resized to image_size x image_size; the patch grid is image_size / 32 per side.
    """

    image_token = IMAGE_PLACEHOLDER

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_token_id: int, image_size: int = 224):
        if image_size < STRIDE or image_size % STRIDE:
            raise ValueError(f"image_size must be a positive multiple of {STRIDE}, got {image_size}")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.image_size = image_size

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's template (`apply_chat_template` adds the image items to it)."""
        return self.tokenizer.chat_template

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches per image."""
        return self.image_size // STRIDE, self.image_size // STRIDE

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False):
        """The tokenizer's chat template with each `{"type": "image"}` item written as "Image N: <image>" on its own
        line (numbered through the conversation, so that "which image" questions can be answered by number).

        Args:
            messages: [{"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}, ...]}].
            add_generation_prompt: end with the assistant's turn header.
            tokenize: False (the text goes through `__call__` with the images); True is refused.
        """
        if tokenize:
            raise ValueError("tokenize=True is not supported: pass the text and the images to the processor instead")
        num_images = 0
        flat = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                parts = []
                for item in content:
                    if item["type"] == "image":
                        num_images += 1
                        parts.append(f"Image {num_images}: {IMAGE_PLACEHOLDER}\n")
                    elif item["type"] == "text":
                        parts.append(item["text"])
                    else:
                        raise ValueError(f"content items must be of type 'image' or 'text', got {item['type']!r}")
                content = "".join(parts)
            flat.append({**message, "content": content})
        return self.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of one prompt, each placeholder expanded to one image token per patch."""
        rows, cols = self.grid
        ids: list[int] = []
        for i, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += [self.image_token_id] * (rows * cols)
            segment_ids = self.tokenizer(segment, add_special_tokens=add_special_tokens and i == 0).input_ids
            if self.image_token_id in segment_ids:
                raise ValueError(
                    f"the text spells the image token {self.tokenizer.decode([self.image_token_id])!r}; "
                    f"mark images with {IMAGE_PLACEHOLDER!r} only"
                )
            ids += segment_ids
        return ids

    def __call__(
        self,
        text: str | list[str],
        images: list[Image.Image] | list[list[Image.Image]] | None = None,
        return_tensors: str = "pt",
        padding: bool = True,
        add_special_tokens: bool = False,
    ) -> BatchFeature:
        """Encodes a batch of prompts and their images (in placeholder order, all rows' images in one flat list or
        one list per row). `add_special_tokens`: let the tokenizer add its own at the start (a chat template
        already writes them; SmolLM2's tokenizer adds none, Gemma's a BOS).

        Returns:
            BatchFeature with input_ids [B, S] and attention_mask [B, S] (left padding), pixel_values [N, 3, H, W]
            (absent without images), modality [B, S] (IMAGE on exactly the image tokens) and patches [B, S, 3]
            ((image index in its row, patch row, patch column), -1 elsewhere).
        """
        if return_tensors != "pt":
            raise ValueError(f"only return_tensors='pt' is supported, got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        flat = [im for item in images or [] for im in (item if isinstance(item, list | tuple) else [item])]
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]
        if sum(counts) != len(flat):
            raise ValueError(
                f"the texts hold {sum(counts)} {IMAGE_PLACEHOLDER!r} placeholders but {len(flat)} images were given"
            )
        encoded = [self._encode(t, add_special_tokens) for t in texts]
        width = max(len(ids) for ids in encoded)
        if not padding and any(len(ids) != width for ids in encoded):
            raise ValueError("prompts of different lengths need padding=True")
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        modality = torch.where(input_ids == self.image_token_id, IMAGE, TEXT)
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat:
            data["pixel_values"] = torch.stack([image_to_pixels(im, self.image_size) for im in flat])
        data["modality"] = modality
        data["patches"] = patches_from_grids(modality, [[self.grid] * n for n in counts])
        return BatchFeature(data=data, tensor_type="pt")

    def decode(self, token_ids, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)
