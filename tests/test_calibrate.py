"""`modalkv calibrate`: the statistics it records (SparseMM's visual scores, MixKV's key redundancy), the picture
region it scores against, and SparseMM / MixKV running on the mini-VLM from a real calibration."""

import math
from types import SimpleNamespace

import pytest
import torch
from architectures import build
from transformers import LlamaConfig
from typer.testing import CliRunner

from modalkv import cli, get_press
from modalkv.calibrate import HeadRecorder, _region, calibrate
from modalkv.eval.synthetic import SyntheticTask
from modalkv.head_statistics import load_statistics
from modalkv.modality import IMAGE, TEXT, patches_from_grids
from modalkv.presses.base import PrefillInputs


def recorder_inputs(keys: torch.Tensor, queries: torch.Tensor) -> PrefillInputs:
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=queries.shape[1], num_key_value_heads=keys.shape[1])
    return PrefillInputs(
        module=SimpleNamespace(layer_idx=0, config=config),
        layer_idx=0,
        queries=queries,
        keys=keys,
        values=torch.zeros_like(keys),
        is_real=torch.ones(1, keys.shape[2], dtype=torch.bool),
        scaling=1 / math.sqrt(keys.shape[-1]),
    )


def test_redundancy_is_the_mean_pairwise_cosine_similarity_of_a_heads_keys():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 10, 4, generator=gen)
    keys[0, 0] = keys[0, 0, :1] * torch.arange(1, 11.0)[:, None]  # head 0: ten keys along one direction
    recorder = HeadRecorder(prompt_length=10)
    recorder.select(recorder_inputs(keys, torch.randn(1, 2, 10, 4, generator=gen)))
    unit = torch.nn.functional.normalize(keys[0, 1], dim=-1)
    pairs = [float(unit[i] @ unit[j]) for i in range(10) for j in range(10) if i != j]
    assert recorder.redundancy[0][0] == pytest.approx(1.0, abs=1e-5)
    assert recorder.redundancy[0][1] == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)


def test_a_head_scores_when_its_strongest_attention_lands_on_the_named_region():
    keys = torch.zeros(1, 1, 12, 2)
    keys[0, 0, :, 1] = 1.0
    keys[0, 0, 4, 0] = 5.0  # token 4 lies in the region; head 0's query points at it, head 1's away from it
    queries = torch.zeros(1, 2, 12, 2)
    queries[0, 0, :, 0] = 1.0
    queries[0, 1, :, 1] = 1.0
    region = torch.zeros(12, dtype=torch.bool)
    region[3:7] = True
    recorder = HeadRecorder(prompt_length=10, named=[9, 10], region=region)
    recorder.select(recorder_inputs(keys, queries))
    assert recorder.visual[0][0] == pytest.approx(2 / 4)  # two named tokens, each 1 / (4 region tokens)
    assert recorder.visual[0][1] == 0


@pytest.mark.parametrize("side", [7, 14])
def test_the_named_photo_is_its_patches_on_any_grid(side):
    modality = torch.tensor([[TEXT] + [IMAGE] * (2 * side * side) + [TEXT]])
    patches = patches_from_grids(modality, [[(side, side), (side, side)]])
    region = _region(patches, (1, 2, 3))  # picture 1, photo's top-left at row 2, column 3 of the 7 x 7 canvas
    scale = side // 7
    image, row, col = patches[0, region].unbind(-1)
    assert int(region.sum()) == (4 * scale) ** 2
    assert set(image.tolist()) == {1}
    assert set(row.tolist()) == set(range(2 * scale, 6 * scale)) and set(col.tolist()) == set(
        range(3 * scale, 7 * scale)
    )


def test_calibrate_a_tiny_vision_language_model_through_its_processor():
    model, processor = build("llava")
    statistics = calibrate(model, processor, examples=2, pictures=2)
    config = model.config.get_text_config()
    assert statistics.num_layers == config.num_hidden_layers and statistics.examples == 2
    assert torch.tensor(statistics.visual).shape == (config.num_hidden_layers, config.num_attention_heads)
    redundancy = torch.tensor(statistics.redundancy)
    assert redundancy.shape == (config.num_hidden_layers, config.num_key_value_heads)
    assert bool(((redundancy > -1) & (redundancy < 1)).all()) and bool((torch.tensor(statistics.visual) >= 0).all())


@pytest.mark.slow
@pytest.mark.real_calibration
def test_sparsemm_and_mixkv_run_on_the_mini_vlm_after_modalkv_calibrate(tmp_path):
    path = tmp_path / "mini-vlm.json"
    args = ["calibrate", "--model", "mini-vlm", "--examples", "8", "--pictures", "4", "--out", str(path)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    from modalkv.models import load_model

    model, processor = load_model("mini-vlm")
    statistics = load_statistics(model.config, path)
    visual = torch.tensor(statistics.visual)
    assert (
        statistics.model == "mini-vlm"
        and visual.sum() > 0
        and "every visual score" not in " ".join(result.output.split())
    )
    assert (visual > 0).float().mean() < 0.5  # a minority of heads look at the photo they name
    task = SyntheticTask(tokens=300, samples=1, families=("spatial",))
    examples, _ = task.load(processor)
    for method in ("sparsemm", "mixkv", "sparsemm:mixkv"):
        press = get_press(method, budget=0.5, calibration=str(path))
        outcome = task.evaluate(model, processor, press, examples[0])
        assert 0.45 < outcome.cache_bytes / outcome.full_cache_bytes < 0.6
