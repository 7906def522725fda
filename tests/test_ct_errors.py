"""Bad CT inputs: each raises its own exception type naming the file and the problem, and through the CLI
prints one line on stderr and exits 2 (no traceback)."""

from __future__ import annotations

import os
import shutil
import struct

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from ctglip_jax import cli, errors
from ctglip_jax.data import ct

SHAPE = (6, 5, 4)
AFFINE = np.diag([-0.8, -0.8, 2.0, 1.0])


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _patch_header(path, offset, fmt, *values):
    """Overwrite header bytes of an uncompressed .nii (what a broken writer would have produced)."""
    blob = bytearray(path.read_bytes())
    struct.pack_into(fmt, blob, offset, *values)
    path.write_bytes(bytes(blob))
    return path


def _cli_rejects(capsys, argv, path):
    capsys.readouterr()
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and os.path.basename(str(path)) in lines[0]
    return lines[0]


def _check(capsys, path, exc_type, match, loader=ct.load_ct):
    with pytest.raises(exc_type, match=match) as info:
        loader(path)
    assert isinstance(info.value, errors.CTGlipInputError)
    assert str(path) in str(info.value)
    line = _cli_rejects(capsys, ["inspect-ct", str(path)], path)
    assert info.value.problem in line


def test_missing_file(tmp_path, capsys):
    _check(capsys, tmp_path / "nope.nii.gz", errors.InputNotFoundError, "no such file")


def test_not_a_nifti(tmp_path, capsys):
    path = tmp_path / "scan.nii"
    path.write_text("patient: anonymous\n" * 40)
    _check(capsys, path, errors.UnreadableFileError, "not a single-file NIfTI")
    short = tmp_path / "tiny.nii"
    short.write_bytes(b"abc")
    _check(capsys, short, errors.UnreadableFileError, "not a NIfTI")


def test_gzip_that_is_not_nifti(tmp_path, capsys):
    import gzip

    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"hello " * 200))
    _check(capsys, path, errors.UnreadableFileError, "NIfTI")


def test_truncated_gzip(tmp_path, capsys):
    path = _save(
        tmp_path / "cut.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)
    )
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _check(capsys, path, errors.CorruptFileError, "truncated")


def test_truncated_uncompressed(tmp_path, capsys):
    path = _save(tmp_path / "cut.nii", np.zeros((20, 20, 20), np.int16))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 500])
    _check(capsys, path, errors.CorruptFileError, "truncated")


def test_2d_image(tmp_path, capsys):
    path = _save(tmp_path / "slice.nii.gz", np.zeros((6, 5), np.int16))
    _check(capsys, path, errors.VolumeShapeError, "2-D")


def test_4d_image(tmp_path, capsys):
    path = _save(tmp_path / "series.nii.gz", np.zeros((6, 5, 4, 2), np.int16))
    _check(capsys, path, errors.VolumeShapeError, "4-D")
    _check(capsys, os.path.join(data_path, "example4d.nii.gz"), errors.VolumeShapeError, "4-D")


def test_trailing_singleton_axis_is_fine(tmp_path):
    path = _save(tmp_path / "vol.nii.gz", np.ones((6, 5, 4, 1), np.int16))
    assert ct.load_ct(path).shape == (6, 5, 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, capsys, bad):
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 3] = bad
    path = _save(tmp_path / "nan.nii.gz", data)
    _check(capsys, path, errors.NonFiniteVoxelError, "1 NaN/Inf voxels")


@pytest.mark.parametrize("pixdim", [0.0, -1.5])
def test_zero_or_negative_spacing(tmp_path, capsys, pixdim):
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    img.set_qform(AFFINE, code=1)
    path = tmp_path / "spacing.nii"
    nib.save(img, path)
    _patch_header(path, 80, "<f", pixdim)  # pixdim[1]
    _check(capsys, path, errors.InvalidGeometryError, "spacing")


def test_singular_affine(tmp_path, capsys):
    singular = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.zeros(SHAPE, np.int16), None)
    img.set_sform(singular, code=1)
    img.set_qform(None, code=0)
    path = tmp_path / "singular.nii.gz"
    nib.save(img, path)
    _check(capsys, path, errors.InvalidGeometryError, "singular affine")


# ------------------------------------------------------------------------------- label maps


@pytest.fixture
def image_path(tmp_path):
    return _save(tmp_path / "ct.nii.gz", np.full(SHAPE, 40, np.int16))


def _mask_check(capsys, image_path, mask_path, exc_type, match):
    image = ct.load_ct(image_path)
    with pytest.raises(exc_type, match=match) as info:
        ct.load_label_map(mask_path, reference=image)
    assert str(mask_path) in str(info.value)
    line = _cli_rejects(capsys, ["inspect-ct", str(image_path), "--mask", str(mask_path)], mask_path)
    assert info.value.problem in line
    out = image_path.with_name("out.nii.gz")
    argv = [
        "preprocess",
        str(image_path),
        "--out",
        str(out),
        "--mask",
        str(mask_path),
        "--mask-out",
        str(out),
    ]
    _cli_rejects(capsys, argv, mask_path)


def test_mask_shape_mismatch(tmp_path, capsys, image_path):
    mask = _save(tmp_path / "mask.nii.gz", np.zeros((6, 5, 5), np.uint8))
    _mask_check(capsys, image_path, mask, errors.MaskMismatchError, "shape")


def test_mask_affine_mismatch(tmp_path, capsys, image_path):
    shifted = AFFINE.copy()
    shifted[2, 3] += 1.0
    mask = _save(tmp_path / "mask.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    _mask_check(capsys, image_path, mask, errors.MaskMismatchError, "affine differs")


def test_mask_in_other_axis_order_is_accepted(tmp_path, image_path):
    """Same grid stored as RAS instead of LPS: after canonicalisation the two match voxel for voxel."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[0, 0, 0] = 7
    flipped = nib.as_closest_canonical(nib.Nifti1Image(labels, AFFINE))
    mask = tmp_path / "mask_ras.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(flipped.dataobj), flipped.affine), mask)
    image = ct.load_ct(image_path)
    loaded = ct.load_label_map(mask, reference=image)
    assert loaded.data.dtype == np.int16
    assert loaded.data[-1, -1, 0] == 7  # stored voxel (0, 0, 0) is the most right/anterior one in LPS


@pytest.mark.parametrize("bad_id", [105, 250, -1])
def test_mask_ids_outside_vocabulary(tmp_path, capsys, image_path, bad_id):
    labels = np.zeros(SHAPE, np.int16)
    labels[1, 1, 1] = bad_id
    labels[2, 2, 2] = 104  # the last valid id is fine
    mask = _save(tmp_path / "mask.nii.gz", labels)
    _mask_check(
        capsys, image_path, mask, errors.UnknownLabelError, f"outside the vocabulary 0..104: {bad_id}"
    )


def test_mask_with_fractional_values(tmp_path, capsys, image_path):
    labels = np.zeros(SHAPE, np.float32)
    labels[1, 1, 1] = 2.5
    mask = _save(tmp_path / "mask.nii.gz", labels)
    _mask_check(capsys, image_path, mask, errors.UnknownLabelError, "non-integer")


# ------------------------------------------------------------------------------------ DICOM


def test_folder_without_dicom(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing here")
    _check(capsys, tmp_path, errors.InputNotFoundError, "no DICOM")


def test_one_slice_series_without_thickness(tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key in ("SliceThickness", "SpacingBetweenSlices"):
        del ds[key]
    ds.save_as(tmp_path / "one.dcm")
    _check(capsys, tmp_path, errors.InvalidGeometryError, "SliceThickness")


def test_dicom_series_with_duplicate_positions(tmp_path, capsys):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    for name in ("a.dcm", "b.dcm"):
        shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / name)
    _check(capsys, tmp_path, errors.InvalidGeometryError, "share one position")
    del pydicom
