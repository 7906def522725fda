"""`ctglip inspect-ct` and `ctglip preprocess`, in-process (plus one subprocess run of the console script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctglip_jax import cli
from ctglip_jax.data import organs

SHAPE = (16, 12, 10)
LPS = np.array([[-0.75, 0, 0, 30.0], [0, -0.75, 0, 20.0], [0, 0, 2.5, -50.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """An LPS int16 CT with slope/intercept and a label map holding liver, spleen and L2."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    raw = rng.integers(-500, 1500, size=SHAPE).astype(np.int16)
    img = nib.Nifti1Image(raw, LPS)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, root / "ct.nii.gz")
    hu = nib.load(root / "ct.nii.gz").get_fdata()
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 3:8, 1:4] = organs.organ_id("liver")
    labels[9:12, 2:4, 5:9] = organs.organ_id("spleen")
    labels[7, 7, 7] = organs.organ_id("vertebrae_L2")
    nib.save(nib.Nifti1Image(labels, LPS), root / "labels.nii.gz")
    return root, hu, labels


def _run(capsys, argv):
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_inspect_ct_reports_geometry_hu_and_organs(case, capsys):
    root, hu, labels = case
    out = _run(capsys, ["inspect-ct", str(root / "ct.nii.gz"), "--mask", str(root / "labels.nii.gz")])
    info = json.loads(out)
    assert info["shape"] == list(SHAPE)  # LPS -> RAS flips axes, keeps their order
    assert info["spacing_mm"] == pytest.approx([0.75, 0.75, 2.5])
    assert info["orientation"] == {"stored": "LPS", "canonical": "RAS"}
    assert info["hu"]["min"] == pytest.approx(hu.min()) and info["hu"]["max"] == pytest.approx(hu.max())
    assert info["hu"]["mean"] == pytest.approx(hu.mean(), abs=1e-3)
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    expected = {organs.v1_names()[int(i)]: int(c) for i, c in zip(ids, counts, strict=True)}
    assert {name: o["voxels"] for name, o in info["organs"].items()} == expected
    assert info["organs"]["liver"]["volume_ml"] == pytest.approx(
        expected["liver"] * 0.75 * 0.75 * 2.5 / 1000, abs=1e-3
    )
    assert info["background_voxels"] == int((labels == 0).sum())


def test_inspect_ct_without_mask(case, capsys):
    root, _, _ = case
    info = json.loads(_run(capsys, ["inspect-ct", str(root / "ct.nii.gz")]))
    assert "organs" not in info and info["orientation"]["canonical"] == "RAS"


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_preprocess_writes_canonical_resampled_pair(case, capsys, tmp_path, dtype):
    root, hu, labels = case
    out, mask_out = tmp_path / "sub" / "ct.nii.gz", tmp_path / "labels.nii.gz"
    argv = [
        "preprocess",
        str(root / "ct.nii.gz"),
        "--out",
        str(out),
        "--spacing",
        "1.5,1.5,3",
        "--dtype",
        dtype,
    ]
    argv += ["--mask", str(root / "labels.nii.gz"), "--mask-out", str(mask_out)]
    summary = json.loads(_run(capsys, argv))
    image, label_map = nib.load(out), nib.load(mask_out)
    assert summary["shape"] == list(image.shape)
    assert image.get_data_dtype() == np.dtype(dtype) and label_map.get_data_dtype() == np.int16
    assert "".join(nib.aff2axcodes(image.affine)) == "RAS"
    np.testing.assert_allclose(nib.affines.voxel_sizes(image.affine), [1.5, 1.5, 3.0], atol=1e-5)
    np.testing.assert_allclose(label_map.affine, image.affine)
    assert label_map.shape == image.shape
    # Output voxel (2, 2, 5) falls on an input voxel centre (steps 2, 2, 1.2): compare values there.
    world = nib.affines.apply_affine(image.affine, [2, 2, 5])
    src = np.round(nib.affines.apply_affine(np.linalg.inv(LPS), world)).astype(int)
    np.testing.assert_allclose(nib.affines.apply_affine(LPS, src), world, atol=1e-4)  # lies on an input voxel
    assert image.get_fdata()[2, 2, 5] == pytest.approx(hu[tuple(src)], abs=0.5 if dtype == "int16" else 1e-3)
    assert label_map.get_fdata()[2, 2, 5] == labels[tuple(src)]
    assert set(np.unique(np.asarray(label_map.dataobj))) <= set(np.unique(labels))


def test_preprocess_native_spacing_only_reorients(case, capsys, tmp_path):
    root, hu, _ = case
    out, mask_out = tmp_path / "ras.nii", tmp_path / "labels_ras.nii.gz"
    argv = ["preprocess", str(root / "ct.nii.gz"), "--out", str(out)]
    _run(capsys, [*argv, "--mask", str(root / "labels.nii.gz"), "--mask-out", str(mask_out)])
    ref = nib.as_closest_canonical(nib.load(root / "ct.nii.gz"))
    np.testing.assert_allclose(nib.load(out).affine, ref.affine, atol=1e-5)
    np.testing.assert_allclose(nib.load(out).get_fdata(), ref.get_fdata(), atol=1e-3)
    ref_labels = nib.as_closest_canonical(nib.load(root / "labels.nii.gz"))
    np.testing.assert_allclose(nib.load(mask_out).affine, ref_labels.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(nib.load(mask_out).dataobj), np.asarray(ref_labels.dataobj))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--spacing", "1,0,2"], "positive"),
        (["--spacing", "a,b,c"], "numbers"),
        (["--out", "x.png"], ".nii"),
    ],
)
def test_preprocess_rejects_bad_options(case, capsys, extra, message):
    root, _, _ = case
    argv = ["preprocess", str(root / "ct.nii.gz"), "--out", "y.nii.gz", *extra]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_preprocess_mask_needs_mask_out(case, capsys, tmp_path):
    root, _, _ = case
    argv = ["preprocess", str(root / "ct.nii.gz"), "--out", str(tmp_path / "o.nii.gz")]
    assert cli.main([*argv, "--mask", str(root / "labels.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mask-out" in err[0]
    assert not (tmp_path / "o.nii.gz").exists()


def test_inspect_ct_dicom_folder(capsys, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "0001.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    info = json.loads(_run(capsys, ["inspect-ct", str(tmp_path)]))
    assert info["shape"] == [128, 128, 1]
    assert info["hu"]["min"] == float(ds.pixel_array.min()) + float(ds.RescaleIntercept)


def test_help_texts(capsys):
    for command in ("inspect-ct", "preprocess"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, "--help"])
        assert info.value.code == 0
        assert "Example" in capsys.readouterr().out


def test_console_script_one_line_error(tmp_path):
    """A real process: nibabel would log a 'fixing pixdim' line for this header; only our line may show."""
    script = Path(sys.executable).with_name("ctglip")
    if not script.exists():
        pytest.skip("console script not installed next to this Python")
    path = tmp_path / "negative_pixdim.nii"
    img = nib.Nifti1Image(np.zeros((6, 5, 4), np.int16), None)
    img.set_qform(LPS, code=1)
    nib.save(img, path)
    blob = bytearray(path.read_bytes())
    blob[80:84] = np.float32(-1.5).tobytes()  # pixdim[1]
    path.write_bytes(bytes(blob))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([str(script), "inspect-ct", str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "negative_pixdim.nii" in lines[0] and "spacing (pixdim) must be positive" in lines[0]
