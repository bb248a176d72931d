"""Figures of a study report, each saved as PNG and PDF, numbered as the figures of Jha and Reagen,
"Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489) that they reproduce.

- fig2a_entropy_bins: share of heads per head-entropy bin, one group of 4 bars per model.
- fig2b_eval_loss: validation cross-entropy against the training step, one line per model.
- fig3_head_entropy: layer x head heatmaps of the final head entropy, one panel per model.
- fig5_layer_entropy: mean head entropy of each layer against the training step, one panel per model.
- fig6_thresholds_<model>: learned thresholds of a regularized model: layer x head, per-layer mean and variance.
- fig7_gamma_bins: head-entropy bins across gamma values (only with a gamma sweep).
Every value is the mean over the seeds of a model. Identical inputs give identical bytes: the figures use
matplotlib's default style whatever the user's matplotlibrc says, and no timestamp or software version is
written into the files.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.style
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from harness.tables import BIN_NAMES, gamma_groups

if TYPE_CHECKING:
    from harness.report import Group

log = logging.getLogger(__name__)

RC_PARAMS = {"svg.hashsalt": "harness-report", "figure.dpi": 100, "savefig.dpi": 120, "font.size": 9,
             "pdf.compression": 6, "axes.grid": False}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"Creator": "harness tables", "Producer": None, "CreationDate": None}
MAX_PANEL_COLUMNS = 4
MAX_ANNOTATED_HEADS = 64  # heatmaps with at most this many cells get the value written in each cell


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, folder: Path, name: str) -> list[Path]:
    """Save <name>.png and <name>.pdf without timestamps or version strings."""
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    figure.savefig(png, metadata=PNG_METADATA, bbox_inches="tight")
    figure.savefig(pdf, metadata=PDF_METADATA, bbox_inches="tight")
    return [png, pdf]


def slug(label: str) -> str:
    """Return a file-name form of a model label: "EReg(SM(t)+ScFuFFN) gamma=0.20" -> "ereg_sm_t_scfuffn_gamma_0_20"."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def _panels(count: int, panel_width: float, panel_height: float) -> tuple[Figure, list]:
    """Create a figure with `count` visible panels in rows of at most MAX_PANEL_COLUMNS."""
    columns = min(count, MAX_PANEL_COLUMNS)
    rows = math.ceil(count / columns)
    figure = _figure(panel_width * columns, panel_height * rows)
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(rows * columns)]
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


# -----------------------------------------------------------------------------
# Figures

def plot_bins(labels: list[str], means: np.ndarray, stds: np.ndarray, title: str) -> Figure:
    """Draw grouped bars, one group per label and one bar per bin, from (G, 4) mean and std shares."""
    figure = _figure(max(6.5, 1.1 * len(labels) + 3.0), 3.8)
    ax = figure.add_subplot()
    x = np.arange(len(labels))
    width = 0.2
    for i, name in enumerate(BIN_NAMES):
        # std over seeds as error bars, cut at zero below
        upper = np.nan_to_num(100 * stds[:, i], nan=0.0)
        lower = np.minimum(upper, 100 * means[:, i])
        ax.bar(x + (i - 1.5) * width, 100 * means[:, i], width, yerr=[lower, upper], capsize=2, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("heads (%)")
    ax.set_title(title)
    ax.legend(title="head entropy bin\n(M = max head entropy)", fontsize=7, title_fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    return figure


def _bins_of(groups: list[Group]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return labels and the (G, 4) mean and std of bin shares over seeds, for groups with bins."""
    labels, means, stds = [], [], []
    for group in groups:
        bins = group.stacked("bins")  # (n, 4)
        if bins is None:
            continue
        labels.append(group.label)
        means.append(bins.mean(axis=0))
        stds.append(bins.std(axis=0, ddof=1) if len(bins) > 1 else np.full(4, np.nan))
    return labels, np.array(means), np.array(stds)


def plot_eval_loss(groups: list[Group]) -> Figure | None:
    """Draw the validation cross-entropy against the step, one line per model (mean over seeds)."""
    curves = [(g.label, g.mean_curve("eval_steps", "eval_loss")) for g in groups]
    curves = [(label, curve) for label, curve in curves if curve is not None]
    if not curves:
        return None
    figure = _figure(8.0, 4.0)
    ax = figure.add_subplot()
    colors = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    for (label, (steps, loss)), color in zip(curves, colors * 2):
        ax.plot(steps, loss, marker="o", markersize=2, color=color, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation cross-entropy (nats)")
    ax.set_title("Evaluation loss (mean over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _heatmap(ax, values: np.ndarray, norm: Normalize, title: str):
    """Draw an (L, H) array with heads on x and layers on y (layer 0 on top), and return the image for a colorbar."""
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    n_layer, n_head = values.shape
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=8)
    if values.size <= MAX_ANNOTATED_HEADS:
        for layer, head in np.ndindex(values.shape):
            if np.isfinite(values[layer, head]):
                bright = np.mean(image.cmap(norm(values[layer, head]))[:3]) > 0.5
                ax.text(head, layer, f"{values[layer, head]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if bright else "white")
    return image


def _colorbar(figure: Figure, image, axes, label: str) -> None:
    colorbar = figure.colorbar(image, ax=axes, label=label)
    colorbar.ax.ticklabel_format(useOffset=False)


def plot_head_entropy(groups: list[Group]) -> Figure | None:
    """Draw one layer x head heatmap of the final head entropy per model, on one shared color scale."""
    maps = [(g.label, g.stacked("head_entropy")) for g in groups]
    maps = [(label, stack.mean(axis=0)) for label, stack in maps if stack is not None]  # each (L, H)
    if not maps:
        return None
    finite = np.concatenate([m[np.isfinite(m)] for _, m in maps])
    norm = Normalize(vmin=float(finite.min()), vmax=float(finite.max())) if finite.size else Normalize()
    figure, axes = _panels(len(maps), 3.6, 3.2)
    for ax, (label, values) in zip(axes, maps):
        image = _heatmap(ax, values, norm, label)
    _colorbar(figure, image, axes, "head entropy (nats)")
    figure.suptitle("Head entropy at the last evaluation (mean over seeds)")
    return figure


def plot_layer_entropy(groups: list[Group]) -> Figure | None:
    """Draw the mean head entropy of each layer against the step, one panel per model, one line per layer."""
    curves = [(g, g.mean_curve("entropy_steps", "layer_entropy")) for g in groups]
    curves = [(g, curve) for g, curve in curves if curve is not None]
    if not curves:
        return None
    figure, axes = _panels(len(curves), 4.2, 3.2)
    for ax, (group, (steps, layers)) in zip(axes, curves):
        for layer in range(layers.shape[1]):
            ax.plot(steps, layers[:, layer], label=f"layer {layer}")
        ax.axhline(math.log(group.cfg.data.context_length), color="gray", linestyle=":", linewidth=1, label="log T")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean head entropy (nats)")
        ax.set_title(group.label, fontsize=8)
        ax.legend(fontsize=6)
    figure.suptitle("Layerwise entropy during training (mean over seeds)")
    return figure


def plot_thresholds(group: Group) -> Figure | None:
    """Draw a regularized model's learned thresholds: layer x head, and their mean and variance per layer."""
    stack = group.stacked("thresholds")  # (n, L, H)
    if stack is None:
        return None
    values = stack.mean(axis=0)  # (L, H)
    figure = _figure(12.0, 3.4)
    ax_map, ax_mean, ax_var = (figure.add_subplot(1, 3, i) for i in (1, 2, 3))
    norm = Normalize(float(np.nanmin(values)), float(np.nanmax(values)))
    image = _heatmap(ax_map, values, norm, "threshold per head")
    _colorbar(figure, image, ax_map, "theta (fraction of E_max)")
    layers = np.arange(values.shape[0])
    ax_mean.bar(layers, np.nanmean(values, axis=1))
    ax_mean.set_title("mean over heads", fontsize=8)
    ax_mean.set_ylabel("theta (fraction of E_max)")
    ax_var.bar(layers, np.nanvar(values, axis=1), color="tab:orange")
    ax_var.set_title("variance over heads", fontsize=8)
    ax_var.set_ylabel("variance of theta")
    for ax in (ax_mean, ax_var):
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
    figure.suptitle(f"{group.label}: learned entropy thresholds (mean over {len(stack)} seeds)")
    return figure


# -----------------------------------------------------------------------------
# All figures of a report

def _draw_all(groups: list[Group]) -> list[tuple[str, Figure | None]]:
    labels, means, stds = _bins_of(groups)
    figures = [("fig2a_entropy_bins", plot_bins(labels, means, stds, "Head-entropy distribution") if labels else None),
               ("fig2b_eval_loss", plot_eval_loss(groups)),
               ("fig3_head_entropy", plot_head_entropy(groups)),
               ("fig5_layer_entropy", plot_layer_entropy(groups))]
    figures += [(f"fig6_thresholds_{slug(g.label)}", plot_thresholds(g)) for g in groups if g.regularized]
    swept = gamma_groups(groups)
    if swept:
        labels, means, stds = _bins_of(swept)
        if len({g.arch for g in swept}) == 1 and len({g.loss_coeff for g in swept}) == 1:
            labels = [f"gamma={g.tolerance:.2f}" for g in swept if g.stacked("bins") is not None]
        figure = plot_bins(labels, means, stds, "Head-entropy distribution by gamma") if labels else None
        figures.append(("fig7_gamma_bins", figure))
    return figures


def write_figures(groups: list[Group], folder: Path) -> list[Path]:
    """Draw and save every figure the groups have data for, and return the paths written."""
    written = []
    with matplotlib.style.context("default"), matplotlib.rc_context(RC_PARAMS):
        for name, figure in _draw_all(groups):
            if figure is None:
                log.info("figure %s skipped: no run of the study logged its data", name)
                continue
            written += _save(figure, folder, name)
    return written
