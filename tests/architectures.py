"""Tiny randomly initialised vision-language models of transformers' real architectures, each with its own processor
and SmolLM2's real tokenizer (no weights can be downloaded here), for tests/test_architectures.py. Video processors
need torchvision, which is not installed: the Qwen and SmolVLM processors are built for images only.
"""

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from modalkv.models import embedded_model_path

ARCHITECTURES = [
    "llava",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "internvl",
    "llava_onevision",
    "mistral3",
]
TEXT_MODEL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    eos_token_id=None,  # no early stop: every generation runs its full length
)
VISION_MODEL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor (which imports torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (which imports torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor (which imports torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without its video processor (which imports torchvision)."""

    def __init__(self, image_processor, tokenizer, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template, **kwargs)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video processor (which imports torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)


class PixtralLayoutProcessor:
    """PixtralProcessor's layout without PixtralProcessor (its module imports torchvision): Pixtral's own image
    processor, then each [IMG] placeholder expanded as `PixtralProcessor.replace_image_token` does -- per row of
    merged patches, [IMG] x columns then [IMG_BREAK], the last one replaced by [IMG_END]."""

    image_token = "[IMG]"

    def __init__(self, image_processor, tokenizer, patch_size: int, spatial_merge_size: int, chat_template: str):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.merged_patch = patch_size * spatial_merge_size

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def __call__(self, text, images=None, padding=True, return_tensors="pt", **kwargs):
        texts = [text] if isinstance(text, str) else list(text)
        flat = [image for group in images for image in group] if images and isinstance(images[0], list) else images
        outputs = {}
        if flat:
            outputs = dict(self.image_processor(flat, patch_size=self.merged_patch, return_tensors="pt"))
            sizes = iter(outputs["image_sizes"].tolist())
            texts = [self._expand(t, sizes) for t in texts]
        encoded = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs)
        return {**encoded, **outputs}

    def _expand(self, text: str, sizes) -> str:
        pieces = text.split(self.image_token)
        expanded = pieces[0]
        for piece in pieces[1:]:
            height, width = next(sizes)
            rows = [["[IMG]"] * (width // self.merged_patch) + ["[IMG_BREAK]"]] * (height // self.merged_patch)
            tokens = [token for row in rows for token in row]
            tokens[-1] = "[IMG_END]"
            expanded += "".join(tokens) + piece
        return expanded


class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
    """SmolVLM's processor without its video processor (which imports torchvision); `apply_chat_template` reads the
    video processor's frame defaults, so a stand-in gives them."""

    def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template)
        self.video_processor = SimpleNamespace(num_frames=None, fps=None)


def smollm2_tokenizer(special_tokens: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m", torch.float32))
    tokenizer.add_special_tokens({"additional_special_tokens": special_tokens})
    return tokenizer


def text_config(tokenizer) -> dict:
    return dict(TEXT_MODEL, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)


def build_llava():
    tokenizer = smollm2_tokenizer(["<image>"])
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_MODEL),
        text_config=LlamaConfig(**text_config(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",  # CLS dropped: exactly the 4 x 4 patches
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def build_qwen(version: str):
    tokenizer = smollm2_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}{suffix}|>")
        for name, suffix in (("image", "_pad"), ("video", "_pad"), ("vision_start", ""), ("vision_end", ""))
    }
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(text_config(tokenizer), rope_parameters=rope)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        processor_class = ImageOnlyQwen2VLProcessor
    elif version == "qwen2_5_vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]
        )
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
        processor_class = ImageOnlyQwen2_5_VLProcessor
    else:  # Qwen3-VL: interleaved 3-D rope, q/k norms, DeepStack (vision features added into early LM layers)
        text = dict(text, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        )
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
        processor_class = ImageOnlyQwen3VLProcessor
    return model, processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)


def build_idefics3(version: str):
    rows_cols = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer = smollm2_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    tokenizer.add_tokens(rows_cols)
    vision = VISION_MODEL
    # 32 px tiles of 8 px patches, pixel-shuffled by 2: 2 x 2 = 4 tokens per tile; images up to 64 px: 2 x 2 tiles.
    image_kwargs = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    settings = dict(text_config=text_config(tokenizer), vision_config=vision, scale_factor=2)
    settings["image_token_id"] = tokenizer.convert_tokens_to_ids("<image>")
    if version == "idefics3":
        model = Idefics3ForConditionalGeneration(Idefics3Config(**settings))
        processor = Idefics3Processor(
            Idefics3ImageProcessorPil(**image_kwargs), tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
        )
    else:
        model = SmolVLMForConditionalGeneration(SmolVLMConfig(**settings))
        processor = ImageOnlySmolVLMProcessor(
            SmolVLMImageProcessorPil(**image_kwargs), tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
        )
    return model, processor


def build_gemma3():
    """Gemma 3 vision: SigLIP patches pooled to `mm_tokens_per_image` soft tokens per image, between <start_of_image>
    and <end_of_image>; sliding and global layers alternate (window 8, shorter than the prompts); image tokens attend
    to each other both ways at prefill (`token_type_ids`)."""
    names = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = AutoTokenizer.from_pretrained(
        embedded_model_path("smollm2-135m", torch.float32), extra_special_tokens=names
    )
    text = dict(
        text_config(tokenizer),
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=VISION_MODEL,  # 32 px in 8 px patches: 4 x 4, pooled to 2 x 2
        mm_tokens_per_image=4,
        image_token_id=tokenizer.image_token_id,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.convert_tokens_to_ids(names["eoi_token"]),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return Gemma3ForConditionalGeneration(config), processor


def build_internvl():
    """InternVL: each image cut into up to 4 tiles of 32 px plus a thumbnail, each tile's 4 x 4 patches pixel-shuffled
    (downsample_ratio 0.5) into 2 x 2 tokens, all between <img> and </img>; a Qwen2 language model."""
    names = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = AutoTokenizer.from_pretrained(
        embedded_model_path("smollm2-135m", torch.float32), extra_special_tokens=names
    )
    vision = dict(VISION_MODEL, image_size=[32, 32], patch_size=[8, 8])
    text = dict(text_config(tokenizer), model_type="qwen2")
    config = InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5
    )
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4)
    template = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
    processor = ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=4, chat_template=template)
    return InternVLForConditionalGeneration(config), processor


def build_llava_onevision():
    """LLaVA-OneVision: per image, the base view's 4 x 4 patches, then the "anyres" high-resolution tiles (32 px tiles
    on a grid chosen among `pins`) unpadded to the image's aspect ratio, each of their rows ended by a newline token;
    a Qwen2 language model."""
    tokenizer = smollm2_tokenizer(["<image>", "<video>"])
    pins = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**VISION_MODEL),
        text_config=dict(text_config(tokenizer), model_type="qwen2"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pins,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pins)
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor,
        tokenizer,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_TEMPLATE,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


def build_mistral3():
    """Mistral 3 (Pixtral vision tower, 2 x 2 patch merger, Mistral language model) with a window-less text config;
    inputs laid out as PixtralProcessor does (`PixtralLayoutProcessor`)."""
    tokenizer = smollm2_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    vision = PixtralVisionConfig(**dict(VISION_MODEL, image_size=64), head_dim=16)
    config = Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**text_config(tokenizer), head_dim=16, sliding_window=None),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 64})
    template = LLAVA_TEMPLATE.replace("<image>", "[IMG]")
    processor = PixtralLayoutProcessor(image_processor, tokenizer, 8, 2, chat_template=template)
    return Mistral3ForConditionalGeneration(config), processor


def build(name: str):
    torch.manual_seed(0)
    if name == "llava":
        model, processor = build_llava()
    elif name == "gemma3":
        model, processor = build_gemma3()
    elif name == "internvl":
        model, processor = build_internvl()
    elif name == "llava_onevision":
        model, processor = build_llava_onevision()
    elif name == "mistral3":
        model, processor = build_mistral3()
    elif name.startswith("qwen"):
        model, processor = build_qwen(name)
    else:
        model, processor = build_idefics3(name)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


IMAGES = [image(56, 84, 0), image(84, 56, 1)]  # Qwen: 2 x 3 and 3 x 2 merged tokens; Idefics3: 2 x 2 tiles each
PROMPT = "Describe the two images."
