"""Summaries, figures and the results page, from a run folder's JSONL files alone (every rank's, merged).

Rows are (method, budget) with `full` first; columns are the tasks (each MileBench dataset its own; a task run at
several prompt lengths, one column per length), the mean cache ratio (and, for a model with sliding-window layers, the
mean ratio over its global layers: "global"), secondary metrics (fidelity's KL) and the average over accuracy-like
columns (present only when the row has all of them). Scores are shown x100, as MileBench and the KV-cache papers
report them, each with its 95% interval (`intervals.py`). Each method is compared with `full` and with SnapKV at the
same budget on the same examples (exact McNemar or a paired sign-flip test).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modalkv.eval.intervals import Comparison, average_interval, bootstrap, compare, interval
from modalkv.eval.runner import RUN_FILE, read_failures, read_records

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class Row:
    method: str
    budget: float | int
    scores: dict[str, float] = field(default_factory=dict)  # task -> mean score in [0, 1]
    counts: dict[str, int] = field(default_factory=dict)  # task -> examples
    metrics: dict[str, float] = field(default_factory=dict)  # "task metric" -> mean (e.g. "fidelity kl")
    metric_intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # "task metric" -> bootstrap 95%
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> 95% interval of its score
    cache_ratio: float | None = None
    global_cache_ratio: float | None = None  # over the global layers (hybrid models), from records that have it
    average: float | None = None
    average_interval: tuple[float, float] | None = None


@dataclass
class Summary:
    tasks: list[str]
    averaged: list[str]  # the tasks the average is over
    metrics: list[str]
    rows: list[Row]
    failures: list[dict]
    records: int
    comparisons: list[Comparison] = field(default_factory=list)  # paired, over the averaged columns' examples
    prompt_tokens: dict[str, list[int]] = field(default_factory=dict)  # column -> [shortest, longest] prompt
    seconds: float = 0.0  # the records' evaluation time, summed (what the run spent on them, model loading aside)


def column_of(record: dict, by_length: set[str]) -> str:
    """The table column of a record: its task, and its prompt length where the task ran at several."""
    return f"{record['task']}/{record['info']['length']}" if record["task"] in by_length else record["task"]


def summarize(records: list[dict], failures: list[dict] | None = None) -> Summary:
    """Means and 95% intervals per (method, budget) and column; the average over the accuracy-like columns; each
    method paired against `full` and against SnapKV at its budget."""
    lengths: dict[str, set] = {}
    for r in records:
        lengths.setdefault(r["task"], set()).add((r.get("info") or {}).get("length"))
    by_length = {task for task, found in lengths.items() if len(found) > 1 and None not in found}
    records = [{**r, "column": column_of(r, by_length)} for r in records]
    first = {task: i for i, task in enumerate(dict.fromkeys(r["task"] for r in records))}
    ordered = sorted(records, key=lambda r: (first[r["task"]], r["info"]["length"] if r["task"] in by_length else 0))
    tasks = list(dict.fromkeys(r["column"] for r in ordered))  # in the order tasks first appear, lengths ascending
    averaged = [t for t in tasks if all(r["in_average"] for r in records if r["column"] == t)]
    found = {t: [r["prompt_tokens"] for r in records if r["column"] == t and r.get("prompt_tokens")] for t in tasks}
    prompt_tokens = {t: [min(lengths), max(lengths)] for t, lengths in found.items() if lengths}
    methods = list(dict.fromkeys(["full", *(r["method"] for r in records)]))
    keys = sorted({(r["method"], r["budget"]) for r in records}, key=lambda k: (methods.index(k[0]), k[1]))
    rows, metric_names, paired = [], [], {}
    for method, budget in keys:
        mine = [r for r in records if r["method"] == method and r["budget"] == budget]
        row = Row(method, budget)
        for task in tasks:
            scores = [r["score"] for r in mine if r["column"] == task]
            if scores:
                row.scores[task], row.counts[task] = statistics.mean(scores), len(scores)
                row.intervals[task] = interval(scores)
            for name in dict.fromkeys(m for r in mine if r["column"] == task for m in r["metrics"]):
                if name != "top1":  # the score already is top-1 agreement
                    values = [r["metrics"][name] for r in mine if r["column"] == task and name in r["metrics"]]
                    row.metrics[f"{task} {name}"] = statistics.mean(values)
                    row.metric_intervals[f"{task} {name}"] = bootstrap([values])
        ratios = [r["cache_ratio"] for r in mine if r["cache_ratio"] is not None]
        row.cache_ratio = statistics.mean(ratios) if ratios else None
        global_ratios = [r["global_cache_ratio"] for r in mine if r.get("global_cache_ratio") is not None]
        row.global_cache_ratio = statistics.mean(global_ratios) if global_ratios else None
        paired[method, budget] = {(r["column"], r["example"]): r["score"] for r in mine if r["column"] in averaged}
        metric_names += [m for m in row.metrics if m not in metric_names]
        rows.append(row)
    # Averaged only over whole columns: a partial one (a run stopped early) would weigh its few examples as a column.
    most = {t: max(row.counts.get(t, 0) for row in rows) for t in averaged}
    for row in rows:
        if averaged and all(row.counts.get(t) == most[t] for t in averaged):
            row.average = statistics.mean(row.scores[t] for t in averaged)
            scores = paired[row.method, row.budget]
            row.average_interval = average_interval([[v for (c, _), v in scores.items() if c == t] for t in averaged])
    comparisons = []
    for method, budget in keys:
        references = [("full", 1.0), ("snapkv", budget)] if method != "snapkv" else [("full", 1.0)]
        for reference in references if method != "full" else []:
            if reference in paired:
                name = "full" if reference[0] == "full" else f"snapkv@{budget:g}"
                found = compare(paired[method, budget], paired[reference], (method, budget, name))
                comparisons += [found] if found is not None else []
    seconds = sum(r.get("seconds") or 0.0 for r in records)
    return Summary(
        tasks, averaged, metric_names, rows, failures or [], len(records), comparisons, prompt_tokens, seconds
    )


def load_summary(run_dir: Path) -> Summary:
    if not run_dir.is_dir():
        raise ValueError(f"run folder not found: {run_dir}")
    records = read_records(run_dir)
    if not records:
        raise ValueError(f"no records in {run_dir} (records.rank*.jsonl)")
    return summarize(records, read_failures(run_dir))


def table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table as text (scores x100; a cell with fewer examples says how many)."""
    most = {t: max(row.counts.get(t, 0) for row in summary.rows) for t in summary.tasks}
    hybrid = any(row.global_cache_ratio not in (None, row.cache_ratio) for row in summary.rows)
    ratios = ["cache", "global"] if hybrid else ["cache"]
    header = ["method", "budget", *ratios, *(f"{t} (n={most[t]})" for t in summary.tasks), *summary.metrics]
    if summary.averaged:
        header.append("average")
    lines = []
    for row in summary.rows:
        cells = [row.method, f"{row.budget:g}", "-" if row.cache_ratio is None else f"{row.cache_ratio:.3f}"]
        if hybrid:
            cells.append("-" if row.global_cache_ratio is None else f"{row.global_cache_ratio:.3f}")
        for task in summary.tasks:
            if task not in row.scores:
                cells.append("-")
            else:
                partial = f" ({row.counts[task]}/{most[task]})" if row.counts[task] < most[task] else ""
                cells.append(f"{100 * row.scores[task]:.1f} {_bounds(row.intervals[task])}{partial}")
        for name in summary.metrics:  # the full cache's KL with itself is ~±1e-8: shown as 0.000, not -0.000
            if name not in row.metrics:
                cells.append("-")
                continue
            low, high = row.metric_intervals[name]
            cells.append(f"{row.metrics[name]:.3f} [{low:.3f}, {high:.3f}]".replace("-0.000", "0.000"))
        if summary.averaged:
            cells.append("-" if row.average is None else f"{100 * row.average:.1f} {_bounds(row.average_interval)}")
        lines.append(cells)
    return header, lines


def _bounds(bounds: tuple[float, float]) -> str:
    return f"[{100 * bounds[0]:.0f}-{100 * bounds[1]:.0f}]"


def comparison_table(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired comparisons: each method against `full` and against SnapKV at its budget."""
    header = ["method", "budget", "against", "examples", "difference", "better / worse", "p", "test"]
    rows = [
        [
            c.method,
            f"{c.budget:g}",
            c.reference,
            str(c.examples),
            f"{100 * c.difference:+.1f}",
            f"{c.better} / {c.worse}",
            f"{c.p_value:.3g}" + (" *" if c.p_value < 0.05 else ""),
            c.test,
        ]
        for c in summary.comparisons
    ]
    return header, rows


def failure_lines(summary: Summary) -> list[str]:
    """One line per task with failures: how many, and the first error."""
    by_task: dict[str, list[dict]] = {}
    for failure in summary.failures:
        by_task.setdefault(failure["task"], []).append(failure)
    return [f"{task}: {len(items)} failed ({items[0]['error']})" for task, items in by_task.items()]


# -- figures ---------------------------------------------------------------------------------------------------------


def _ratio_rows(summary: Summary) -> dict[str, list[Row]]:
    """Compressed rows with a ratio budget, per method (absolute token budgets have no common x axis)."""
    lines: dict[str, list[Row]] = {}
    for row in summary.rows:
        if row.method != "full" and row.budget <= 1:
            lines.setdefault(row.method, []).append(row)
    return lines


def _full(summary: Summary) -> Row | None:
    return next((row for row in summary.rows if row.method == "full"), None)


def _budget_ticks(axis, summary: Summary) -> None:
    """The run's budgets as the x ticks of a log axis."""
    budgets = sorted({r.budget for rows in _ratio_rows(summary).values() for r in rows})
    axis.set_xticks(budgets, [f"{b:g}" for b in budgets])
    axis.minorticks_off()


def accuracy_figure(summary: Summary) -> Figure:
    """Score vs budget per task (and the average): one line per method, the full cache as a dashed line."""
    from modalkv.plots import _pyplot

    plt = _pyplot()
    panels = summary.tasks + (["average"] if len(summary.averaged) > 1 else [])
    columns = min(len(panels), 3)
    figure, axes = plt.subplots(
        (len(panels) + columns - 1) // columns,
        columns,
        figsize=(4.5 * columns, 3.5 * ((len(panels) + 2) // 3)),
        squeeze=False,
    )

    def value(row: Row, panel: str) -> float | None:
        return row.average if panel == "average" else row.scores.get(panel)

    methods = _ratio_rows(summary)
    for axis, panel in zip(axes.flat, panels, strict=False):
        for i, (method, rows) in enumerate(methods.items()):
            shown = [r for r in rows if value(r, panel) is not None]
            if shown:
                ys = [100 * value(r, panel) for r in shown]
                bounds = [(r.average_interval if panel == "average" else r.intervals[panel]) for r in shown]
                errors = [  # (the bounds can sit a rounding error on the wrong side of the score)
                    [max(0.0, y - 100 * lo) for y, (lo, _) in zip(ys, bounds, strict=True)],
                    [max(0.0, 100 * hi - y) for y, (_, hi) in zip(ys, bounds, strict=True)],
                ]
                dodge = 1 + 0.012 * (i - len(methods) / 2)  # side by side on the log axis
                xs = [r.budget * dodge for r in shown]
                axis.errorbar(xs, ys, yerr=errors, capsize=1.5, elinewidth=0.7, **line_style(i), label=method)
        full = _full(summary)
        if full is not None and value(full, panel) is not None:
            axis.axhline(100 * value(full, panel), color="black", linestyle="--", label="full")
        axis.set(title=panel, xlabel="budget (kept fraction)", ylabel="score x100", xscale="log", ylim=(-3, 103))
        _budget_ticks(axis, summary)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    return figure


def line_style(index: int) -> dict:
    """Colour, marker and dash of the index-th method's line: distinct for up to 40 methods (10 colours x 4)."""
    variant = index // 10 % 4
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", "-.", ":")[variant], "marker": "os^D"[variant]}


def bars_figure(summary: Summary, budget: float | int) -> Figure:
    """Per-task scores at one budget: a group of bars per task, one bar per method, the full cache first."""
    from modalkv.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in summary.rows if r.method == "full" or r.budget == budget]
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(summary.tasks) * max(len(rows), 1) / 3), 4))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [t + i * width for t, task in enumerate(summary.tasks) if task in row.scores]
        heights = [100 * row.scores[task] for task in summary.tasks if task in row.scores]
        label = row.method if row.method == "full" else f"{row.method}@{budget:g}"
        axis.bar(xs, heights, width, color=plt.get_cmap("tab20")(i % 20), label=label)
    axis.set_xticks([t + 0.4 - width / 2 for t in range(len(summary.tasks))], summary.tasks, rotation=20, ha="right")
    axis.set(ylabel="score x100", title=f"per-task scores at budget {budget:g}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def fidelity_figure(summary: Summary, task: str = "fidelity") -> Figure:
    """KL(full || compressed) and top-1 agreement vs budget, one line per method."""
    from modalkv.plots import _pyplot

    plt = _pyplot()
    figure, (kl_axis, top1_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (method, rows) in enumerate(_ratio_rows(summary).items()):
        kl = [(r.budget, r.metrics[f"{task} kl"]) for r in rows if f"{task} kl" in r.metrics]
        top1 = [(r.budget, r.scores[task]) for r in rows if task in r.scores]
        if kl:
            kl_axis.plot(*zip(*kl, strict=True), **line_style(i), label=method)
        if top1:
            top1_axis.plot(*zip(*top1, strict=True), **line_style(i), label=method)
    kl_axis.set(title="next-token KL(full || compressed)", xlabel="budget", ylabel="nats/token", xscale="log")
    top1_axis.set(title="top-1 agreement with the full cache", xlabel="budget", xscale="log", ylim=(-0.03, 1.03))
    for axis in (kl_axis, top1_axis):
        _budget_ticks(axis, summary)
    kl_axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def default_bar_budget(summary: Summary) -> float | int | None:
    """The ratio budget closest to 0.2 (the papers' usual setting), or None with no compressed rows."""
    budgets = sorted({r.budget for rows in _ratio_rows(summary).values() for r in rows})
    return min(budgets, key=lambda b: abs(b - 0.2)) if budgets else None


def write_figures(summary: Summary, folder: Path, bar_budget: float | int | None = None) -> list[Path]:
    """Writes the figures as PNG and the numbers behind them as summary.json; returns the PNG paths."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"accuracy_vs_budget": accuracy_figure(summary)}
    bar_budget = default_bar_budget(summary) if bar_budget is None else bar_budget
    if bar_budget is not None:
        figures[f"tasks_at_{bar_budget:g}"] = bars_figure(summary, bar_budget)
    if "fidelity" in summary.tasks:
        figures["fidelity_vs_budget"] = fidelity_figure(summary)
    paths = []
    for name, figure in figures.items():
        paths.append(folder / f"{name}.png")
        figure.savefig(paths[-1], dpi=110)
    (folder / "summary.json").write_text(json.dumps(asdict(summary), indent=1), encoding="utf-8")
    return paths


# What a task's score is, for the results page (by the task's name, the part of a column before "/")
SCORES = {
    "passkey": "exact key",
    "milebench": "each dataset's own metric",
    "fidelity": "top-1 agreement with the full cache, with its KL in nats/token",
    "deferred": "every key token the compressed model's top-1 at its step of the teacher-forced continuation, "
    "chance ~0, with the KL to the full cache at the key (`kl_key`) and over the continuation (`kl`), in nats/token",
    "synthetic": "the right option ranked first by likelihood, chance 1/4 with the default 4 options, with its margin "
    "in nats",
    "haystack": "greedy decoding writes the 5-digit key, chance ~0, with the share of the key's tokens right",
    "photos": "the answer names the photo, or gives the target's image number; chance 1/6 for one photo, about 1/N "
    "among N",
}


def markdown(summary: Summary, run_dir: Path, figures: list[Path], page: Path) -> str:
    """The results page: what was run, the table, the figures (linked relative to the page), the failures."""
    run = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8")) if (run_dir / RUN_FILE).exists() else {}
    header, rows = table(summary)
    lines = [
        "# Results",
        "",
        f"Generated by `modalkv report {run_dir} --markdown {page}` from {summary.records} records (not by hand).",
        "",
    ]
    if run:
        lines += [
            f"Model `{run.get('model')}` ({run.get('dtype')}), made with:",
            "",
            "```bash",
            *run.get("commands", []),
            "```",
            "",
        ]
    kinds = dict.fromkeys(task.partition("/")[0] for task in summary.tasks)
    meanings = "; ".join(f"{kind}: {SCORES[kind]}" for kind in kinds if kind in SCORES)
    lines += [
        f"Scores x100 ({meanings}). `cache`: kept KV bytes / uncompressed KV bytes (what "
        "transformers' own cache holds: its sliding-window layers keep their window); `global`, for a model with "
        "sliding-window layers: the same over its global layers, where the budget applies. Brackets: the 95% "
        "interval (Wilson for 0/1 scores, over all the examples for the average; else a percentile bootstrap that, for "
        "the average, resamples each column). A cell "
        "with fewer examples than its column says how many; a row with such a cell has no average.",
        "",
        "Prompt tokens per column (shortest-longest): "
        + "; ".join(f"{t} {low:,}-{high:,}" for t, (low, high) in summary.prompt_tokens.items())
        + f". Evaluation time, summed over the records (model loading aside): {summary.seconds / 60:,.1f} min.",
        "",
        *_markdown_table(header, rows),
    ]
    if summary.comparisons:
        header, rows = comparison_table(summary)
        lines += [
            "## Paired comparisons",
            "",
            "Each method against the full cache and against SnapKV at the same budget, on the examples both ran, over "
            f"the averaged columns ({', '.join(summary.averaged)}): the mean score difference (x100), the examples "
            "where it scores higher / lower, and the two-sided p-value (exact McNemar for 0/1 scores, else a paired "
            "sign-flip test); * p < 0.05, uncorrected for the number of comparisons.",
            "",
            *_markdown_table(header, rows),
        ]
    for figure in figures:
        lines += [f"![{figure.stem}]({figure.resolve().relative_to(page.resolve().parent).as_posix()})", ""]
    failures = failure_lines(summary)
    lines += ["## Failures", "", *([f"- {line}" for line in failures] or ["None."]), ""]
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [*lines, *("| " + " | ".join(row) + " |" for row in rows), ""]
