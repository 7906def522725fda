"""Builder configs named from their grid: `grid_<spacing>_<shape>_m<body margin>`, parsed back on read.

`ctglip build-data ctglip_nifti --spacing 1.5,1.5,3 --shape 224,224,128 --body-margin 10` builds the
config `grid_1.5x1.5x3_224x224x128_m10`: spacing in mm along R, A, S, shape in voxels, body margin in mm.
Numbers are written in their shortest exact decimal form (no exponent, no trailing zeros: `3`, `1.5`,
`0.75`), so every grid has exactly one name, two grids never share a data folder, and the name alone is
enough to read the dataset back (`--config.data.config=grid_...` in training, evaluation, zeroshot).
A name that starts with `grid_` but does not parse is a ConfigError naming it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ctglip_jax.errors import ConfigError
from tfds_builders.ctglip_nifti.preprocess import Preprocess

PREFIX = "grid_"
DEFAULT_BODY_MARGIN_MM = 10.0
_NUM = r"(\d+(?:\.\d+)?)"
_INT = r"(\d+)"
_GRID = re.compile(rf"grid_{_NUM}x{_NUM}x{_NUM}_{_INT}x{_INT}x{_INT}_m{_NUM}")
FORMAT = "grid_SXxSYxSZ_NXxNYxNZ_mMARGIN (e.g. grid_1.5x1.5x3_224x224x128_m10)"


def _number(value: float) -> str:
    """Shortest decimal that reads back as the same float, never in exponent form."""
    return np.format_float_positional(float(value), trim="-")


def check_grid(spacing: Sequence[float], shape: Sequence[int], body_margin_mm: float, source: object) -> None:
    """ConfigError naming `source` unless spacing/shape are three positive numbers and the margin >= 0."""
    spacing, shape = list(spacing), list(shape)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ConfigError(source, f"spacing must be three positive numbers (mm), got {spacing}")
    if len(shape) != 3 or not all(int(n) == n and n > 0 for n in shape):
        raise ConfigError(source, f"shape must be three positive integers (voxels), got {shape}")
    if not (np.isfinite(body_margin_mm) and body_margin_mm >= 0):
        raise ConfigError(source, f"body margin must be a number >= 0 (mm), got {body_margin_mm}")


def grid_name(spacing: Sequence[float], shape: Sequence[int],
              body_margin_mm: float = DEFAULT_BODY_MARGIN_MM) -> str:
    """The canonical config name of a grid; checks the values first (ConfigError)."""
    check_grid(spacing, shape, body_margin_mm, "<grid>")
    return (
        PREFIX + "x".join(map(_number, spacing)) + "_" + "x".join(str(int(n)) for n in shape)
        + "_m" + _number(body_margin_mm)
    )


def parse_grid_name(name: str) -> tuple[str, Preprocess] | None:
    """(canonical name, Preprocess) of a `grid_...` name; None if `name` is not one; malformed raises.

    The other Preprocess fields (body threshold, window) keep their defaults.
    """
    if not name.startswith(PREFIX):
        return None
    match = _GRID.fullmatch(name)
    if match is None:
        raise ConfigError(name, f"malformed grid config name; the format is {FORMAT}")
    values = [float(v) for v in match.groups()]
    spacing, shape, margin = tuple(values[:3]), tuple(int(v) for v in values[3:6]), values[6]
    try:
        check_grid(spacing, shape, margin, name)
    except ConfigError as e:
        raise ConfigError(name, f"bad grid config name: {e.problem}") from None
    preprocess = Preprocess(spacing=spacing, shape=shape, body_margin_mm=margin)
    return grid_name(spacing, shape, margin), preprocess


def describe(preprocess: Preprocess) -> str:
    spacing = " x ".join(map(_number, preprocess.spacing))
    shape = " x ".join(str(n) for n in preprocess.shape)
    return f"Your grid: {spacing} mm, {shape} voxels, body margin {_number(preprocess.body_margin_mm)} mm."
