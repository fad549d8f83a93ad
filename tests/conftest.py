import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A seeded random Llama with GQA, small enough to run every test in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=None,  # no early stop: every test decodes its full length
        bos_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct and its tokenizer (the real-model tests share one)."""
    from modalkv import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(1))


def synthetic_statistics(config, path=None):
    """Head statistics for any model a test attaches a calibrated press to, unless the test names a file: a few
    strong visual heads and spread redundancies, drawn from the model's shape. Invariant tests (budget 1.0 equals
    uncompressed, batched equals one by one, decoding after eviction equals a cache of the kept tokens) hold whatever
    the statistics; what the statistics themselves mean is tested with real calibrations (test_calibrate.py)."""
    from modalkv.head_statistics import HeadStatistics, head_shape, load_statistics

    if path:  # a file the test wrote; the user's own calibrations (cache_dir) are never read by tests
        return load_statistics(config, path)
    layers, heads, kv_heads = head_shape(config)
    generator = torch.Generator().manual_seed(layers * 1000 + heads * 10 + kv_heads)
    visual = torch.rand(layers, heads, generator=generator) ** 8  # a few heads dominate, as in SparseMM's models
    return HeadStatistics(
        model="synthetic",
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        redundancy=torch.rand(layers, kv_heads, generator=generator).tolist(),
        visual=visual.tolist(),
        examples=0,
        source="tests/conftest.py synthetic_statistics",
    )


@pytest.fixture(autouse=True)
def head_statistics_for_every_model(request, monkeypatch):
    """SparseMM and MixKV read per-model head statistics; tiny random models get synthetic ones (see above). Tests
    marked `real_calibration` see the library's own loading (and its errors)."""
    if request.node.get_closest_marker("real_calibration") is None:
        monkeypatch.setattr("modalkv.presses.base.load_statistics", synthetic_statistics)
