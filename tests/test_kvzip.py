"""KVzipPress on the tiny Llama: the reconstruction's scores (against eager attention's own weights), the budget
over layers and heads, batches, chunks, replayed prefills, and the errors."""

import pytest
import torch
from conftest import tiny_llama
from eval_tiny import tiny_tokenizer
from transformers import DynamicCache

from modalkv import CompressedCache, api, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.generation import generate_shared, generate_timed, share_prefill
from modalkv.modality import IMAGE
from modalkv.presses.reconstruction import ReconstructionPrompt, reconstruction_scores

PROMPT = ReconstructionPrompt(first=[5, 6, 7], later=[8, 9], suffix=[10, 11], prefix=[2, 3])


@pytest.fixture(autouse=True)
def fixed_prompt(monkeypatch):
    """A repetition request in the tiny model's vocabulary (the real one comes from the model's tokenizer)."""
    monkeypatch.setattr("modalkv.presses.kvzip.reconstruction_prompt", lambda path: PROMPT)


def prefill(model, press, ids, mask=None) -> CompressedCache:
    cache = CompressedCache(press)
    with press.attach(model), torch.no_grad():
        model(ids, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
    return cache


def reference_scores(ids: list[int], start: int, end: int, question: list[int], n_sink: int = 4) -> torch.Tensor:
    """[L, H_kv, end - start]: kvpress's score from eager attention weights over [ids ; repetition], renormalised
    over the sinks, the chunk and the repetition (the keys kvpress's softmax sees)."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    sequence = torch.tensor([ids + question + PROMPT.suffix + ids[start:end]])
    with torch.no_grad():
        attentions = model(sequence, output_attentions=True).attentions  # per layer [1, H, T, T]
    seen = [*range(min(n_sink, start)), *range(start, end), *range(len(ids), sequence.shape[1])]
    scores = []
    for layer in attentions:
        weights = layer[0, :, len(ids) :][..., seen]
        chunk = (weights / weights.sum(-1, keepdim=True))[..., min(n_sink, start) : min(n_sink, start) + end - start]
        scores.append(chunk.amax(dim=1).view(2, 2, -1).amax(dim=1))  # max over queries, then the KV group
    return torch.stack(scores)


def test_reconstruction_scores_equal_eager_attention_renormalised(model):
    ids = [2, 3, *torch.randint(12, 128, (30,), generator=torch.Generator().manual_seed(0)).tolist()]
    scores = reconstruction_scores(
        model, torch.tensor([ids]), torch.ones(1, 32, dtype=torch.bool), PROMPT, chunk_size=16
    )
    first = reference_scores(ids, 2, 18, PROMPT.first)  # the opening [2, 3] is not repeated
    later = reference_scores(ids, 18, 32, PROMPT.later + ids[10:18])
    expected = torch.cat([torch.zeros(2, 2, 2), first, later], dim=-1)
    expected[..., :4] = expected.max() + 1  # the sinks rank first
    assert torch.allclose(scores[:, 0], expected, atol=1e-5)


def test_keeps_the_top_scores_over_all_layers_and_heads(model, prompt):
    cache = prefill(model, get_press("kvzip", budget=0.25), prompt)
    lengths = torch.stack([layer.kept_lengths()[0] for layer in cache.layers])  # [L, H_kv]
    assert int(lengths.sum()) == 2 * 2 * 12 and len(set(lengths.flatten().tolist())) > 1
    assert all(head[:4] == [0, 1, 2, 3] for layer in cache.kept_positions() for head in layer[0])
    layerwise = prefill(model, get_press("kvzip", budget=0.25, layerwise=True), prompt)
    assert [int(layer.kept_lengths().sum()) for layer in layerwise.layers] == [2 * 12, 2 * 12]


def test_left_padded_batch_equals_one_by_one(model):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(12, 128, (n,), generator=gen) for n in (40, 29)]
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 40 - len(p) :], mask[i, 40 - len(p) :] = p, 1
    press = get_press("kvzip", budget=0.3)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    batched = press.generate(model, input_ids=ids, attention_mask=mask, **settings)
    for i, p in enumerate(prompts):
        single = press.generate(model, input_ids=p[None], **settings)
        assert torch.equal(batched[i, 40:], single[0, len(p) :])
    shift = 40 - len(prompts[1])
    padded, alone = prefill(model, press, ids, mask), prefill(model, press, prompts[1][None])
    for ours, theirs in zip(padded.kept_positions(), alone.kept_positions(), strict=True):
        assert ours[1] == [[p + shift for p in head] for head in theirs[0]]


def test_budget_one_needs_no_reconstruction(model, prompt):
    press = get_press("kvzip")
    reference = model.generate(prompt, past_key_values=DynamicCache(), max_new_tokens=5, do_sample=False)
    with api.attach(press, model):  # no reconstruction hook: keeping everything needs no scores
        out = model.generate(prompt, **{CACHE_KWARG: CompressedCache(press)}, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, reference)


def test_a_prefill_without_the_reconstruction_is_refused(model, prompt):
    press = get_press("kvzip", budget=0.3)
    with api.attach(press, model), pytest.raises(ValueError, match="reconstructing it before the prefill"):
        model(prompt, **{CACHE_KWARG: CompressedCache(press)}, use_cache=True)


def test_images_are_refused(model, prompt):
    press = get_press("kvzip", budget=0.3)
    modality = torch.zeros_like(prompt)
    modality[0, 5:20] = IMAGE
    with pytest.raises(ValueError, match="image or video tokens are refused"):
        press.generate(model, input_ids=prompt, modality=modality, max_new_tokens=2)


def test_budgets_replaying_one_prefill_share_one_reconstruction(model, monkeypatch):
    """A left-padded batch recorded once (`share_prefill`) and replayed for two budgets: each prompt decodes what it
    decodes alone with its own prefill (text, token count, bytes), and the reconstruction runs once for both budgets
    (its seconds counted in each budget's prefill time)."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return reconstruction_scores(*args, **kwargs)

    monkeypatch.setattr("modalkv.presses.kvzip.reconstruction_scores", counted)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(12, 128, (1, n), generator=gen) for n in (44, 31)]
    ids, mask = torch.zeros(2, 44, dtype=torch.long), torch.zeros(2, 44, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 44 - p.shape[1] :], mask[row, 44 - p.shape[1] :] = p, 1
    tokenizer, settings = tiny_tokenizer(), {"max_new_tokens": 6, "min_new_tokens": 1}
    shared = share_prefill(model, {"input_ids": ids, "attention_mask": mask})
    for budget in (0.2, 0.4):
        press = get_press("kvzip", budget=budget)
        together = generate_shared(
            model, tokenizer, press, {"input_ids": ids, "attention_mask": mask}, **settings, shared=shared
        )
        made = shared.prompt_states["kvzip"][1]
        assert [shape[0] for shape in calls] == [2] and together[0].prefill_seconds >= made > 0
        for p, result in zip(prompts, together, strict=True):
            with monkeypatch.context() as patched:  # a prompt alone makes its own reconstruction
                patched.setattr("modalkv.presses.kvzip.reconstruction_scores", reconstruction_scores)
                alone = generate_timed(model, tokenizer, press, {"input_ids": p}, **settings)
            assert (result.text, result.generated_tokens) == (alone.text, alone.generated_tokens)
            assert (result.cache_bytes, result.full_cache_bytes) == (alone.cache_bytes, alone.full_cache_bytes)


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_replays_keep_what_the_press_own_prefill_keeps(model, prompt, name):
    """A recorded prefill replayed into the benchmark's cache and into a new one (the evaluation's), on a hybrid model
    too."""
    if name == "gemma3_text":
        from test_hybrid import build

        model = build(name)
    press = get_press("kvzip", budget=0.3)
    shared = share_prefill(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
    own, replayed = CompressedCache(press), CompressedCache(press)
    with press.attach(model), torch.no_grad():
        model(prompt, **{CACHE_KWARG: own}, use_cache=True)
        shared.replay(model, press, replayed)
        evaluated, _ = shared.replay(model, press)
    assert replayed.kept_positions() == evaluated.kept_positions() == own.kept_positions()
