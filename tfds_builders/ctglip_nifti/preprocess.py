"""Turning one user CT + label map into a fixed-shape record (shared by `ctglip_nifti` and `msd_tumor`).

Steps, in order: load (RAS+, checks in `ctglip_jax.data.ct`), resample to a target spacing (image linear,
labels nearest), crop around the body (bounding box of HU > threshold, plus a margin: the air around the
patient carries no signal and would dominate a fixed crop), centre crop / pad to a fixed shape (static
shapes for the TFDS feature and for jit), and optionally clip HU to a window (still int16 HU, so the input
pipeline's jitter and windowing stay meaningful).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctglip_jax.data.augment import AIR_HU, crop_or_pad_at


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How volumes are brought to a common grid. `window=None` keeps the full HU range."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    shape: tuple[int, int, int] = (224, 224, 128)
    body_threshold_hu: float = -500.0
    body_margin_mm: float = 10.0
    window: tuple[float, float] | None = None


def body_bbox(hu: np.ndarray, threshold: float, margin_vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, stop) of the box of voxels above `threshold`, grown by `margin_vox`; whole volume if none."""
    shape = np.asarray(hu.shape)
    inside = hu > threshold
    if not inside.any():
        return np.zeros(3, int), shape
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(inside.any(axis=other))
        start.append(hits[0])
        stop.append(hits[-1] + 1)
    start = np.maximum(np.asarray(start) - margin_vox, 0)
    stop = np.minimum(np.asarray(stop) + margin_vox, shape)
    return start, stop


def fixed_shape_around_body(
    hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, cfg: Preprocess, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop/pad both arrays to `cfg.shape` centred on the body box; returns (hu, labels, shifted affine)."""
    margin = np.ceil(cfg.body_margin_mm / np.asarray(spacing)).astype(int)
    lo, hi = body_bbox(hu, cfg.body_threshold_hu, margin)
    start = (lo + hi) // 2 - np.asarray(cfg.shape) // 2
    hu = crop_or_pad_at(hu, start, cfg.shape, AIR_HU)
    labels = crop_or_pad_at(labels, start, cfg.shape, 0)
    shift = np.eye(4)
    shift[:3, 3] = start
    return hu, labels, affine @ shift


def preprocess_case(ct_path, mask_path, cfg: Preprocess, load_labels=None) -> dict[str, np.ndarray]:
    """{volume int16, labels (int as stored), spacing, affine} on the common grid; raises CTGlipInputError.

    `load_labels(mask_path, reference=image) -> CTVolume` reads the label map (default
    `ct.load_label_map`; `masks.label_loader` converts TotalSegmentator v2 maps and per-class folders).
    """
    from ctglip_jax.data import ct

    image = ct.load_ct(ct_path)
    labels = (load_labels or ct.load_label_map)(mask_path, reference=image)
    image = ct.resample(image, cfg.spacing, order=1)
    labels = ct.resample(labels, cfg.spacing, order=0)
    spacing = np.asarray(cfg.spacing, np.float64)
    hu, lab = np.asarray(image.data), np.asarray(labels.data)
    common = tuple(min(a, b) for a, b in zip(hu.shape, lab.shape, strict=True))  # rounding may differ by 1
    hu, lab = hu[tuple(map(slice, common))], lab[tuple(map(slice, common))]
    hu, lab, affine = fixed_shape_around_body(hu, lab, np.asarray(image.affine), cfg, spacing)
    if cfg.window is not None:
        hu = np.clip(hu, *cfg.window)
    return {
        "volume": np.clip(np.rint(hu), -32768, 32767).astype(np.int16),
        "labels": lab,
        "spacing": spacing.astype(np.float32),
        "affine": affine.astype(np.float32),
    }
