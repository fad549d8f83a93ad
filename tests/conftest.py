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


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(1))
