"""Building on Apache Beam (`--beam-runner`): the same records, in the same order, as the one-process build.

Reference: the one-process build of the same folder (itself checked against nibabel + numpy in
test_nifti_builder.py); records are compared decoded, field by field, in stored order, and `skipped.json`
byte for byte. The DirectRunner runs with 2 worker processes, so the cases really are pickled to workers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_nifti_builder import BROKEN, user_folder  # noqa: F401 - the fixture is used by name

from ctglip_jax import cli
from ctglip_jax.data import datasets
from ctglip_jax.errors import ConfigError
from tfds_builders import case_examples
from tfds_builders.beam_options import INSTALL_HINT, pipeline_setup

TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"
MSD_TASK = Path(__file__).parents[1] / "tfds_builders/msd_tumor/dummy_data/Task00_Dummy"


def _assert_same_records(name: str, config: str, dir_a, dir_b) -> dict[str, int]:
    sizes = {}
    info_a = datasets.make_builder(name, config, str(dir_a)).info.splits
    assert set(info_a) == set(datasets.make_builder(name, config, str(dir_b)).info.splits)
    for split in info_a:
        a = datasets.data_source(name, config, split, str(dir_a))
        b = datasets.data_source(name, config, split, str(dir_b))
        assert len(a) == len(b), split
        for i in range(len(a)):
            ra, rb = a[i], b[i]
            assert ra.keys() == rb.keys()
            for key in ra:
                assert np.array_equal(np.asarray(ra[key]), np.asarray(rb[key])), (split, i, key)
        sizes[split] = len(a)
    return sizes


def _build_both(name, config, tmp_path, manual_dir=None):
    local = datasets.build(name, config, str(tmp_path / "local"), manual_dir)
    beam = datasets.build(
        name, config, str(tmp_path / "beam"), manual_dir, beam=pipeline_setup("DirectRunner", TWO_WORKERS)
    )
    return local, beam


def test_nifti_folder_with_broken_cases_builds_the_same_on_beam(tmp_path, user_folder):  # noqa: F811
    local, beam = _build_both("ctglip_nifti", "tiny", tmp_path, str(user_folder))
    assert not beam.reused
    sizes = _assert_same_records("ctglip_nifti", "tiny", tmp_path / "local", tmp_path / "beam")
    assert sizes == {"train": 4, "validation": 1, "test": 1}
    # The same skipped cases, reasons and order, file for file.
    assert {s["case_id"] for s in beam.skipped} == set(BROKEN)
    assert (Path(beam.data_dir) / "skipped.json").read_bytes() == (
        Path(local.data_dir) / "skipped.json"
    ).read_bytes()
    # The workers' skip files are gone: nothing but the version folder beside the dataset.
    assert [p.name for p in Path(beam.data_dir).parent.iterdir()] == [Path(beam.data_dir).name]


def test_msd_task_builds_the_same_on_beam(tmp_path):
    _build_both("msd_tumor", "tiny", tmp_path, str(MSD_TASK))
    sizes = _assert_same_records("msd_tumor", "tiny", tmp_path / "local", tmp_path / "beam")
    assert sum(sizes.values()) > 0


@pytest.mark.slow
def test_phantom_builds_the_same_on_beam(tmp_path):
    _build_both("ctglip_synthetic", "tiny", tmp_path)
    sizes = _assert_same_records("ctglip_synthetic", "tiny", tmp_path / "local", tmp_path / "beam")
    assert sizes == {"train": 32, "validation": 8, "test": 8}


def test_a_split_whose_cases_all_fail_on_the_workers_is_dropped_as_in_one_process(tmp_path, user_folder):  # noqa: F811
    """Every test-split case breaks only when its record is made: the one-process and the Beam build both
    rerun without it, so the split is absent and the case listed, identically."""
    folder = tmp_path / "folder"
    shutil.copytree(user_folder, folder)
    lines = [json.loads(x) for x in (folder / "cases.jsonl").read_text().splitlines()]
    for entry in lines:
        if entry.get("split") == "test":
            (folder / entry["ct"]).write_bytes((folder / "ct/corrupt.nii.gz").read_bytes())
    local, beam = _build_both("ctglip_nifti", "tiny", tmp_path, str(folder))
    assert set(beam.records) == set(local.records) == {"train", "validation"}
    assert beam.skipped == local.skipped
    assert "good5" in {s["case_id"] for s in beam.skipped}


def test_a_failed_beam_build_leaves_nothing_that_reads_as_built(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    from tfds_builders.msd_tumor import msd_tumor_dataset_builder as msd

    monkeypatch.setattr(msd, "preprocess_case", broken)
    with pytest.raises(Exception, match="disk on fire"):
        datasets.build(
            "msd_tumor", "tiny", str(tmp_path / "d"), str(MSD_TASK), beam=pipeline_setup("DirectRunner", None)
        )
    assert not datasets.make_builder("msd_tumor", "tiny", str(tmp_path / "d")).is_prepared()
    assert not list((tmp_path / "d").rglob("dataset_info.json"))
    assert not list((tmp_path / "d").rglob(f"{case_examples.SKIPS_PREFIX}*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--beam-runner", "NoSuchRunner"], "--beam-runner: Unexpected pipeline runner: NoSuchRunner"),
        (
            ["--beam-runner", "DirectRunner", "--beam-pipeline-options=--direct_num_wrkers=2"],
            "Beam knows no option --direct_num_wrkers",
        ),
        (
            ["--beam-runner", "DirectRunner", "--beam-pipeline-options=--direct_num_workers=two"],
            "a value Beam cannot parse",
        ),
        (
            ["--beam-runner", "DirectRunner", "--beam-pipeline-options=--direct_num_workers=2 stray"],
            "expects --name=value flags, got 'stray'",
        ),
        (
            ["--beam-runner", "DirectRunner", "--beam-pipeline-options=--job_name='unclosed"],
            "cannot be split into flags",
        ),
        (["--beam-pipeline-options=--direct_num_workers=2"], "only with --beam-runner"),
    ],
)
def test_bad_beam_flags_are_one_line_and_exit_2_with_nothing_written(tmp_path, capsys, flags, message):
    code = cli.main(
        ["build-data", "ctglip_synthetic", "--config", "tiny", "--data-dir", str(tmp_path), *flags]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "\n" not in err, err
    assert not list(tmp_path.iterdir())


def test_without_beam_installed_the_flag_says_how_to_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam now raises ImportError
    code = cli.main(
        [
            "build-data",
            "ctglip_synthetic",
            "--config",
            "tiny",
            "--data-dir",
            str(tmp_path),
            "--beam-runner",
            "DirectRunner",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and INSTALL_HINT in err and "\n" not in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="pip install 'ctglip-jax\\[beam\\]'"):
        pipeline_setup("DirectRunner", None)
