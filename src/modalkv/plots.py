"""Figures: data in, matplotlib Figure out (matplotlib is imported lazily: `pip install modalkv[plots]`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError("plots need matplotlib: pip install 'modalkv[plots]'") from error
    return plt


def head_preference_figure(preference: list[list[float]], kept: list[list[int]], title: str) -> Figure:
    """MadaKV's picture: visual preference per layer x KV head (heatmap) and tokens kept per layer after HCC (bars).

    Args:
        preference: [layers][heads] w_v / (w_v + w_t) in [0, 1].
        kept: [layers][heads] tokens each head keeps.
    """
    plt = _pyplot()
    figure, (heat, bars) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    image = heat.imshow(preference, aspect="auto", cmap="coolwarm", vmin=0, vmax=1, origin="lower")
    heat.set(xlabel="KV head", ylabel="layer", title="visual preference w_v / (w_v + w_t)")
    heat.set_xticks(range(len(preference[0])))
    figure.colorbar(image, ax=heat, fraction=0.05)
    layers = range(len(kept))
    bars.bar(layers, [sum(row) / len(row) for row in kept], color="tab:blue")
    bars.set(xlabel="layer", ylabel="tokens kept per head (mean)", title="per-layer budgets after HCC")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def bench_figures(rows: list[dict], title: str, capacity: list[dict] | None = None) -> dict[str, Figure]:
    """The benchmark's pictures from `modalkv bench` rows (bench.json): decode ms/token vs context per method with the
    uncompressed baseline and the short-context floor; speed-up over the baseline vs budget at the longest context;
    KV-cache MiB (and prefill peak MiB when measured) vs context -- these three at the smallest batch. With several
    batch sizes, tokens/s vs batch per method at the longest context; with `capacity` rows (--memory-limit), the most
    sequences in flight per method."""
    plt = _pyplot()
    figures = throughput_figures(rows, title, capacity or [])
    smallest = min(row["batch"] for row in rows)
    rows = [row for row in rows if row["batch"] == smallest]
    if smallest > 1:
        title = f"{title}, batch {smallest}"
    cells: dict[str, list[dict]] = {}
    for row in rows:
        cells.setdefault(f"{row['method']} @ {row['budget']}", []).append(row)
    contexts = sorted({row["context"] for row in rows})

    figure, axes = plt.subplots(figsize=(7, 4.5))
    baseline = {row["context"]: row["baseline_ms_per_token"] for row in rows}
    floor = {row["context"]: row["floor_ms_per_token"] for row in rows}
    axes.plot(contexts, [baseline[c] for c in contexts], "k-o", label="DynamicCache (uncompressed)")
    axes.plot(contexts, [floor[c] for c in contexts], "k:", label="floor (256-token context)")
    for label, cell in cells.items():
        cell = sorted(cell, key=lambda r: r["context"])
        axes.plot([r["context"] for r in cell], [r["decode_ms_per_token"] for r in cell], "-o", label=label)
    axes.set(xlabel="context (tokens)", ylabel="decode ms/token", title=title)
    axes.legend(fontsize=8)
    figures["decode_vs_context"] = figure

    longest = contexts[-1]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if row["context"] == longest:
            by_method.setdefault(row["method"], []).append(row)
    for method, cell in by_method.items():
        cell = sorted(cell, key=lambda r: r["budget"])
        axes.plot([r["budget"] for r in cell], [r["decode_speedup"] for r in cell], "-o", label=method)
    axes.axhline(1.0, color="k", linestyle=":", linewidth=1)
    axes.set(xlabel="budget", ylabel="decode speed-up over DynamicCache", title=f"{title}, {longest} tokens")
    axes.legend(fontsize=8)
    figures["speedup_vs_budget"] = figure

    figure, axes = plt.subplots(figsize=(7, 4.5))
    full = {row["context"]: row["full_cache_bytes"] / 2**20 for row in rows}
    axes.plot(contexts, [full[c] for c in contexts], "k-o", label="uncompressed KV cache")
    for label, cell in cells.items():
        cell = sorted(cell, key=lambda r: r["context"])
        axes.plot([r["context"] for r in cell], [r["cache_bytes"] / 2**20 for r in cell], "-o", label=f"{label} cache")
        if "prefill_peak_mib" in cell[0]:
            axes.plot([r["context"] for r in cell], [r["prefill_peak_mib"] for r in cell], "--", label=f"{label} peak")
    if "baseline_prefill_peak_mib" in rows[0]:
        peak = {row["context"]: row["baseline_prefill_peak_mib"] for row in rows}
        axes.plot(contexts, [peak[c] for c in contexts], "k--", label="DynamicCache prefill peak")
    axes.set(xlabel="context (tokens)", ylabel="MiB", title=f"{title}: memory")
    axes.legend(fontsize=7)
    figures["memory_vs_context"] = figure
    for figure in figures.values():
        figure.tight_layout()
    return figures


def throughput_figures(rows: list[dict], title: str, capacity: list[dict]) -> dict[str, Figure]:
    """tokens/s vs batch per method at the longest context (several batch sizes), and max batch under the memory
    limit per method and context (capacity rows)."""
    plt = _pyplot()
    figures = {}
    batches = sorted({row["batch"] for row in rows})
    if len(batches) > 1:
        longest = max(row["context"] for row in rows)
        at_longest = [row for row in rows if row["context"] == longest]
        figure, axes = plt.subplots(figsize=(7, 4.5))
        baseline = {row["batch"]: row["baseline_tokens_per_second"] for row in at_longest}
        axes.plot(batches, [baseline[b] for b in batches], "k-o", label="DynamicCache (uncompressed)")
        cells: dict[str, list[dict]] = {}
        for row in at_longest:
            cells.setdefault(f"{row['method']} @ {row['budget']}", []).append(row)
        for label, cell in cells.items():
            cell = sorted(cell, key=lambda r: r["batch"])
            axes.plot([r["batch"] for r in cell], [r["tokens_per_second"] for r in cell], "-o", label=label)
        axes.set(xlabel="batch (sequences decoded together)", ylabel="tokens/s", title=f"{title}, {longest} tokens")
        axes.set_xscale("log", base=2)
        axes.legend(fontsize=8)
        figures["throughput_vs_batch"] = figure
    if capacity:
        contexts = sorted({row["context"] for row in capacity})
        labels = list(dict.fromkeys(f"{row['method']} @ {row['budget']}" for row in capacity))
        figure, axes = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / len(contexts)
        for i, context in enumerate(contexts):
            by_label = {f"{r['method']} @ {r['budget']}": r["max_batch"] for r in capacity if r["context"] == context}
            positions = [j + i * width for j in range(len(labels))]
            axes.bar(positions, [by_label.get(label, 0) for label in labels], width, label=f"{context} tokens")
        axes.set_xticks([j + width * (len(contexts) - 1) / 2 for j in range(len(labels))], labels, rotation=30)
        limit = capacity[0]["memory_limit_bytes"] / 2**30
        axes.set(ylabel="max sequences in flight", title=f"{title}: under {limit:g} GiB (measured)")
        axes.legend(fontsize=8)
        figures["max_concurrent"] = figure
    for figure in figures.values():
        figure.tight_layout()
    return figures
