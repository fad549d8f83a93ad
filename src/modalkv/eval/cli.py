"""`modalkv eval` and `modalkv report` (registered in `modalkv.cli`); the work is in runner.py and report.py."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from modalkv.cli_common import command_line, console, fail, parse_budget, parse_params
from modalkv.eval import report, runner
from modalkv.eval.tasks import Failure, build_task
from modalkv.models import DEFAULT_MODEL, load_model, parse_dtype
from modalkv.presses import split_methods

LOG_EVERY_SECONDS = 60.0  # progress lines in a log (no terminal): at most one a minute, and the last one


def progress_line(done: int, total: int, seconds: float, label: str) -> str:
    """One line of progress for a log, where rich's bars draw nothing: a batch job would say nothing for hours."""
    left = seconds / done * (total - done)
    return f"{done}/{total} records, {seconds / 60:.1f} min, about {left / 60:.0f} min left (last: {label})"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _task_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """['passkey.lengths=1024,2048'] -> {'passkey': {'lengths': '1024,2048'}}."""
    options: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        task, dot, name = key.partition(".")
        if not (sep and dot and task and name):
            raise typer.BadParameter(f"task options are TASK.OPTION=VALUE, got {item!r}")
        options.setdefault(task, {})[name] = value
    return options


def print_summary(summary: report.Summary, title: str) -> None:
    header, rows = report.table(summary)
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    Console(width=max(100, sum(widths) + 3 * len(widths) + 1)).print(table)
    for line in report.failure_lines(summary):
        console.print(f"[yellow]failures[/yellow] {line}")


def eval_command(
    out: Annotated[Path, typer.Option(help="run folder: records.rank<k>.jsonl, failures, run.json")],
    model: Annotated[str, typer.Option(help="embedded model name, local folder or hub id")] = DEFAULT_MODEL,
    methods: Annotated[
        str,
        typer.Option(
            help="comma-separated methods (`all`: every one), each with its own parameters if any, as its label "
            "writes them: 'snapkv,madakv(ends=1, mpa=false)'; `full` runs once, at budget 1.0"
        ),
    ] = "full,snapkv",
    budgets: Annotated[str, typer.Option(help="comma-separated budgets (ratios or token counts)")] = "0.1,0.2,0.5",
    tasks: Annotated[str, typer.Option(help="comma-separated: passkey, fidelity, milebench:PATH")] = "passkey",
    limit: Annotated[int | None, typer.Option(min=1, help="at most N examples per task column")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="method parameter KEY=VALUE, given to every method that has it"),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option("--task-option", "-t", help="TASK.OPTION=VALUE, e.g. passkey.lengths=1024,4096"),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="examples of a generation task decoded together (left-padded, one shared prefill) by every method "
            "whose batch rows are independent; records are those of one at a time, timings the batch's. Memory grows "
            "with it: each batch's prefill is kept for all its methods",
        ),
    ] = 1,
) -> None:
    """Accuracy and fidelity of every method x budget on the tasks: one JSONL record each, resumable, and a table.

    Runs data-parallel under `accelerate launch` or `torchrun`: each process takes its share of the examples.
    """
    import torch
    from accelerate import PartialState

    # Without CUDA, processes started by torchrun talk over gloo only if accelerate is told it is on the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        ratios = [parse_budget(b) for b in _split(budgets)]
        presses = runner.make_presses(split_methods(methods), ratios, parse_params(param))
        options = _task_options(task_option)
        specs = _split(tasks)
        built = [build_task(spec, options.pop(spec.partition(":")[0], {})) for spec in specs]
        if options:
            raise ValueError(f"options for tasks that are not run: {', '.join(options)}")
        command = command_line("eval")
        runner.check_run(out, {"model": model, "dtype": dtype, "commands": [command]}, built, state.is_main_process)
        with console.status(f"loading {model}"):
            lm, processor = load_model(model, dtype=parse_dtype(dtype), device=state.device)
        with console.status("loading the tasks"):
            loaded, failures = runner.load_tasks(built, processor, limit)
    except ValueError as error:
        raise fail(error) from error
    if state.is_main_process:  # failures of ranks a previous, wider run had are not this run's
        for stale in out.glob(runner.FAILURES.format(rank="*")):
            if int(stale.name.split(".")[1].removeprefix("rank")) >= state.num_processes:
                stale.unlink()
    state.wait_for_everyone()  # run.json is written before any rank reads the record files
    done = {runner.record_key(r) for r in runner.read_records(out)}
    work = runner.pending(loaded, presses, done, state.process_index, state.num_processes, batch_size)
    records = runner.JsonlWriter(out / runner.RECORDS.format(rank=state.process_index))
    failed = runner.JsonlWriter(out / runner.FAILURES.format(rank=state.process_index), truncate=True)
    for failure in failures:
        failed.write(dataclasses.asdict(failure))
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, disable=not state.is_main_process) as progress:
        columns_left = Counter(example.task for item in work for example in item.examples)
        total = columns_left.total()
        overall = progress.add_task(f"all (rank {state.process_index}/{state.num_processes})", total=total)
        bars = {column: progress.add_task(column, total=count) for column, count in columns_left.items()}
        logged = state.is_main_process and not console.is_terminal
        start = last_line = time.monotonic()
        done = 0
        for item in work:
            first = item.examples[0].task
            together = f" x {len(item.examples)}" if len(item.examples) > 1 else ""
            label = f"{first}: {item.press.label()}@{item.press.budget:g}{together}"
            progress.update(bars[first], description=label)
            for result in runner.evaluate(lm, processor, item, state.process_index):
                if isinstance(result, Failure):
                    failed.write(dataclasses.asdict(result))
                    column = result.task
                else:
                    records.write(result)
                    column = result["task"]
                progress.advance(bars[column])
                progress.advance(overall)
                done += 1
                if logged and (time.monotonic() - last_line >= LOG_EVERY_SECONDS or done == total):
                    last_line = time.monotonic()
                    line = progress_line(done, total, last_line - start, label)
                    console.print(line, markup=False, highlight=False, soft_wrap=True)
    records.close()
    failed.close()
    state.wait_for_everyone()
    if state.is_main_process:  # every example may have failed: then the table is empty and the failures say why
        print_summary(report.summarize(runner.read_records(out), runner.read_failures(out)), f"{model}: {out}")
    state.destroy_process_group()


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="a folder written by `modalkv eval --out`")],
    markdown: Annotated[Path | None, typer.Option(help="write a results page here (figures next to it)")] = None,
    plots: Annotated[bool, typer.Option(help="write the figures (PNG) and summary.json to RUN_DIR/plots")] = False,
    bar_budget: Annotated[
        str | None, typer.Option(help="budget of the per-task bar chart (default: nearest 0.2)")
    ] = None,
) -> None:
    """Re-summarise a run from its JSONL records (every rank's file, merged): table, figures, results page."""
    try:
        summary = report.load_summary(run_dir)
        budget = None if bar_budget is None else parse_budget(bar_budget)
        print_summary(summary, str(run_dir))
        if plots:
            paths = report.write_figures(summary, run_dir / "plots", budget)
            console.print(f"wrote {len(paths)} figures and summary.json to {run_dir / 'plots'}")
        if markdown is not None:
            figures = report.write_figures(summary, markdown.parent / f"{markdown.stem}-figures", budget)
            markdown.write_text(report.markdown(summary, run_dir, figures, markdown), encoding="utf-8")
            console.print(f"wrote {markdown} and its figures in {markdown.parent / (markdown.stem + '-figures')}")
    except ValueError as error:
        raise fail(error) from error
