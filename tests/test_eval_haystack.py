"""The long multimodal haystacks: examples from a seed, sized in tokens, the key where each family puts it; reading
the key through a full cache equals plain greedy generation (the question fed after compression included); a shared
prefill reads as the press's own; one `modalkv eval` run. On the SmolLM2 mini-VLM (the task's logic does not depend
on the language model; the Gemma 3 one needs its package, tests/test_real_gemma3.py)."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from modalkv import cli, load_model
from modalkv.eval.haystack import FAMILIES, IMAGE_LINE, NEEDLE, QUESTION, HaystackTask, read_key
from modalkv.eval.tasks import IMAGE_PLACEHOLDER, build_task, encode_example
from modalkv.generation import share_prefill
from modalkv.presses import get_press

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vlm():
    return load_model("mini-vlm")


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


def prompt_inputs(model, processor, example):
    """The example's inputs with the images embedded, its modality and patch maps (as the task makes them)."""
    inputs, modality, _ = encode_example(model, processor, example)
    patches = inputs.pop("patches")
    inputs["inputs_embeds"] = model.embed(inputs.pop("input_ids"), inputs.pop("pixel_values"))
    return inputs, modality, patches


def test_same_seed_same_examples_other_seed_other_examples(vlm):
    _, processor = vlm
    first, failures = HaystackTask(tokens=600, samples=2).load(processor)
    again, _ = HaystackTask(tokens=600, samples=2).load(processor)
    other, _ = HaystackTask(tokens=600, samples=2, seed=1).load(processor)
    assert failures == [] and first == again and first != other
    assert [e.task for e in first] == [f"haystack/{f}" for f in FAMILIES for _ in range(2)]
    # a larger count only adds examples (a run folder grows by resuming with one: runner.EXAMPLE_COUNT)
    more, _ = HaystackTask(tokens=600, samples=3).load(processor)
    assert [e for e in more if int(e.id.rpartition("-")[2]) < 2] == first


@pytest.mark.parametrize("tokens", [600, 2000])
def test_prompts_hold_about_the_target_token_count(vlm, tokens):
    model, processor = vlm
    for example in HaystackTask(tokens=tokens, samples=1).load(processor)[0]:
        inputs, _, how = encode_example(model, processor, example)
        picture = processor.grid[0] * processor.grid[1]
        assert how == "processor" and abs(inputs["input_ids"].shape[1] - tokens) <= picture // 2 + 10, example.id


def test_the_key_sits_where_each_family_puts_it(vlm):
    _, processor = vlm
    task = HaystackTask(tokens=1500, samples=4)
    for example in task.load(processor)[0]:
        family, prompt, key, images = example.info["family"], example.prompt, example.reference, example.images
        assert re.fullmatch(r"\d{5}", key) and example.chat is False
        assert prompt.count(IMAGE_PLACEHOLDER) == len(images) == example.info["images"]
        if family == "image":
            target = example.info["target_index"]
            codes = re.findall(r"Code: (\d{5})\.", prompt)
            assert codes[target] == key and len(codes) == len(images) - 1
            assert images[-1] == images[target] and len(set(images[:-1])) == len(images) - 1  # all others distinct
            assert prompt.endswith(IMAGE_PLACEHOLDER + " Code:")
        else:
            needle = NEEDLE.format(key=key)
            before = prompt.split(needle)[0].count(IMAGE_PLACEHOLDER)
            assert prompt.count(needle) == 1 and before == example.info["needle_before_image"]
            assert prompt.endswith(QUESTION) == (family == "needle")
            assert IMAGE_LINE.format(key=key) not in prompt
        assert task.score(f" {key}", example) == 1.0 and task.score(f" {key[:-1]}", example) == 0.0


@pytest.mark.parametrize("family", ["needle", "deferred"])
def test_reading_the_key_through_a_full_cache_is_greedy_generation(vlm, family):
    """What `read_key` writes is greedy generation's output up to the first token that is not the key's, the
    deferred question fed after the compressed prompt included."""
    model, processor = vlm
    task = HaystackTask(tokens=400, samples=1, families=(family,))
    (example,), _ = task.load(processor)
    inputs, modality, patches = prompt_inputs(model, processor, example)
    question = ids(processor, QUESTION) if family == "deferred" else []
    answer = ids(processor, " " + example.reference)
    written, _, sizes, replayed = read_key(model, get_press("full"), inputs, modality, patches, None, question, answer)
    embeds = inputs["inputs_embeds"]
    if question:
        embeds = torch.cat([embeds, model.language_model.get_input_embeddings()(torch.tensor([question]))], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    greedy = model.language_model.generate(
        inputs_embeds=embeds, attention_mask=mask, max_new_tokens=len(answer), do_sample=False
    )[0, -len(answer) :].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(greedy, answer, strict=True)) if a != b), len(answer) - 1)
    assert written == greedy[: agree + 1] and not replayed
    assert sizes[0] == sizes[1] > 0 and sizes[:2] == sizes[2:]  # full cache, no sliding layers


@pytest.mark.parametrize("method", ["snapkv", "madakv", "retentivekv"])
def test_a_shared_prefill_reads_the_key_as_the_press_own(vlm, method):
    model, processor = vlm
    (example,), _ = HaystackTask(tokens=400, samples=1, families=("deferred",)).load(processor)
    inputs, modality, patches = prompt_inputs(model, processor, example)
    shared = share_prefill(model, inputs, modality, patches)
    question, answer = ids(processor, QUESTION), ids(processor, " 0123456789")  # ten steps, whatever is written
    press = get_press(method, budget=0.2)
    own = read_key(model, press, inputs, modality, patches, None, question, answer)
    replayed = read_key(model, press, inputs, modality, patches, shared, question, answer)
    assert replayed[3] and not own[3]
    assert replayed[0] == own[0] and replayed[2] == own[2]
    assert own[2][0] < 0.5 * own[2][1]  # compressed


def test_text_only_model_and_bad_options_are_refused(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match="--model mini-vlm-gemma3"):
        HaystackTask().load(processor.tokenizer)
    with pytest.raises(ValueError, match="families must be among"):
        build_task("haystack", {"families": "needle,nope"})
    with pytest.raises(ValueError, match="tokens must be at least 200"):
        build_task("haystack", {"tokens": "100"})
    with pytest.raises(ValueError, match="samples must be at least 1, got 0"):
        build_task("haystack", {"samples": "0"})


def test_eval_runs_the_suite_on_the_mini_vlm(vlm, tmp_path):
    args = ["eval", "--model", "mini-vlm", "--tasks", "haystack", "--limit", "1", "--methods", "full,madakv"]
    options = ["-t", "haystack.tokens=300"]
    result = CliRunner().invoke(cli.app, [*args, "--budgets", "0.3", *options, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "records.rank0.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["method"]) for r in records) == sorted(
        (f"haystack/{f}", m) for f in FAMILIES for m in ("full", "madakv")
    )
    for record in records:
        assert record["image_input"] == "processor" and record["shared_prefill"]
        assert record["score"] == float(record["prediction"].strip().startswith(record["reference"]))
        assert set(record["metrics"]) == {"key_tokens_right"} and 0 <= record["metrics"]["key_tokens_right"] <= 1
        assert (record["cache_ratio"] == 1.0) == (record["method"] == "full")
