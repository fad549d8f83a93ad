"""`modalkv eval` / `modalkv report` end to end on a tiny random Llama: records, resume, failures, report."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from eval_tiny import save_tiny_model
from transformers import AutoTokenizer
from typer.testing import CliRunner

from modalkv import cli, get_press
from modalkv.cli_common import command_line
from modalkv.eval import forced, report, runner, tasks
from modalkv.eval.tasks import build_task
from modalkv.presses import METHODS, parse_method, split_methods

FIXTURE = Path(__file__).parent / "fixtures" / "milebench"
TASK_OPTIONS = [
    *("-t", "passkey.lengths=64,128", "-t", "passkey.depths=0.5", "-t", "passkey.max_new_tokens=4"),
    *("-t", "fidelity.context_tokens=48", "-t", "fidelity.continuation_tokens=6", "-t", "fidelity.samples=2"),
    *("-t", "milebench.max_new_tokens=3", "-t", "milebench.max_context_len=200"),
]
EXAMPLES = 2 + 2 + 6  # passkey, fidelity, MileBench (7 samples, one with a missing image)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def eval_args(tiny: Path, out: Path, methods: str = "full,streaming_llm,snapkv", *extra: str) -> list[str]:
    args = ["eval", "--model", str(tiny), "--out", str(out), "--methods", methods, "--budgets", "0.5"]
    return [*args, "--tasks", f"passkey,fidelity,milebench:{FIXTURE}", *TASK_OPTIONS, *extra]


def run_eval(tiny: Path, out: Path, methods: str = "full,streaming_llm,snapkv", *extra: str):
    return CliRunner().invoke(cli.app, eval_args(tiny, out, methods, *extra))


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    """One single-process run of the grid; tests that change a run work on a copy."""
    out = tmp_path_factory.mktemp("base-run")
    result = run_eval(tiny, out)
    assert result.exit_code == 0, result.output
    return out, result


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def lines(out: Path) -> list[dict]:
    return lines_of(out / "records.rank0.jsonl")


@pytest.fixture
def count_evaluations(monkeypatch) -> list:
    calls = []
    real = runner.evaluate

    def counting(*args, **kwargs):
        calls.extend(example.id for example in args[2].examples)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", counting)
    return calls


def test_grid_records_failures_and_summary(base_run):
    out, result = base_run
    records = lines(out)
    assert len(records) == EXAMPLES * 3  # full once + 2 methods at one budget
    assert {(r["method"], r["budget"]) for r in records} == {("full", 1.0), ("streaming_llm", 0.5), ("snapkv", 0.5)}
    for record in records:
        assert {"prediction", "reference", "score", "cache_bytes", "prefill_seconds", "decode_ms_per_token"} <= set(
            record
        )
        assert 0 <= record["score"] <= 1
    full = [r for r in records if r["method"] == "full"]
    assert all(r["cache_ratio"] == 1.0 for r in full)
    assert all(r["metrics"]["kl"] < 1e-4 and r["score"] == 1.0 for r in full if r["task"] == "fidelity")
    compressed = [r for r in records if r["method"] == "snapkv" and r["task"] == "passkey"]
    assert all(r["cache_ratio"] < 0.6 for r in compressed)
    milebench = [r for r in records if r["task"].startswith("milebench/")]
    assert {r["image_input"] for r in milebench} == {"stand-in"} and all(r["images"] > 0 for r in milebench)
    # prompts are prefilled once per example and replayed for each press (test_shared_prefill.py)
    assert all(r["shared_prefill"] for r in records)
    failures = [json.loads(line) for line in (out / "failures.rank0.jsonl").read_text().splitlines()]
    assert sorted(f["task"] for f in failures) == ["milebench/ActionSequence", "milebench/Broken"]
    assert "milebench/Broken: 1 failed" in result.stderr.replace("\n", " ")
    assert "milebench/TextNeedleInAHaystack" in result.stdout and "fidelity kl" in result.stdout
    evaluated = len(records)  # no terminal here: the log gets plain progress lines, and the last
    assert f"{evaluated}/{evaluated} records," in result.stderr and "about 0 min left" in result.stderr


def test_resume_skips_finished_records_and_redoes_only_the_missing(
    tiny, base_run, tmp_path, count_evaluations, monkeypatch
):
    run = copy_of(base_run[0], tmp_path)
    first = lines(run)
    assert run_eval(tiny, run).exit_code == 0
    assert count_evaluations == [] and lines(run) == first
    # An interruption: the last 4 records are lost and the one before was cut mid-line.
    text = (run / "records.rank0.jsonl").read_text().splitlines()
    (run / "records.rank0.jsonl").write_text("\n".join(text[:-5]) + "\n" + text[-5][:40])
    assert run_eval(tiny, run).exit_code == 0
    assert len(count_evaluations) == 5
    deterministic = ("prediction", "score", "cache_bytes", "prompt_tokens")
    assert comparable(runner.read_records(run), deterministic) == comparable(first, deterministic)
    # A new method runs only its own cells; `full` and the others are not run again.
    count_evaluations.clear()
    monkeypatch.setattr(sys, "argv", ["modalkv", *eval_args(tiny, run, "full,streaming_llm,snapkv,knorm")])
    assert run_eval(tiny, run, "full,streaming_llm,snapkv,knorm").exit_code == 0
    assert len(count_evaluations) == EXAMPLES
    # run.json lists both invocations (the same one once), and so does the results page
    commands = json.loads((run / "run.json").read_text())["commands"]
    assert len(commands) == 2 and "--methods full,streaming_llm,snapkv,knorm" in commands[1]


def test_a_batched_run_writes_the_records_of_one_example_at_a_time(tiny, base_run, tmp_path):
    """--batch-size decodes a generation task's examples together (left-padded: the passkey prompts differ in
    length; fidelity's windows are fed together): every record equals the single-example run's but for timings."""
    out = tmp_path / "batched"
    result = run_eval(tiny, out, "full,streaming_llm,snapkv", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    records = lines(out)
    deterministic = ("prediction", "score", "cache_bytes", "full_cache_bytes", "prompt_tokens", "reference")
    assert comparable(records, deterministic) == comparable(lines(base_run[0]), deterministic)
    batches = {(r["task"].partition("/")[0], r["batch"]) for r in records}
    assert batches == {("passkey", 2), ("milebench", 3), ("fidelity", 2)}
    kl = {runner.record_key(r): r["metrics"]["kl"] for r in lines(base_run[0]) if r["task"] == "fidelity"}
    assert all(
        r["metrics"]["kl"] == pytest.approx(kl[runner.record_key(r)], abs=1e-5) for r in records if "kl" in r["metrics"]
    )
    failures = [json.loads(line) for line in (out / "failures.rank0.jsonl").read_text().splitlines()]
    assert sorted(f["task"] for f in failures) == ["milebench/ActionSequence", "milebench/Broken"]


def test_a_press_that_takes_a_batch_one_example_at_a_time_replays_its_batch_prefill(tiny, tmp_path, monkeypatch):
    """`random` cannot decode rows together: after the batch's other presses it takes each example alone, on that
    example's row of the batch's prefill (no forward of its own), with the records of a run without batches."""
    rows_prefilled = []
    record_prefill = tasks.share_prefill

    def counted(model, inputs):
        rows_prefilled.append(inputs["input_ids"].shape[0])
        return record_prefill(model, inputs)

    monkeypatch.setattr(tasks, "share_prefill", counted)
    monkeypatch.setattr(forced, "share_prefill", counted)
    alone = run_eval(tiny, tmp_path / "alone", "full,random")
    assert alone.exit_code == 0, alone.output
    assert rows_prefilled and set(rows_prefilled) == {1}
    rows_prefilled.clear()
    batched = run_eval(tiny, tmp_path / "batched", "full,random", "--batch-size", "3")
    assert batched.exit_code == 0, batched.output
    assert rows_prefilled and 1 not in rows_prefilled  # every prompt's prefill ran within its batch's
    deterministic = ("prediction", "score", "cache_bytes", "full_cache_bytes", "prompt_tokens", "reference")
    records, records_alone = lines(tmp_path / "batched"), lines(tmp_path / "alone")
    assert {r["method"] for r in records if r["batch"] == 1} == {"random(seed=0)"}
    generated = [r for r in records if r["task"] != "fidelity"]
    assert comparable(generated, deterministic) == comparable(
        [r for r in records_alone if r["task"] != "fidelity"], deterministic
    )
    # fidelity's reference logits come from a batched forward: equal to one example's up to float rounding
    kl = {runner.record_key(r): r["metrics"]["kl"] for r in records_alone if r["task"] == "fidelity"}
    fidelity = [r for r in records if r["task"] == "fidelity"]
    assert len(kl) == len(fidelity) == 4
    assert all(r["metrics"]["kl"] == pytest.approx(kl[runner.record_key(r)], abs=1e-5) for r in fidelity)


def comparable(records: list[dict], fields: tuple[str, ...]) -> list:
    return sorted((runner.record_key(r), [r[f] for f in fields]) for r in records)


def test_changed_task_options_refuse_to_resume(tiny, base_run, tmp_path):
    run = copy_of(base_run[0], tmp_path)
    result = run_eval(tiny, run, "full", "-t", "passkey.seed=3")
    assert result.exit_code == 2 and "use another --out" in result.stderr.replace("\n", " ")


def test_a_larger_example_count_adds_only_the_new_examples_to_the_folder(tiny, base_run, tmp_path, count_evaluations):
    run = copy_of(base_run[0], tmp_path)
    first = lines(run)
    assert run_eval(tiny, run, "full,streaming_llm,snapkv", "-t", "fidelity.samples=3").exit_code == 0
    new = lines(run)[len(first) :]
    assert lines(run)[: len(first)] == first and len(new) == 3  # the third window, by each of the 3 methods
    assert {r["task"] for r in new} == {"fidelity"} and len(set(count_evaluations)) == 1
    assert {r["example"] for r in new}.isdisjoint(r["example"] for r in first if r["task"] == "fidelity")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    options = {"context_tokens": "48", "continuation_tokens": "6"}
    two, three = (build_task("fidelity", {**options, "samples": n}).load(tokenizer)[0] for n in ("2", "3"))
    assert three[:2] == two  # what made the records above the same examples
    # the folder keeps the largest count; a smaller one reruns nothing and does not lower it
    count_evaluations.clear()
    assert run_eval(tiny, run, "full", "-t", "fidelity.samples=1").exit_code == 0
    assert count_evaluations == [] and json.loads((run / "run.json").read_text())["tasks"]["fidelity"]["samples"] == 3


def test_report_rebuilds_table_figures_and_page_from_jsonl(base_run, tmp_path):
    run = copy_of(base_run[0], tmp_path)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    result = CliRunner().invoke(cli.app, ["report", str(run), "--markdown", str(page)])
    assert result.exit_code == 0, result.output
    figures = page.parent / "results-figures"
    assert {p.name for p in figures.iterdir()} == {
        "accuracy_vs_budget.png",
        "tasks_at_0.5.png",
        "fidelity_vs_budget.png",
        "summary.json",
    }
    text = page.read_text()
    assert "](results-figures/accuracy_vs_budget.png)" in text and "](results-figures/tasks_at_0.5.png)" in text
    assert "| streaming_llm | 0.5 |" in text and "milebench/Broken: 1 failed" in text
    # what each score is, for the run's own tasks only
    assert "(passkey: exact key; fidelity: top-1 agreement" in text and "milebench: each dataset's own metric" in text
    assert "haystack:" not in text and "synthetic:" not in text
    rows = [[line for line in out.splitlines() if line.startswith("│")] for out in (base_run[1].stdout, result.stdout)]
    assert rows[0] == rows[1] and len(rows[0]) == 3  # the table `eval` printed, again from the JSONL alone
    summary = json.loads((figures / "summary.json").read_text())
    full = next(row for row in summary["rows"] if row["method"] == "full")
    for length in (64, 128):  # a task run at several lengths: a column per length
        records = [
            r
            for r in runner.read_records(run)
            if r["method"] == "full" and r["task"] == "passkey" and r["info"]["length"] == length
        ]
        assert full["scores"][f"passkey/{length}"] == pytest.approx(sum(r["score"] for r in records) / len(records))
        every = [r["prompt_tokens"] for r in runner.read_records(run) if r["info"].get("length") == length]
        assert summary["prompt_tokens"][f"passkey/{length}"] == [min(every), max(every)]
        assert f"passkey/{length} {min(every):,}-{max(every):,}" in text
    spent = sum(r["seconds"] for r in runner.read_records(run))
    assert summary["seconds"] == pytest.approx(spent) and f"{spent / 60:,.1f} min" in text
    assert "fidelity" not in summary["averaged"] and {"passkey/64", "passkey/128"} <= set(summary["averaged"])
    assert "## Paired comparisons" in text and "| snapkv | 0.5 | full |" in text
    assert "| streaming_llm | 0.5 | snapkv@0.5 |" in text


def test_two_processes_under_torchrun_merge_to_the_single_process_run(tiny, base_run, tmp_path):
    """Data-parallel: each rank writes its own share, and `report` merges them into the single-process records."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "modalkv", *eval_args(tiny, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [lines_of(out / f"records.rank{k}.jsonl") for k in (0, 1)]
    assert all(ranks) and {r["rank"] for r in ranks[1]} == {1}
    assert not {runner.record_key(r) for r in ranks[0]} & {runner.record_key(r) for r in ranks[1]}
    deterministic = ("prediction", "score", "cache_bytes", "full_cache_bytes", "prompt_tokens", "reference")
    assert comparable(runner.read_records(out), deterministic) == comparable(lines(base_run[0]), deterministic)
    merged = {runner.record_key(r): r["metrics"] for r in runner.read_records(out)}
    for record in lines(base_run[0]):
        assert merged[runner.record_key(record)] == pytest.approx(record["metrics"], abs=1e-5)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_table_adds_the_global_layers_ratio_only_for_hybrid_models():
    def record(method: str, ratio: float, global_ratio: float | None) -> dict:
        return dict(
            task="passkey",
            example="0",
            method=method,
            budget=0.2,
            score=1.0,
            metrics={},
            in_average=True,
            cache_ratio=ratio,
        ) | ({} if global_ratio is None else {"global_cache_ratio": global_ratio})

    hybrid = report.summarize([record("full", 1.0, 1.0), record("snapkv", 0.65, 0.2)])
    header, rows = report.table(hybrid)
    assert header[2:4] == ["cache", "global"] and rows[1][:4] == ["snapkv", "0.2", "0.650", "0.200"]
    for records in ([record("snapkv", 0.2, 0.2)], [record("snapkv", 0.2, None)]):  # no sliding layers; older runs
        assert report.table(report.summarize(records))[0][2:4] == ["cache", "passkey (n=1)"]


def test_the_average_is_over_whole_columns_only():
    """A row with a partial column (a run stopped early) gets no average: its few examples would count as a column."""

    def record(method: str, task: str, example: int, score: float) -> dict:
        return dict(task=task, example=str(example), method=method, budget=0.2, score=score, metrics={})

    full = [record("full", task, i, 1.0) for task in ("a", "b") for i in range(4)]
    whole = [record("snapkv", task, i, float(i % 2)) for task in ("a", "b") for i in range(4)]
    partial = [record("knorm", "a", i, 1.0) for i in range(4)] + [record("knorm", "b", 0, 0.0)]
    summary = report.summarize([{**r, "in_average": True, "cache_ratio": 0.2} for r in full + whole + partial])
    averages = {row.method: row.average for row in summary.rows}
    assert averages == {"full": 1.0, "snapkv": 0.5, "knorm": None}
    assert report.table(summary)[1][2][-2:] == ["0.0 [0-79] (1/4)", "-"]


def test_presses_of_a_grid():
    presses = runner.make_presses(["full", "snapkv", "random", "streaming_llm"], [0.1, 0.5], {"window_size": 8})
    labels = [(p.label(), p.budget) for p in presses]
    assert labels[0] == ("full", 1.0) and len(labels) == 7
    assert ("snapkv(window_size=8)", 0.1) in labels and ("random(seed=0)", 0.5) in labels
    assert ("streaming_llm", 0.5) in labels
    with pytest.raises(ValueError, match="takes the parameter"):
        runner.make_presses(["full", "streaming_llm"], [0.5], {"window_size": 8})


def test_a_method_may_carry_its_own_parameters_as_its_label_writes_them():
    specs = split_methods("snapkv, madakv(ends=1, mpa=false),retentivekv(readout=False),madakv")
    assert specs == ["snapkv", "madakv(ends=1, mpa=false)", "retentivekv(readout=False)", "madakv"]
    presses = runner.make_presses(specs, [0.2], {"window_size": 8, "theta": 0.5})
    labels = [p.label() for p in presses]
    assert labels == [
        "snapkv(window_size=8)",
        "madakv(window_size=8, theta=0.5, mpa=False, ends=1)",
        "retentivekv(window_size=8, readout=False)",
        "madakv(window_size=8, theta=0.5)",
    ]
    again = runner.make_presses(split_methods(",".join(labels)), [0.2], {})  # a label reads back as itself
    assert [p.label() for p in again] == labels
    assert parse_method("chunkkv:snapkv(chunk_length=8)") == ("chunkkv:snapkv", {"chunk_length": 8})
    for bad, message in [("madakv(ends=1", "unbalanced"), ("madakv(ends)", "key=value"), ("madakv(x=1)", "x")]:
        with pytest.raises((ValueError, TypeError), match=message):
            runner.make_presses(split_methods(bad), [0.2], {})


def test_all_is_every_registered_method():
    presses = runner.make_presses(["all"], [0.5], {})
    seeded = {"random": {"seed": 0}}  # runs repeat
    assert [p.label() for p in presses] == [get_press(name, **seeded.get(name, {})).label() for name in METHODS]
    assert {p.budget for p in presses if p.name != "full"} == {0.5}


def test_task_names_and_options():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build_task("nope", {})
    with pytest.raises(ValueError, match="no option 'size'"):
        build_task("passkey", {"size": "3"})
    with pytest.raises(ValueError, match=r"passkey\.lengths must be int"):
        build_task("passkey", {"lengths": "1k"})
    with pytest.raises(ValueError, match="path"):
        build_task("milebench", {})
    task = build_task(f"milebench:{FIXTURE}", {"tokens_per_image": "none", "datasets": "GPR1200,MMCoQA"})
    assert task.path == FIXTURE and task.tokens_per_image is None and task.datasets == ("GPR1200", "MMCoQA")
    assert build_task("passkey", {"lengths": "1024,8192"}).lengths == (1024, 8192)


def test_synthetic_task_refuses_a_text_only_model(tiny, tmp_path):
    result = CliRunner().invoke(cli.app, ["eval", "--model", str(tiny), "--out", str(tmp_path), "--tasks", "synthetic"])
    assert result.exit_code == 2 and "--model mini-vlm" in result.stderr


def test_the_recorded_command_line_is_quoted_for_a_shell(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["modalkv", "eval", "--methods", "snapkv,madakv(ends=1, mpa=false)", "--out", "x"])
    line = command_line("eval")
    assert line == "modalkv eval --methods 'snapkv,madakv(ends=1, mpa=false)' --out x"
    assert shlex.split(line)[1:] == sys.argv[1:]
