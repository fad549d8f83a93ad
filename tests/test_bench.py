"""The benchmark's bookkeeping: cells, ratios to the same-run baseline and floor, and the CLI's output."""

import json

import pytest
import torch
from test_cli import assert_fails, invoke

from modalkv import cli, get_press
from modalkv.bench import FLOOR_CONTEXT, decode_dispatch, measure, run_grid


def prompt_of_length(length: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(length))


def test_measure_counts_the_cache_it_holds(model):
    baseline = measure(model, None, prompt_of_length(40), decode_tokens=4)
    assert baseline.method == "dynamic_cache" and baseline.cache_bytes == baseline.full_cache_bytes
    assert baseline.full_cache_bytes == 2 * 2 * 44 * 2 * 16 * 4  # layers x KV heads x tokens x (K + V) x D x fp32
    run = measure(model, get_press("snapkv", budget=0.5, window_size=4), prompt_of_length(40), decode_tokens=4)
    assert run.cache_bytes == 2 * 2 * (20 + 4) * 2 * 16 * 4 and run.full_cache_bytes == baseline.full_cache_bytes
    assert run.prefill_seconds > 0 and run.decode_ms_per_token > 0


def test_grid_reports_ratios_to_the_baseline_and_floor_of_the_same_run(model):
    presses = [get_press("snapkv", budget=0.5, window_size=4), get_press("streaming_llm", budget=0.25)]
    seen = []
    rows = run_grid(model, prompt_of_length, presses, [40, 80], decode_tokens=4, repeats=2, on_run=seen.append)
    assert len(seen) == 2 * 2 * (2 + 2)  # contexts x repeats x (baseline, floor, 2 presses)
    assert {run.context for run in seen} == {40, 80, FLOOR_CONTEXT}
    assert [(row["method"], row["context"]) for row in rows] == [
        ("snapkv(window_size=4)", 40),
        ("streaming_llm", 40),
        ("snapkv(window_size=4)", 80),
        ("streaming_llm", 80),
    ]
    for row in rows:
        assert row["repeats"] == 2
        assert row["decode_speedup"] == pytest.approx(row["baseline_ms_per_token"] / row["decode_ms_per_token"])
        assert row["vs_floor"] == pytest.approx(row["decode_ms_per_token"] / row["floor_ms_per_token"])
    streaming_80 = rows[3]
    assert streaming_80["cache_ratio"] == pytest.approx(20 / (80 + 4))  # evicts while decoding: stays at 20 tokens


@pytest.mark.parametrize("press", [None, get_press("snapkv", budget=0.5, window_size=4)], ids=["dynamic", "snapkv"])
def test_decode_dispatch_counts_ops_per_layer_step_and_syncs_per_step(model, press):
    counted = decode_dispatch(model, press, prompt_of_length(40), steps=2, warmup=1)
    assert counted.steps == 2 and counted.layers == 2
    assert counted.ops_per_layer_step == counted.ops / 2 / 2 > 0
    assert counted.syncs_per_step >= 0 and float(counted.syncs_per_step).is_integer()  # the same syncs every step
    assert sum(counted.top_ops.values()) <= counted.ops / 2 and "aten.mm" in counted.top_ops
    assert sum(counted.sync_sites.values()) == counted.syncs_per_step
    assert f"{counted.ops / 2:g} ops" in counted.report


def test_measure_counts_dispatch_only_when_asked_and_after_the_timed_steps(model):
    plain = measure(model, None, prompt_of_length(40), decode_tokens=4)
    assert plain.ops_per_layer_step is None and plain.syncs_per_step is None
    counted = measure(model, None, prompt_of_length(40), decode_tokens=4, count_steps=2)
    assert counted.ops_per_layer_step > 0 and counted.syncs_per_step is not None
    assert counted.cache_bytes == plain.cache_bytes  # sizes taken before the counted steps grow the cache


def test_grid_rows_carry_dispatch_counts_and_the_table_shows_them(model, monkeypatch, tmp_path):
    import modalkv.bench

    press = get_press("snapkv", budget=0.5, window_size=4)
    seen = []
    rows = run_grid(model, prompt_of_length, [press], [40], decode_tokens=3, repeats=2, on_run=seen.append)
    counted = [run.method for run in seen if run.ops_per_layer_step is not None]
    assert counted == ["dynamic_cache", press.label()]  # the first round only, never the floor
    [row] = rows
    assert row["ops_per_layer_step"] > 0 and row["baseline_ops_per_layer_step"] > 0
    assert float(row["syncs_per_step"]).is_integer() and float(row["baseline_syncs_per_step"]).is_integer()

    # `modalkv bench` on the tiny model: its random-token prompts instead of the tokenizer's passkey text
    real_grid = modalkv.bench.run_grid
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: (model, None))
    monkeypatch.setattr(
        modalkv.bench, "run_grid", lambda m, _, *rest, **kw: real_grid(m, prompt_of_length, *rest, **kw)
    )
    args = ["bench", "--context", "40", "--decode-tokens", "3", "--methods", "snapkv", "--out", tmp_path]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "ops/layer-step" in result.stdout and "syncs/step" in result.stdout
    [row] = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert f"{row['ops_per_layer_step']:.0f}" in result.stdout
    result = invoke(*args, "--count-steps", "0")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["ops_per_layer_step"] is None


@pytest.mark.slow
def test_bench_cli_writes_json_and_refuses_contexts_past_the_model(tmp_path):
    args = ["bench", "--context", "300", "--decode-tokens", "3", "--methods", "snapkv", "-p", "pooling=max"]
    result = invoke(*args, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [row["context"] for row in record["rows"]] == [300] and record["rows"][0]["cache_ratio"] < 0.23
    assert record["rows"][0]["method"] == "snapkv(pooling=max)"  # the parameter reached the press
    for figure in ("decode_vs_context", "speedup_vs_budget", "memory_vs_context"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 10_000
    assert_fails(invoke("bench", "--context", "9000", "--out", tmp_path), "handles at most 8192 positions")
    assert_fails(invoke("bench", "--methods", "nope", "--out", tmp_path), "unknown method 'nope'")
    assert_fails(invoke("bench", "--methods", "snapkv", "-p", "theta=0.5", "--out", tmp_path), "parameter(s) theta")


@pytest.mark.slow
def test_prefill_memory_is_measured_in_a_fresh_process():
    from modalkv.prefill_memory import measure_in_subprocess

    plain = measure_in_subprocess("smollm2-135m", "float32", "dynamic_cache", 1.0, 3000)
    ours = measure_in_subprocess("smollm2-135m", "float32", "snapkv", 0.2, 3000)
    assert plain["cache_mib"] == pytest.approx(3000 * 46080 / 2**20)  # 46,080 bytes per token (ENVIRONMENT.md)
    assert ours["cache_mib"] == pytest.approx(600 * 46080 / 2**20)
    # The peak includes what each prefill leaves in its cache. (That the compressed prefill peaks lower is measured
    # by `bench --memory`, not asserted: the margin at this length is within the allocator's noise.)
    for run in (plain, ours):
        assert run["prefill_peak_mib"] >= run["cache_mib"]


def test_grid_with_compile_adds_compiled_methods_and_transformers_static_cache_as_a_peer(model):
    presses = [get_press("snapkv", budget=0.5, window_size=4)]
    rows = run_grid(model, prompt_of_length, presses, [40], decode_tokens=3, count_steps=0, compile=True)
    assert [row["method"] for row in rows] == ["snapkv(window_size=4)", "static_cache", "snapkv(window_size=4)+compile"]
    for row in rows:  # every ratio is to the same run's eager DynamicCache
        assert row["decode_speedup"] == pytest.approx(row["baseline_ms_per_token"] / row["decode_ms_per_token"])
    # The compiled cell decodes its untimed compilation steps too: 20 kept + 3 timed + 4 more generated tokens.
    assert rows[2]["cache_bytes"] == 2 * 2 * (20 + 3 + 4) * 2 * 16 * 4
