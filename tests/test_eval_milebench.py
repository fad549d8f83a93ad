"""The MileBench loader on a fixture in the real on-disk format: prompts, truncation, metrics per dataset, failures."""

import json
from pathlib import Path

import pytest
from eval_tiny import tiny_tokenizer

from modalkv.eval.milebench import MileBenchTask, build_prompt
from modalkv.eval.tasks import IMAGE_PLACEHOLDER as P
from modalkv.eval.tasks import IMAGE_STANDIN, encode_example

FIXTURE = Path(__file__).parent / "fixtures" / "milebench"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def loaded(tokenizer):
    examples, failures = MileBenchTask(path=FIXTURE, max_new_tokens=4).load(tokenizer)
    return {(e.task.removeprefix("milebench/"), e.id): e for e in examples}, failures


def test_every_dataset_is_a_column_and_failures_name_their_file(loaded):
    examples, failures = loaded
    assert sorted(examples) == [
        ("ActionSequence", "0"),
        ("ActionSequence", "2"),
        ("CLEVR-Change", "0"),
        ("GPR1200", "0"),
        ("MMCoQA", "0"),
        ("TextNeedleInAHaystack", "0"),
    ]
    by_task = {f.task: f for f in failures}
    assert len(failures) == 2
    assert "Broken.json is not valid JSON" in by_task["milebench/Broken"].error
    missing = by_task["milebench/ActionSequence"]
    assert missing.item == "1" and "image file not found" in missing.error and "seq1/1.png" in missing.error


def test_multiple_choice_prompt(loaded):
    example = loaded[0][("ActionSequence", "0")]
    instruction = "Given a sequence of video frames, answer the question about the actions in them."
    assert example.prompt == (
        f"{instruction}\n{P}\n{P}\n{P}Question: What did the person do first?\nChoice list: \n"
        "A. Opened the door.\nB. Took the cup.\nC. Sat on the sofa.\nD. Closed the window.\nYour answer is: "
    )  # <ImageHere><ImageHere> gets newlines as the official LLaVA worker does
    assert [p.name for p in example.images] == ["0.png", "1.png", "2.png"] and all(p.is_file() for p in example.images)
    assert example.info["metric"] == "multiple_choice" and example.chat and example.max_new_tokens == 4


def test_gpr1200_lists_options_without_letters_and_tables_are_images(loaded):
    examples = loaded[0]
    assert examples[("GPR1200", "0")].prompt.endswith("Choice list: \nImage 2\nImage 3\nYour answer is: ")
    assert examples[("MMCoQA", "0")].prompt.count(P) == 1 and "{table#1}" not in examples[("MMCoQA", "0")].prompt


def test_each_dataset_gets_its_own_metric(loaded):
    examples = loaded[0]
    task = MileBenchTask(path=FIXTURE)
    mc, needle = examples[("ActionSequence", "0")], examples[("TextNeedleInAHaystack", "0")]
    assert task.score("B", mc) == 1.0 and task.score("A. Opened the door.", mc) == 0.0
    assert task.score("The word is rhubarb.", needle) == 1.0 and task.score("rhubarbs", needle) == 0.0
    coqa, clevr = examples[("MMCoQA", "0")], examples[("CLEVR-Change", "0")]
    assert task.score("in 1998 i think", coqa) == 1.0
    assert task.score("the gray cube became blue", clevr) == pytest.approx(1.0)
    assert 0 < task.score("the cube became red", clevr) < 1


def test_truncation_walks_from_the_end_and_keeps_the_last_images(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    instruction, context = "Look.", "AAA {image#1} BBB {image#2} Question?"
    full, kept = build_prompt(tokenizer, instruction, context, ["i1", "i2"], 1000, 5)
    assert full == f"Look.\nAAA {P} BBB {P} Question?" and kept == ["i1", "i2"]
    # Room for the question, image 2 and " BBB " but not image 1: image 1 and what precedes it are dropped.
    room = count(" Question?") + 5 + count(" BBB ") + 4
    cut, kept = build_prompt(tokenizer, instruction, context, ["i1", "i2"], count(instruction) + room, 5)
    assert cut == f"Look.\n BBB {P} Question?" and kept == ["i2"]
    # A single fragment longer than the room keeps its last tokens: the question survives.
    long = "filler words " * 50 + "What is the answer?"
    cut, kept = build_prompt(tokenizer, instruction, long, [], count(instruction) + 12, 5)
    assert cut.endswith("What is the answer?") and count(cut.removeprefix("Look.\n")) <= 12 and kept == []


def test_text_only_model_reads_a_stand_in_for_each_image(loaded, tokenizer):
    example = loaded[0][("ActionSequence", "0")]
    inputs, modality, image_input = encode_example(None, tokenizer, example)
    text = tokenizer.decode(inputs["input_ids"][0])
    assert image_input == "stand-in" and modality is None
    assert text.count(IMAGE_STANDIN) == 3 and P not in text


def test_single_dataset_folder_selection_and_bad_samples(tmp_path, tokenizer):
    examples, failures = MileBenchTask(path=FIXTURE / "GPR1200").load(tokenizer)
    assert [e.task for e in examples] == ["milebench/GPR1200"] and failures == []
    examples, _ = MileBenchTask(path=FIXTURE, datasets=("MMCoQA",)).load(tokenizer)
    assert [e.task for e in examples] == ["milebench/MMCoQA"]
    bad = tmp_path / "Odd"
    bad.mkdir()
    meta = {"question_type": "multi-choice", "task_instruction": ["x"]}
    sample = {"sample_id": 7, "task_instruction_id": 0, "response": "a"}
    (bad / "Odd.json").write_text(json.dumps({"meta_data": meta, "data": [sample]}))
    examples, failures = MileBenchTask(path=bad).load(tokenizer)
    assert examples == [] and failures[0].item == "7" and "task_instance" in failures[0].error
    assert str(bad / "Odd.json") in failures[0].error
    with pytest.raises(ValueError, match="MileBench folder not found"):
        MileBenchTask(path=tmp_path / "nowhere").load(tokenizer)


def test_a_vision_language_model_gets_the_images_in_place_through_its_processor():
    from architectures import build_llava

    from modalkv.modality import IMAGE
    from modalkv.presses import get_press

    model, processor = build_llava()  # 4 x 4 = 16 image tokens per image
    task = MileBenchTask(path=FIXTURE, datasets=("ActionSequence",), tokens_per_image=16, max_new_tokens=2)
    example = task.load(processor)[0][0]
    inputs, modality, image_input = encode_example(model, processor, example)
    assert image_input == "processor" and inputs["pixel_values"].shape[0] == 3
    image_columns = (modality[0] == IMAGE).nonzero().flatten().tolist()
    assert len(image_columns) == 3 * 16
    text = processor.tokenizer.decode(inputs["input_ids"][0, : image_columns[0]])
    assert "answer the question about the actions" in text  # the instruction comes first, then the frames
    assert "Question: What did the person do first?" not in text
    outcome = task.evaluate(model, processor, get_press("snapkv", budget=0.5, window_size=8), example)
    assert outcome.image_input == "processor" and outcome.cache_bytes < 0.6 * outcome.full_cache_bytes
