"""Several HU windows as input channels: numpy reference, the config's choice, old single-window workdirs."""

from __future__ import annotations

import numpy as np
import pytest

from ctglip_jax import config_lib, objective
from ctglip_jax.data.augment import DEFAULT_WINDOW, DEFAULT_WINDOWS, apply_windows, windows_of
from ctglip_jax.data.pipeline import PipelineConfig, RecordTransform
from ctglip_jax.errors import ConfigError


def test_apply_windows_matches_numpy():
    hu = np.array([[[-1000.0, -600.0, 0.0, 40.0, 240.0, 400.0, 1300.0, 2000.0]]])
    out = apply_windows(hu, DEFAULT_WINDOWS)
    assert out.shape == (*hu.shape, 3) and out.dtype == np.float32
    for c, (lo, hi) in enumerate(DEFAULT_WINDOWS):
        np.testing.assert_allclose(out[..., c], np.clip((hu - lo) / (hi - lo), 0, 1), rtol=1e-6)
    # a sclerotic 400 HU focus is saturated by the old single window but not by the bone window
    assert apply_windows(hu, [DEFAULT_WINDOW])[0, 0, 5] == 1.0 and out[0, 0, 5, 2] < 0.6
    assert apply_windows(hu, [DEFAULT_WINDOW]).shape == hu.shape  # one window: no channel axis
    with pytest.raises(ValueError):
        apply_windows(hu, [(100.0, -100.0)])


def test_configs_default_to_three_windows_and_old_ones_keep_one():
    config = config_lib.load_config("configs/ctglip_vit.py:runlocal")
    assert windows_of(config.data) == DEFAULT_WINDOWS
    assert objective.make_model(config).image_tower.in_channels == 3
    old = config_lib.load_config("configs/ctglip_vit.py:runlocal", ["--config.data.windows=()"])
    assert windows_of(old.data) == (tuple(old.data.window),)
    assert objective.make_model(old).image_tower.in_channels == 1
    as_saved = {k: v for k, v in old.data.to_dict().items() if k != "windows"}  # a workdir from before
    assert windows_of(as_saved) == (tuple(old.data.window),)


def test_records_become_channels_and_bad_windows_are_refused():
    record = {"volume": np.full((8, 8, 8), 40, np.int16), "case_id": "c"}
    cfg = PipelineConfig.from_mapping(
        {"crop_shape": (4, 4, 4), "windows": [list(w) for w in DEFAULT_WINDOWS], "random_augment": False}
    )
    image = RecordTransform(cfg, None, None)(record, None)["image"]
    assert image.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(
        image[0, 0, 0], [(40 - lo) / (hi - lo) for lo, hi in DEFAULT_WINDOWS], rtol=1e-6
    )
    with pytest.raises(ConfigError, match="config.data.windows"):
        PipelineConfig.from_mapping({"windows": [[350.0, -1150.0]]})
