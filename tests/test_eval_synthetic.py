"""The synthetic multimodal suite: examples from a seed, sized in tokens, one checkable answer, the asked-about picture
where each family puts it, and one `modalkv eval` run on the mini-VLM. Loads the mini-VLM once (~10 s)."""

import json

import pytest
from typer.testing import CliRunner

from modalkv import cli, load_model
from modalkv.eval.synthetic import FAMILIES, SyntheticTask
from modalkv.eval.tasks import build_task, encode_example
from modalkv.vlm.images import PHOTOS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vlm():
    return load_model("mini-vlm")


def test_same_seed_same_examples_other_seed_other_examples(vlm):
    _, processor = vlm
    first, failures = SyntheticTask(samples=3).load(processor)
    again, _ = SyntheticTask(samples=3).load(processor)
    other, _ = SyntheticTask(samples=3, seed=1).load(processor)
    assert failures == [] and first == again and first != other
    assert [e.task for e in first] == [f"synthetic/{f}" for f in FAMILIES for _ in range(3)]


@pytest.mark.parametrize("tokens", [300, 1024])
def test_prompts_hold_about_the_target_token_count(vlm, tokens):
    model, processor = vlm
    for example in SyntheticTask(tokens=tokens, samples=1).load(processor)[0]:
        inputs, _, how = encode_example(model, processor, example)
        assert how == "processor" and abs(inputs["input_ids"].shape[1] - tokens) <= 30, example.id


def test_answer_is_checkable_and_the_picture_sits_where_the_family_says(vlm):
    _, processor = vlm
    task = SyntheticTask(samples=4, tokens=1024)
    for example in task.load(processor)[0]:
        index, images = example.info["target_index"], example.images
        assert example.reference in PHOTOS and example.prompt.endswith(f"image {index + 1}?")
        assert task.score(f"It is {PHOTOS[example.reference].words[0]}.", example) == 1.0
        assert task.score(f"It is {PHOTOS[example.info['distractor']].words[0]}.", example) == 0.0
        others = [image for i, image in enumerate(images) if i != index]
        assert all(image.name.startswith(example.info["distractor"]) for image in others)
        if example.info["family"] == "deferred":
            assert index < len(images) / 3 and images[index] == PHOTOS[example.reference].path
        if example.info["family"] == "spatial":
            assert images[index].name.startswith(f"region-{example.reference}-4-")
        if example.info["family"] == "distractor":
            assert index > 0 and images[index] == PHOTOS[example.reference].path


def test_text_only_model_and_bad_options_are_refused(vlm):
    _, processor = vlm
    with pytest.raises(ValueError, match="--model mini-vlm"):
        SyntheticTask().load(processor.tokenizer)
    with pytest.raises(ValueError, match="families must be among"):
        build_task("synthetic", {"families": "deferred,nope"})


def test_eval_runs_the_suite_on_the_mini_vlm(vlm, tmp_path):
    args = ["eval", "--model", "mini-vlm", "--tasks", "synthetic", "--limit", "1", "--methods", "full,snapkv"]
    options = ["-t", "synthetic.tokens=200", "-t", "synthetic.max_new_tokens=3", "-t", "synthetic.families=spatial"]
    result = CliRunner().invoke(cli.app, [*args, "--budgets", "0.2", *options, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "records.rank0.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["full", "snapkv"]
    assert {r["task"] for r in records} == {"synthetic/spatial"} and all(
        r["image_input"] == "processor" for r in records
    )
