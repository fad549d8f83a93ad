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
