"""`modalkv bench` (registered in `modalkv.cli`): the work is in bench.py (speed, batches) and peak_memory.py (peak
memory in fresh processes, the largest batch under a limit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from modalkv.api import check_prompt_length
from modalkv.bench import Prompts
from modalkv.cli_common import command_line, console, fail, parse_budget, parse_params
from modalkv.models import DEFAULT_MODEL, load_model, parse_dtype
from modalkv.presses import Press

BENCH_COLUMNS = [
    ("method", lambda row: row["method"]),
    ("budget", lambda row: str(row["budget"])),
    ("context", lambda row: str(row["context"])),
    ("batch", lambda row: str(row["batch"])),
    ("decode ms/step", lambda row: f"{row['decode_ms_per_token']:.1f}"),
    ("tokens/s", lambda row: f"{row['tokens_per_second']:.1f}"),
    ("speed-up vs DynamicCache", lambda row: f"{row['decode_speedup']:.2f}x"),
    ("vs 256-token floor", lambda row: f"{row['vs_floor']:.2f}"),
    ("cache ratio", lambda row: f"{row['cache_ratio']:.3f}"),
    ("MiB/sequence", lambda row: f"{row['bytes_per_sequence_decoded'] / 2**20:.1f}"),
    ("prefill s", lambda row: f"{row['prefill_seconds']:.2f}"),
    ("ops/layer-step", lambda row: "-" if row["ops_per_layer_step"] is None else f"{row['ops_per_layer_step']:.0f}"),
    ("syncs/step", lambda row: "-" if row["syncs_per_step"] is None else f"{row['syncs_per_step']:g}"),
]

MEMORY_COLUMNS = [
    ("prefill peak MiB", lambda row: f"{row['prefill_peak_mib']:.0f}"),
    ("DynamicCache prefill peak MiB", lambda row: f"{row['baseline_prefill_peak_mib']:.0f}"),
]

CAPACITY_COLUMNS = [
    ("method", lambda row: row["method"]),
    ("budget", lambda row: str(row["budget"])),
    ("context", lambda row: str(row["context"])),
    ("max batch", lambda row: str(row["max_batch"])),
    ("vs DynamicCache", lambda row: "-" if row["concurrency_ratio"] is None else f"{row['concurrency_ratio']:.1f}x"),
    ("peak MiB at max", lambda row: "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.0f}"),
    ("tokens/s at max", lambda row: "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.1f}"),
    ("batches tried", lambda row: ", ".join(row["trials"])),
]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def passkey_prompts(tokenizer, length: int, batch: int, ragged: bool) -> Prompts:
    """`batch` distinct passkey prompts (each its own key and depth); `ragged`: lengths spread evenly from `length`
    down to half of it, left-padded (as generate() pads), else all `length` tokens."""
    from modalkv.eval.passkey import passkey_example

    lengths = [length - (length // 2) * i // max(batch - 1, 1) for i in range(batch)] if ragged else [length] * batch
    rows = []
    for i, n in enumerate(lengths):
        text = passkey_example(tokenizer, n + 64, depth=(i + 0.5) / batch, seed=1000 * length + i).text
        rows.append(tokenizer(text, add_special_tokens=False).input_ids[:n])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    if not ragged:
        return Prompts(ids)
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return Prompts(ids, mask)


def bench_command(
    out: Annotated[Path, typer.Option(help="folder for bench.json and the figures")],
    model: Annotated[str, typer.Option(help="embedded model name, local folder or hub id")] = DEFAULT_MODEL,
    methods: Annotated[str, typer.Option(help="comma-separated methods")] = "snapkv,streaming_llm",
    budgets: Annotated[str, typer.Option(help="comma-separated budgets")] = "0.2",
    context: Annotated[str, typer.Option(help="comma-separated context lengths (tokens)")] = "1024,2048,4096",
    batch: Annotated[str, typer.Option(help="comma-separated batch sizes: sequences decoded together")] = "1",
    ragged: Annotated[
        bool, typer.Option(help="a batch's prompts range from the context length down to half of it (left-padded)")
    ] = False,
    decode_tokens: Annotated[int, typer.Option(min=3)] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="interleaved rounds per context")] = 1,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's)")] = None,
    memory: Annotated[bool, typer.Option(help="also measure prefill peak memory, one fresh process per cell")] = False,
    memory_limit: Annotated[
        float | None,
        typer.Option(
            help="GiB: for DynamicCache and every method, the largest batch whose peak (one more prompt admitted "
            "while the batch is held, then --decode-tokens decoding steps) fits under this, found by measurement in "
            "fresh processes, and its tokens/s",
            min=0,
        ),
    ] = None,
    count_steps: Annotated[
        int,
        typer.Option(
            min=0,
            help="untimed decode steps after the timed ones over which aten ops per layer-step and host syncs per "
            "step are counted, per method and context (0: not counted)",
        ),
    ] = 4,
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="method parameter KEY=VALUE, given to every method that has it"),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="also run every method with a torch.compile'd decoding step, and transformers' StaticCache + "
            "compile as a peer (compilation takes minutes per cell on a CPU)",
        ),
    ] = False,
    share_prefill: Annotated[
        bool,
        typer.Option(
            "--share-prefill",
            help="prefill each context once and replay it into every cell's cache: the same decoding steps, one long "
            "forward instead of one per cell and round (prefill seconds: that forward plus the cell's compression)",
        ),
    ] = False,
) -> None:
    """Decode speed, throughput, prefill time and cache size per method, budget and batch, as ratios to the
    uncompressed cache measured in the same run; with --memory-limit, the most sequences each fits."""
    from modalkv.bench import run_grid
    from modalkv.eval.runner import make_presses

    try:
        budget_list = [parse_budget(b) for b in _split(budgets)]
        presses = make_presses(_split(methods), budget_list, parse_params(param))
        lengths = [int(n) for n in _split(context)]
        batches = [int(n) for n in _split(batch)]
        if not batches or min(batches) < 1:
            raise ValueError(f"--batch takes positive batch sizes, got {batch!r}")
        if ragged and compile:
            raise ValueError("--ragged with --compile is not supported: padded batches change the mask's shape")
        with console.status(f"loading {model}"):
            lm, tokenizer = load_model(model, dtype=parse_dtype(dtype))
        for length in lengths:
            check_prompt_length(lm, length, decode_tokens)
    except ValueError as error:
        raise fail(error) from error
    if threads is not None:
        torch.set_num_threads(threads)

    def prompts_of(length: int, size: int) -> Prompts:
        return passkey_prompts(tokenizer, length, size, ragged)

    cells = len(presses) + 2 + (len(presses) + 1 if compile else 0)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("bench", total=len(lengths) * len(batches) * repeats * cells)
        rows = run_grid(
            lm,
            prompts_of,
            presses,
            lengths,
            decode_tokens,
            repeats,
            on_run=lambda run: progress.update(
                task, advance=1, description=f"{run.method} at {run.context} tokens, batch {run.batch}"
            ),
            count_steps=count_steps,
            compile=compile,
            batches=batches,
            share_prefill=share_prefill,
        )
    if memory:
        from modalkv.peak_memory import measure_in_subprocess

        with console.status("prefill peak memory, one process per cell"):
            for length in lengths:
                prompt = passkey_prompts(tokenizer, length, 1, False).input_ids
                baseline = measure_in_subprocess(model, dtype, None, prompt)
                by_label = {
                    (press.label(), press.budget): measure_in_subprocess(model, dtype, press, prompt)
                    for press in presses
                }
                for row in rows:
                    if row["context"] == length and (row["method"], row["budget"]) in by_label:
                        row["prefill_peak_mib"] = by_label[row["method"], row["budget"]]["prefill_peak_mib"]
                        row["baseline_prefill_peak_mib"] = baseline["prefill_peak_mib"]
    capacity = []
    if memory_limit is not None:
        capacity = measure_capacity(model, dtype, tokenizer, presses, lengths, decode_tokens, memory_limit)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line("bench"),
        "model": model,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "decode_tokens": decode_tokens,
        "ragged": ragged,
        "share_prefill": share_prefill,
        "rows": rows,
        "capacity": capacity,
    }
    (out / "bench.json").write_text(json.dumps(record, indent=1))
    title = f"{model}, {dtype}, {torch.get_num_threads()} threads"
    columns = BENCH_COLUMNS + (MEMORY_COLUMNS if memory else [])
    print_table(f"{title}; ratios measured in the same run", columns, rows)
    if capacity:
        limit = f"{memory_limit:g} GiB"
        print_table(f"{title}: most sequences in flight under {limit} (measured)", CAPACITY_COLUMNS, capacity)
    from modalkv.plots import bench_figures

    for name, figure in bench_figures(rows, title, capacity).items():
        figure.savefig(out / f"{name}.png", dpi=120)
    console.print(f"wrote {out / 'bench.json'} and the figures beside it")


def measure_capacity(
    model: str, dtype: str, tokenizer, presses: list[Press], lengths: list[int], decode_tokens: int, limit_gib: float
) -> list[dict]:
    """`peak_memory.capacity` for DynamicCache and every press at every context, with a progress line per trial;
    rows gain `concurrency_ratio`, the max batch over DynamicCache's."""
    from modalkv.peak_memory import DISTINCT_PROMPTS, capacity

    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("capacity", total=len(lengths) * (len(presses) + 1))
        for length in lengths:
            prompts = passkey_prompts(tokenizer, length, DISTINCT_PROMPTS + 1, False).input_ids
            cells = []
            for press in [None, *presses]:
                cell = f"{'dynamic_cache' if press is None else press.label()}@{length} tokens"

                def on_trial(batch: int, peak: int, cell: str = cell) -> None:
                    progress.update(task, description=f"{cell}: batch {batch} peaked at {peak / 2**20:.0f} MiB")

                limit = int(limit_gib * 2**30)
                cells.append(
                    capacity(model, dtype, press, prompts, limit, decode_tokens, torch.get_num_threads(), on_trial)
                )
                progress.advance(task)
            baseline = cells[0]["max_batch"]
            for cell in cells:
                cell["concurrency_ratio"] = cell["max_batch"] / baseline if baseline else None
            rows += cells
    return rows


def print_table(title: str, columns: list, rows: list[dict]) -> None:
    table = Table(title=title)
    for column, _ in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(show(row) for _, show in columns))
    Console(width=180).print(table)
