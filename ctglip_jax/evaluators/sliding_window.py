"""Sliding-window inference: a model trained on fixed crops, applied to a whole (larger) volume.

Windows of the training crop size tile the volume with a given overlap; along each axis the starts are
spread evenly from 0 to `size - window` (nnU-Net's rule), so the last window ends exactly at the border and
volumes that are not a multiple of the step need no padding. An axis shorter than the window is padded
(`pad_value`, centred) and the padding cropped from the output. Window predictions are blended with a
per-voxel importance map - uniform, or a Gaussian centred on the window (sigma = `sigma_scale` x window,
nnU-Net's 1/8) that trusts window centres over their borders, where the receptive field is cut off - and
divided by the summed weights. A model whose per-voxel output does not depend on the window position
(e.g. a linear per-voxel map, or a constant) is therefore reconstructed exactly, which the tests check.

The predict function is jitted once per `SlidingWindow`; windows go through it in batches of a fixed size
(the last batch padded), so a volume of any size costs one compilation. Blending happens on the host in
float64.

`reduce="sum"` is for predictions that are not voxel maps (per-window organ feature sums and voxel counts,
`zeroshot.ScanInference`): the outputs (any pytree of `(b, ...)` arrays) of the real windows are summed in
float64, the filler windows of the last batch dropped. Arrays `aligned` with the volume (a label map) are
padded and cropped alike and passed to `predict_fn` after the windows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ctglip_jax.errors import ConfigError

Shape3 = tuple[int, int, int]
REDUCE_MODES = ("blend", "sum")


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Evenly spread starts covering `[0, size)` with windows of `window` (size >= window)."""
    if size < window:
        raise ValueError(f"size {size} is smaller than the window {window}: pad first")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError("sliding window", f"overlap must lie in [0, 1), got {overlap}")
    step = max(1, int(round(window * (1.0 - overlap))))
    count = math.ceil((size - window) / step) + 1
    if count == 1:
        return [0]
    actual_step = (size - window) / (count - 1)
    return [int(round(i * actual_step)) for i in range(count)]


def importance_map(
    window: Sequence[int], weighting: str = "gaussian", sigma_scale: float = 0.125
) -> np.ndarray:
    """`(wx, wy, wz)` float64 blending weights, max 1, strictly positive everywhere."""
    window = tuple(int(w) for w in window)
    if weighting == "uniform":
        return np.ones(window)
    if weighting != "gaussian":
        raise ConfigError("sliding window", f"unknown weighting {weighting!r}; use 'gaussian' or 'uniform'")
    weights = np.ones(window)
    for axis, w in enumerate(window):
        centre, sigma = (w - 1) / 2.0, max(w * sigma_scale, 1e-6)
        profile = np.exp(-0.5 * ((np.arange(w) - centre) / sigma) ** 2)
        shape = [1, 1, 1]
        shape[axis] = w
        weights = weights * profile.reshape(shape)
    weights /= weights.max()
    return np.maximum(weights, weights[weights > 0].min() if np.any(weights > 0) else 1.0)


class SlidingWindow:
    """`predict_fn(params, windows (b, wx, wy, wz[, C])) -> (b, wx, wy, wz, K)` applied to whole volumes.

    Args:
      predict_fn: un-jitted; jitted here once.
      window: the crop size the model was trained on.
      overlap: fraction of the window shared by neighbours along each axis (0.5 = half).
      weighting: 'gaussian' or 'uniform' blending.
      batch_size: windows per device call.
      pad_value: fill for axes shorter than the window (0.0 = air after the usual [0, 1] HU window).
      reduce: 'blend' (a voxel map, weighted) or 'sum' (any per-window outputs, summed over windows).
    """

    def __init__(
        self,
        predict_fn: Callable[[Any, Any], Any],
        window: Sequence[int],
        *,
        overlap: float = 0.5,
        weighting: str = "gaussian",
        batch_size: int = 4,
        pad_value: float = 0.0,
        sigma_scale: float = 0.125,
        reduce: str = "blend",
    ):

        self.window: Shape3 = tuple(int(w) for w in window)  # type: ignore[assignment]
        if len(self.window) != 3 or min(self.window) < 1:
            raise ConfigError("sliding window", f"window must be 3 positive sizes, got {tuple(window)}")
        if batch_size < 1:
            raise ConfigError("sliding window", f"batch_size must be >= 1, got {batch_size}")
        if reduce not in REDUCE_MODES:
            raise ConfigError("sliding window", f"unknown reduce {reduce!r}; use one of {REDUCE_MODES}")
        self.overlap, self.batch_size, self.pad_value, self.reduce = overlap, batch_size, pad_value, reduce
        self.weights = importance_map(self.window, weighting, sigma_scale)
        window_starts(self.window[0], self.window[0], overlap)  # validates the overlap early
        self._predict = jax.jit(predict_fn)

    def windows(self, shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Window start corners for a (padded) volume of `shape`."""
        starts = [window_starts(s, w, self.overlap) for s, w in zip(shape, self.window, strict=True)]
        return list(itertools.product(*starts))

    def padding(self, shape: Sequence[int]) -> list[tuple[int, int]]:
        """Centred `(before, after)` padding of each axis shorter than the window."""
        before = [max(w - s, 0) // 2 for s, w in zip(shape[:3], self.window, strict=True)]
        return [(b, max(w - s, 0) - b) for s, w, b in zip(shape[:3], self.window, before, strict=True)]

    def num_windows(self, shape: Sequence[int]) -> int:
        """How many windows a volume of (unpadded) `shape` takes."""
        padded = [s + a + b for s, (a, b) in zip(shape[:3], self.padding(shape), strict=True)]
        return len(self.windows(padded))

    def _batches(self, volume: np.ndarray, aligned: Sequence[np.ndarray]):
        """(padded shape, then per batch: corners, windows, aligned windows), the last batch filled with
        zero windows to the fixed batch size."""
        pad = self.padding(volume.shape)
        arrays = [np.pad(volume, pad + [(0, 0)] * (volume.ndim - 3), constant_values=self.pad_value)]
        for array in aligned:
            if array.shape[:3] != volume.shape[:3]:
                problem = f"aligned array {array.shape} does not match the volume {volume.shape}"
                raise ConfigError("sliding window", problem)
            arrays.append(np.pad(array, pad + [(0, 0)] * (array.ndim - 3)))
        corners = self.windows(arrays[0].shape[:3])
        wx, wy, wz = self.window
        yield arrays[0].shape[:3]
        for first in range(0, len(corners), self.batch_size):
            chunk = corners[first : first + self.batch_size]
            crops = []
            for array in arrays:
                crop = np.stack([array[x : x + wx, y : y + wy, z : z + wz] for x, y, z in chunk])
                if len(chunk) < self.batch_size:
                    filler = np.zeros((self.batch_size - len(chunk), *crop.shape[1:]), crop.dtype)
                    crop = np.concatenate([crop, filler])
                crops.append(crop)
            yield chunk, crops

    def __call__(self, params: Any, volume: np.ndarray, *aligned: np.ndarray) -> Any:
        """`(X, Y, Z[, C])` volume -> `(X, Y, Z, K)` float32 blended prediction (`reduce="blend"`), or the
        float64 sum over windows of each output (`reduce="sum"`)."""
        volume = np.asarray(volume, np.float32)
        if volume.ndim not in (3, 4):
            raise ConfigError("sliding window", f"expected a (X, Y, Z[, C]) volume, got shape {volume.shape}")
        batches = self._batches(volume, [np.asarray(a) for a in aligned])
        padded_shape = next(batches)
        if self.reduce == "sum":
            total = None
            for chunk, crops in batches:
                n = len(chunk)
                out = jax.tree.map(lambda a, n=n: np.asarray(a, np.float64)[:n].sum(0),
                                   self._predict(params, *crops))
                total = out if total is None else jax.tree.map(np.add, total, out)
            return total
        wx, wy, wz = self.window
        total = weight_sum = None
        for chunk, crops in batches:
            predictions = np.asarray(self._predict(params, *crops), np.float64)
            if predictions.shape[1:4] != self.window:
                raise ConfigError(
                    "sliding window",
                    f"predict_fn returned windows of {predictions.shape[1:4]}, expected {self.window}",
                )
            if total is None:
                total = np.zeros((*padded_shape, predictions.shape[-1]))
                weight_sum = np.zeros(padded_shape)
            for (x, y, z), prediction in zip(chunk, predictions, strict=False):
                total[x : x + wx, y : y + wy, z : z + wz] += prediction * self.weights[..., None]
                weight_sum[x : x + wx, y : y + wy, z : z + wz] += self.weights
        out = total / weight_sum[..., None]
        crop = tuple(slice(b, b + s) for (b, _), s in zip(self.padding(volume.shape), volume.shape[:3],
                                                            strict=True))
        return out[crop].astype(np.float32)
