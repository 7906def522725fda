"""Builder configs named from their grid (`grid_1.5x1.5x3_224x224x128_m10`): names, reading back, flags."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest

from ctglip_jax import cli
from ctglip_jax.data import datasets
from ctglip_jax.data.datasets import training_spacing
from ctglip_jax.errors import ConfigError
from tfds_builders.ctglip_nifti import grid
from tfds_builders.ctglip_nifti.preprocess import Preprocess

ROOT = Path(__file__).resolve().parents[1]
NIFTI_DUMMY = ROOT / "tfds_builders" / "ctglip_nifti" / "dummy_data"


@pytest.mark.parametrize(
    ("spacing", "shape", "margin", "name"),
    [
        ((1.5, 1.5, 3.0), (224, 224, 128), 10.0, "grid_1.5x1.5x3_224x224x128_m10"),
        ((0.75, 0.7, 1.25), (8, 9, 10), 0.0, "grid_0.75x0.7x1.25_8x9x10_m0"),
        ((0.1 + 0.2, 4.0, 1e-3), (16, 16, 16), 2.5, "grid_0.30000000000000004x4x0.001_16x16x16_m2.5"),
    ],
)
def test_grid_names_round_trip(spacing, shape, margin, name):
    assert grid.grid_name(spacing, shape, margin) == name
    canonical, preprocess = grid.parse_grid_name(name)
    assert canonical == name
    assert preprocess == Preprocess(spacing=spacing, shape=shape, body_margin_mm=margin)  # exact floats


def test_grid_names_read_back_everywhere_a_config_name_is_taken(tmp_path):
    builder = datasets.make_builder("ctglip_nifti", "grid_1.50x1.5x3.0_224x224x128_m10", str(tmp_path))
    assert builder.builder_config.name == "grid_1.5x1.5x3_224x224x128_m10"  # one name per grid
    assert builder.builder_config.preprocess.spacing == (1.5, 1.5, 3.0)
    assert Path(builder.data_dir).parent.name == "grid_1.5x1.5x3_224x224x128_m10"
    tiny = datasets.make_builder("ctglip_nifti", "tiny", str(tmp_path)).builder_config
    assert tiny.preprocess.shape == (16,) * 3
    msd = datasets.make_builder("msd_tumor", "liver_grid_2x2x2_32x32x32_m5", str(tmp_path)).builder_config
    assert msd.name == "liver_grid_2x2x2_32x32x32_m5"
    assert (msd.tumor_labels, msd.preprocess.shape) == ((2,), (32,) * 3)
    msd = datasets.make_builder("msd_tumor", "grid_2x2x2_32x32x32_m5", str(tmp_path)).builder_config
    assert msd.tumor_labels == () and msd.preprocess.spacing == (2.0, 2.0, 2.0)
    config = ml_collections.ConfigDict(
        {"data": {"dataset": "ctglip_nifti", "config": "grid_2x2x2.5_8x8x8_m0", "data_dir": str(tmp_path)}}
    )
    spacing, where = training_spacing(config)
    assert spacing == (2.0, 2.0, 2.5) and "grid_2x2x2.5_8x8x8_m0" in where


@pytest.mark.parametrize(
    ("dataset", "name", "message"),
    [
        ("ctglip_nifti", "grid_1x1_8x8x8_m1", "malformed grid config name"),
        ("ctglip_nifti", "grid_1x1x1_8x8x8", "malformed grid config name"),
        ("ctglip_nifti", "grid_0x1x1_8x8x8_m1", "spacing must be three positive numbers"),
        ("ctglip_nifti", "grid_1x1x1_0x8x8_m1", "shape must be three positive integers"),
        ("ctglip_nifti", "huge", "or a grid: grid_SXxSYxSZ"),
        ("msd_tumor", "kidney_grid_1x1x1_8x8x8_m1", "malformed grid config name"),
        ("ctglip_synthetic", "grid_1x1x1_8x8x8_m1", "has no config"),
    ],
)
def test_a_malformed_grid_name_is_a_config_error_naming_it(dataset, name, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as e:
        datasets.make_builder(dataset, name, str(tmp_path))
    assert name in str(e.value)


def test_build_data_with_your_own_grid(tmp_path, capsys):
    args = ["build-data", "ctglip_nifti", "--manual-dir", str(NIFTI_DUMMY), "--data-dir", str(tmp_path),
            "--spacing", "4,4,4", "--shape", "12,12,10", "--body-margin", "0"]
    assert cli.main(args) == 0
    assert "ctglip_nifti/grid_4x4x4_12x12x10_m0 at" in capsys.readouterr().out
    record = datasets.data_source("ctglip_nifti", "grid_4x4x4_12x12x10_m0", "train", str(tmp_path))[0]
    assert record["volume"].shape == (12, 12, 10)
    np.testing.assert_allclose(record["spacing"], [4, 4, 4])
    assert cli.main(args[:-2]) == 0  # --body-margin defaults to 10 mm: another grid, another dataset
    assert "grid_4x4x4_12x12x10_m10" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--spacing", "4,4,4"], "give both --spacing"),
        (["--shape", "16,16,16"], "give both --spacing"),
        (["--spacing", "0,4,4", "--shape", "16,16,16"], "--spacing: expects three positive numbers"),
        (["--spacing", "4,4,-1", "--shape", "16,16,16"], "--spacing: expects three positive numbers"),
        (["--spacing", "4,x,4", "--shape", "16,16,16"], "--spacing: expects three floats"),
        (["--spacing", "4,4", "--shape", "16,16,16"], "--spacing: expects three positive numbers"),
        (["--spacing", "4,4,4", "--shape", "16,16.5,16"], "--shape: expects three ints"),
        (["--spacing", "4,4,4", "--shape", "16,16,0"], "--shape: expects three positive numbers"),
        (["--spacing", "4,4,4", "--shape", "16,16,16", "--body-margin", "-1"], "--body-margin: expects"),
        (["--spacing", "4,4,4", "--shape", "16,16,16", "--body-margin", "ten"], "--body-margin: expects"),
        (["--body-margin", "4"], "--body-margin: only with --spacing and --shape"),
        (["--config", "tiny", "--spacing", "4,4,4", "--shape", "16,16,16"], "give --config or --spacing"),
        (["--config", "grid_4x4_16x16x16_m4"], "malformed grid config name"),
    ],
)
def test_bad_grid_flags_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    full = ["build-data", "ctglip_nifti", "--manual-dir", str(NIFTI_DUMMY), "--data-dir", str(tmp_path)]
    full += argv
    assert cli.main(full) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("ctglip build-data: error:"), err
    assert not list(tmp_path.rglob("dataset_info.json"))


def test_grid_flags_on_the_synthetic_dataset_are_an_error(tmp_path, capsys):
    argv = ["build-data", "ctglip_synthetic", "--spacing", "4,4,4", "--shape", "16,16,16"]
    argv += ["--data-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "fixed configs" in capsys.readouterr().err
