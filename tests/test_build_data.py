"""`ctglip build-data`: builds, summarises, reuses, and turns bad input into one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctglip_jax import cli
from ctglip_jax.data import datasets

ROOT = Path(__file__).resolve().parents[1]
NIFTI_DUMMY = ROOT / "tfds_builders" / "ctglip_nifti" / "dummy_data"


def test_synthetic_tiny_builds_from_the_console_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ctglip_jax.cli", "build-data", "ctglip_synthetic", "--config", "tiny",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "train: 32 records" in proc.stdout and "validation: 8 records" in proc.stdout
    assert "test: 8 records" in proc.stdout
    assert "Generating" in proc.stderr  # TFDS's tqdm progress bars
    assert "tensorflow" not in proc.stderr.lower().replace("tensorflow_datasets", "")
    version = str(datasets.builder_class("ctglip_synthetic").VERSION)  # the builder's: a copy goes stale
    assert (tmp_path / "ctglip_synthetic" / "tiny" / version / "dataset_info.json").exists()


def test_nifti_summary_lists_skipped_cases_and_a_second_run_reuses(tmp_path, capsys):
    args = ["build-data", "ctglip_nifti", "--config", "tiny", "--manual-dir", str(NIFTI_DUMMY),
            "--data-dir", str(tmp_path), "--json"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["records"] == {"train": 2, "test": 1} and not first["reused"]
    assert [s["case_id"] for s in first["skipped"]] == ["missing"]
    assert "missing.nii.gz" in first["skipped"][0]["reason"]
    assert cli.main(args[:-1]) == 0
    text = capsys.readouterr().out
    assert "(already built)" in text and "skipped 1 case(s):" in text and "missing:" in text


def test_env_var_sets_the_default_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(datasets.DATA_DIR_ENV, str(tmp_path / "env"))
    assert datasets.default_data_dir() == str(tmp_path / "env")
    assert cli.main(["build-data", "msd_tumor", "--config", "tiny", "--manual-dir",
                     str(NIFTI_DUMMY.parents[1] / "msd_tumor/dummy_data/Task00_Dummy")]) == 0
    assert (tmp_path / "env/msd_tumor/tiny/1.0.0").is_dir()
    monkeypatch.delenv(datasets.DATA_DIR_ENV)
    assert datasets.default_data_dir().endswith("tensorflow_datasets")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ctglip_nifti", "--config", "tiny"], "needs --manual-dir"),
        (["ctglip_synthetic", "--config", "huge"], "has no config 'huge'"),
        (["ctglip_nifti", "--config", "tiny", "--manual-dir", "/nonexistent"], "manual dir does not exist"),
        (["msd_tumor", "--config", "tiny", "--manual-dir", "{empty}"], "dataset.json not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert cli.main(["build-data", *argv, "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("ctglip build-data: error:")


def test_a_broken_manifest_leaves_no_dataset_behind(tmp_path, capsys):
    folder = tmp_path / "user"
    shutil.copytree(NIFTI_DUMMY, folder)
    entry = {"case_id": "a", "ct": "ct/x.nii.gz", "mask": "seg/x.nii.gz", "report": "The liver is normal."}
    (folder / "cases.jsonl").write_text(json.dumps(entry) + "\n")
    assert cli.main(["build-data", "ctglip_nifti", "--config", "tiny", "--manual-dir", str(folder),
                     "--data-dir", str(tmp_path / "d")]) == 2
    assert "no usable case" in capsys.readouterr().err
    assert not list((tmp_path / "d").rglob("dataset_info.json"))


def test_data_source_of_an_unbuilt_dataset_says_how_to_build_it(tmp_path):
    from ctglip_jax.errors import CTGlipInputError

    with pytest.raises(CTGlipInputError, match="ctglip build-data ctglip_synthetic --config tiny"):
        datasets.data_source("ctglip_synthetic", "tiny", "train", str(tmp_path))
