"""The decoding step under torch.compile: no graph break inside modalkv, and compiled tokens equal eager ones."""

import pytest
import torch

from modalkv import CompressedCache, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.modality import IMAGE


@pytest.mark.parametrize(
    ("method", "padded"),
    [
        ("snapkv", False),
        ("madakv", False),
        ("h2o", False),
        ("tova", True),  # ragged rows: paged attention and paged eviction
        ("retentivekv", False),
        ("retentivekv", True),
        ("streaming_llm", False),
        ("adakv:snapkv", False),
    ],
)
def test_a_decoding_step_is_one_graph(model, method, padded):
    prompt = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    if padded:
        mask[1, :7] = 0
    modality = torch.zeros_like(prompt)
    modality[:, 4:24] = IMAGE
    press = get_press(method, budget=0.3)
    cache = CompressedCache(press, modality=modality)
    with press.attach(model), torch.no_grad():
        token = model(prompt, attention_mask=mask, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)  # the views a step keeps exist

        def step(token):
            return model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)

        explained = torch._dynamo.explain(step)(token)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_generation_equals_eager(model, prompt):
    press = get_press("h2o", budget=0.3)  # decode-time eviction every step: the most stateful step
    eager = press.generate(model, input_ids=prompt, max_new_tokens=8, do_sample=False)
    compiled = press.generate(model, input_ids=prompt, max_new_tokens=8, do_sample=False, compile=True)
    assert torch.equal(compiled, eager)


def test_compile_needs_a_compileable_cache(model, prompt):
    press = get_press("snapkv", budget=0.3)
    with pytest.raises(ValueError, match="compileable=True"):
        press.generate(model, input_ids=prompt, max_new_tokens=2, compile=True, **{CACHE_KWARG: CompressedCache(press)})
