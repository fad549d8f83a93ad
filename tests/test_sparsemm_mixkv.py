"""SparseMM (head budgets from visual scores) and MixKV (importance mixed with diversity by head redundancy): their
budget and scoring rules on hand-made inputs, and the head statistics they read (modalkv.head_statistics)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from modalkv import CompressedCache, get_press
from modalkv.compat import CACHE_KWARG
from modalkv.head_statistics import CalibrationError, HeadStatistics, load_statistics, model_key, statistics_path
from modalkv.presses.base import PrefillInputs
from modalkv.presses.scoring import pooled_window_attention

LAYERS, KV_HEADS, GROUPS = 3, 2, 2


def statistics(visual=None, redundancy=None) -> HeadStatistics:
    visual = visual if visual is not None else torch.ones(LAYERS, KV_HEADS * GROUPS)
    redundancy = redundancy if redundancy is not None else torch.full((LAYERS, KV_HEADS), 0.5)
    return HeadStatistics("hand", LAYERS, KV_HEADS * GROUPS, KV_HEADS, redundancy.tolist(), visual.tolist(), 1, "hand")


def config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=LAYERS, num_attention_heads=KV_HEADS * GROUPS, num_key_value_heads=KV_HEADS)


def make_inputs(layer=0, seq=200, dim=8, seed=0, padding=0) -> PrefillInputs:
    gen = torch.Generator().manual_seed(seed)
    is_real = torch.ones(1, seq, dtype=torch.bool)
    is_real[:, :padding] = False
    return PrefillInputs(
        module=SimpleNamespace(layer_idx=layer, config=config()),
        layer_idx=layer,
        queries=torch.randn(1, KV_HEADS * GROUPS, seq, dim, generator=gen) * 3,
        keys=torch.randn(1, KV_HEADS, seq, dim, generator=gen),
        values=torch.randn(1, KV_HEADS, seq, dim, generator=gen),
        is_real=is_real,
        scaling=1 / math.sqrt(dim),
        state={},
    )


def loaded(press, stats: HeadStatistics):
    press._statistics = stats  # what attach() loads from the model's calibration file
    if hasattr(press, "press"):
        press.press._statistics = stats
    return press


def kept_per_head(press, layer: int, state: dict, **kwargs) -> list[int]:
    inputs = make_inputs(layer, **kwargs)
    inputs.state = state
    return press.select(inputs).lengths[0].tolist()


def test_sparsemm_spends_exactly_the_models_budget_and_gives_visual_heads_the_most():
    visual = torch.zeros(LAYERS, KV_HEADS * GROUPS)
    visual[1, 2] = 3.0  # layer 1, query heads 2-3 = KV head 1: the one visual head
    visual[2, 0] = 1.0
    press = loaded(get_press("sparsemm", budget=0.25), statistics(visual))
    state = {}
    lengths = [kept_per_head(press, layer, state) for layer in range(LAYERS)]
    assert sum(map(sum, lengths)) == LAYERS * KV_HEADS * 50  # 25% of 200 tokens per head, on average
    window, floor = 32, int((50 - 32) * 0.1)
    assert lengths[1][1] > lengths[2][0] > lengths[0][0] == window + floor
    # The authors' split: each head's share of the rest, in proportion to its score.
    rest = (50 - window - floor) * LAYERS * KV_HEADS
    assert abs(lengths[1][1] - (window + floor + rest * 3 / 4)) <= 1
    assert abs(lengths[2][0] - (window + floor + rest * 1 / 4)) <= 1


def test_sparsemm_passes_on_what_a_head_cannot_hold_and_keeps_the_window():
    visual = torch.zeros(LAYERS, KV_HEADS * GROUPS)
    visual[0, 0] = 1.0  # one head would get more than the prompt
    press = loaded(get_press("sparsemm", budget=0.5), statistics(visual))
    state, total = {}, 0
    for layer in range(LAYERS):
        inputs = make_inputs(layer)
        inputs.state = state
        selection = press.select(inputs)
        total += int(selection.lengths.sum())
        for head in range(KV_HEADS):
            kept = selection.indices[0, head, : selection.lengths[0, head]].tolist()
            assert set(range(200 - 32, 200)) <= set(kept)  # the inner SnapKV's 32-token window
        if layer == 0:
            assert selection.lengths[0, 0] == 200
    assert total == LAYERS * KV_HEADS * 100


def test_sparsemm_reads_visual_scores_and_refuses_a_text_calibration():
    text_only = HeadStatistics("text", LAYERS, 4, 2, torch.zeros(LAYERS, 2).tolist(), None, 1, "text")
    press = loaded(get_press("sparsemm", budget=0.2), text_only)
    with pytest.raises(CalibrationError, match="no visual-head scores"):
        press.select(make_inputs())


def test_sparsemm_warns_when_the_calibration_found_no_visual_head():
    """A library user who calibrates a model with no visual head (every score 0) is told that SparseMM splits evenly,
    as `modalkv calibrate` tells a CLI user; nonzero scores say nothing."""
    even = loaded(get_press("sparsemm", budget=0.25), statistics(torch.zeros(LAYERS, KV_HEADS * GROUPS)))
    with pytest.warns(UserWarning, match="every visual score in the calibration of hand is 0"):
        lengths = kept_per_head(even, 0, {})
    assert len(set(lengths)) == 1  # an even split
    assert statistics(torch.zeros(LAYERS, KV_HEADS * GROUPS)).finds_no_visual_head()
    assert not statistics().finds_no_visual_head()
    assert not HeadStatistics(
        "text", LAYERS, 4, 2, torch.zeros(LAYERS, 2).tolist(), None, 1, "t"
    ).finds_no_visual_head()


def test_mixkv_is_importance_for_unredundant_heads_and_diversity_for_redundant_ones():
    inputs = make_inputs(seq=120)
    window = 32
    scored = torch.arange(120) < 120 - window
    attention = pooled_window_attention(inputs, window, 5, "avg")[0]
    none = loaded(get_press("mixkv", budget=0.3), statistics(redundancy=torch.zeros(LAYERS, KV_HEADS))).score(inputs)
    full = loaded(get_press("mixkv", budget=0.3), statistics(redundancy=torch.ones(LAYERS, KV_HEADS))).score(inputs)
    keys = torch.nn.functional.normalize(inputs.keys[0], dim=-1)
    similarity = keys @ keys.mean(1, keepdim=True).transpose(-1, -2)  # [H, S, 1]
    for head in range(KV_HEADS):
        norms = inputs.values[0, head].norm(dim=-1)
        # r = 0: attention plus the value norm on the attention's scale, so the largest value norm adds the most
        extra = none[0, head] - attention[head]
        assert torch.corrcoef(torch.stack([extra[scored], norms[scored]]))[0, 1] > 0.999
        assert float(extra[scored].mean()) == pytest.approx(float(attention[head][scored].mean()), rel=1e-4)
        # r = 1: diversity alone, largest for the key least like the mean key
        diversity = full[0, head][scored]
        assert int(diversity.argmax()) == int(similarity[head, :, 0][scored].argmin())


def test_mixkv_and_sparsemm_leave_padding_out():
    press = loaded(get_press("sparsemm:mixkv", budget=0.3), statistics())
    state = {}
    for layer in range(LAYERS):
        inputs = make_inputs(layer, padding=20)
        inputs.state = state
        selection = press.select(inputs)
        for head in range(KV_HEADS):
            assert min(selection.indices[0, head, : selection.lengths[0, head]].tolist()) >= 20


def test_statistics_are_saved_found_checked_and_missing_ones_name_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALKV_CACHE_DIR", str(tmp_path))
    model_config = config()
    with pytest.raises(CalibrationError, match="modalkv calibrate --model llama"):
        load_statistics(model_config)
    saved = statistics().save(statistics_path(model_config))
    assert saved == tmp_path / "calibration" / "llama.json"
    assert load_statistics(model_config) == statistics()
    other = LlamaConfig(num_hidden_layers=LAYERS + 1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CalibrationError, match="not on this model"):
        load_statistics(other, saved)


def test_the_key_of_an_embedded_model_is_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALKV_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "smollm2-135m-float32"
    folder.mkdir()
    assert model_key(LlamaConfig(name_or_path=str(folder))) == "smollm2-135m"
    assert model_key(LlamaConfig(name_or_path="org/some-vlm")) == "org--some-vlm"


@pytest.mark.real_calibration
def test_a_compressed_prefill_without_calibration_names_the_command(model, prompt, tmp_path, monkeypatch):
    monkeypatch.setenv("MODALKV_CACHE_DIR", str(tmp_path))
    press = get_press("mixkv", budget=0.5)
    with pytest.raises(CalibrationError, match="modalkv calibrate"), press.attach(model):
        model(prompt, **{CACHE_KWARG: CompressedCache(press)})
    with press.attach(model):  # a budget that keeps everything never needs it
        model(prompt, **{CACHE_KWARG: CompressedCache(get_press("mixkv", budget=1.0))})


@pytest.mark.real_calibration
def test_a_calibration_file_is_read_when_attached(model, prompt, tmp_path):
    path = tmp_path / "stats.json"
    text = model.config
    redundancy = torch.zeros(text.num_hidden_layers, text.num_key_value_heads)
    visual = torch.ones(text.num_hidden_layers, text.num_attention_heads)
    HeadStatistics(
        "tiny",
        *redundancy.shape[:1],
        text.num_attention_heads,
        redundancy.shape[1],
        redundancy.tolist(),
        visual.tolist(),
        1,
        "test",
    ).save(path)
    press = get_press("sparsemm:mixkv", budget=0.5, calibration=str(path))
    cache = CompressedCache(press)
    with press.attach(model):
        model(prompt, **{CACHE_KWARG: cache})
    assert press._statistics is None  # read for the block only
    kept = sum(int(layer.kept_lengths().sum()) for layer in cache.layers)
    assert kept == text.num_hidden_layers * text.num_key_value_heads * 24
