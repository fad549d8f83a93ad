"""Real VLM architectures of transformers (Llava, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM, Gemma 3,
InternVL, LLaVA-OneVision, Mistral 3) through their own processors (Mistral 3: its layout, as PixtralProcessor needs
torchvision), as tiny randomly initialised models (tests/architectures.py builds them) with SmolLM2's real tokenizer.

Qwen videos are laid out by hand as its processor would lay them out (`qwen_inputs`, checked against the processor on
images): the video processors need torchvision. Hybrid models (Gemma 3: sliding-window and global layers) are checked
on their global layers where budgets are concerned; sliding layers keep transformers' window (tests/test_hybrid.py).
"""

import json

import pytest
import torch
from architectures import ARCHITECTURES, IMAGES, LLAVA_TEMPLATE, PROMPT, VISION_MODEL, build
from helpers import METHODS
from PIL import Image
from transformers import (
    BloomConfig,
    CLIPVisionConfig,
    DynamicCache,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from typer.testing import CliRunner

from modalkv import CompressedCache, cli, get_press, load_model
from modalkv.modality import IMAGE, TEXT, VIDEO
from modalkv.multimodal import encode_multimodal, multimodal_inputs


@pytest.fixture(scope="module")
def built():
    return {}


def built_once(name: str, built: dict) -> tuple:
    """(name, model, processor) of a tiny architecture, built once per module."""
    if name not in built:
        built[name] = build(name)
    model, processor = built[name]
    return name, model, processor


@pytest.fixture(params=ARCHITECTURES)
def arch(request, built):
    return built_once(request.param, built)


def generate(model, inputs: dict, method: str | None, budget: float = 1.0, tokens: int = 4, **params):
    """Greedy generation, uncompressed (`method` None: transformers' own cache) or with a press."""
    settings = dict(max_new_tokens=tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if method is None:
        plain = {k: v for k, v in inputs.items() if k not in ("modality", "patches")}
        return model.generate(**plain, **settings)
    cache = inputs.get("past_key_values")
    press = cache.press if cache is not None else get_press(method, budget=budget, **params)  # the cache's own
    return press.generate(model, **inputs, **settings)


def test_every_method_keeping_everything_equals_uncompressed_generation(arch):
    _, model, processor = arch
    inputs = encode_multimodal(model, processor, PROMPT, IMAGES)
    reference = generate(model, inputs, None)
    for method in METHODS:
        output = generate(model, inputs, method, budget=1.0)
        assert torch.equal(output.sequences, reference.sequences), method
        for ours, theirs in zip(output.logits, reference.logits, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=method)


def test_the_modality_map_marks_exactly_the_image_tokens(arch):
    name, model, processor = arch
    inputs = encode_multimodal(model, processor, PROMPT, IMAGES)
    image_tokens = inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(inputs["modality"] == IMAGE, image_tokens)
    assert torch.equal(inputs["modality"] == TEXT, ~image_tokens)
    if name.startswith("qwen"):  # Qwen's own map (0 text, 1 image, 2 video) is the same
        assert torch.equal(inputs["modality"], inputs["mm_token_type_ids"])
    if name == "gemma3":  # Gemma 3's own map (0 text, 1 image), which drives its bidirectional image attention
        assert torch.equal(inputs["modality"], inputs["token_type_ids"])


EXPECTED_GRIDS = {
    "llava": [(4, 4)] * 2,  # 32 px / 8 px patches, CLS dropped
    "qwen2_vl": [(2, 3), (3, 2)],  # 56 x 84 px in 14 px patches, merged 2 x 2
    "qwen2_5_vl": [(2, 3), (3, 2)],
    "qwen3_vl": [(2, 3), (3, 2)],
    "idefics3": [(2, 2)] * 10,  # per image: 2 x 2 tiles + the global view, each 2 x 2 tokens
    "smolvlm": [(2, 2)] * 10,
    "gemma3": [(2, 2)] * 2,  # 32 px / 8 px patches, average-pooled to mm_tokens_per_image = 4
    "internvl": [(2, 2)] * 8,  # per image: its 32 px tiles and a thumbnail, 4 x 4 patches shuffled to 2 x 2
    # per image: the base view's 4 x 4 patches, then the 2 x 2 tiles' 8 x 8 unpadded (56 x 84 px: 6 rows, 84 x 56 px:
    # 6 columns), a newline token ending each row
    "llava_onevision": [(4, 4), (6, 9), (4, 4), (8, 7)],
    "mistral3": [(3, 4), (4, 3)],  # 48 x 64 and 64 x 48 px (resized to 16 px multiples), 8 px patches merged 2 x 2
}


def test_patch_grids_have_the_right_shape_per_image(arch):
    name, model, processor = arch
    inputs = encode_multimodal(model, processor, PROMPT, IMAGES)
    grids = grids_of(inputs["patches"][0])
    assert grids == EXPECTED_GRIDS[name]
    if name in ("idefics3", "smolvlm"):  # one grid per tile and global view the processor made
        assert len(grids) == inputs["pixel_values"].shape[1]
    if name == "internvl":  # one grid per tile and thumbnail the processor made
        assert len(grids) == inputs["pixel_values"].shape[0]


def test_gemma3_images_attend_to_themselves_both_ways_and_keep_doing_so_through_modalkv(built):
    """Gemma 3's image tokens see each other both ways at prefill (its mask from `token_type_ids`): the mask is in
    effect (without it the logits change) and modalkv's prefill keeps it, on global and sliding layers alike."""
    _, model, processor = built_once("gemma3", built)
    inputs = encode_multimodal(model, processor, PROMPT, IMAGES)
    plain = {k: v for k, v in inputs.items() if k not in ("modality", "patches")}
    with torch.no_grad():
        reference = model(**plain).logits
        causal_only = model(**{k: v for k, v in plain.items() if k != "token_type_ids"}).logits
        press = get_press("snapkv", budget=0.5)
        with press.attach(model):
            ours = model(**plain, past_key_values=CompressedCache(press, modality=inputs["modality"])).logits
    assert not torch.allclose(causal_only, reference, atol=1e-4)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def batch_inputs(model, processor) -> dict:
    """Two prompts of different lengths with different images, left-padded."""
    texts = []
    for images, question in (([IMAGES[0]], "What is shown?"), (IMAGES, "Compare these two pictures in detail.")):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    outputs = processor(text=texts, images=[[IMAGES[0]], IMAGES], padding=True, return_tensors="pt")
    assert bool((outputs["attention_mask"][:, 0] == 0).any()), "the batch should be left-padded"
    return multimodal_inputs(model, dict(outputs))


def test_llava_onevision_images_of_a_multi_image_prompt_are_their_base_view_and_a_newline(built):
    _, model, processor = built_once("llava_onevision", built)
    inputs = batch_inputs(model, processor)  # row 0: one image (anyres); row 1: two images (base views only)
    assert [grids_of(row) for row in inputs["patches"]] == [[(4, 4), (6, 9)], [(4, 4), (1, 1), (4, 4), (1, 1)]]


# Every method that evicts image tokens by its own rule: LOOK-M keeps every text token (test_lookm.py), KVzip refuses
# images (its repetition is text; test_kvzip.py), full evicts nothing.
EVICTING = [method for method in METHODS if method not in ("full", "lookm", "kvzip")]


@pytest.mark.parametrize("method", EVICTING)
def test_generation_after_eviction_with_a_left_padded_batch(arch, method):
    _, model, processor = arch
    inputs = batch_inputs(model, processor)
    real = inputs["attention_mask"].sum(-1)
    cache = CompressedCache(get_press(method, budget=0.5))
    output = generate(model, {**inputs, "past_key_values": cache}, method, budget=0.5, tokens=5)
    assert output.sequences.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert all(torch.isfinite(step).all() for step in output.logits)
    # Presses that evict while decoding stay at their budget (retentivekv into its memories), the others append.
    grown = 0 if cache.press.evict_every else 4
    compressed = [layer for layer in cache.layers if not layer.is_sliding]  # budgets apply to global layers
    kept = torch.stack([layer.kept_lengths() for layer in compressed]).float().mean((0, 2))  # per row
    budget = (real.double() * 0.5).floor().float() + grown  # on average over layers and heads
    if method.startswith("chunkkv"):  # whole chunks of 20 tokens: half of them, the last one possibly shorter
        chunks = (real.double() / 20).ceil()
        assert bool(((kept - grown) <= (chunks * 0.5).floor() * 20).all())
    else:
        assert torch.equal(kept, budget)
    if method == "retentivekv":  # images were absorbed into the visual state, text into the recall state
        assert {"visual", "recall"} <= set(compressed[0].memory)
        assert compressed[0].memory["visual"][..., -1].abs().sum() > 0  # the normaliser column


def kept_dynamic_cache(model, full: DynamicCache, columns: list[int]) -> DynamicCache:
    """A DynamicCache holding exactly the given columns of every global layer of `full`, and the sliding layers'
    windows as transformers left them."""
    kept = DynamicCache(config=model.config)
    index = torch.tensor(columns)
    for layer_idx, layer in enumerate(full.layers):
        if layer.is_sliding:
            kept.layers[layer_idx] = layer
        else:
            kept.update(layer.keys[:, :, index], layer.values[:, :, index], layer_idx)
    return kept


def test_decoding_after_eviction_equals_a_cache_holding_exactly_the_kept_tokens(arch):
    """Positions stay right after eviction (Qwen's 3-D rope included): the compressed cache, which reports the
    logical length, decodes exactly like a DynamicCache holding only the kept tokens, fed the true positions."""
    name, model, processor = arch
    assert_decoding_matches_the_kept_tokens(name, model, encode_multimodal(model, processor, PROMPT, IMAGES))


def rope_positions(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen's 3-D rope positions [3, B, S] of a prompt (and its rope deltas), as its forward computes them."""
    keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")
    return model.model.get_rope_index(inputs["input_ids"], **{key: inputs[key] for key in keys if key in inputs})


def assert_decoding_matches_the_kept_tokens(name: str, model, inputs: dict) -> None:
    plain = {k: v for k, v in inputs.items() if k not in ("modality", "patches")}
    seq = inputs["input_ids"].shape[1]
    press = get_press("streaming_llm", budget=0.5, evict_every=0)  # the same tokens in every layer and head
    cache = CompressedCache(press, modality=inputs["modality"], patches=inputs["patches"])
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        with press.attach(model):
            ours = model(**plain, past_key_values=cache, use_cache=True).logits[:, -1]
        theirs = model(**plain, past_key_values=full, use_cache=True).logits[:, -1]
        if name.startswith("qwen"):  # the next text position after the prompt's 3-D positions
            positions, _ = rope_positions(model, inputs)
            next_position = int(positions.max()) + 1
        else:
            next_position = seq
        compressed = [layer for layer in cache.layers if not layer.is_sliding]
        columns = compressed[0].kept_columns()[0][0]
        assert len(columns) == seq // 2 < seq
        assert all(head == columns for layer in compressed for head in layer.kept_columns()[0])
        reference = kept_dynamic_cache(model, full, columns)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # the prefill's own logits are unchanged
        for step in range(4):
            token = ours.argmax(-1, keepdim=True)
            position = torch.tensor([[next_position + step]])
            if name.startswith("qwen"):
                position = position[None].expand(3, 1, 1)
            with press.attach(model):
                ours = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            theirs = model(input_ids=token, past_key_values=reference, position_ids=position, use_cache=True).logits
            torch.testing.assert_close(ours, theirs[:, -1], rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert cache.get_seq_length() == seq + 4


# ---------------------------------------------------------------- video (Qwen2-VL, Qwen2.5-VL)
#
# A video of (t, h, w) patches, as Qwen's video processor would give it: `video_grid_thw` row [t, h, w] (t temporal
# patches of `temporal_patch_size` frames, h x w patches of `patch_size` px each), `pixel_values_videos` with one row
# of C * temporal_patch_size * patch_size^2 values per patch (t * h * w rows, in the vision tower's merge order), and
# t * h * w / m^2 video tokens in the text between <|vision_start|> and <|vision_end|> (m = spatial_merge_size).
# Patch-map numbering (modalkv.multimodal): each temporal patch of a video is its own grid of (h / m) x (w / m)
# tokens, so a video adds t entries to the row's image index, after the images (and frames) before it.

QWEN = ["qwen2_vl", "qwen2_5_vl"]
VIDEO_ROWS = [  # per prompt: visual items in order, then the question
    ([("video", (3, 4, 6))], "Describe the video."),  # 3 frames of 2 x 3 tokens
    ([("image", IMAGES[0]), ("video", (2, 6, 4))], "Compare the picture with the clip, frame by frame."),
]
# Grids per row, in patch-map order: row 0's three frames; row 1's image (56 x 84 px: 2 x 3), then its two frames.
VIDEO_GRIDS = [[(2, 3)] * 3, [(2, 3), (3, 2), (3, 2)]]


@pytest.fixture(params=QWEN)
def qwen(request, built):
    return built_once(request.param, built)


def qwen_inputs(model, processor, rows: list, seed: int = 0) -> dict:
    """A left-padded batch of Qwen prompts with images and hand-made videos, as Qwen's processor lays them out:
    `rows` lists each prompt's visual items in order (("image", PIL image) or ("video", (t, h, w) patches)) and its
    question, in QWEN_TEMPLATE's form; the video pixels are random (seeded)."""
    vision, config = model.config.vision_config, model.config
    merge = vision.spatial_merge_size
    generator = torch.Generator().manual_seed(seed)
    patch_values = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    texts, images, videos, video_grids = [], [], [], []
    for items, question in rows:
        placeholders = []
        for kind, item in items:
            if kind == "image":
                images.append(item)
                grid = processor.image_processor(images=[item], return_tensors="pt")["image_grid_thw"][0]
                placeholders.append("<|image_pad|>" * (int(grid.prod()) // merge**2))
            else:
                frames, height, width = item
                videos.append(torch.randn(frames * height * width, patch_values, generator=generator))
                video_grids.append(list(item))
                placeholders.append("<|video_pad|>" * (frames * height * width // merge**2))
        vision_text = "".join(f"<|vision_start|>{tokens}<|vision_end|>" for tokens in placeholders)
        texts.append(f"<|im_start|>user\n{vision_text}{question}<|im_end|>\n<|im_start|>assistant\n")
    inputs = dict(processor.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt"))
    ids = inputs["input_ids"]
    inputs["mm_token_type_ids"] = torch.where(
        ids == config.image_token_id, 1, torch.where(ids == config.video_token_id, 2, 0)
    )
    if images:
        inputs.update(processor.image_processor(images=images, return_tensors="pt"))
    if videos:
        inputs["pixel_values_videos"] = torch.cat(videos)
        inputs["video_grid_thw"] = torch.tensor(video_grids)
        if isinstance(model, Qwen2_5_VLForConditionalGeneration):  # seconds per temporal patch, sampled at 4 fps
            inputs["second_per_grid_ts"] = torch.full((len(videos),), vision.temporal_patch_size / 4)
    return multimodal_inputs(model, inputs)


def test_the_hand_layout_is_the_processors_on_images(qwen):
    """`qwen_inputs` lays out images exactly as Qwen's processor does (the template, the placeholder count, the pixels,
    the token types), so its videos follow the processor's layout too."""
    _, model, processor = qwen
    by_hand = qwen_inputs(model, processor, [([("image", IMAGES[0]), ("image", IMAGES[1])], PROMPT)])
    expected = encode_multimodal(model, processor, PROMPT, IMAGES)
    assert set(by_hand) == set(expected)
    for key, value in expected.items():
        assert torch.equal(by_hand[key], value), key


def grids_of(patches: torch.Tensor) -> list[tuple[int, int]]:
    """(rows, columns) of each grid of a [S, 3] patch map, in image-index order, each checked to be row-major."""
    visual = patches[patches[:, 0] >= 0]
    assert torch.equal(visual[:, 0].unique_consecutive(), torch.arange(int(visual[:, 0].max()) + 1))
    grids = []
    for index in visual[:, 0].unique_consecutive().tolist():
        cells = visual[visual[:, 0] == index, 1:]
        rows, cols = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        assert torch.equal(cells, grid), f"grid {index} is not laid out row-major"
        grids.append((rows, cols))
    return grids


def test_video_tokens_are_marked_video_with_one_grid_per_frame(qwen):
    _, model, processor = qwen
    inputs = qwen_inputs(model, processor, VIDEO_ROWS)
    ids, modality = inputs["input_ids"], inputs["modality"]
    assert torch.equal(modality == VIDEO, ids == model.config.video_token_id)
    assert torch.equal(modality == IMAGE, ids == model.config.image_token_id)
    assert torch.equal(modality, inputs["mm_token_type_ids"])  # Qwen's own map: 0 text, 1 image, 2 video
    assert (modality == VIDEO).sum(-1).tolist() == [18, 12] and (modality == IMAGE).sum(-1).tolist() == [0, 6]
    assert [grids_of(row) for row in inputs["patches"]] == VIDEO_GRIDS
    # The numbering is the model's own layout: per frame its temporal rope position is one value, rising frame by
    # frame, and its height / width positions are the patch map's rows / columns (plus the frame's start).
    positions, _ = rope_positions(model, inputs)
    for row in range(len(ids)):
        video = modality[row] == VIDEO
        frames = inputs["patches"][row, video, 0]
        temporal, height, width = positions[:, row, video]
        starts = [int(temporal[frames == frame].unique()) for frame in frames.unique().tolist()]
        assert starts == sorted(set(starts)), "one temporal position per frame, rising"
        assert torch.equal(height - height.min(), inputs["patches"][row, video, 1])
        assert torch.equal(width - width.min(), inputs["patches"][row, video, 2])


def test_video_at_budget_one_equals_uncompressed_generation(qwen):
    _, model, processor = qwen
    inputs = qwen_inputs(model, processor, VIDEO_ROWS[1:])  # an image and a video
    reference = generate(model, inputs, None)
    other_video = generate(model, {**inputs, "pixel_values_videos": -inputs["pixel_values_videos"]}, None)
    assert not torch.allclose(other_video.logits[0], reference.logits[0], atol=1e-3)  # the video is read
    for method in METHODS:
        output = generate(model, inputs, method, budget=1.0)
        assert torch.equal(output.sequences, reference.sequences), method
        for ours, theirs in zip(output.logits, reference.logits, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=method)


@pytest.mark.parametrize("method", ["madakv", "retentivekv", "snapkv"])
def test_video_generation_after_eviction_keeps_exactly_the_budget(qwen, method):
    _, model, processor = qwen
    inputs = qwen_inputs(model, processor, VIDEO_ROWS)
    assert bool((inputs["attention_mask"][:, 0] == 0).any()), "the batch should be left-padded"
    real = inputs["attention_mask"].sum(-1)
    cache = CompressedCache(get_press(method, budget=0.3))
    output = generate(model, {**inputs, "past_key_values": cache}, method, budget=0.3, tokens=5)
    assert output.sequences.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert all(torch.isfinite(step).all() for step in output.logits)
    grown = 0 if method == "retentivekv" else 4  # retentivekv evicts while decoding (into its memories)
    kept = torch.stack([layer.kept_lengths() for layer in cache.layers]).float().mean((0, 2))  # per row
    assert torch.equal(kept, (real.double() * 0.3).floor().float() + grown)
    video = (inputs["modality"] == VIDEO).tolist()
    for row, layers in enumerate(zip(*(layer.kept_columns() for layer in cache.layers), strict=True)):
        kept_video = [sum(video[row][p] for p in head if p < len(video[row])) for layer in layers for head in layer]
        assert max(kept_video) < sum(video[row]), "every head evicts some video tokens"
    if method == "retentivekv":  # video patches were absorbed into the visual state
        assert cache.layers[0].memory["visual"][..., -1].abs().sum() > 0  # the normaliser column


def test_video_decoding_after_eviction_equals_a_cache_holding_exactly_the_kept_tokens(qwen):
    """Qwen2.5-VL spaces a video's temporal positions by tokens_per_second: the next position comes from the rope."""
    name, model, processor = qwen
    assert_decoding_matches_the_kept_tokens(name, model, qwen_inputs(model, processor, VIDEO_ROWS[1:]))


def test_images_without_image_tokens_ask_for_an_explicit_modality_map(built):
    if "llava" not in built:
        built["llava"] = build("llava")
    model, processor = built["llava"]
    inputs = dict(processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=[IMAGES[0]], return_tensors="pt"))
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 5)
    with pytest.raises(ValueError, match=r"no image tokens were found .* pass an explicit modality map"):
        multimodal_inputs(model, inputs)


def test_a_processor_given_map_is_used_as_is(built):
    model, processor = built.get("llava") or build("llava")
    inputs = dict(processor(text="USER: <image>\nWhat is it? ASSISTANT:", images=[IMAGES[0]], return_tensors="pt"))
    modality = torch.full_like(inputs["input_ids"], TEXT)
    modality[0, -3:] = IMAGE
    patches = torch.full((*modality.shape, 3), -1)
    patches[0, -3:] = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    result = multimodal_inputs(model, {**inputs, "modality": modality, "patches": patches})
    assert torch.equal(result["modality"], modality) and torch.equal(result["patches"], patches)
    with pytest.raises(ValueError, match="patch map must give"):
        multimodal_inputs(model, {**inputs, "modality": modality, "patches": patches.roll(1, dims=1)})


def test_a_language_model_outside_the_attention_interface_is_refused():
    vision = CLIPVisionConfig(**VISION_MODEL)
    text = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config)  # Llava around a Bloom language model
    with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
        get_press("snapkv", budget=0.5).generate(model, input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=1)


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory, built):
    """The tiny Llava saved with its processor, as a user's local checkpoint; and two image files."""
    if "llava" not in built:
        built["llava"] = build("llava")
    model, processor = built["llava"]
    folder = tmp_path_factory.mktemp("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for index, picture in enumerate(IMAGES):
        picture.save(folder / f"image{index}.png")
    return folder


def cli_message(result) -> str:
    """stderr without rich's panel borders and line wrapping."""
    text = result.stderr
    for char in "│╭╮╰╯─":
        text = text.replace(char, " ")
    return " ".join(text.split())


def test_cli_generate_answers_from_images_with_a_local_vlm(llava_folder, built):
    model, processor = built["llava"]
    images = [str(llava_folder / "image0.png"), str(llava_folder / "image1.png")]
    args = ["generate", "--model", str(llava_folder), "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(cli.app, [*args, "--image", images[0], "--image", images[1]])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    inputs = encode_multimodal(model, processor, PROMPT, [Image.open(path).convert("RGB") for path in images])
    expected = generate(model, inputs, None).sequences[0, inputs["input_ids"].shape[1] :]
    assert record["text"] == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert record["prompt_tokens"] == inputs["input_ids"].shape[1] and record["generated_tokens"] == 4
    result = CliRunner().invoke(cli.app, [*args, "--image", images[0], "--method", "snapkv", "--budget", "0.5"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == inputs["input_ids"].shape[1] - 17  # one image fewer: 4 x 4 tokens + newline
    assert record["cache_bytes"] < 0.6 * record["full_cache_bytes"]


def test_cli_refuses_a_missing_image_and_images_for_a_text_model(llava_folder):
    args = ["generate", "--prompt", "What is it?", "--image"]
    result = CliRunner().invoke(cli.app, [*args, str(llava_folder / "missing.png"), "--model", str(llava_folder)])
    assert result.exit_code == 2 and "image file not found" in cli_message(result)
    result = CliRunner().invoke(cli.app, [*args, str(llava_folder / "image0.png")])  # the embedded SmolLM2
    assert result.exit_code == 2 and "is a text-only model" in cli_message(result), result.output


@pytest.fixture(scope="module")
def smollm2_llava():
    """Llava around the real SmolLM2-135M-Instruct (random vision tower and projector)."""
    language_model, tokenizer = load_model("smollm2-135m")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_MODEL),
        text_config=language_model.config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


@pytest.mark.slow
def test_llava_with_the_real_smollm2_keeps_uncompressed_generation_and_compresses(smollm2_llava):
    model, processor = smollm2_llava
    inputs = encode_multimodal(model, processor, "What is the capital of France? Answer in one word.", IMAGES)
    reference = generate(model, inputs, None)
    output = generate(model, inputs, "madakv", budget=1.0)
    assert torch.equal(output.sequences, reference.sequences)
    for ours, theirs in zip(output.logits, reference.logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    cache = CompressedCache(get_press("madakv", budget=0.3))
    output = generate(model, {**inputs, "past_key_values": cache}, "madakv", budget=0.3)
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    assert 0.2 < cache.cache_bytes() / cache.full_cache_bytes() < 0.4
