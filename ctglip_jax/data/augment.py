"""Spatial and intensity augmentation of one CT record, applied identically to the image and its labels.

Everything spatial (crop offset, flips) is drawn once per record and applied to the volume and every
voxel-aligned label array (organ label map, tumor mask, task label), so masks keep lying on their organs.
Intensity jitter (HU scale and shift) acts on the image only, before the HU window(s). Several windows give
the image one channel each (`apply_windows`; the standard lung / soft-tissue / bone windows by default).

Flips: the default flips no axis. A flip along axis 0 (patient left-right in RAS+) turns a left kidney into
a right-looking one while its label still says `kidney_left`, and reports speak of sides ("left renal
cyst"), so left-right flips teach the model wrong anatomy; flip only axes where that is acceptable (e.g.
axis 1 for a test of invariance), and never axis 0 for organ-level pretraining.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

AIR_HU = -1024
DEFAULT_WINDOW = (-1150.0, 350.0)  # fVLM's single window; old workdirs (one input channel) use it
# Radiology's standard display windows (level +- width / 2), stacked as input channels by new configs:
#   lung   L -600 W 1500: air, lung parenchyma, nodules, consolidation and effusion against aerated lung
#   soft   L   40 W  400: the 10-60 HU contrasts of liver, spleen, kidney, pancreas lesions spread over
#          3.75x more of the [0, 1] input than in one [-1150, 350] window (a linear window leaves the
#          contrast-to-noise ratio as it is: what changes is how large the difference is at the input)
#   bone   L  400 W 1800: everything above 350 HU (sclerotic lesions, cortex, stones), which a single
#          [-1150, 350] window clips to 1.0: there such lesions are invisible
WINDOWS = {"lung": (-1350.0, 150.0), "soft_tissue": (-160.0, 240.0), "bone": (-500.0, 1300.0)}
DEFAULT_WINDOWS = (WINDOWS["lung"], WINDOWS["soft_tissue"], WINDOWS["bone"])
Window = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """`hu_scale`: image HU multiplied by U(1 - s, 1 + s); `hu_shift`: U(-h, h) HU added (0 = off)."""

    crop_shape: tuple[int, int, int] = (32, 32, 32)
    random_crop: bool = True  # False: centre crop (evaluation)
    flip_axes: tuple[int, ...] = ()
    hu_scale: float = 0.0
    hu_shift: float = 0.0
    window: tuple[float, float] = DEFAULT_WINDOW
    windows: tuple[Window, ...] = ()  # several: stacked as channels (X, Y, Z, C); () = `window` alone


def crop_or_pad_at(array: np.ndarray, start: Sequence[int], shape: Sequence[int], pad_value) -> np.ndarray:
    """array[start : start + shape] with voxels outside `array` set to `pad_value` (start may be < 0)."""
    out = np.full(tuple(shape), pad_value, dtype=array.dtype)
    src, dst = [], []
    for s, n, size in zip(start, shape, array.shape, strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(n), size)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def crop_start(
    shape: Sequence[int], crop_shape: Sequence[int], rng: np.random.Generator | None
) -> np.ndarray:
    """Crop origin per axis: uniform over valid offsets (rng) or centred (None); negative = centred pad."""
    shape, crop = np.asarray(shape), np.asarray(crop_shape)
    slack = shape - crop
    start = slack // 2
    if rng is not None:
        draws = rng.integers(0, np.maximum(slack, 0) + 1)
        start = np.where(slack > 0, draws, start)
    return start


def window(hu, lo: float = DEFAULT_WINDOW[0], hi: float = DEFAULT_WINDOW[1]) -> np.ndarray:
    """HU -> [0, 1] linearly (lo -> 0, hi -> 1), clipped, float32: the one HU window of the project
    (training, evaluation, a user's scan, the preprocessing benchmark). In place on one float32 copy."""
    if not hi > lo:
        raise ValueError(f"HU window ({lo}, {hi}) must have hi > lo")
    out = np.subtract(hu, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def apply_windows(hu: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """One window: `(X, Y, Z)` in [0, 1] (a single input channel, as before); several: `(X, Y, Z, C)`."""
    windows = [tuple(float(v) for v in w) for w in windows]
    if not windows:
        raise ValueError("no HU window")
    for lo, hi in windows:
        if not hi > lo:
            raise ValueError(f"HU window ({lo}, {hi}) must have hi > lo")
    if len(windows) == 1:
        return window(hu, *windows[0])
    return np.stack([window(hu, lo, hi) for lo, hi in windows], axis=-1)


def windows_of(data_config) -> tuple[Window, ...]:
    """The HU windows a data config's images carry, in channel order: `windows` when set, else the single
    `window` (configs and workdirs from before multi-window input)."""
    get = data_config.get if hasattr(data_config, "get") else lambda k, d=None: getattr(data_config, k, d)
    windows = get("windows", None) or ()
    if windows:
        return tuple(tuple(float(v) for v in w) for w in windows)
    return (tuple(float(v) for v in (get("window", None) or DEFAULT_WINDOW)),)


def augment(
    volume: np.ndarray, labels: dict[str, np.ndarray], cfg: AugmentConfig, rng: np.random.Generator | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(windowed float32 image, labels) cropped to `cfg.crop_shape`; `rng=None` = deterministic centre crop.

    Draw order (fixed, so a seed means the same augmentation everywhere): crop offset, one coin per flip
    axis, HU scale, HU shift. (Tumour-centred crops for segmentation: `seg_batches.py`.)
    """
    for key, lab in labels.items():
        if lab.shape != volume.shape:
            raise ValueError(f"{key} shape {lab.shape} differs from volume shape {volume.shape}")
    start = crop_start(volume.shape, cfg.crop_shape, rng if cfg.random_crop else None)
    image = crop_or_pad_at(volume, start, cfg.crop_shape, AIR_HU)
    labels = {k: crop_or_pad_at(v, start, cfg.crop_shape, 0) for k, v in labels.items()}
    flips = [a for a in cfg.flip_axes if rng is not None and rng.random() < 0.5]
    if flips:
        image = np.flip(image, flips)
        labels = {k: np.flip(v, flips) for k, v in labels.items()}
    image = image.astype(np.float32)
    if rng is not None and (cfg.hu_scale or cfg.hu_shift):
        scale = rng.uniform(1.0 - cfg.hu_scale, 1.0 + cfg.hu_scale)
        shift = rng.uniform(-cfg.hu_shift, cfg.hu_shift)
        image = image * np.float32(scale) + np.float32(shift)
    image = apply_windows(image, cfg.windows or (cfg.window,))
    return image, {k: np.ascontiguousarray(v) for k, v in labels.items()}
