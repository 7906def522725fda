"""Post-processing of a binary tumour probability map, chosen on the validation split (nnU-Net's protocol).

A sliding-window network leaves scattered voxels above 0.5 far from any tumour; the headline Dice counts a
case without tumour as 0 as soon as one voxel is predicted (`segmentation.report_from_counts`), so half a
test split of tumour-free patients is lost to a handful of stray voxels. nnU-Net answers this by choosing
its post-processing (removing small connected components) on held-out cases, never on the test split; here
the grid is a probability threshold x the smallest connected component (26-connected) kept. Choosing is
cheap: the validation volumes are predicted once and every grid point is scored on the same maps.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

THRESHOLDS = (0.5, 0.7, 0.9)
# Up to 320 voxels: with (0, ..., 80) the validation split chose the top, 80, in 11 of 13 study fine-tunes
# (docs/RESULTS.md "After (5)"), a grid too short for the optimum. Counts are voxels of the evaluated grid.
MIN_VOXELS = (0, 5, 10, 20, 40, 80, 160, 320)
_Components = tuple[np.ndarray, np.ndarray] | None  # (labels, sizes) of a mask's components; None if empty
_NEIGHBOURS = np.ones((3, 3, 3), bool)  # 26-connectivity: a tumour touching diagonally is one tumour


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """`prob >= threshold`, then connected components smaller than `min_voxels` dropped."""

    threshold: float = 0.5
    min_voxels: int = 0

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        """`(X, Y, Z)` foreground probability -> `(X, Y, Z)` bool mask."""
        mask = np.asarray(prob) >= self.threshold
        return _drop_small(mask, _components(mask) if self.min_voxels > 1 else None, self.min_voxels)


def _components(mask: np.ndarray) -> _Components:
    """`(labels, sizes)` of the mask's 26-connected components (`sizes[0]`: background); None if empty."""
    if not mask.any():
        return None
    labels, _ = ndimage.label(mask, structure=_NEIGHBOURS)
    return labels, np.bincount(labels.ravel())


def _drop_small(mask: np.ndarray, components: _Components, min_voxels: int) -> np.ndarray:
    """The mask without its components smaller than `min_voxels`."""
    if min_voxels <= 1 or components is None:
        return mask
    labels, sizes = components
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def case_dice(predicted: np.ndarray, target: np.ndarray) -> float:
    """Dice of one case; NaN when both are empty (left out of the mean, as in the report)."""
    p, t = int(predicted.sum()), int(target.sum())
    return float("nan") if p + t == 0 else 2.0 * int((predicted & target).sum()) / (p + t)


def choose(
    cases: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = THRESHOLDS,
    min_voxels: Sequence[int] = MIN_VOXELS,
) -> tuple[PostProcess, dict[str, float]]:
    """The grid point with the highest mean case Dice over `cases` = (foreground probability, target mask)
    pairs, and the whole table (`"threshold/min_voxels"` -> Dice). Ties go to the earlier grid point (the
    lower threshold, then the smaller component), so an uninformative validation set keeps plain 0.5."""
    grid = [PostProcess(float(t), int(m)) for t, m in itertools.product(thresholds, min_voxels)]
    scores: list[list[float]] = [[] for _ in grid]
    seen = 0
    for prob, target in cases:
        target, prob = np.asarray(target) > 0, np.asarray(prob)
        by_threshold = {}  # one labelling per threshold, shared by every component floor
        for row, post in zip(scores, grid, strict=True):
            if post.threshold not in by_threshold:
                mask = prob >= post.threshold
                by_threshold[post.threshold] = mask, _components(mask)
            mask, components = by_threshold[post.threshold]
            row.append(case_dice(_drop_small(mask, components, post.min_voxels), target))
        seen += 1
    if not seen:
        raise ValueError("no validation cases to choose the post-processing on")
    means = [float(np.nanmean(row)) if not np.all(np.isnan(row)) else float("nan") for row in scores]
    table = {f"{p.threshold:g}/{p.min_voxels}": m for p, m in zip(grid, means, strict=True)}
    finite = [i for i, m in enumerate(means) if np.isfinite(m)]
    best = max(finite, key=lambda i: (means[i], -i)) if finite else 0
    return grid[best], table
