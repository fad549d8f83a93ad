"""Hybrid sliding-window / global models (Gemma 3, gpt-oss with attention sinks) and Qwen3's q/k norms, as tiny random
text models built from their configs: the press compresses the global layers, sliding layers keep exactly
transformers' own window (`DynamicCache(config=...)` is the reference), and both decode sync-free.

The window (8 tokens) is far shorter than the prompts, so every test runs past it.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers import METHODS
from transformers import (
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modalkv import CompressedCache, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.modality import IMAGE
from modalkv.profiling import DispatchCounter

WINDOW = 8
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=None,  # no early stop
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def build(name: str):
    torch.manual_seed(0)
    if name == "gemma3_text":  # five sliding layers per global one in the real model; here two of each, interleaved
        layer_types = ["sliding_attention", "full_attention"] * 2
        config = Gemma3TextConfig(**TINY, num_hidden_layers=4, sliding_window=WINDOW, layer_types=layer_types)
        model = Gemma3ForCausalLM(config)
    elif name == "gpt_oss":  # sliding and full layers alternate; every layer has learned attention sinks
        config = GptOssConfig(
            **TINY, num_hidden_layers=2, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2
        )
        config.rope_parameters = ROPE
        model = GptOssForCausalLM(config)
        with torch.no_grad():  # initialised to zeros-ish: make the sinks matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, num_hidden_layers=2))
    return model.eval()


@pytest.fixture(scope="module")
def built():
    return {}


@pytest.fixture(params=["gemma3_text", "gpt_oss", "qwen3"])
def arch(request, built):
    if request.param not in built:
        built[request.param] = build(request.param)
    return request.param, built[request.param]


def prompt(batch: int = 1, seq: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def greedy(model, inputs: dict, press=None, tokens: int = 4, **kwargs):
    settings = dict(max_new_tokens=tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if press is None:
        return model.generate(**inputs, **settings, **kwargs)
    return press.generate(model, **inputs, **settings, **kwargs)


def assert_same_generation(ours, theirs, msg: str = "") -> None:
    assert torch.equal(ours.sequences, theirs.sequences), msg
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=msg)


def is_hybrid(model) -> bool:
    return "sliding_attention" in (getattr(model.config, "layer_types", None) or [])


def test_every_method_keeping_everything_equals_uncompressed_generation(arch):
    _, model = arch
    inputs = {"input_ids": prompt()}
    reference = greedy(model, inputs)  # transformers' own cache: DynamicCache(config), sliding layers windowed
    for method in METHODS:
        assert_same_generation(greedy(model, inputs, get_press(method, budget=1.0)), reference, method)


def test_a_left_padded_batch_equals_uncompressed_generation_and_decodes_after_eviction(arch):
    _, model = arch
    ids = prompt(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # row 1: 19 real tokens, still more than the window
    inputs = {"input_ids": ids, "attention_mask": mask}
    reference = greedy(model, inputs)
    assert_same_generation(greedy(model, inputs, get_press("snapkv", budget=1.0)), reference)
    for method in ("snapkv", "streaming_llm", "madakv", "retentivekv"):
        cache = CompressedCache(get_press(method, budget=0.5))
        output = greedy(model, inputs, get_press(method, budget=0.5), tokens=5, **{CACHE_KWARG: cache})
        assert all(torch.isfinite(step).all() for step in output.logits), method
        grown = 0 if method in ("streaming_llm", "retentivekv") else 4  # these evict while decoding
        for layer in cache.layers:
            expected = [min(n, WINDOW - 1) for n in (30, 19)] if layer.is_sliding else [15 + grown, 9 + grown]
            assert layer.kept_lengths()[:, 0].tolist() == expected, (method, layer.layer_idx)


def test_several_new_tokens_on_a_hybrid_cache_see_their_own_window(arch):
    """A follow-up forward longer than the window, on a left-padded batch: each new token sees only its window on
    sliding layers, and what left the window is dropped."""
    _, model = arch
    first, follow_up = prompt(2, 20), prompt(2, 13, seed=2)
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[1, :5] = 0
    press = get_press("full")

    def follow(past, context):
        with context, torch.no_grad():
            model(first, attention_mask=mask[:, :20], **{CACHE_KWARG: past})
            logits = model(follow_up, attention_mask=mask, **{CACHE_KWARG: past}).logits
            token = logits[:, -1:].argmax(-1)
            return logits, model(token, attention_mask=F.pad(mask, (0, 1), value=1), **{CACHE_KWARG: past}).logits

    cache, reference = CompressedCache(press), DynamicCache(config=model.config)
    for ours, theirs in zip(follow(cache, press.attach(model)), follow(reference, nullcontext()), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for ours_layer, their_layer in zip(cache.layers, reference.layers, strict=True):
        expected = [their_layer.keys.shape[2], their_layer.keys.shape[2] - (0 if ours_layer.is_sliding else 5)]
        assert ours_layer.kept_lengths()[:, 0].tolist() == expected  # 7 on sliding layers; global: 34, 29 (no pads)


def test_bytes_count_what_transformers_own_cache_holds(arch):
    """full_cache_bytes is DynamicCache(config)'s size (sliding layers: their window); the global layers' ratio is
    the budget."""
    _, model = arch
    inputs = {"input_ids": prompt(1, 40)}
    reference = DynamicCache(config=model.config)
    greedy(model, inputs, **{CACHE_KWARG: reference})
    held = sum(t.numel() * t.element_size() for layer in reference.layers for t in (layer.keys, layer.values))
    cache = CompressedCache(get_press("snapkv", budget=0.25))
    greedy(model, inputs, get_press("snapkv", budget=0.25), **{CACHE_KWARG: cache})
    assert cache.full_cache_bytes() == held
    per_token = cache.layers[0].bytes_per_token() * 2  # two KV heads
    globals_ = [layer for layer in cache.layers if not layer.is_sliding]
    assert cache.full_cache_bytes(include_sliding=False) == len(globals_) * 43 * per_token  # 40 + 3 appended
    assert cache.cache_bytes(include_sliding=False) == len(globals_) * (10 + 3) * per_token
    sliding = len(cache.layers) - len(globals_)
    assert cache.cache_bytes() - cache.cache_bytes(include_sliding=False) == sliding * (WINDOW - 1) * per_token


def test_decoding_after_eviction_equals_a_cache_holding_exactly_the_kept_tokens(arch):
    """Global layers hold StreamingLLM's kept tokens, sliding layers the window; gpt-oss's sinks included."""
    _, model = arch
    ids, seq = prompt(1, 30), 30
    press = get_press("streaming_llm", budget=0.5, evict_every=0)  # the same tokens in every global layer and head
    cache, full = CompressedCache(press), DynamicCache(config=model.config)
    with torch.no_grad():
        with press.attach(model):
            ours = model(ids, **{CACHE_KWARG: cache}).logits[:, -1]
        theirs = model(ids, **{CACHE_KWARG: full}).logits[:, -1]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        columns = next(layer for layer in cache.layers if not layer.is_sliding).kept_columns()[0][0]
        assert len(columns) == seq // 2
        reference = DynamicCache(config=model.config)
        for index, layer in enumerate(full.layers):
            if layer.is_sliding:  # transformers' own window, as it stands after the prompt
                reference.layers[index] = layer
            else:
                reference.update(layer.keys[:, :, columns], layer.values[:, :, columns], index)
        for step in range(4):
            token = ours.argmax(-1, keepdim=True)
            with press.attach(model):
                ours = model(token, **{CACHE_KWARG: cache}).logits[:, -1]
            position = torch.tensor([[seq + step]])
            theirs = model(token, **{CACHE_KWARG: reference}, position_ids=position).logits[:, -1]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def test_gpt_oss_sinks_are_read(built):
    """Without its sinks gpt-oss decodes otherwise: modalkv's prefill and decoding both honour them."""
    if "gpt_oss" not in built:
        built["gpt_oss"] = build("gpt_oss")
    model = built["gpt_oss"]
    inputs = {"input_ids": prompt()}
    with_sinks = greedy(model, inputs, get_press("snapkv", budget=1.0))
    sinks = [layer.self_attn.sinks.detach().clone() for layer in model.model.layers]
    try:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
        without = greedy(model, inputs, get_press("snapkv", budget=1.0))
        assert not torch.allclose(without.logits[0], with_sinks.logits[0], atol=1e-3)
        assert_same_generation(without, greedy(model, inputs))  # and eager agrees without them too
    finally:
        with torch.no_grad():
            for layer, value in zip(model.model.layers, sinks, strict=True):
                layer.self_attn.sinks.copy_(value)


def decode_counts(model, ids, press, mask=None, modality=None, steps=4):
    cache = CompressedCache(press, modality=modality)
    with press.attach(model), torch.no_grad():
        token = model(ids, attention_mask=mask, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        for _ in range(3):
            token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        with DispatchCounter() as counter:
            for _ in range(steps):
                token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
    return counter, cache


@pytest.mark.parametrize("method", ["snapkv", "h2o", "retentivekv"])
@pytest.mark.parametrize("padded", [False, True])
def test_a_hybrid_decoding_step_never_waits_for_the_device(built, method, padded):
    for name in ("gemma3_text", "gpt_oss"):
        if name not in built:
            built[name] = build(name)
        ids, mask = prompt(2, 40), None
        if padded:
            mask = torch.ones_like(ids)
            mask[1, :9] = 0
        modality = torch.zeros_like(ids)
        modality[:, 5:25] = IMAGE
        counter, cache = decode_counts(built[name], ids, get_press(method, budget=0.3), mask, modality)
        assert any(layer.is_sliding for layer in cache.layers)
        assert counter.total_syncs == 0, (name, counter.report())


def test_a_hybrid_decoding_step_is_one_graph(built):
    if "gemma3_text" not in built:
        built["gemma3_text"] = build("gemma3_text")
    model = built["gemma3_text"]
    press = get_press("h2o", budget=0.3)
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():
        token = model(prompt(2, 40), **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)
        token = model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)

        def step(token):
            return model(token, **{CACHE_KWARG: cache}).logits[:, -1:].argmax(-1)

        explained = torch._dynamo.explain(step)(token)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_compiled_hybrid_generation_equals_eager(built):
    if "gpt_oss" not in built:
        built["gpt_oss"] = build("gpt_oss")
    model, ids = built["gpt_oss"], prompt()
    press = get_press("h2o", budget=0.3)
    eager = press.generate(model, input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(press.generate(model, input_ids=ids, max_new_tokens=6, do_sample=False, compile=True), eager)


def test_layers_other_than_full_and_sliding_attention_are_refused():
    config = LlamaConfig(**TINY, num_hidden_layers=2)
    config.layer_types = ["chunked_attention", "full_attention"]
    config.attention_chunk_size = 8
    model = LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"\['chunked_attention'\] layers; modalkv supports full-attention and"):
        get_press("snapkv", budget=0.5).generate(model, input_ids=prompt(), max_new_tokens=1)


@pytest.mark.parametrize("method", ["snapkv", "madakv", "retentivekv", "cam"])
def test_a_shared_prefill_replays_sliding_layers_and_sinks_exactly(arch, method):
    """The prefill recorded once (generation.share_prefill) and replayed for a press holds what the press's own
    prefill holds, sliding windows included, and decodes the same logits."""
    from modalkv.generation import share_prefill

    _, model = arch
    ids = prompt(seq=40)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    shared = share_prefill(model, inputs)
    press = get_press(method, budget=0.3)
    own = CompressedCache(press)
    follow = torch.tensor([[5, 9, 11]])
    with press.attach(model), torch.no_grad():
        first = model(**inputs, **{CACHE_KWARG: own}, logits_to_keep=1).logits[:, -1]
        replayed = CompressedCache(press)
        replayed.replay_prefill(shared.layers)
        assert [layer.is_sliding for layer in replayed.layers] == [layer.is_sliding for layer in own.layers]
        assert replayed.kept_positions() == own.kept_positions()
        logits = {}
        for name, cache in (("own", own), ("replayed", replayed)):
            logits[name] = torch.cat([model(follow[:, i : i + 1], **{CACHE_KWARG: cache}).logits for i in range(3)], 1)
    torch.testing.assert_close(shared.first_logits, first, rtol=0, atol=0)
    torch.testing.assert_close(logits["replayed"], logits["own"], rtol=0, atol=0)
    assert replayed.kept_positions() == own.kept_positions()
    assert replayed.cache_bytes() == own.cache_bytes() and replayed.full_cache_bytes() == own.full_cache_bytes()


@pytest.mark.parametrize("method", ["snapkv", "retentivekv"])
def test_prompts_decoded_together_on_a_shared_prefill_each_hold_their_own_bytes(arch, method):
    """A left-padded batch (generation.generate_shared): each prompt's text and bytes are those it has alone, sliding
    windows and sinks included; the shorter prompt's window holds only its own tokens."""
    from eval_tiny import tiny_tokenizer

    from modalkv.generation import generate_shared, generate_timed, share_prefill

    _, model = arch
    prompts = [prompt(seq=40, seed=3), prompt(seq=26, seed=4)]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 40 - p.shape[1] :], mask[row, 40 - p.shape[1] :] = p, 1
    tokenizer = tiny_tokenizer()
    press = get_press(method, budget=0.5, window_size=4)
    batch = {"input_ids": ids, "attention_mask": mask}
    together = generate_shared(model, tokenizer, press, batch, 5, 1, share_prefill(model, batch))
    for mine, p in zip(together, prompts, strict=True):
        alone = generate_timed(model, tokenizer, press, {"input_ids": p}, max_new_tokens=5, min_new_tokens=1)
        assert mine.text == alone.text and mine.prompt_tokens == p.shape[1]
        for field in ("cache_bytes", "full_cache_bytes", "global_cache_bytes", "global_full_cache_bytes"):
            assert getattr(mine, field) == getattr(alone, field), field
