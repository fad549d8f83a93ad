"""The benchmark's bookkeeping: cells, ratios to the same-run baseline and floor, and the CLI's output."""

import json

import pytest
import torch
from test_cli import assert_fails, invoke

from modalkv import bench_cli, get_press
from modalkv.bench import FLOOR_CONTEXT, Prompts, decode_dispatch, measure, run_grid


def prompt_of_length(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(length))


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
    monkeypatch.setattr(bench_cli, "load_model", lambda *args, **kwargs: (model, None))
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
    # A ragged batch of the real model's passkey prompts: 300 and 150 tokens, left-padded, prefilled once.
    args = ["bench", "--context", "300", "--decode-tokens", "3", "--batch", "2", "--ragged", "--share-prefill"]
    result = invoke(*args, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    rows = record["rows"]
    assert record["share_prefill"] and all(row["shared_prefill"] for row in rows)
    assert {(row["batch"], row["prompt_tokens"]) for row in rows} == {(2, 450)}
    snapkv = next(row for row in rows if row["method"] == "snapkv")
    assert snapkv["bytes_per_sequence_prefill"] == pytest.approx((60 + 30) / 2 * 46080, rel=0.02)  # 20% of each


@pytest.mark.slow
def test_prefill_memory_is_measured_in_a_fresh_process():
    from modalkv.peak_memory import measure_in_subprocess

    prompt = torch.randint(0, 49152, (1, 3000), generator=torch.Generator().manual_seed(0))
    plain = measure_in_subprocess("smollm2-135m", "float32", None, prompt)
    ours = measure_in_subprocess("smollm2-135m", "float32", get_press("snapkv", budget=0.2), prompt)
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


def test_grid_measures_batches_with_throughput_and_bytes_per_sequence(model):
    press = get_press("snapkv", budget=0.5, window_size=4)
    seen = []
    rows = run_grid(
        model, prompt_of_length, [press], [40], decode_tokens=3, count_steps=0, batches=[1, 3], on_run=seen.append
    )
    assert sorted({(run.batch, run.context) for run in seen}) == [
        (1, 40),
        (1, FLOOR_CONTEXT),
        (3, 40),
        (3, FLOOR_CONTEXT),
    ]
    assert [(row["batch"], row["context"]) for row in rows] == [(1, 40), (3, 40)]
    for row in rows:
        assert row["tokens_per_second"] == pytest.approx(1000 * row["batch"] / row["decode_ms_per_token"])
        assert row["throughput_speedup"] == pytest.approx(row["tokens_per_second"] / row["baseline_tokens_per_second"])
        assert row["prompt_tokens"] == 40 * row["batch"]
        # per sequence: 20 kept after prefill, + the 3 decoded ones; 2 layers x 2 KV heads x K+V x D x fp32
        assert row["bytes_per_sequence_prefill"] == 2 * 2 * 20 * 2 * 16 * 4
        assert row["bytes_per_sequence_decoded"] == 2 * 2 * (20 + 3) * 2 * 16 * 4
        assert row["baseline_bytes_per_sequence_decoded"] == 2 * 2 * (40 + 3) * 2 * 16 * 4


def test_a_ragged_batch_is_left_padded_and_the_compressed_cache_holds_only_real_tokens(model):
    ids = prompt_of_length(40, 2)
    mask = torch.ones_like(ids)
    mask[1, :16] = 0  # the second prompt is 24 tokens, left-padded
    prompts = Prompts(ids, mask)
    plain = measure(model, None, prompts, decode_tokens=3)
    assert plain.batch == 2 and plain.prompt_tokens == 64
    assert plain.cache_bytes == 2 * 2 * 2 * (40 + 3) * 2 * 16 * 4  # DynamicCache stores the padding too
    run = measure(model, get_press("snapkv", budget=0.5, window_size=4), prompts, decode_tokens=3)
    kept = (20 + 3) + (12 + 3)  # half of each real prompt, then the decoded tokens
    assert run.cache_bytes == 2 * 2 * kept * 2 * 16 * 4


def test_passkey_prompts_are_distinct_and_ragged_ones_left_padded():
    from transformers import AutoTokenizer

    from modalkv.models import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path("smollm2-135m", torch.float32))
    even = bench_cli.passkey_prompts(tokenizer, 200, 3, ragged=False)
    assert even.attention_mask is None and even.input_ids.shape == (3, 200)
    assert len({tuple(row.tolist()) for row in even.input_ids}) == 3
    ragged = bench_cli.passkey_prompts(tokenizer, 200, 3, ragged=True)
    assert ragged.attention_mask.sum(1).tolist() == [200, 150, 100]
    assert ragged.attention_mask[2, :100].sum() == 0 and ragged.attention_mask[2, 100:].all()  # padding on the left


def test_bench_cli_batches_ragged_and_capacity_rows(model, monkeypatch, tmp_path):
    """The CLI's plumbing: batch rows, the capacity table and its ratios, figures (the measurement itself:
    tests/test_peak_memory.py)."""
    import modalkv.bench
    import modalkv.peak_memory

    real_grid = modalkv.bench.run_grid
    monkeypatch.setattr(bench_cli, "load_model", lambda *args, **kwargs: (model, None))
    monkeypatch.setattr(
        bench_cli, "passkey_prompts", lambda _, length, batch, ragged: Prompts(prompt_of_length(length, batch))
    )
    monkeypatch.setattr(
        modalkv.bench, "run_grid", lambda m, _, *rest, **kw: real_grid(m, prompt_of_length, *rest, **kw)
    )

    def fake_capacity(model_name, dtype, press, prompts, limit, decode_tokens, threads, on_trial):
        per_sequence = 100 if press is None else 100 * press.budget
        best = int(limit // per_sequence)
        on_trial(best, best * per_sequence)
        return {
            "method": "dynamic_cache" if press is None else press.label(),
            "budget": 1.0 if press is None else press.budget,
            "context": prompts.shape[1],
            "memory_limit_bytes": limit,
            "decode_tokens": decode_tokens,
            "max_batch": best,
            "peak_bytes": best * per_sequence,
            "tokens_per_second": 1.0,
            "bytes_per_sequence": per_sequence,
            "trials": {str(best): best * per_sequence},
        }

    monkeypatch.setattr(modalkv.peak_memory, "capacity", fake_capacity)
    args = ["bench", "--context", "40", "--decode-tokens", "3", "--methods", "snapkv", "--budgets", "0.25,0.5"]
    result = invoke(
        *args, "--batch", "1,2", "--memory-limit", str(1000 / 2**30), "--count-steps", "0", "--out", tmp_path
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [(row["budget"], row["batch"]) for row in record["rows"]] == [(0.25, 1), (0.5, 1), (0.25, 2), (0.5, 2)]
    assert [(row["method"], row["max_batch"], row["concurrency_ratio"]) for row in record["capacity"]] == [
        ("dynamic_cache", 10, 1.0),
        ("snapkv", 40, 4.0),
        ("snapkv", 20, 2.0),
    ]
    assert "most sequences in flight" in result.stdout and "4.0x" in result.stdout
    for figure in ("throughput_vs_batch", "max_concurrent", "decode_vs_context"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 10_000
    assert_fails(invoke(*args, "--batch", "0", "--out", tmp_path), "--batch takes positive batch sizes")
    assert_fails(invoke(*args, "--ragged", "--compile", "--out", tmp_path), "--ragged with --compile is not supported")


def test_the_baseline_of_a_hybrid_model_is_transformers_own_cache():
    """Gemma 3's sliding layers keep only their window in transformers' cache: so does the benchmark's baseline, and
    a compressed cache's uncompressed figure is that same number."""
    from test_hybrid import WINDOW, build

    model = build("gemma3_text")  # 2 sliding + 2 global layers, 2 KV heads of 16 dims
    per_token = 2 * 2 * 16 * 4  # KV heads x (K + V) x D x fp32
    baseline = measure(model, None, prompt_of_length(40), decode_tokens=3)
    assert baseline.cache_bytes == (2 * (40 + 3) + 2 * (WINDOW - 1)) * per_token
    run = measure(model, get_press("snapkv", budget=0.5, window_size=4), prompt_of_length(40), decode_tokens=3)
    assert run.full_cache_bytes == baseline.cache_bytes


@pytest.mark.parametrize("hybrid", [False, True], ids=["llama", "gemma3_text"])
def test_a_recorded_prefill_fills_each_cache_as_its_own_prefill_would(model, hybrid):
    """Replayed into transformers' DynamicCache (sliding layers: their window) or a CompressedCache, a recorded
    prefill of a left-padded batch leaves the same tokens and next logits as the cache's own prefill of that batch:
    the shared-prefill grid times the same decoding steps."""
    from transformers import DynamicCache

    from modalkv.bench import Decoder
    from modalkv.cache import CompressedCache
    from modalkv.generation import record_prefill

    if hybrid:
        from test_hybrid import build

        model = build("gemma3_text")
    ids = prompt_of_length(40, 2)
    mask = torch.ones_like(ids)
    mask[1, :16] = 0
    prompts = Prompts(ids, mask)
    recorded = record_prefill(model, {"input_ids": ids, "attention_mask": mask})
    own, replayed = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        logits = Decoder.prefill(model, prompts, own).logits
    recorded.fill(replayed)
    torch.testing.assert_close(recorded.first_logits[:, None], logits)
    for mine, theirs in zip(replayed.layers, own.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    press = get_press("snapkv", budget=0.5, window_size=4)
    own, replayed = CompressedCache(press), CompressedCache(press)
    with press.attach(model), torch.no_grad():
        Decoder.prefill(model, prompts, own)
        recorded.replay(model, press, replayed)
    assert replayed.kept_positions() == own.kept_positions()


def test_a_grid_on_shared_prefills_measures_the_same_caches(model):
    presses = [get_press("snapkv", budget=0.5, window_size=4), get_press("streaming_llm", budget=0.25)]
    seen = []
    kwargs = {"decode_tokens": 3, "count_steps": 2, "batches": [1, 2]}
    own = run_grid(model, prompt_of_length, presses, [40], **kwargs)
    shared = run_grid(model, prompt_of_length, presses, [40], share_prefill=True, on_run=seen.append, **kwargs)
    assert all(run.shared_prefill for run in seen) and not any(row["shared_prefill"] for row in own)
    for mine, theirs in zip(shared, own, strict=True):
        for name in ("method", "batch", "cache_bytes", "bytes_per_sequence_prefill", "bytes_per_sequence_decoded"):
            assert mine[name] == theirs[name]
        assert mine["ops_per_layer_step"] == theirs["ops_per_layer_step"]
