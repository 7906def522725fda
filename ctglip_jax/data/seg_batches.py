"""Tumour-bearing training batches for segmentation fine-tuning, by design rather than by chance.

Tumours are tiny (the `study` phantoms: 5-400 voxels of 393,216, median ~40) and only ~40 % of cases hold
one, so random crops, or nnU-Net's per-crop foreground coin, leave most batches without a tumour voxel and
the head learns "never tumour". Here the composition of every batch is fixed:

- `round(foreground_fraction * batch_size)` crops of *every* batch are foreground crops: a tumour-bearing
  case, one of its tumour types (uniform among the types the case has, so a 7-voxel nodule beside a
  300-voxel mass is drawn as often as the mass), a voxel of that tumour (uniform), and a crop that puts
  the voxel within a quarter crop of its centre (kept inside the volume where it fits). Every foreground
  crop therefore holds at least one tumour voxel.
- the other crops are uniform random crops of a case drawn from the tumour-bearing cases with probability
  `tumour_case_fraction`, else from the tumour-free ones; `None` = every case equally likely (the split's
  own tumour rate).

Every draw of batch `i` comes from `SeedSequence([seed, i])`: a batch is a pure function of (data, seed,
i), so `get_state()` (`{"next_batch": i}`) / `set_state` resume exactly, and threads can build batches
ahead in any order. Crops, flips and HU jitter are those of the training pipeline (`augment.py`).

Which voxels are tumour, and of which type, is read once from each record (`tumor_mask`; the type from
`lesion_map` = 1 + catalogue index where the dataset has it, else one type per case): a pass over the
split when the stream starts (~6 s for 256 phantoms of 64 x 64 x 96).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctglip_jax.data.augment import AIR_HU, DEFAULT_WINDOW, apply_windows, crop_or_pad_at, crop_start
from ctglip_jax.errors import ConfigError

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SegBatchConfig:
    batch_size: int = 2
    crop_shape: tuple[int, int, int] = (32, 32, 48)
    foreground_fraction: float = 0.5  # share of every batch centred on a tumour voxel (rounded)
    tumour_case_fraction: float | None = None  # P(tumour-bearing case) for the other crops; None = natural
    windows: tuple[tuple[float, float], ...] = (DEFAULT_WINDOW,)
    flip_axes: tuple[int, ...] = ()
    hu_scale_jitter: float = 0.0
    hu_shift_jitter: float = 0.0
    seed: int = 0
    prefetch: int = 2  # batches built ahead by background threads (0 = build on demand)

    def foreground_per_batch(self) -> int:
        return int(np.floor(self.foreground_fraction * self.batch_size + 0.5))  # round half up

    def check(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError("--foreground-fraction", f"must be in [0, 1], got {self.foreground_fraction}")
        if self.tumour_case_fraction is not None and not 0.0 <= self.tumour_case_fraction <= 1.0:
            raise ConfigError("--tumour-case-fraction", f"must be in [0, 1], got {self.tumour_case_fraction}")
        if len(self.crop_shape) != 3 or min(self.crop_shape) < 1:
            raise ConfigError("--crop", f"must be 3 positive sizes, got {tuple(self.crop_shape)}")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError("flip_axes", f"{self.flip_axes} must be among 0, 1, 2")


@dataclasses.dataclass(frozen=True)
class TumourIndex:
    """Per record: its tumour voxels grouped by tumour type (`{type: (n, 3) int array}`; empty = none)."""

    voxels: tuple[dict[int, np.ndarray], ...]

    @property
    def tumour_cases(self) -> np.ndarray:
        return np.asarray([i for i, v in enumerate(self.voxels) if v], np.int64)

    @property
    def tumour_free_cases(self) -> np.ndarray:
        return np.asarray([i for i, v in enumerate(self.voxels) if not v], np.int64)


def index_tumours(source: Sequence[dict[str, Any]], mask_key: str = "tumor_mask") -> TumourIndex:
    """One pass over the records: where each one's tumour voxels are, by type."""
    voxels = []
    for i in range(len(source)):
        record = source[i]
        if mask_key not in record:
            raise ConfigError(mask_key, f"record {i} has no {mask_key!r}: segmentation needs tumour masks")
        mask = np.asarray(record[mask_key]) > 0
        where = np.argwhere(mask).astype(np.int32)
        if not len(where):
            voxels.append({})
            continue
        if "lesion_map" in record:
            types = np.asarray(record["lesion_map"])[mask].astype(np.int64)
        else:
            types = np.zeros(len(where), np.int64)
        voxels.append({int(t): where[types == t] for t in np.unique(types)})
    return TumourIndex(tuple(voxels))


def foreground_start(voxel: np.ndarray, shape: Sequence[int], crop: Sequence[int],
                     rng: np.random.Generator) -> np.ndarray:
    """A crop origin with `voxel` within a quarter crop of the centre; inside the volume where it fits
    (the voxel stays inside the crop either way)."""
    crop = np.asarray(crop)
    start = np.asarray(voxel) - crop // 2 + rng.integers(-(crop // 4), crop // 4 + 1)
    slack = np.asarray(shape) - crop
    return np.where(slack > 0, np.clip(start, 0, np.maximum(slack, 0)), slack // 2)


class TumourBatches:
    """Endless iterator of `{"image" (B, X, Y, Z[, C]) float32, "tumor_mask" (B, X, Y, Z) uint8,
    "case_index" (B,), "foreground" (B,) bool}` numpy batches; see the module docstring."""

    def __init__(self, source: Sequence[dict[str, Any]], cfg: SegBatchConfig,
                 index: TumourIndex | None = None):
        cfg.check()
        self.source, self.cfg = source, cfg
        self.index = index or index_tumours(source)
        self._tumour, self._free = self.index.tumour_cases, self.index.tumour_free_cases
        if cfg.foreground_per_batch() and not len(self._tumour):
            raise ConfigError("--foreground-fraction", "no training case holds a tumour voxel")
        self._next = 0
        self._pool = (concurrent.futures.ThreadPoolExecutor(cfg.prefetch, thread_name_prefix="seg-batches")
                      if cfg.prefetch > 0 else None)
        self._pending: dict[int, concurrent.futures.Future] = {}

    # ------------------------------------------------------------------------------------------------
    def _case(self, rng: np.random.Generator, foreground: bool) -> int:
        p = self.cfg.tumour_case_fraction
        if foreground:
            pool = self._tumour
        elif p is None or not len(self._tumour) or not len(self._free):
            return int(rng.integers(len(self.source)))
        else:
            pool = self._tumour if rng.random() < p else self._free
        return int(pool[rng.integers(len(pool))])

    def _example(self, case: int, foreground: bool,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        record = self.source[case]
        volume = np.asarray(record["volume"])
        mask = (np.asarray(record["tumor_mask"]) > 0).astype(np.uint8)
        if foreground:
            by_type = self.index.voxels[case]
            kind = sorted(by_type)[int(rng.integers(len(by_type)))]
            voxel = by_type[kind][int(rng.integers(len(by_type[kind])))]
            start = foreground_start(voxel, volume.shape, cfg.crop_shape, rng)
        else:
            start = crop_start(volume.shape, cfg.crop_shape, rng)
        image = crop_or_pad_at(volume, start, cfg.crop_shape, AIR_HU).astype(np.float32)
        mask = crop_or_pad_at(mask, start, cfg.crop_shape, 0)
        flips = [a for a in cfg.flip_axes if rng.random() < 0.5]
        if flips:
            image, mask = np.flip(image, flips), np.flip(mask, flips)
        if cfg.hu_scale_jitter or cfg.hu_shift_jitter:
            scale = rng.uniform(1.0 - cfg.hu_scale_jitter, 1.0 + cfg.hu_scale_jitter)
            shift = rng.uniform(-cfg.hu_shift_jitter, cfg.hu_shift_jitter)
            image = image * np.float32(scale) + np.float32(shift)
        return apply_windows(image, cfg.windows), np.ascontiguousarray(mask)

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """Batch `i` of the stream (a pure function of the data, the config and `i`)."""
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(i)]))
        n_fg = cfg.foreground_per_batch()
        foreground = np.arange(cfg.batch_size) < n_fg
        cases = [self._case(rng, bool(f)) for f in foreground]
        examples = [self._example(c, bool(f), rng) for c, f in zip(cases, foreground, strict=True)]
        return {
            "image": np.stack([e[0] for e in examples]),
            "tumor_mask": np.stack([e[1] for e in examples]),
            "case_index": np.asarray(cases, np.int32),
            "foreground": foreground,
        }

    # ------------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        i = self._next
        self._next += 1
        if self._pool is None:
            return self.batch(i)
        for j in range(i, i + self.cfg.prefetch + 1):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self.batch, j)
        return self._pending.pop(i).result()

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": int(self.cfg.seed), "next_batch": int(self._next)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("seed") != self.cfg.seed:
            raise ConfigError("<segmentation batch state>", f"state {state} is not from this stream")
        self._cancel()
        self._next = int(state["next_batch"])

    def _cancel(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> TumourBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
