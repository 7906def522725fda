"""`ctglip_nifti` in the CT-RATE layout: reports CSVs, volumes found by name, TotalSegmentator v2 masks.

References, independent of the builder: nibabel's own canonical (RAS+) view of each stored file with its
scl_slope/scl_inter applied (the volume, the affine); the v2 -> v1 ids written out by hand from the
TotalSegmentator class tables (shared/reference/totalsegmentator_classes.json); the organ flags each
hand-written report states (`ctrate_fixture.REPORTS`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from ctrate_fixture import CLINICAL, TECHNIQUE, write_ctrate_folder

from ctglip_jax import cli
from ctglip_jax.data import datasets, organs
from ctglip_jax.errors import CTGlipInputError
from tfds_builders.ctglip_nifti import ctrate, masks
from tfds_builders.ctglip_nifti.source import NiftiSource, ReportsCsv

GRID = "grid_4x4x4_24x24x24_m4"  # the stored grid: resampling is the identity, the crop keeps everything
# v2 id -> v1 id for the classes the fixture draws (heart: v2's single class has no v1 counterpart).
V2_TO_V1 = {1: 1, 2: 2, 3: 3, 5: 5, 6: 6, 10: 13, 11: 14, 12: 15, 13: 16, 14: 17, 23: 3, 51: 0, 52: 7}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_ctrate_folder(tmp_path_factory.mktemp("ctrate"))


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    summary = datasets.build("ctglip_nifti", GRID, str(data_dir), str(folder.root), source=folder.source())
    return summary, data_dir


def _records(data_dir, split):
    source = datasets.data_source("ctglip_nifti", GRID, split, str(data_dir))
    return [source[i] for i in range(len(source))]


def test_splits_follow_the_csvs_and_broken_cases_are_listed(built, folder):
    summary, data_dir = built
    assert summary.records == {"train": 6, "validation": 3, "test": 3}
    for split in ("train", "validation", "test"):
        ids = [r["case_id"].decode() for r in _records(data_dir, split)]
        assert ids == [c.case_id for c in folder.good if c.split == split]  # CSV order
    reasons = {s["case_id"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"train_5_a_1", "valid_6_a_1"}
    assert "no TotalSegmentator mask" in reasons["train_5_a_1"]
    assert "train_reports.csv line" in reasons["train_5_a_1"]
    assert "no volume valid_6_a_1" in reasons["valid_6_a_1"]
    assert json.loads((Path(summary.data_dir) / "skipped.json").read_text()) == summary.skipped


def test_volumes_are_ras_hu_and_masks_are_v1(built, folder):
    _, data_dir = built
    by_id = {c.case_id: c for c in folder.good}
    records = [r for split in ("train", "validation", "test") for r in _records(data_dir, split)]
    assert len(records) == 12
    for record in records:
        case = by_id[record["case_id"].decode()]
        stored = nib.load(case.ct_path)
        assert nib.aff2axcodes(stored.affine) == ("L", "P", "S") and stored.get_data_dtype() == np.int16
        assert (stored.dataobj.slope, stored.dataobj.inter) == (1.0, -1024.0)
        assert np.asarray(stored.dataobj.get_unscaled()).min() >= 0  # the stored values are HU + 1024
        canonical = nib.as_closest_canonical(stored)
        np.testing.assert_array_equal(record["volume"], np.asarray(canonical.dataobj).astype(np.int16))
        np.testing.assert_allclose(record["affine"], canonical.affine, atol=1e-4)
        np.testing.assert_array_equal(record["volume"], case.hu)
        assert record["volume"].min() == -1000  # air, after the intercept
        if case.mask_path.is_dir():  # per-class v2 masks, combined by class name
            expected = np.zeros(record["label_map"].shape, np.uint8)
            for path in case.mask_path.iterdir():
                v2_id = {n: i for i, n in organs.v2_names().items()}[path.name[: -len(".nii.gz")]]
                expected[np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj) > 0] = V2_TO_V1[v2_id]
        else:
            v2 = np.asarray(nib.as_closest_canonical(nib.load(case.mask_path)).dataobj)
            assert set(np.unique(v2)) <= set(V2_TO_V1) | {0} and 52 in v2 and 10 in v2
            expected = np.vectorize(lambda i: V2_TO_V1.get(int(i), 0))(v2).astype(np.uint8)
        np.testing.assert_array_equal(record["label_map"], expected)
        present = set(np.unique(record["label_map"]).tolist())
        assert {organs.organ_id("aorta"), organs.organ_id("lung_upper_lobe_left")} <= present
        assert 51 not in present and 52 not in present  # v2's heart and aorta ids are gone


def test_organ_texts_and_flags_come_from_the_reports(built, folder):
    _, data_dir = built
    by_id = {c.case_id: c for c in folder.good}
    for split in ("train", "test"):
        for record in _records(data_dir, split):
            case = by_id[record["case_id"].decode()]
            report = record["report"].decode()
            assert case.findings in report and case.impressions in report
            assert CLINICAL not in report and TECHNIQUE not in report  # only the text columns
            for organ, flag in case.stated.items():
                i = organs.organ_id(organ) - 1
                assert record["organ_abnormal"][i] == flag, (case.case_id, organ)
                assert record["organ_text"][i], (case.case_id, organ)
            assert record["organ_abnormal"][organs.organ_id("brain") - 1] == -1


def test_auto_split_and_validation_fraction_keep_patients_together(folder, tmp_path, capsys):
    """Through the CLI, on the user's own grid: a train CSV with half its patients moved, an auto CSV."""
    args = ["build-data", "ctglip_nifti", "--manual-dir", str(folder.root), "--mask-dir", "seg",
            "--mask-version", "v2", "--reports-csv", "train_reports.csv:train", "--reports-csv",
            str(folder.root / "validation_reports.csv"), "--validation-fraction", "0.5",
            "--spacing", "4,4,4", "--shape", "16,16,16", "--body-margin", "4", "--data-dir", str(tmp_path),
            "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["config"] == "grid_4x4x4_16x16x16_m4"
    split_of = {}
    for split in out["records"]:
        for record in datasets.data_source("ctglip_nifti", out["config"], split, str(tmp_path)):
            split_of[record["case_id"].decode()] = split
            assert record["volume"].shape == (16, 16, 16)
    train_csv = [c for c in folder.good if c.csv == "train_reports.csv"]
    auto_csv = [c for c in folder.good if c.csv == "validation_reports.csv"]
    assert set(split_of) == {c.case_id for c in train_csv + auto_csv}
    for c in train_csv:
        assert split_of[c.case_id] == ctrate.assign_split(c.case_id, "train", 0.5) in ("train", "validation")
    for c in auto_csv:
        assert split_of[c.case_id] == ctrate.assign_split(c.case_id, "auto", 0.5)
    for a, b in (("train_1_a_1", "train_1_a_2"), ("train_4_a_1", "train_4_b_1")):
        assert split_of[a] == split_of[b]


def test_auto_split_is_a_stable_80_10_10_by_patient():
    patients = [f"train_{i}" for i in range(4000)]
    splits = [ctrate.assign_split(f"{p}_a_1", "auto", 0.05) for p in patients]
    share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["validation"] - 0.1) < 0.02
    again = [ctrate.assign_split(f"{p}_b_2", "auto", 0.05) for p in patients]  # another scan, same patient
    assert again == splits
    moved = [ctrate.assign_split(f"{p}_a_1", "train", 0.05) for p in patients]
    assert set(moved) == {"train", "validation"} and abs(moved.count("validation") / 4000 - 0.05) < 0.015
    assert {ctrate.assign_split(f"{p}_a_1", "test", 0.05) for p in patients} == {"test"}
    assert ctrate.patient_of("valid_12_b_3") == "valid_12" and ctrate.patient_of("scan42") == "scan42"
    assert ctrate.case_id_of("train_1_a_1.nii.gz") == ctrate.case_id_of("train_1_a_1") == "train_1_a_1"


def test_two_volumes_of_one_name_and_an_empty_report_are_skipped(folder, tmp_path):
    root = tmp_path / "user"
    shutil.copytree(folder.root, root)
    copy = root / "elsewhere" / "train_3_a_1.nii.gz"
    copy.parent.mkdir()
    shutil.copy(next(c.ct_path for c in folder.cases if c.case_id == "train_3_a_1"), copy)
    lines = (root / "train_reports.csv").read_text().splitlines()
    lines.append("train_9_a_1.nii.gz,history,technique,,")
    (root / "train_reports.csv").write_text("\n".join(lines) + "\n")
    source = NiftiSource(reports_csvs=(ReportsCsv("train_reports.csv", "train"),), mask_dir="seg",
                         mask_version="v2", validation_fraction=0.0)
    cases, skipped = ctrate.read_cases(root, source)
    reasons = {s["case_id"]: s["reason"] for s in skipped}
    assert "2 volumes" in reasons["train_3_a_1"] and str(copy) in reasons["train_3_a_1"]
    assert "dataset/train/train_3/train_3_a/train_3_a_1.nii.gz" in reasons["train_3_a_1"]
    assert "empty report" in reasons["train_9_a_1"]
    assert "no TotalSegmentator mask" in reasons["train_5_a_1"]
    assert [c.case_id for c in cases] == ["train_1_a_1", "train_1_a_2", "train_2_a_1", "train_4_a_1",
                                          "train_4_b_1"]
    assert cases[2].mask.is_dir() and cases[0].mask.name == "train_1_a_1.nii.gz"


def test_a_class_folder_without_class_masks_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CTGlipInputError, match="no TotalSegmentator v2 class mask"):
        masks.load_class_folder(tmp_path, reference=None, version="v2")


def test_v2_masks_in_a_manifest_are_converted_with_mask_version(folder, tmp_path):
    case = next(c for c in folder.good if c.case_id == "train_1_a_1")
    entry = {"case_id": "m1", "ct": str(case.ct_path), "mask": str(case.mask_path), "split": "train",
             "report": case.findings}
    (tmp_path / "cases.jsonl").write_text(json.dumps(entry) + "\n")
    source = NiftiSource(mask_version="v2")
    datasets.build("ctglip_nifti", GRID, str(tmp_path / "d"), str(tmp_path), source=source)
    record = datasets.data_source("ctglip_nifti", GRID, "train", str(tmp_path / "d"))[0]
    np.testing.assert_array_equal(record["label_map"], case.labels_v1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--reports-csv", "train_reports.csv:train", "--mask-dir", "seg"], "needs --mask-version v1|v2"),
        (["--reports-csv", "train_reports.csv", "--mask-version", "v2"], "needs --mask-dir"),
        (["--mask-dir", "seg", "--mask-version", "v2"], "--mask-dir: is for the CT-RATE layout"),
        (["--reports-csv", "train_reports.csv:holdout", "--mask-dir", "seg", "--mask-version", "v2"],
         "split 'holdout'"),
        (["--reports-csv", "gone.csv", "--mask-dir", "seg", "--mask-version", "v2"], "reports CSV not found"),
        (["--reports-csv", "train_reports.csv", "--mask-dir", "seg", "--mask-version", "v2",
          "--text-columns", "Findings_EN,Nope"], "no column 'Nope'"),
        (["--reports-csv", "train_reports.csv", "--mask-dir", "nowhere", "--mask-version", "v2"],
         "mask dir (--mask-dir) not found"),
        (["--reports-csv", "train_reports.csv", "--mask-dir", "seg", "--mask-version", "v2",
          "--validation-fraction", "1.5"], "must be in [0, 1)"),
        (["--reports-csv", "train_reports.csv", "--mask-dir", "{empty}", "--mask-version", "v2"],
         "train_reports.csv: no usable case (7 skipped: train_1_a_1: "),
        (["--reports-csv", "train_reports.csv", "--mask-dir", "seg", "--mask-version", "v2", "{manifest}"],
         "use one layout"),
    ],
)
def test_bad_layout_flags_are_one_line_and_exit_2(extra, message, folder, tmp_path, capsys):
    root = folder.root
    if "{manifest}" in extra:
        root = tmp_path / "user"
        shutil.copytree(folder.root, root)
        (root / "cases.jsonl").write_text("{}\n")
        extra = [e for e in extra if e != "{manifest}"]
    (tmp_path / "empty").mkdir()
    extra = [e.replace("{empty}", str(tmp_path / "empty")) for e in extra]
    argv = ["build-data", "ctglip_nifti", "--config", "tiny", "--manual-dir", str(root),
            "--data-dir", str(tmp_path / "d"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("ctglip build-data: error:"), err
    assert not list((tmp_path / "d").rglob("dataset_info.json"))
