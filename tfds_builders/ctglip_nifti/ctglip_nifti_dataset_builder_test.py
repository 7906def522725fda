"""`ctglip_nifti` on its dummy_data folder (3 good cases, 1 with a wrong path).

The full 10-case check with every kind of broken case is `tests/test_nifti_builder.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctglip_jax.data import datasets, organs
from ctglip_jax.errors import CTGlipInputError
from tfds_builders.ctglip_nifti.ctglip_nifti_dataset_builder import read_manifest, resolve_report

DUMMY = Path(__file__).parent / "dummy_data"


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    return datasets.build("ctglip_nifti", "tiny", str(tmp_path_factory.mktemp("tfds")), str(DUMMY))


def test_dummy_folder_builds(summary):
    assert summary.records == {"train": 2, "test": 1}
    assert [s["case_id"] for s in summary.skipped] == ["missing"]
    source = datasets.data_source("ctglip_nifti", "tiny", "train", str(Path(summary.data_dir).parents[2]))
    record = source[0]
    assert record["volume"].dtype == np.int16 and record["volume"].shape == (16, 16, 16)
    liver, kidney = organs.organ_id("liver") - 1, organs.organ_id("kidney_left") - 1
    assert (record["organ_abnormal"][liver], record["organ_abnormal"][kidney]) == (0, 1)
    assert set(np.unique(record["label_map"])) <= {0, liver + 1, kidney + 1, organs.organ_id("spleen")}


def test_rebuilding_reuses_the_dataset(summary):
    again = datasets.build("ctglip_nifti", "tiny", str(Path(summary.data_dir).parents[2]), str(DUMMY))
    assert again.reused and again.records == summary.records and again.skipped == summary.skipped


def test_manifest_reader_checks_cheaply(tmp_path):
    (tmp_path / "cases.jsonl").write_text(
        '{"case_id": "a", "ct": "x.nii", "mask": "y.nii", "report": "r", "split": "holdout"}\n'
        'not json\n'
    )
    cases, skipped = read_manifest(tmp_path)
    assert cases == []
    assert "split 'holdout'" in skipped[0]["reason"] and "not a JSON object" in skipped[1]["reason"]


def test_report_may_be_inline_or_a_file(tmp_path):
    (tmp_path / "r.txt").write_text("The liver is normal.")
    assert resolve_report("r.txt", tmp_path, "c") == "The liver is normal."
    assert resolve_report("Liver normal.", tmp_path, "c") == "Liver normal."
    with pytest.raises(CTGlipInputError, match="report file not found"):
        resolve_report("gone.txt", tmp_path, "c")
    with pytest.raises(CTGlipInputError, match="no report"):
        resolve_report(None, tmp_path, "c")
