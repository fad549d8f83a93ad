"""The evaluation grid: (task, example) x press, one JSONL record each, resumable and shardable across processes.

Each process (rank k of n, from `accelerate launch` / `torchrun`, or 0 of 1) takes every n-th example of each task,
starting at the k-th, runs every press on it, and appends one record per (task, example, method, budget) to its own
`records.rank<k>.jsonl`. Finished records in any rank's file are skipped, so an interrupted run resumes where it
stopped, with the same or another number of processes. `report.py` merges the files. With a batch size above 1,
generation tasks decode that many examples together (left-padded, on one shared prefill) for every press whose rows
are independent; each record is the one that example gets alone, only its timings are the batch's. Generation is
greedy and a `random` press left without a seed gets seed 0, so a run gives the same records however it is split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modalkv.eval.tasks import Example, Failure, Outcome, Task, task_options
from modalkv.presses import METHODS, Press, get_press, parse_method

RECORDS = "records.rank{rank}.jsonl"
FAILURES = "failures.rank{rank}.jsonl"
RUN_FILE = "run.json"


def record_key(record: dict) -> tuple:
    return record["task"], record["example"], record["method"], record["budget"]


def cell_key(example: Example, press: Press) -> tuple:
    """The `record_key` of the record that (example, press) writes."""
    return example.task, example.id, press.label(), press.budget


def read_jsonl(paths: list[Path]) -> Iterator[dict]:
    """Every complete JSON line of `paths`; a line cut short by an interrupted write is skipped."""
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def read_records(out: Path) -> list[dict]:
    """The records of every rank's file, one per key (the last written wins)."""
    records = {record_key(r): r for r in read_jsonl(sorted(out.glob(RECORDS.format(rank="*"))))}
    return list(records.values())


def read_failures(out: Path) -> list[dict]:
    """The failures of the latest run (every rank reports load failures; each is kept once)."""
    unique = {(f["task"], f["item"], f["error"]): f for f in read_jsonl(sorted(out.glob(FAILURES.format(rank="*"))))}
    return list(unique.values())


def make_presses(methods: list[str], budgets: list[float | int], params: dict[str, Any]) -> list[Press]:
    """`full` once (budget 1.0), then every other method at every budget (`all`: every registered method). A method
    may carry its own parameters, as its label writes them (`madakv(ends=1)`, `parse_method`). Each of `params` goes
    to the methods that have it (ValueError if none does), under a method's own; a press with a `seed` gets 0 unless
    one is given, so that runs repeat."""
    presses = []
    used = set()
    for spec in [name for given in methods for name in (METHODS if given == "all" else [given])]:
        method, given = parse_method(spec)
        for budget in [1.0] if method == "full" else budgets:
            probe = get_press(method, budget=budget)
            fields = {f.name for f in dataclasses.fields(probe)} | {f.name for f in _inner_fields(probe)}
            own = {key: value for key, value in params.items() if key in fields}
            if "seed" in fields:
                own.setdefault("seed", 0)
            used |= own.keys()
            presses.append(get_press(method, budget=budget, **own, **given))
    unused = set(params) - used
    if unused:
        raise ValueError(f"no method in {', '.join(methods)} takes the parameter(s) {', '.join(sorted(unused))}")
    return presses


def _inner_fields(press: Press) -> tuple:
    inner = getattr(press, "press", None)  # adakv:<method> wraps a scoring press
    return dataclasses.fields(inner) if isinstance(inner, Press) else ()


def shard(examples: list[Example], rank: int, world_size: int) -> list[Example]:
    """This process's share: examples rank, rank + n, rank + 2n, ... (the same split on every run)."""
    return examples[rank::world_size]


@dataclass
class WorkItem:
    """Examples of one task run with one press: one example, or a batch decoded together (`Task.evaluate_batch`)."""

    task: Task
    examples: list[Example]
    press: Press


def pending(
    loaded: list[tuple[Task, list[Example]]],
    presses: list[Press],
    done: set[tuple],
    rank: int,
    world_size: int,
    batch_size: int = 1,
) -> list[WorkItem]:
    """The (examples, press) items of this rank still to run, batch by batch of `batch_size` examples: every press
    of a batch before the next batch (fidelity reuses its reference, generation tasks their shared prefill). In a
    batch, presses that decode rows together come first (`batch_invariant`); the others take the examples one by
    one, after them."""
    items = []
    for task, examples in loaded:
        mine = shard(examples, rank, world_size)
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            decoded_together = [batch_size > 1 and batchable(task, press) for press in presses]
            for press in (p for p, flag in zip(presses, decoded_together, strict=True) if flag):
                todo = [e for e in batch if cell_key(e, press) not in done]
                if todo:
                    items.append(WorkItem(task, todo, press))
            alone = [p for p, flag in zip(presses, decoded_together, strict=True) if not flag]
            for example in batch:
                for press in alone:
                    if cell_key(example, press) not in done:
                        items.append(WorkItem(task, [example], press))
    return items


def batchable(task: Task, press: Press) -> bool:
    """Whether `task` can run examples together with `press` (`evaluate_batch` may still decline a batch)."""
    return hasattr(task, "evaluate_batch") and press.batch_invariant


def evaluate(model: Any, processor: Any, item: WorkItem, rank: int) -> list[dict | Failure]:
    """Runs one work item: a record per example, or a Failure for an example that cannot run (an unreadable image, too
    long a prompt). A batch the task declines, or one that fails, runs one example at a time."""
    if len(item.examples) > 1:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                outcomes = item.task.evaluate_batch(model, processor, item.press, item.examples)
        except ValueError:
            outcomes = None  # which example failed, and why: one by one
        if outcomes is not None:
            seconds = (time.perf_counter() - start) / len(item.examples)
            pairs = zip(item.examples, outcomes, strict=True)
            return [record(item, example, outcome, seconds, rank) for example, outcome in pairs]
    results: list[dict | Failure] = []
    for example in item.examples:
        start = time.perf_counter()
        try:
            with torch.no_grad():
                outcome = item.task.evaluate(model, processor, item.press, example)
        except ValueError as error:
            results.append(Failure(example.task, example.id, f"{item.press.label()}: {error}"))
            continue
        results.append(record(item, example, outcome, time.perf_counter() - start, rank))
    return results


def record(item: WorkItem, example: Example, outcome: Outcome, seconds: float, rank: int) -> dict:
    """The JSONL record of one example's outcome. `seconds`: its wall time (a batch's: its share)."""
    return {
        "task": example.task,
        "example": example.id,
        "method": item.press.label(),
        "budget": item.press.budget,
        "score": outcome.score,
        "metrics": outcome.metrics,
        "prediction": outcome.prediction,
        "reference": example.reference,
        "in_average": item.task.in_average,
        "prompt_tokens": outcome.prompt_tokens,
        "images": len(example.images),
        "image_input": outcome.image_input,
        "cache_bytes": outcome.cache_bytes,
        "full_cache_bytes": outcome.full_cache_bytes,
        "cache_ratio": outcome.cache_bytes / outcome.full_cache_bytes if outcome.full_cache_bytes else None,
        "global_cache_ratio": (  # hybrid models: the global layers only, where the budget applies
            outcome.global_cache_bytes / outcome.global_full_cache_bytes if outcome.global_full_cache_bytes else None
        ),
        "prefill_seconds": outcome.prefill_seconds,
        "shared_prefill": outcome.shared_prefill,
        "decode_ms_per_token": outcome.decode_ms_per_token,
        "batch": outcome.batch,
        "seconds": seconds,
        "info": example.info,
        "rank": rank,
    }


class JsonlWriter:
    """Appends one JSON object per line, flushed at once, so that an interruption loses at most the line in flight."""

    def __init__(self, path: Path, truncate: bool = False):
        if not truncate and path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with path.open("a", encoding="utf-8") as file:  # close a line cut short, so the next one stands alone
                file.write("\n")
        self.file = path.open("w" if truncate else "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# The task option that only counts examples: a task that has it draws example i the same whatever the count (tested
# for each), so a larger count adds examples to a folder and a smaller one reruns a prefix of it.
EXAMPLE_COUNT = "samples"


def check_run(out: Path, run: dict, tasks: list[Task], write: bool) -> None:
    """Records what this run is (`run.json`); refuses to resume a folder made with another model or task options,
    whose records would be summarised together with these. Methods, budgets, --limit and a task's example count
    (`EXAMPLE_COUNT`; the folder keeps the largest) may change: `commands` lists every invocation that ran in the
    folder, in order."""
    run = {**run, "tasks": {task.name: task_options(task) for task in tasks}}
    path = out / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        for key in ("model", "dtype"):
            if previous.get(key) != run[key]:
                raise ValueError(
                    f"{out} holds a run with {key} {previous.get(key)!r}, not {run[key]!r}: use another --out"
                )
        for name, options in run["tasks"].items():
            if name not in previous.get("tasks", {}):
                continue
            before = previous["tasks"][name]
            if _without_count(before) != _without_count(options):
                raise ValueError(f"{out} holds a run of {name} with options {before}, not {options}: use another --out")
            if EXAMPLE_COUNT in options:
                options[EXAMPLE_COUNT] = max(options[EXAMPLE_COUNT], before.get(EXAMPLE_COUNT, 0))
        run["tasks"] = {**previous.get("tasks", {}), **run["tasks"]}
        earlier = previous.get("commands", [previous["command"]] if "command" in previous else [])  # older files
        run["commands"] = earlier + [command for command in run["commands"] if command not in earlier]
    if write:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(run, indent=1), encoding="utf-8")
        tmp.replace(path)


def _without_count(options: dict) -> dict:
    return {name: value for name, value in options.items() if name != EXAMPLE_COUNT}


def load_tasks(
    tasks: list[Task], processor: Any, limit: int | None
) -> tuple[list[tuple[Task, list[Example]]], list[Failure]]:
    """Each task's examples (the first `limit` of each column, before sharding) and every load failure."""
    loaded, failures = [], []
    for task in tasks:
        examples, failed = task.load(processor)
        if limit is not None:
            per_column: dict[str, int] = {}
            kept = []
            for example in examples:
                per_column[example.task] = per_column.get(example.task, 0) + 1
                if per_column[example.task] <= limit:
                    kept.append(example)
            examples = kept
        loaded.append((task, examples))
        failures += failed
    return loaded, failures
