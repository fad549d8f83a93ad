"""MiniVLM: EfficientNet-Lite0 patch features, projected into SmolLM2-135M-Instruct's embedding space.

It follows the shape of transformers' VLMs (Llava): the prompt holds one image placeholder token per patch, and
the placeholders' embeddings are replaced by the projected patches before the language model runs. `generate()`
delegates to the language model's own `generate()`, so every generation option and `CompressedCache` work
unchanged: the engine only ever sees a Llama with an `inputs_embeds` prompt.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, GenerationConfig, PretrainedConfig, PreTrainedModel

from modalkv.vlm.encoder import STRIDE, EfficientNetLite0
from modalkv.vlm.projector import ClassPosteriorProjector


class MiniVLMConfig(PretrainedConfig):
    """The mini-VLM's config: the language model's config as `text_config`, plus the image settings.
    `image_token_id`: a token of the LM's vocabulary that text never writes, standing for one patch (an id the
    vocabulary already has keeps the LM's embedding and output matrices untouched)."""

    model_type = "modalkv-mini-vlm"
    sub_configs = {"text_config": AutoConfig}  # noqa: RUF012 (transformers' class attribute)

    def __init__(
        self,
        text_config: PretrainedConfig | None = None,
        image_token_id: int | None = None,  # None only in a config built from nothing: no id is a safe default
        image_size: int = 224,
        **kwargs,
    ):
        self.text_config = text_config
        self.image_token_id = image_token_id
        self.image_size = image_size
        if text_config is not None:  # the base class would reset the shared text config's attention to None
            kwargs.setdefault("attn_implementation", text_config._attn_implementation)
        super().__init__(**kwargs)


class MiniVLM(nn.Module):
    """A small vision-language model from real pretrained parts (see the module docstring and docs/mini-vlm.md).

    Args:
        vision_tower: EfficientNet-Lite0 with its ImageNet weights.
        projector: patch features -> LM input embeddings.
        language_model: SmolLM2-135M-Instruct or Gemma 3 270M (any causal LM with the projector's embedding size).
        image_token_id: the placeholder token that stands for one patch (see `MiniVLMConfig`).
        image_size: the side, in pixels, that the processor resizes images to (the patch grid is image_size / 32).
        name: what `load_model` calls it ("mini-vlm", "mini-vlm-gemma3"): the calibration files' key.
    """

    def __init__(
        self,
        vision_tower: EfficientNetLite0,
        projector: ClassPosteriorProjector,
        language_model: PreTrainedModel,
        image_token_id: int,
        image_size: int = 224,
        name: str = "",
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        self.config = MiniVLMConfig(
            language_model.config, image_token_id=image_token_id, image_size=image_size, name_or_path=name
        )

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    @property
    def generation_config(self) -> GenerationConfig:
        return self.language_model.generation_config

    @property
    def grid_size(self) -> int:
        """Patches per image side at the configured image size."""
        return self.config.image_size // STRIDE

    def get_decoder(self) -> nn.Module:
        """The language model's decoder (its layers and rotary embedding), as transformers' VLMs give it."""
        return self.language_model.get_decoder()

    def set_attn_implementation(self, attn_implementation: str | dict[str, str]) -> None:
        """Switches the language model's attention (the vision tower has none): what `Press.attach` calls. Takes a
        name or, like transformers, a dict by sub-config ({"text_config": name}; other keys are ignored)."""
        if isinstance(attn_implementation, dict):
            current = self.language_model.config._attn_implementation
            attn_implementation = attn_implementation.get("text_config", attn_implementation.get("", current))
        self.language_model.set_attn_implementation(attn_implementation)
        self.config._attn_implementation = self.language_model.config._attn_implementation

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [-1, 1] -> [N, H/32 * W/32, D] patch embeddings, patches row-major."""
        features = self.vision_tower.features(pixel_values.to(self.device, torch.float32))
        return self.projector(features).to(self.dtype)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] ids -> [B, S, D] input embeddings with the image placeholders replaced by the images' patches.

        Args:
            input_ids: [B, S], `image_token_id` once per patch, images in order along rows, then along the batch.
            pixel_values: [N, 3, H, W], the N images of the whole batch in that order.
        """
        is_patch = input_ids == self.config.image_token_id
        embeds = self.language_model.get_input_embeddings()(input_ids)
        num_slots = int(is_patch.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if num_slots:
                raise ValueError(f"the prompt has {num_slots} image placeholder tokens but no pixel_values were given")
            return embeds
        patches = self.image_embeddings(pixel_values).flatten(0, 1)
        if len(patches) != num_slots:
            raise ValueError(
                f"the prompt has {num_slots} image placeholder tokens but the {len(pixel_values)} images give "
                f"{len(patches)} patches; build the prompt and the pixels with the same processor and image size"
            )
        return embeds.masked_scatter(is_patch[..., None], patches)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        """The language model's forward on the embedded prompt (pass `pixel_values` only with the image tokens,
        i.e. at prefill; later steps are text). Returns the language model's output."""
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`language_model.generate()` on the embedded prompt; every other keyword (`cache`, which transformers 5.23
        calls `past_key_values`, max_new_tokens, do_sample, ...) goes to it unchanged.

        Returns:
            [B, S + new] the prompt ids followed by the new tokens, like transformers' VLMs (slice off
            `input_ids.shape[1]` columns to get the answer).
        """
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(
            input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask, **kwargs
        )
