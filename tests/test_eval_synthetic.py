"""The synthetic multimodal suite: examples from a seed, sized in tokens, exactly one option shown, the answer picture
where each family puts it; option likelihoods through a compressed cache equal an uncompressed forward at budget 1.0
and do not depend on how many options share the cache; one `modalkv eval` run on the mini-VLM. Loads the mini-VLM
once (~10 s)."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from modalkv import cli, load_model
from modalkv.eval.synthetic import (
    ANSWER_PREFIX,
    ANSWERS,
    CONFUSED,
    FAMILIES,
    QUESTION,
    SyntheticTask,
    layout,
    option_log_likelihoods,
)
from modalkv.eval.tasks import IMAGE_PLACEHOLDER, Example, build_task, encode_example
from modalkv.generation import share_prefill
from modalkv.presses import get_press
from modalkv.vlm.images import PHOTOS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vlm():
    return load_model("mini-vlm")


def ids(processor, text):
    return processor.tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def reference_log_likelihoods(model, inputs, prefix, options):
    """[n] log-likelihood of each option from a plain forward of prompt + prefix + option: no cache, no press."""
    prompt, pixels = inputs["input_ids"], inputs["pixel_values"]
    scores = []
    for option in options:
        tail = torch.tensor([prefix + option])
        logits = model(input_ids=torch.cat([prompt, tail], dim=1), pixel_values=pixels, use_cache=False).logits[0]
        log_probs = torch.log_softmax(logits[-len(option) - 1 : -1].float(), dim=-1)
        scores.append(log_probs.gather(-1, tail[0, -len(option) :, None]).sum())
    return torch.stack(scores)


@pytest.fixture(scope="module")
def one_picture(vlm):
    """A short prompt (the cat photo, the question) and options of one to three tokens."""
    model, processor = vlm
    example = Example("x", "x", IMAGE_PLACEHOLDER + QUESTION, "", images=(PHOTOS["cat"].path,))
    inputs, modality, _ = encode_example(model, processor, example)
    patches = inputs.pop("patches")
    options = [ids(processor, f" {word}") for word in ("cat", "space shuttle", "cup of coffee")]
    assert [len(option) for option in options] == [1, 2, 3]
    return inputs, modality, patches, ids(processor, ANSWER_PREFIX), options


def test_same_seed_same_examples_other_seed_other_examples(vlm):
    _, processor = vlm
    first, failures = SyntheticTask(samples=3).load(processor)
    again, _ = SyntheticTask(samples=3).load(processor)
    other, _ = SyntheticTask(samples=3, seed=1).load(processor)
    assert failures == [] and first == again and first != other
    assert [e.task for e in first] == [f"synthetic/{f}" for f in FAMILIES for _ in range(3)]
    # a larger count only adds examples (a run folder grows by resuming with one: runner.EXAMPLE_COUNT)
    more, _ = SyntheticTask(samples=4).load(processor)
    assert [e for e in more if int(e.id.rpartition("-")[2]) < 3] == first


@pytest.mark.parametrize("tokens", [300, 1024])
def test_prompts_hold_about_the_target_token_count(vlm, tokens):
    model, processor = vlm
    for example in SyntheticTask(tokens=tokens, samples=1).load(processor)[0]:
        inputs, _, how = encode_example(model, processor, example)
        assert how == "processor" and abs(inputs["input_ids"].shape[1] - tokens) <= 30, example.id


def test_exactly_one_option_is_shown_and_the_picture_sits_where_the_family_says(vlm):
    _, processor = vlm
    task = SyntheticTask(samples=6, tokens=600)
    for example in task.load(processor)[0]:
        info, images = example.info, example.images
        index, options, target = info["target_index"], info["options"], info["target"]
        assert len(options) == len(set(options)) == 4 and ANSWERS[target] == example.reference in options
        shown = [p for p in PHOTOS if ANSWERS[p] in options]
        assert all(frozenset({a, b}) not in CONFUSED for a in shown for b in shown)
        others = [image for i, image in enumerate(images) if i != index]
        assert [image.name.split("-")[0] for image in others] == info["distractors"]
        for distractor in set(info["distractors"]):  # no option's photo (nor one read like it) is a distractor
            assert ANSWERS[distractor] not in options
            assert all(frozenset({distractor, p}) not in CONFUSED for p in shown)
        assert task.score(example.reference, example) == 1.0
        assert all(task.score(word, example) == 0.0 for word in options if word != example.reference)
        if info["family"] == "deferred":
            assert index == 0 and images[0] == PHOTOS[target].path
        if info["family"] == "spatial":
            assert images[index].name.startswith(f"region-{target}-4-")
        if info["family"] == "distractor":
            assert index > 0 and images[index] == PHOTOS[target].path


def test_every_photo_is_asked_about_and_options_are_single_tokens(vlm):
    _, processor = vlm
    targets = {layout("distractor", random.Random(i), 3).target for i in range(60)}
    assert targets == set(PHOTOS)
    assert all(len(ids(processor, f" {word}")) == 1 for word in ANSWERS.values())
    two = layout("deferred", random.Random(0), 3, choices=2)
    assert len(two.options) == 2 and two.target in two.options


def test_option_likelihoods_at_budget_1_equal_an_uncompressed_forward(vlm, one_picture):
    model, _ = vlm
    inputs, modality, patches, prefix, options = one_picture
    reference = reference_log_likelihoods(model, inputs, prefix, options)
    scored = option_log_likelihoods(model, get_press("full"), inputs, prefix, options, modality, patches)
    torch.testing.assert_close(scored.log_likelihoods, reference, atol=1e-3, rtol=0)
    assert scored.cache_bytes == scored.full_cache_bytes > 0 and scored.prompt_tokens == inputs["input_ids"].shape[1]
    assert int(reference.argmax()) == 0  # a cat is shown: the model prefers it over the shuttle and the coffee


@pytest.mark.parametrize("method", ["h2o", "retentivekv"])
def test_compressed_option_likelihoods_do_not_depend_on_the_other_options(vlm, one_picture, method):
    """All options from one prefill (batched) equal each option scored alone. Both presses also evict while the
    prefix and the options are fed; RetentiveKV reads the modality map for every copied row."""
    model, _ = vlm
    inputs, modality, patches, prefix, options = one_picture
    press = get_press(method, budget=0.2)
    together = option_log_likelihoods(model, press, inputs, prefix, options, modality, patches)
    alone = torch.cat(
        [option_log_likelihoods(model, press, inputs, prefix, [o], modality, patches).log_likelihoods for o in options]
    )
    torch.testing.assert_close(together.log_likelihoods, alone, atol=1e-4, rtol=0)
    assert together.cache_bytes < 0.3 * together.full_cache_bytes
    full = option_log_likelihoods(model, get_press("full"), inputs, prefix, options[:1], modality, patches)
    assert abs(float(together.log_likelihoods[0] - full.log_likelihoods[0])) > 1e-2  # compression changes them


@pytest.mark.parametrize("method", ["madakv", "retentivekv", "cam", "sparsemm:snapkv"])
def test_option_likelihoods_from_a_shared_prefill_equal_the_press_own(vlm, one_picture, method):
    """The image prompt prefilled once (its modality and patch maps recorded with it) and replayed for a press scores
    every option exactly as the press's own prefill does."""
    model, _ = vlm
    inputs, modality, patches, prefix, options = one_picture
    shared = share_prefill(model, inputs, modality, patches)
    press = get_press(method, budget=0.2)
    own = option_log_likelihoods(model, press, inputs, prefix, options, modality, patches)
    replayed = option_log_likelihoods(model, press, inputs, prefix, options, modality, patches, shared)
    assert replayed.shared_prefill and not own.shared_prefill
    torch.testing.assert_close(replayed.log_likelihoods, own.log_likelihoods, rtol=0, atol=0)
    assert (replayed.cache_bytes, replayed.full_cache_bytes) == (own.cache_bytes, own.full_cache_bytes)


def test_evaluate_picks_the_calibrated_most_likely_option(vlm):
    model, processor = vlm
    task = SyntheticTask(tokens=100, samples=1, families=("distractor",), choices=3)
    (example,), _ = task.load(processor)
    assert len(example.images) == 2 and len(example.info["options"]) == 3
    outcome = task.evaluate(model, processor, get_press("full"), example)
    words = example.info["options"]
    inputs, modality, _ = encode_example(model, processor, example)  # pixels, not the task's cached embeddings
    patches = inputs.pop("patches")
    options = [ids(processor, f" {w}") for w in words]
    prefix = ids(processor, ANSWER_PREFIX)
    raw = option_log_likelihoods(model, get_press("full"), inputs, prefix, options, modality, patches)
    raw = raw.log_likelihoods
    prior = task.prior(model, processor)
    assert sorted(prior) == sorted(ANSWERS.values())
    calibrated = raw - torch.tensor([prior[w] for w in words])
    right = words.index(example.reference)
    assert outcome.prediction == words[int(calibrated.argmax())]
    assert outcome.score == float(outcome.prediction == example.reference) == float(outcome.metrics["margin"] > 0)
    best_other = max(float(c) for i, c in enumerate(calibrated) if i != right)
    assert outcome.metrics["margin"] == pytest.approx(float(calibrated[right]) - best_other, abs=1e-3)
    assert outcome.cache_bytes == outcome.full_cache_bytes and outcome.image_input == "processor"


def test_text_only_model_and_bad_options_are_refused(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match="--model mini-vlm"):
        SyntheticTask().load(processor.tokenizer)
    with pytest.raises(ValueError, match="families must be among"):
        build_task("synthetic", {"families": "deferred,nope"})
    with pytest.raises(ValueError, match="choices must be 2, 3 or 4"):
        build_task("synthetic", {"choices": "5"})


def test_eval_runs_the_suite_on_the_mini_vlm(vlm, tmp_path):
    args = ["eval", "--model", "mini-vlm", "--tasks", "synthetic", "--limit", "1", "--methods", "full,snapkv"]
    options = ["-t", "synthetic.tokens=100", "-t", "synthetic.families=spatial"]
    result = CliRunner().invoke(cli.app, [*args, "--budgets", "0.2", *options, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "records.rank0.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["full", "snapkv"]
    assert {r["task"] for r in records} == {"synthetic/spatial"}
    for record in records:
        assert record["image_input"] == "processor" and record["prediction"] in record["info"]["options"]
        assert record["score"] == float(record["prediction"] == record["reference"])
        assert set(record["metrics"]) == {"margin"} and record["in_average"]
