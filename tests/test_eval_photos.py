"""`--tasks photos`: the questions are drawn as documented (distinct photos, no ambiguous pair, targets rotating over
the positions), answers are scored by the photo's words or the first image number, and one run on the mini-VLM."""

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from modalkv import cli
from modalkv.eval.photos import AMBIGUOUS, IMAGE_COUNTS, PhotosTask, first_number
from modalkv.eval.tasks import IMAGE_PLACEHOLDER, build_task
from modalkv.vlm.images import PHOTOS


def test_questions_are_drawn_as_documented():
    examples, failures = PhotosTask(per_count=8).load(None)
    assert failures == [] and len(examples) == len(PHOTOS) + 2 * len(IMAGE_COUNTS) * 8
    columns = Counter(e.task for e in examples)
    assert columns["photos/single"] == len(PHOTOS) and all(columns[f"photos/which-{n}"] == 8 for n in IMAGE_COUNTS)
    for example in examples:
        shown = example.info["photos"]
        assert len(set(shown)) == len(shown) == len(example.images) == example.prompt.count(IMAGE_PLACEHOLDER)
        assert not any(pair <= set(shown) for pair in AMBIGUOUS)
        if example.task.startswith("photos/which"):
            assert PHOTOS[shown[int(example.reference) - 1]].subject in example.prompt
        elif example.task.startswith("photos/nth"):
            k = int(example.prompt.rsplit("image ", 1)[1].rstrip("?"))
            assert shown[k - 1] == example.reference
    for n in IMAGE_COUNTS:  # the targets rotate over the positions: counts at most 1 apart
        positions = Counter(e.reference for e in examples if e.task == f"photos/which-{n}")
        assert len(positions) == n and max(positions.values()) - min(positions.values()) <= 1
    again, _ = PhotosTask(per_count=8).load(None)
    other, _ = PhotosTask(per_count=8, seed=1).load(None)
    assert again == examples and other != examples


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="per_count must be at least 1"):
        build_task("photos", {"per_count": "0"})
    with pytest.raises(ValueError, match="samples must be at least 1"):
        build_task("deferred", {"samples": "0"})
    with pytest.raises(ValueError, match="tokens must be at least 100"):
        build_task("deferred", {"tokens": "20"})


@pytest.mark.parametrize(
    ("answer", "number"),
    [("2", 2), ("Image 3 shows a cat.", 3), ("The second image.", 2), ("It is the fifth one", 5), ("A cat.", None)],
)
def test_the_first_image_number_of_an_answer(answer, number):
    assert first_number(answer) == number


def test_scores():
    task = PhotosTask(per_count=2)
    examples, _ = task.load(None)
    which = next(e for e in examples if e.task == "photos/which-3")
    assert task.score(f"Image {which.reference}.", which) == 1.0
    assert task.score(f"Image {int(which.reference) % 3 + 1}.", which) == 0.0
    nth = next(e for e in examples if e.task == "photos/nth-2")
    assert task.score(f"It shows {PHOTOS[nth.reference].words[0]}.", nth) == 1.0
    assert task.score("It shows nothing I know.", nth) == 0.0


@pytest.mark.slow
def test_one_run_on_the_mini_vlm(tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--model", "mini-vlm", "--tasks", "photos", "-t", "photos.per_count=1", "-t"]
    args += ["photos.max_new_tokens=8", "--methods", "full", "--out", str(out)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == len(PHOTOS) + 2 * len(IMAGE_COUNTS)
    assert all(r["image_input"] == "processor" and r["images"] >= 1 for r in records)
    single = [r["prediction"] for r in records if r["task"] == "photos/single"]
    assert len(set(single)) >= 4  # the answers come from the photos: not one answer for all
