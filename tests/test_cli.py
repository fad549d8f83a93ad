"""The `modalkv` command line through typer's CliRunner, on the real embedded model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import METHODS
from typer.testing import CliRunner

from modalkv import CompressedCache, cli, get_press, load_model
from modalkv.eval.passkey import passkey_example
from modalkv.modality import IMAGE, TEXT
from modalkv.multimodal import encode_multimodal
from modalkv.vlm.images import PHOTOS, load_photo

# click >= 8.2 always captures stderr apart: result.stdout holds only what the command prints (the JSON),
# result.stderr the error messages, result.output both interleaved.
runner = CliRunner()

JSON_KEYS = {
    "text",
    "method",
    "budget",
    "prompt_tokens",
    "generated_tokens",
    "cache_bytes",
    "full_cache_bytes",
    "global_cache_bytes",
    "global_full_cache_bytes",
    "allocated_bytes",
    "memory_bytes",
    "prefill_seconds",
    "decode_ms_per_token",
    "compiled",
    "shared_prefill",
    "batch",
}

_loaded: dict = {}


def _load_once(name_or_path=cli.DEFAULT_MODEL, **kwargs):
    """The real load_model, memoised so that each CLI call does not reload the weights."""
    key = (name_or_path, *sorted(kwargs.items()))
    if key not in _loaded:
        _loaded[key] = load_model(name_or_path, **kwargs)
    return _loaded[key]


@pytest.fixture(scope="module", autouse=True)
def _memoised_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "load_model", _load_once)
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return _load_once()[1]


@pytest.fixture(scope="module")
def passkey_file(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "passkey.txt"
    path.write_text(passkey_example(tokenizer, 600, depth=0.5, seed=3).text, encoding="utf-8")
    return path


def invoke(*args: str):
    return runner.invoke(cli.app, [str(arg) for arg in args])


def message(result) -> str:
    """stderr with rich's panel borders and line wrapping removed."""
    text = result.stderr
    for char in "│╭╮╰╯─":
        text = text.replace(char, " ")
    return " ".join(text.split())


def assert_fails(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a handled error, not a traceback
    for fragment in fragments:
        assert fragment in message(result), result.output


def kept_positions(passkey_file: Path, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "kept.json"
    result = invoke("inspect", "--dump-kept", out, "--prompt-file", passkey_file, "--raw", *args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def snapkv_kept(passkey_file, tmp_path_factory) -> dict:
    return kept_positions(passkey_file, tmp_path_factory.mktemp("kept"), "--method", "snapkv", "--budget", "0.2")


# ---------------------------------------------------------------- generate


@pytest.mark.slow
def test_generate_json_snapkv(passkey_file: Path, tokenizer) -> None:
    result = invoke(
        "generate", "--json", "--method", "snapkv", "--budget", "0.2", "--raw",
        "--prompt-file", passkey_file, "--max-new-tokens", "6",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    record = json.loads(lines[0])
    assert set(record) == JSON_KEYS
    raw_length = len(tokenizer(passkey_file.read_text(encoding="utf-8"), add_special_tokens=False).input_ids)
    assert 550 <= raw_length <= 650
    assert record["prompt_tokens"] == raw_length
    assert record["method"] == "snapkv"
    assert record["budget"] == 0.2
    assert 1 <= record["generated_tokens"] <= 6
    assert isinstance(record["text"], str)
    assert 0 < record["cache_bytes"] / record["full_cache_bytes"] <= 0.22
    assert record["prefill_seconds"] > 0
    assert math.isfinite(record["decode_ms_per_token"]) or record["generated_tokens"] < 2


@pytest.mark.slow
def test_raw_skips_the_chat_template(tokenizer) -> None:
    text = "What is the capital of France?"
    counts = {}
    for flag in ("--raw", "--no-raw"):
        result = invoke("generate", "--json", "--prompt", text, "--max-new-tokens", "1", flag)
        assert result.exit_code == 0, result.output
        counts[flag] = json.loads(result.stdout)["prompt_tokens"]
    assert counts["--raw"] == len(tokenizer(text, add_special_tokens=False).input_ids)
    assert counts["--no-raw"] > counts["--raw"]


@pytest.mark.slow
def test_method_params_are_passed(passkey_file: Path, tmp_path: Path, snapkv_kept: dict) -> None:
    args = ("--method", "snapkv", "--budget", "0.2", "-p", "pooling=max", "-p", "kernel_size=7")
    record = kept_positions(passkey_file, tmp_path, *args)
    assert record["prompt_tokens"] == snapkv_kept["prompt_tokens"]
    assert record["layers"] != snapkv_kept["layers"]  # max pooling over 7 chooses other tokens than avg over 5
    result = invoke("generate", "--prompt", "Hi", "--max-new-tokens", "1", *args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("param", "fragments"),
    [
        ("nonsense=1", ["snapkv does not take that parameter", "nonsense"]),
        ("novalue", ["KEY=VALUE", "'novalue'"]),
        ("=1", ["KEY=VALUE"]),
        ("pooling=median", ["pooling must be 'avg' or 'max'", "median"]),
        ("kernel_size=4", ["kernel_size must be a positive odd number", "4"]),
        ("kernel_size=7.0", ["kernel_size must be int", "7.0"]),
        ("window_size=abc", ["window_size must be int", "'abc'"]),
    ],
)
def test_bad_method_params(param: str, fragments: list[str]) -> None:
    result = invoke("generate", "--method", "snapkv", "--budget", "0.2", "-p", param, "--prompt", "Hi")
    assert_fails(result, *fragments)


# ---------------------------------------------------------------- inspect


@pytest.mark.slow
def test_inspect_snapkv_dump(snapkv_kept: dict) -> None:
    assert snapkv_kept["method"] == "snapkv"
    assert snapkv_kept["budget"] == 0.2
    n = snapkv_kept["prompt_tokens"]
    assert 550 <= n <= 650
    assert snapkv_kept["modality"] == [TEXT] * n  # a text prompt: every token is text
    layers = snapkv_kept["layers"]
    assert len(layers) == 30
    for heads in layers:
        assert len(heads) == 3
        for kept in heads:
            assert len(kept) == math.floor(0.2 * n)
            assert kept == sorted(set(kept))
            assert kept[0] >= 0 and kept[-1] < n
            assert kept[-1] == n - 1  # the observation window is always kept
    assert len({tuple(kept) for heads in layers for kept in heads}) > 1  # heads choose differently


@pytest.mark.slow
def test_inspect_full_keeps_everything(passkey_file: Path, tmp_path: Path) -> None:
    record = kept_positions(passkey_file, tmp_path, "--method", "full")
    assert record["method"] == "full"
    assert record["budget"] == 1.0
    everything = list(range(record["prompt_tokens"]))
    assert len(record["layers"]) == 30
    assert all(heads == [everything] * 3 for heads in record["layers"])


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name in METHODS if name not in ("full", "lookm")])
def test_inspect_dumps_every_method(passkey_file: Path, tmp_path: Path, method: str) -> None:
    record = kept_positions(passkey_file, tmp_path, "--method", method, "--budget", "0.2")
    tokens = record["prompt_tokens"]
    assert record["method"] == method and len(record["layers"]) == 30
    heads = [head for layer in record["layers"] for head in layer]
    assert all(head == sorted(set(head)) and head[0] >= 0 and head[-1] < tokens for head in heads)
    # Every method keeps the same total: 20% of the prompt per head, on average over layers and heads; ChunkKV keeps
    # whole chunks, 20% of them (the last chunk may be shorter), the same in every head of a layer.
    if method.startswith("chunkkv"):
        chunks = int(0.2 * math.ceil(tokens / 20))
        for layer in record["layers"]:
            assert all(head == layer[0] for head in layer) and (chunks - 1) * 20 < len(layer[0]) <= chunks * 20
    else:
        assert sum(map(len, heads)) == 30 * 3 * int(0.2 * tokens)


@pytest.mark.slow
def test_inspect_lookm_keeps_every_text_token(passkey_file: Path, tmp_path: Path) -> None:
    """LOOK-M's text prior keeps every text token by definition: on a text-only prompt it evicts nothing."""
    record = kept_positions(passkey_file, tmp_path, "--method", "lookm", "--budget", "0.2")
    everything = list(range(record["prompt_tokens"]))
    assert all(heads == [everything] * 3 for heads in record["layers"])


@pytest.mark.slow
def test_heads_draws_madakv_preferences_and_saves_the_numbers(tmp_path: Path, tokenizer) -> None:
    text = passkey_example(tokenizer, 400, depth=0.5, seed=5).text
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(text, encoding="utf-8")
    tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    modality = tmp_path / "modality.json"
    modality.write_text(json.dumps([1 if 50 <= i < 250 else 0 for i in range(tokens)]))
    out = tmp_path / "figures" / "heads.png"  # a folder that does not exist yet
    result = invoke("heads", "--prompt-file", prompt, "--raw", "--modality-file", modality, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["visual_preference"]) == 30 and len(record["visual_preference"][0]) == 3
    assert all(0 < p < 1 for layer in record["visual_preference"] for p in layer)  # both modalities drew attention
    assert sum(map(sum, record["kept_per_head"])) == 30 * 3 * int(0.2 * tokens)  # HCC keeps exactly the budget
    modality.write_text(json.dumps([0] * (tokens - 1)))
    assert_fails(
        invoke("heads", "--prompt-file", prompt, "--raw", "--modality-file", modality, "--out", out),
        f"the modality map has shape (1, {tokens - 1}) but the prompt is 1 x {tokens} tokens",
    )
    modality.write_text("[0, 1, ")
    assert_fails(
        invoke("heads", "--prompt-file", prompt, "--raw", "--modality-file", modality, "--out", out),
        "cannot read the modality file",
    )


@pytest.mark.slow
def test_generate_reads_a_modality_file(tmp_path: Path, tokenizer) -> None:
    """LOOK-M keeps every text token: with no map it keeps everything, with image tokens it evicts some of them."""
    text = "Describe the picture. " * 40
    tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    modality = tmp_path / "modality.json"
    modality.write_text(json.dumps([1 if i < 100 else 0 for i in range(tokens)]))
    args = ["generate", "--raw", "--prompt", text, "--method", "lookm", "--budget", "0.2", "--max-new-tokens", "2"]
    without = json.loads(invoke(*args, "--json").stdout)
    with_map = json.loads(invoke(*args, "--json", "--modality-file", modality).stdout)
    assert without["cache_bytes"] == without["full_cache_bytes"]
    assert with_map["cache_bytes"] < 0.5 * with_map["full_cache_bytes"]


def test_methods_lists_every_method() -> None:
    result = invoke("methods")
    assert result.exit_code == 0
    for name in [*cli.PRESSES, *(f"{wrapper}:<method>" for wrapper in cli.WRAPPERS)]:
        assert name in result.stdout
    assert "window_size=64" in result.stdout and "num_sinks=4" in result.stdout


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("budget", "fragments"),
    [
        ("0", ["budget must be a ratio in (0, 1]", "got 0"]),
        ("-1", ["budget must be a ratio in (0, 1]", "got -1"]),
        ("1.5", ["budget must be a ratio in (0, 1]", "got 1.5"]),
        ("abc", ["budget must be a number", "'abc'"]),
    ],
)
def test_bad_budget(budget: str, fragments: list[str]) -> None:
    result = invoke("generate", "--method", "snapkv", "--budget", budget, "--prompt", "Hi")
    assert_fails(result, *fragments)


def test_unknown_method() -> None:
    result = invoke("generate", "--method", "h2o_magic", "--prompt", "Hi")
    assert_fails(result, "unknown method 'h2o_magic'", "snapkv", "streaming_llm")


def test_missing_prompt_file(tmp_path: Path) -> None:
    result = invoke("generate", "--prompt-file", tmp_path / "absent.txt")
    assert_fails(result, "prompt file not found", "absent.txt")


def test_prompt_file_must_be_utf8_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00")
    assert_fails(invoke("generate", "--prompt-file", bad), "is not UTF-8 text")
    assert_fails(invoke("generate", "--prompt-file", tmp_path), "not a file")


@pytest.mark.slow
def test_json_with_one_new_token_is_valid_json() -> None:
    result = invoke("generate", "--prompt", "Hi", "--max-new-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert record["generated_tokens"] == 1 and record["decode_ms_per_token"] is None


@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_prompt_and_prompt_file_are_exclusive(command: str, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Hi", encoding="utf-8")
    dump = ["--dump-kept", tmp_path / "kept.json"] if command == "inspect" else []
    both = invoke(command, *dump, "--prompt", "Hi", "--prompt-file", prompt_file)
    assert_fails(both, "exactly one of --prompt and --prompt-file")
    neither = invoke(command, *dump)
    assert_fails(neither, "exactly one of --prompt and --prompt-file")
    assert not (tmp_path / "kept.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("raw", ["--raw", "--no-raw"])
def test_empty_prompt(raw: str) -> None:
    result = invoke("generate", "--prompt", " \n\t ", raw)
    assert_fails(result, "the prompt is empty")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "inspect"])
def test_prompt_longer_than_the_model(command: str, tmp_path: Path, tokenizer) -> None:
    text = "apple " * 9000
    assert len(tokenizer(text, add_special_tokens=False).input_ids) > 8192
    prompt_file = tmp_path / "long.txt"
    prompt_file.write_text(text, encoding="utf-8")
    dump = ["--dump-kept", tmp_path / "kept.json"] if command == "inspect" else []
    result = invoke(command, *dump, "--prompt-file", prompt_file, "--raw")
    assert_fails(result, "at most 8192 positions")
    assert not (tmp_path / "kept.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "retentivekv"])
def test_generate_answers_from_images_with_the_mini_vlm(method: str) -> None:
    from modalkv.vlm.images import PHOTOS

    budget = "1.0" if method == "full" else "0.5"
    args = ["--model", "mini-vlm", "--method", method, "--budget", budget, "--max-new-tokens", "8", "--json"]
    result = invoke("generate", "--image", PHOTOS["cat"].path, "--prompt", "What is shown in the image?", *args)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert PHOTOS["cat"].is_named_in(record["text"]), record["text"]
    assert record["prompt_tokens"] > 49  # the image's 7 x 7 patches are in the prompt
    if method == "retentivekv":
        assert record["cache_bytes"] < 0.55 * record["full_cache_bytes"] and record["memory_bytes"] > 0


# ---------------------------------------------------------------- images: inspect and heads on the mini-VLM

QUESTION = "What is shown in these images?"
TWO_PHOTOS = ("cat", "coffee")
COMPARE_KEPT = Path(__file__).resolve().parents[1] / "tools" / "compare_kept.py"


def image_args(*names: str) -> list:
    return [arg for name in names for arg in ("--image", PHOTOS[name].path)]


@pytest.fixture(scope="module")
def mini_vlm():
    return _load_once("mini-vlm", dtype=torch.float32)  # the same memoised copy the commands load


@pytest.fixture(scope="module")
def photo_inputs(mini_vlm) -> dict:
    """The two photos and the question through the library's own encoding (what `generate --image` gives)."""
    model, processor = mini_vlm
    return encode_multimodal(model, processor, QUESTION, [load_photo(name) for name in TWO_PHOTOS])


@pytest.mark.slow
def test_inspect_with_images_records_which_visual_and_text_tokens_are_kept(
    tmp_path: Path, mini_vlm, photo_inputs
) -> None:
    out = tmp_path / "kept.json"
    args = ["--model", "mini-vlm", *image_args(*TWO_PHOTOS), "--prompt", QUESTION, "--method", "madakv"]
    result = invoke("inspect", "--dump-kept", out, *args, "--budget", "0.2")
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert set(record) == {"method", "budget", "prompt_tokens", "layers", "modality"}
    tokens = record["prompt_tokens"]
    assert tokens == photo_inputs["input_ids"].shape[1]  # the prompt generate --image encodes
    assert record["modality"] == photo_inputs["modality"][0].tolist()
    assert record["modality"].count(IMAGE) == 2 * 49 and record["modality"].count(TEXT) == tokens - 98
    # The kept sets are the library's own choice on those inputs (images, maps and patch grids all passed).
    model, _ = mini_vlm
    press = get_press("madakv", budget=0.2)
    cache = CompressedCache(press)
    press.generate(model, **photo_inputs, past_key_values=cache, max_new_tokens=1)  # one new token: prefill only
    assert record["layers"] == [layer[0] for layer in cache.kept_positions()]
    heads = [head for layer in record["layers"] for head in layer]
    assert sum(map(len, heads)) == 30 * 3 * int(0.2 * tokens)  # MadaKV keeps exactly the budget
    kept_modality = [record["modality"][position] for head in heads for position in head]
    assert 0 < kept_modality.count(IMAGE) < 30 * 3 * 98  # some image tokens kept, most evicted
    assert kept_modality.count(TEXT) > 0
    # generate --image encodes the same prompt
    result = invoke("generate", *args, "--budget", "0.2", "--max-new-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == tokens
    # tools/compare_kept.py reads the new record, beside one in the old schema (tools/kvpress_reference.py's)
    old_schema = tmp_path / "old.json"
    old_schema.write_text(json.dumps({key: value for key, value in record.items() if key != "modality"}))
    compared = subprocess.run(
        [sys.executable, COMPARE_KEPT, out, old_schema, "--min-overlap", "1"], capture_output=True, text=True
    )
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "(layer, head) sets identical: 90/90" in compared.stdout


@pytest.mark.slow
def test_heads_with_images_draws_preferences_on_a_multimodal_prompt(tmp_path: Path, photo_inputs) -> None:
    out = tmp_path / "heads.png"
    result = invoke("heads", "--model", "mini-vlm", *image_args(*TWO_PHOTOS), "--prompt", QUESTION, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.with_suffix(".json").read_text())
    tokens = record["prompt_tokens"]
    assert tokens == photo_inputs["input_ids"].shape[1]
    assert record["modality"] == photo_inputs["modality"][0].tolist()
    assert len(record["visual_preference"]) == 30 and all(len(layer) == 3 for layer in record["visual_preference"])
    assert all(0 < p < 1 for layer in record["visual_preference"] for p in layer)  # both modalities drew attention
    assert sum(map(sum, record["kept_per_head"])) == 30 * 3 * int(0.2 * tokens)  # HCC keeps exactly the budget


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "inspect", "heads"])
def test_images_need_a_vision_language_model_and_existing_files(command: str, tmp_path: Path) -> None:
    output = {"inspect": ["--dump-kept", tmp_path / "kept.json"], "heads": ["--out", tmp_path / "heads.png"]}
    args = [command, *output.get(command, []), "--prompt", "What is it?"]
    result = invoke(*args, *image_args("cat"))  # the embedded SmolLM2
    assert_fails(result, "smollm2-135m is a text-only model (it has no image processor)", "--image needs a vision")
    result = invoke(*args, "--model", "mini-vlm", "--image", tmp_path / "absent.jpg")
    assert_fails(result, "image file not found", "absent.jpg")
    assert not list(tmp_path.iterdir())  # nothing written
