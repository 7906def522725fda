"""PNG figures for evaluation and zero-shot inference (matplotlib, Agg backend: no display needed).

Volumes are canonical RAS+ `(X, Y, Z)` arrays. Slices are drawn in the radiological convention: axial
slices seen from the feet (patient's right on the image's left, anterior up), coronal slices seen from the
front (right on the left, superior up), with the aspect ratio of the voxel spacing when it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib  # slow to import: only when a figure is drawn

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return path


def display_image(image: np.ndarray) -> np.ndarray:
    """The channel to show of a multi-window image `(X, Y, Z, C)`: the middle one (soft tissue of the default
    lung / soft tissue / bone stack); a single-window `(X, Y, Z)` image as it is."""
    image = np.asarray(image)
    return image[..., image.shape[-1] // 2] if image.ndim == 4 else image


def _plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """2-D image to `imshow(origin='lower')`: rows vertical, patient's right on the left."""
    sliced = volume[:, :, index] if view == "axial" else volume[:, index, :]
    return np.asarray(sliced).T[:, ::-1]  # transpose: x horizontal; flip: patient's right on the left


def _aspect(spacing: Sequence[float] | None, view: str) -> float:
    if spacing is None:
        return 1.0
    vertical = spacing[1] if view == "axial" else spacing[2]
    return float(vertical) / float(spacing[0])


def label_colors(labels: np.ndarray):
    """A fixed colour per organ id (0 transparent), so the same organ has the same colour in every figure."""
    from matplotlib.colors import ListedColormap

    rng = np.random.default_rng(0)
    colors = np.concatenate([rng.uniform(0.15, 1.0, (105, 3)), np.full((105, 1), 0.45)], axis=1)
    colors[0] = 0.0
    return ListedColormap(colors), np.ma.masked_equal(labels, 0)


def _show_slice(
    ax, image, view, index, *, labels=None, heatmap=None, outline=None, spacing=None, vrange=None
) -> Any:
    aspect = _aspect(spacing, view)
    ax.imshow(_plane(image, view, index), cmap="gray", origin="lower", vmin=0.0, vmax=1.0, aspect=aspect)
    shown = None
    if labels is not None:
        cmap, masked = label_colors(_plane(labels, view, index))
        ax.imshow(masked, cmap=cmap, origin="lower", vmin=0, vmax=104, aspect=aspect, interpolation="nearest")
    if heatmap is not None:
        lo, hi = vrange if vrange is not None else (float(heatmap.min()), float(heatmap.max()))
        shown = ax.imshow(
            _plane(heatmap, view, index),
            cmap="jet",
            origin="lower",
            alpha=0.45,
            vmin=lo,
            vmax=max(hi, lo + 1e-6),
            aspect=aspect,
        )
    if outline is not None and np.any(_plane(outline, view, index)):
        ax.contour(_plane(outline, view, index).astype(float), levels=[0.5], colors="white", linewidths=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.01, 0.99, "R", color="yellow", transform=ax.transAxes, va="top", ha="left", fontsize=8)
    return shown


def heatmap_overlay(
    image: np.ndarray,
    heatmap: np.ndarray,
    path: str | Path,
    *,
    title: str = "",
    labels: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
) -> Path:
    """Axial and coronal slices through the heatmap's maximum: CT, heatmap on top (and the mask, if any)."""
    image = display_image(image)
    plt = pyplot()
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    panels = [("axial", peak[2]), ("coronal", peak[1])]
    columns = 2 if labels is None else 3
    fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.4), squeeze=False)
    vrange = (float(heatmap.min()), float(heatmap.max()))
    for row, (view, index) in enumerate(panels):
        _show_slice(axes[row, 0], image, view, index, spacing=spacing)
        axes[row, 0].set_title(f"{view} {index}", fontsize=8)
        shown = _show_slice(axes[row, 1], image, view, index, heatmap=heatmap, spacing=spacing, vrange=vrange)
        fig.colorbar(shown, ax=axes[row, 1], fraction=0.046, pad=0.02, format="%.3g")
        axes[row, 1].set_title("similarity", fontsize=8)
        if labels is not None:
            _show_slice(axes[row, 2], image, view, index, labels=labels, spacing=spacing)
            axes[row, 2].set_title("organ mask", fontsize=8)
    fig.suptitle(title[:90], fontsize=9)
    return _save(fig, path)


def case_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    heatmaps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    outline: np.ndarray | None = None,
    title: str = "",
    spacing: Sequence[float] | None = None,
) -> Path:
    """One evaluation case: the mask overlay, then one heatmap per query, each through its own maximum
    (axial row and coronal row); `outline` (e.g. the lesion mask) is drawn in white on every panel."""
    image = display_image(image)
    plt = pyplot()
    columns = 1 + len(heatmaps)
    fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 6.4), squeeze=False)
    if outline is not None and np.any(outline):
        centre = [int(round(c)) for c in np.argwhere(outline).mean(axis=0)]
    else:
        centre = [s // 2 for s in image.shape]
    for row, view in enumerate(("axial", "coronal")):
        index = centre[2] if view == "axial" else centre[1]
        _show_slice(axes[row, 0], image, view, index, labels=labels, outline=outline, spacing=spacing)
        axes[row, 0].set_title(f"organ mask ({view} {index})", fontsize=8)
        for col, (query, heatmap) in enumerate(heatmaps.items(), start=1):
            peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            at = peak[2] if view == "axial" else peak[1]
            shown = _show_slice(
                axes[row, col], image, view, at, heatmap=heatmap, outline=outline, spacing=spacing
            )
            fig.colorbar(shown, ax=axes[row, col], fraction=0.046, pad=0.02, format="%.3g")
            axes[row, col].set_title(f"{query[:40]} ({view} {at})", fontsize=7)
    fig.suptitle(title[:90], fontsize=9)
    return _save(fig, path)


def roc_curves(per_finding: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """One small ROC plot per finding (`roc_fpr`/`roc_tpr` of `binary_report`), with AUC and F1."""
    plt = pyplot()
    names = sorted(per_finding)
    columns = max(1, min(4, len(names)))
    rows = max(1, -(-len(names) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        report = per_finding[name]
        ax.plot(report["roc_fpr"], report["roc_tpr"], color="tab:blue", lw=1.5)
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        auc, f1 = report.get("auc"), report.get("f1")
        ax.set_title(f"{name}\nAUC {auc:.2f}  F1 {f1:.2f}  (+{report.get('positives', '?')})", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no finding with both classes", ha="center", va="center")
    fig.suptitle(title or "zero-shot abnormality detection (FPR vs TPR)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str = ""
) -> Path:
    """Row-normalised confusion matrix, restricted to classes that occur as truth or prediction."""
    plt = pyplot()
    matrix = np.asarray(matrix, np.float64)
    keep = np.flatnonzero((matrix.sum(0) > 0) | (matrix.sum(1) > 0))
    if not len(keep):
        keep = np.arange(min(1, len(matrix)))
    sub = matrix[np.ix_(keep, keep)]
    rows = sub / np.maximum(sub.sum(1, keepdims=True), 1.0)
    size = max(4.0, 0.16 * len(keep) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    shown = ax.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0)
    names = [class_names[i] for i in keep]
    ax.set_xticks(range(len(keep)), names, rotation=90, fontsize=5)
    ax.set_yticks(range(len(keep)), names, fontsize=5)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02, format="%.3g")
    ax.set_title(title or "zero-shot organ recognition (row-normalised)", fontsize=9)
    return _save(fig, path)
