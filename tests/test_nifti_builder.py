"""`ctglip_nifti`: a user folder with broken cases builds the good ones and lists the broken with reasons.

Reference: the CT files are written with nibabel on the builder's target grid (4 mm, so resampling is the
identity) and the expected stored volume is cut out of the written array with plain numpy around the
body box; organ flags are the ones the hand-written reports state.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctglip_jax.data import datasets, organs
from ctglip_jax.errors import CTGlipInputError

SHAPE = (20, 18, 14)  # stored grid, 4 mm isotropic: larger than the 16^3 crop on two axes, smaller on one
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
LIVER, KIDNEY_L = organs.organ_id("liver"), organs.organ_id("kidney_left")
GOOD = [f"good{i}" for i in range(6)]
BROKEN = {  # case id: a phrase its skip reason must hold
    "corrupt": "corrupt",
    "mismatch": "differs from image",
    "noreport": "no report",
    "wrongpath": "not found",
}


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    hu = np.full(SHAPE, -1000, np.int16)
    lo = rng.integers(2, 4, 3)
    hu[lo[0]:17, lo[1]:15, lo[2]:12] = rng.integers(-120, 80, (17 - lo[0], 15 - lo[1], 12 - lo[2]))
    lab = np.zeros(SHAPE, np.uint8)
    lab[6:12, 6:12, 4:9] = LIVER
    lab[12:15, 5:9, 4:7] = KIDNEY_L
    return hu, lab


def _save(array, path: Path, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), path)


def _report(i: int) -> str:
    if i % 2:
        return "FINDINGS: The liver is normal in size. There is a 2 cm cyst in the left kidney."
    return "FINDINGS: There is a 3 cm mass in the liver. The left kidney is unremarkable."


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user")
    (root / "ct").mkdir()
    (root / "seg").mkdir()
    (root / "reports").mkdir()
    lines = []
    for i, case in enumerate(GOOD):
        hu, lab = _phantom(i)
        _save(hu, root / f"ct/{case}.nii.gz")
        _save(lab, root / f"seg/{case}.nii.gz")
        report = _report(i)
        if i % 3 == 0:  # some reports as files, some inline
            (root / f"reports/{case}.txt").write_text(report)
            report = f"reports/{case}.txt"
        split = ["train", "train", "train", "train", "validation", "test"][i]
        lines.append({"case_id": case, "ct": f"ct/{case}.nii.gz", "mask": f"seg/{case}.nii.gz",
                      "report": report, "split": split})
    hu, lab = _phantom(99)
    for case in BROKEN:
        _save(hu, root / f"ct/{case}.nii.gz")
        _save(lab, root / f"seg/{case}.nii.gz")
    raw = gzip.decompress((root / "ct/corrupt.nii.gz").read_bytes())  # valid header, then cut mid-data
    (root / "ct/corrupt.nii.gz").write_bytes(gzip.compress(raw[: 352 + 200]))
    _save(lab[:, :, :-2], root / "seg/mismatch.nii.gz")
    entries = {
        "corrupt": {"ct": "ct/corrupt.nii.gz", "mask": "seg/corrupt.nii.gz", "report": _report(0)},
        "mismatch": {"ct": "ct/mismatch.nii.gz", "mask": "seg/mismatch.nii.gz", "report": _report(1)},
        "noreport": {"ct": "ct/noreport.nii.gz", "mask": "seg/noreport.nii.gz", "report": ""},
        "wrongpath": {"ct": "ct/does_not_exist.nii.gz", "mask": "seg/wrongpath.nii.gz", "report": _report(0)},
    }
    for j, (case, entry) in enumerate(entries.items()):
        lines.insert(2 * j + 1, {"case_id": case, "split": "train", **entry})
    (root / "cases.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


@pytest.fixture(scope="module")
def built(user_folder, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    summary = datasets.build("ctglip_nifti", "tiny", str(data_dir), str(user_folder))
    return summary, data_dir


def test_builds_the_good_cases_and_lists_the_broken_with_reasons(built):
    summary, _ = built
    assert summary.records == {"train": 4, "validation": 1, "test": 1}
    reasons = {s["case_id"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == set(BROKEN)
    for case, word in BROKEN.items():
        assert word in reasons[case].lower(), reasons[case]
    assert "does_not_exist.nii.gz" in reasons["wrongpath"]
    assert json.loads((Path(summary.data_dir) / "skipped.json").read_text()) == summary.skipped


def test_records_match_an_independent_numpy_crop(built, user_folder):
    summary, data_dir = built
    source = datasets.data_source("ctglip_nifti", "tiny", "train", str(data_dir))
    ids = [source[i]["case_id"].decode() for i in range(len(source))]
    assert ids == ["good0", "good1", "good2", "good3"]  # manifest order, broken ones removed
    for i in range(len(source)):
        record = source[i]
        hu = np.asarray(nib.load(user_folder / f"ct/{ids[i]}.nii.gz").dataobj)
        lab = np.asarray(nib.load(user_folder / f"seg/{ids[i]}.nii.gz").dataobj)
        body = np.argwhere(hu > -500)
        lo, hi = np.maximum(body.min(0) - 1, 0), np.minimum(body.max(0) + 2, SHAPE)  # 4 mm margin = 1 voxel
        start = (lo + hi) // 2 - 8
        expected_hu = np.full((16, 16, 16), -1024, np.int16)
        expected_lab = np.zeros((16, 16, 16), np.uint8)
        for x in range(16):
            for y in range(16):
                for z in range(16):
                    p = start + (x, y, z)
                    if np.all(p >= 0) and np.all(p < SHAPE):
                        expected_hu[x, y, z] = hu[tuple(p)]
                        expected_lab[x, y, z] = lab[tuple(p)]
        np.testing.assert_array_equal(record["volume"], expected_hu)
        np.testing.assert_array_equal(record["label_map"], expected_lab)
        np.testing.assert_allclose(record["spacing"], [4, 4, 4])
        np.testing.assert_allclose(record["affine"][:3, 3], start * 4.0)
        flags = record["organ_abnormal"]
        liver_abnormal = int(ids[i] in ("good0", "good2"))
        assert (flags[LIVER - 1], flags[KIDNEY_L - 1]) == (liver_abnormal, 1 - liver_abnormal)
        assert np.sum(flags >= 0) == 2
        assert b"liver" in record["organ_text"][LIVER - 1]
        assert record["organ_text"][0] == b""


def test_a_manifest_with_no_usable_case_is_an_error_naming_it(tmp_path, user_folder):
    bad = tmp_path / "bad"
    bad.mkdir()
    entry = {"case_id": "x", "ct": "nope.nii.gz", "mask": "nope.nii.gz", "report": "liver ok"}
    lines = [json.dumps(entry), "{"]
    (bad / "cases.jsonl").write_text("\n".join(lines))
    with pytest.raises(CTGlipInputError, match=r"cases\.jsonl.*no usable case"):
        datasets.build("ctglip_nifti", "tiny", str(tmp_path / "d"), str(bad))


def test_cases_that_all_fail_late_are_an_error_too(tmp_path, user_folder):
    bad = tmp_path / "late"
    (bad / "ct").mkdir(parents=True)
    (bad / "ct/a.nii.gz").write_bytes((user_folder / "ct/corrupt.nii.gz").read_bytes())
    (bad / "ct/m.nii.gz").write_bytes((user_folder / "seg/corrupt.nii.gz").read_bytes())
    entry = {"case_id": "a", "ct": "ct/a.nii.gz", "mask": "ct/m.nii.gz", "report": _report(0)}
    (bad / "cases.jsonl").write_text(json.dumps(entry))
    with pytest.raises(CTGlipInputError, match=r"cases\.jsonl.*no usable case.*a:"):
        datasets.build("ctglip_nifti", "tiny", str(tmp_path / "d"), str(bad))
    assert not list((tmp_path / "d").rglob("dataset_info.json"))  # nothing half-built left to be reused


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(CTGlipInputError, match="cases.jsonl"):
        datasets.build("ctglip_nifti", "tiny", str(tmp_path / "d"), str(tmp_path))
