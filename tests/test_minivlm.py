"""The embedded mini-VLM (modalkv.vlm): real weights loaded offline, processor maps, the engine on it, and answers
that come from the images. Loads the model once for the module (~10 s)."""

import socket

import pytest
import torch

from modalkv import CompressedCache, get_press, load_model
from modalkv.modality import IMAGE, TEXT
from modalkv.vlm import MiniVLMProcessor
from modalkv.vlm.encoder import load_encoder
from modalkv.vlm.images import PHOTOS, load_photo
from modalkv.vlm.processor import image_to_pixels

pytestmark = pytest.mark.slow
QUESTION = "What is shown in the image?"


def _no_network(*args, **kwargs):
    raise OSError("the mini-VLM must load without the network")


@pytest.fixture(scope="module")
def vlm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _no_network)
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_model("mini-vlm")


def chat(processor: MiniVLMProcessor, num_images: int, question: str = QUESTION) -> str:
    content = [*({"type": "image"} for _ in range(num_images)), {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def model_inputs(batch) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def answers(vlm, names: list[str]) -> list[str]:
    model, processor = vlm
    batch = processor(text=[chat(processor, 1)] * len(names), images=[load_photo(n) for n in names])
    out = model.generate(**model_inputs(batch), max_new_tokens=8, do_sample=False)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def test_vision_tower_labels_every_photo_with_one_of_its_classes():
    encoder = load_encoder()  # load_state_dict(strict=True): every tensor of the shipped state_dict, no other
    pixels = torch.stack([image_to_pixels(load_photo(name), 224) for name in PHOTOS])
    with torch.no_grad():
        labels = encoder(pixels).argmax(-1).tolist()
    assert {name: label in PHOTOS[name].class_ids for name, label in zip(PHOTOS, labels, strict=True)} == dict.fromkeys(
        PHOTOS, True
    )


def test_processor_marks_exactly_the_image_tokens_on_row_major_grids(vlm):
    model, processor = vlm
    texts = [chat(processor, 1), chat(processor, 2, "Which image shows a cat?")]
    batch = processor(text=texts, images=[[load_photo("cat")], [load_photo("coffee"), load_photo("rocket")]])
    ids, modality, patches, mask = batch["input_ids"], batch["modality"], batch["patches"], batch["attention_mask"]
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    assert torch.equal(modality == IMAGE, ids == model.config.image_token_id)
    assert (modality == IMAGE).sum(-1).tolist() == [49, 98]
    assert mask[0, 0] == 0 and mask[1].all() and mask[0, -1] == 1  # the shorter row is padded on the left
    assert (modality[mask == 0] == TEXT).all() and (patches[mask == 0] == -1).all()
    for row, num_images in enumerate([1, 2]):
        visual = patches[row][modality[row] == IMAGE]  # [49 * n, 3] in prompt order
        cells = torch.arange(49)
        expected = torch.cat(
            [torch.stack([torch.full_like(cells, i), cells // 7, cells % 7], -1) for i in range(num_images)]
        )
        assert torch.equal(visual, expected)


def test_processor_at_448_px_has_14x14_grids(vlm):
    processor = MiniVLMProcessor(vlm[1].tokenizer, vlm[1].image_token_id, image_size=448)
    batch = processor(text=chat(processor, 1), images=[load_photo("cat")])
    visual = batch["patches"][0][batch["modality"][0] == IMAGE]
    assert len(visual) == 196 and visual[:, 1].max() == 13 and visual[:, 2].max() == 13
    assert batch["pixel_values"].shape == (1, 3, 448, 448)


def test_images_must_match_the_placeholders(vlm):
    model, processor = vlm
    with pytest.raises(ValueError, match="placeholders"):
        processor(text=chat(processor, 2), images=[load_photo("cat")])
    batch = processor(text=chat(processor, 1), images=[load_photo("cat")])
    with pytest.raises(ValueError, match="patches"):
        model.embed(batch["input_ids"], torch.cat([batch["pixel_values"]] * 2))


def test_full_and_budget_one_generate_exactly_the_uncompressed_tokens(vlm):
    model, processor = vlm
    texts = [chat(processor, 1), chat(processor, 2, "What is shown in image 2?")]
    batch = processor(text=texts, images=[[load_photo("cat")], [load_photo("coffee"), load_photo("rocket")]])
    reference = model.generate(**model_inputs(batch), max_new_tokens=6, do_sample=False)
    assert torch.equal(reference[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # prompt + new tokens
    for press in (get_press("full"), get_press("snapkv", 1.0)):
        assert torch.equal(press.generate(model, **batch, max_new_tokens=6, do_sample=False), reference), press.name


@pytest.mark.parametrize("method", ["snapkv", "madakv", "expected_attention"])  # the last reads the LM's decoder
def test_compressed_cache_generates_from_the_processor_maps(vlm, method):
    model, processor = vlm
    batch = processor(
        text=[chat(processor, 2, "What is shown in image 1?")], images=[load_photo("cat"), load_photo("coffee")]
    )
    press = get_press(method, 0.5)
    cache = CompressedCache(press, batch["modality"], batch["patches"])
    with press.attach(model):
        out = model.generate(**model_inputs(batch), past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 6)
    assert cache.cache_bytes() < 0.55 * cache.full_cache_bytes()


def test_answers_name_the_photo_and_follow_the_images(vlm):
    names = ["cat", "rocket", "space_shuttle"]
    first = answers(vlm, names)
    assert [PHOTOS[n].is_named_in(a) for n, a in zip(names, first, strict=True)] == [True] * 3, first
    assert answers(vlm, names[::-1]) == first[::-1]  # same answers for the same images, whatever the row
