"""Hand-made prefill inputs for press tests (imported by the test modules; pytest puts tests/ on sys.path)."""

import math
from types import SimpleNamespace

import torch
from transformers import PretrainedConfig

from modalkv.presses.base import PrefillInputs, Press


def make_inputs(
    batch=1, heads=4, kv_heads=2, seq=20, dim=8, is_real=None, seed=0, num_layers=4, layer_idx=0, modality=None
) -> PrefillInputs:
    """Seeded random queries/keys/values; `module` carries just a config (presses read its layer count)."""
    gen = torch.Generator().manual_seed(seed)
    return PrefillInputs(
        module=SimpleNamespace(config=PretrainedConfig(num_hidden_layers=num_layers)),  # all layers full attention
        layer_idx=layer_idx,
        queries=torch.randn(batch, heads, seq, dim, generator=gen),
        keys=torch.randn(batch, kv_heads, seq, dim, generator=gen),
        values=torch.randn(batch, kv_heads, seq, dim, generator=gen),
        is_real=torch.ones(batch, seq, dtype=torch.bool) if is_real is None else is_real,
        scaling=1 / math.sqrt(dim),
        modality=modality,
    )


def kept_sets(press: Press, inputs: PrefillInputs) -> list[list[list[int]]]:
    """The kept token indices per batch row and KV head."""
    selection = press.select(inputs)
    indices, lengths = selection.indices, selection.lengths
    return [[indices[b, h, : lengths[b, h]].tolist() for h in range(lengths.shape[1])] for b in range(len(lengths))]
