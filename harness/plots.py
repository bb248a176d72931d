"""Figures of per-layer, per-head values (attention entropy, learned entropy thresholds).

Figures are drawn on a `matplotlib.figure.Figure` with the Agg canvas, not through pyplot, so no global
figure state or GUI backend is involved and several threads or trackers can draw at once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# grids up to this many layers and heads get each value written in its cell
MAX_ANNOTATED_SIDE = 16


def plot_layer_head_heatmap(values: np.ndarray, path: str | Path, title: str, colorbar_label: str) -> Path:
    """Save an (L, H) array as a heatmap PNG: heads on the x axis, layers on the y axis (layer 0 on top)."""
    values = np.asarray(values, dtype=np.float64)  # (L, H)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(
            f"invalid heatmap values: expected a non-empty (n_layer, n_head) array, got shape {values.shape}"
        )
    n_layer, n_head = values.shape

    # the figure grows with the grid, within limits that keep it readable
    width = min(3.0 + 0.6 * n_head, 16.0)
    height = min(2.0 + 0.45 * n_layer, 12.0)
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()

    # NaN cells (a head never measured) are left blank
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if n_layer <= MAX_ANNOTATED_SIDE and n_head <= MAX_ANNOTATED_SIDE:
        _annotate_cells(ax, values, image)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _annotate_cells(ax, values: np.ndarray, image) -> None:
    """Write each finite value in its cell, dark text on light cells and light text on dark ones."""
    fontsize = 8 if max(values.shape) <= 8 else 6
    for layer, head in np.ndindex(values.shape):
        value = values[layer, head]
        if not np.isfinite(value):
            continue
        brightness = np.mean(image.cmap(image.norm(value))[:3])
        color = "black" if brightness > 0.5 else "white"
        ax.text(head, layer, f"{value:.2f}", ha="center", va="center", color=color, fontsize=fontsize)
