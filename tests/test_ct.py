"""CT I/O and geometry, proven against nibabel / scipy / pydicom and against analytic linear volumes.

Every stored volume is a smooth function of *world* coordinates, so whatever the voxel order, the value at
a voxel tells where in space that voxel's centre is; linear interpolation reproduces linear functions
exactly, so after resampling the expected value at every voxel is known analytically.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct

import nibabel as nib
import nibabel.processing
import numpy as np
import pytest
import scipy.ndimage as ndi
from nibabel.testing import data_path

from ctglip_jax.data import ct
from ctglip_jax.data.augment import AIR_HU, window

SHAPE = (14, 11, 9)
SPACING = (0.8, 1.1, 2.5)  # anisotropic


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    cz, sz = np.cos(np.radians(deg_z)), np.sin(np.radians(deg_z))
    cx, sx = np.cos(np.radians(deg_x)), np.sin(np.radians(deg_x))
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


def _affine(axes: str, spacing=SPACING, rotation=None) -> np.ndarray:
    """Affine whose voxel axes point along `axes` (e.g. 'PIR'), optionally rotated a little (oblique)."""
    unit = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    m = np.zeros((3, 3))
    for col, code in enumerate(axes):
        row, sign = unit[code]
        m[row, col] = sign * spacing[col]
    if rotation is not None:
        m = rotation @ m
    return nib.affines.from_matvec(m, [12.5, -30.0, 41.0])


AFFINES = {
    "LPS": _affine("LPS"),
    "LAS": _affine("LAS"),
    "PIR": _affine("PIR"),
    "RAS": _affine("RAS"),
    "oblique": _affine("LPS", rotation=_rotation(6.0, -4.0)),
}
GRADIENT = np.array([5.0, -4.0, 3.0])  # HU per mm along R, A, S


def _world(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return nib.affines.apply_affine(affine, ijk)


def linear_hu(world):
    return world @ GRADIENT + 40.0


def _save_scaled(path, raw: np.ndarray, affine, slope: float, inter: float) -> None:
    """Write int16 `raw` with the given scl_slope/scl_inter exactly (nibabel would pick its own)."""
    img = nib.Nifti1Image(raw.astype(np.int16), affine)
    img.header.set_data_dtype(np.int16)
    blob = bytearray(img.to_bytes())
    struct.pack_into("<ff", blob, 112, slope, inter)  # scl_slope, scl_inter
    with open(path, "wb") as f:
        f.write(gzip.compress(bytes(blob), compresslevel=1) if str(path).endswith(".gz") else bytes(blob))


@pytest.fixture(scope="module", params=sorted(AFFINES))
def scaled_case(request, tmp_path_factory):
    """int16 + slope/intercept volume holding linear_hu, in one of the orientations."""
    affine = AFFINES[request.param]
    slope, inter = 0.05, -200.0
    raw = np.round((linear_hu(_world(affine, SHAPE)) - inter) / slope)
    assert np.abs(raw).max() < 32000
    path = tmp_path_factory.mktemp("ct") / f"{request.param}.nii.gz"
    _save_scaled(path, raw, affine, slope, inter)
    return path, affine, raw * slope + inter


def test_load_matches_nibabel_canonical(scaled_case):
    path, affine, expected_stored = scaled_case
    vol = ct.load_ct(path)
    ref = nib.as_closest_canonical(nib.load(path))
    assert vol.data.dtype == np.float32 and vol.orientation == "RAS"
    assert vol.stored_orientation == "".join(nib.aff2axcodes(affine))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    np.testing.assert_allclose(vol.data, ref.get_fdata(), atol=1e-3)
    # nibabel itself applies the same scl_slope/scl_inter we wrote:
    np.testing.assert_allclose(nib.load(path).get_fdata(), expected_stored, atol=1e-3)
    assert sorted(vol.spacing) == pytest.approx(sorted(SPACING), abs=1e-5)


def test_voxel_centres_keep_their_world_position(scaled_case):
    """Each canonical voxel holds the value of the stored voxel at the same world point (within 0.01 mm)."""
    path, affine, _ = scaled_case
    codes = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    img = nib.Nifti1Image(codes.astype(np.int32), affine)
    coded = path.with_name(path.name.replace(".nii.gz", "_codes.nii"))
    nib.save(img, coded)
    vol = ct.load_ct(coded)
    stored_ijk = np.stack(np.unravel_index(vol.data.astype(np.int64), SHAPE), axis=-1)
    gap = np.linalg.norm(
        _world(vol.affine, vol.shape) - nib.affines.apply_affine(affine, stored_ijk), axis=-1
    )
    assert gap.max() < 0.01


@pytest.mark.parametrize("target", [(1.5, 2.0, 3.0), (0.6, 0.9, 1.7)])
def test_resample_linear_volume_matches_analytic_and_nibabel(scaled_case, target):
    path, _, _ = scaled_case
    vol = ct.resample(ct.load_ct(path), target)
    assert vol.spacing == pytest.approx(target, abs=1e-6)
    assert vol.data.dtype == np.float32
    # Analytic: linear interpolation of a linear field is exact (up to the int16 quantisation 0.025 HU).
    np.testing.assert_allclose(vol.data, linear_hu(_world(vol.affine, vol.shape)), atol=0.06)
    # Independent reference: nibabel.processing (scipy map_coordinates) onto our grid, interior voxels.
    ref = nibabel.processing.resample_from_to(
        nib.as_closest_canonical(nib.load(path)), (vol.shape, vol.affine), order=1
    )
    ref_data = np.asarray(ref.dataobj, dtype=np.float64)
    np.testing.assert_allclose(vol.data[1:-1, 1:-1, 1:-1], ref_data[1:-1, 1:-1, 1:-1], atol=1.0)


@pytest.mark.parametrize("target", [(1.5, 2.0, 3.0), (0.6, 0.9, 1.7)])
def test_resampled_voxel_centres_are_where_the_affine_says(target):
    """Resample three volumes holding world x, y, z: their values are the output voxels' world mm."""
    affine = AFFINES["oblique"]
    world = _world(affine, SHAPE)
    for axis in range(3):
        vol = ct.resample(ct.CTVolume(world[..., axis].astype(np.float32), affine), target)
        expected = _world(vol.affine, vol.shape)[..., axis]
        assert np.abs(vol.data - expected).max() < 0.01


def test_output_grid_stays_inside_input():
    vol = ct.CTVolume(np.zeros(SHAPE, np.float32), AFFINES["RAS"])
    out = ct.resample(vol, (1.5, 2.0, 3.0))
    last_in = np.array(SHAPE) - 1
    last_out = nib.affines.apply_affine(np.linalg.inv(vol.affine) @ out.affine, np.array(out.shape) - 1)
    assert np.all(last_out <= last_in + 1e-9) and np.all(
        last_out + np.array([1.5, 2.0, 3.0]) / SPACING > last_in
    )


def test_load_with_spacing_equals_load_then_resample(scaled_case):
    path, _, _ = scaled_case
    fast = ct.load_ct(path, spacing=(1.3, 1.7, 2.9))
    slow = ct.resample(ct.load_ct(path), (1.3, 1.7, 2.9))
    np.testing.assert_allclose(fast.affine, slow.affine, atol=1e-9)
    np.testing.assert_allclose(fast.data, slow.data, atol=1e-3)


def test_nearest_resampling_matches_scipy_and_keeps_ids():
    labels = np.random.default_rng(0).integers(0, 105, size=SHAPE).astype(np.int16)  # every voxel differs
    vol = ct.CTVolume(labels, AFFINES["RAS"])
    step = np.array([2.2, 1.6, 1.4])  # no output centre falls half-way between two input centres
    out = ct.resample(vol, step * SPACING, order=0)
    ref = ndi.affine_transform(labels, step, output_shape=out.shape, order=0, mode="nearest")
    assert out.data.dtype == np.int16 and out.shape == (6, 7, 6)
    np.testing.assert_array_equal(out.data, ref)


def test_window_hu():
    hu = np.array([-2000.0, -1150.0, -400.0, 350.0, 3000.0], np.float32)
    out = window(hu)  # the default: fVLM's single window
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.clip((hu + 1150.0) / 1500.0, 0, 1), atol=1e-6)
    ints = np.array([-2000, -1150, -400, 350, 3000], np.int16)  # stored volumes are int16
    np.testing.assert_array_equal(window(ints), out)
    with pytest.raises(ValueError):
        window(hu, 10.0, -10.0)


@pytest.mark.parametrize(
    "shape,center", [((6, 20, 4), None), ((5, 5, 5), (1, 9, 8)), ((30, 3, 12), (7, 2, 4))]
)
def test_crop_or_pad_keeps_world_positions(shape, center):
    affine = AFFINES["oblique"]
    world_x = _world(affine, SHAPE)[..., 0].astype(np.float32)
    vol = ct.CTVolume(world_x, affine)
    out = ct.crop_or_pad(vol, shape, center=center)
    assert out.shape == shape
    expected = _world(out.affine, shape)[..., 0]
    inside = out.data != AIR_HU
    np.testing.assert_allclose(out.data[inside], expected[inside], atol=1e-3)
    # pad voxels are exactly those whose centre falls outside the input grid
    src = nib.affines.apply_affine(
        np.linalg.inv(vol.affine) @ out.affine, np.indices(shape).transpose(1, 2, 3, 0)
    )
    in_grid = np.all((np.round(src) >= 0) & (np.round(src) < SHAPE), axis=-1)
    np.testing.assert_array_equal(inside, in_grid)
    labels = ct.CTVolume(np.ones(SHAPE, np.int16), affine)
    assert set(np.unique(ct.crop_or_pad(labels, (30, 30, 30)).data)) == {0, 1}


def test_crop_to_mask_bbox():
    labels = np.zeros(SHAPE, np.int16)
    labels[3:6, 4:7, 2:4] = 5  # liver
    labels[9:11, 1:3, 6:8] = 2
    image = ct.CTVolume(np.random.default_rng(1).normal(size=SHAPE).astype(np.float32), AFFINES["LPS"])
    mask = ct.CTVolume(labels, image.affine)
    img_c, mask_c = ct.crop_to_mask_bbox(image, mask, organ_id=5, margin_mm=1.0)
    lo = np.maximum(np.array([3, 4, 2]) - np.ceil(1.0 / np.array(image.spacing)).astype(int), 0)
    hi = np.array([5, 6, 3]) + np.ceil(1.0 / np.array(image.spacing)).astype(int)
    assert img_c.shape == tuple(hi - lo + 1)
    np.testing.assert_array_equal(
        img_c.data, image.data[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    )
    np.testing.assert_allclose(
        nib.affines.apply_affine(img_c.affine, [0, 0, 0]), nib.affines.apply_affine(image.affine, lo)
    )
    np.testing.assert_allclose(mask_c.affine, img_c.affine)
    assert (mask_c.data == 5).sum() == (labels == 5).sum()
    full, _ = ct.crop_to_mask_bbox(image, mask, margin_mm=0.0)
    assert full.shape == (11 - 3, 7 - 1, 8 - 2)
    with pytest.raises(ct.OrganNotFoundError, match="liver"):
        ct.crop_to_mask_bbox(image, ct.CTVolume(np.zeros(SHAPE, np.int16), image.affine), organ_id=5)


@pytest.mark.parametrize("dtype", [None, "int16"])
def test_to_nifti_round_trip(tmp_path, dtype):
    affine = AFFINES["oblique"]
    data = linear_hu(_world(affine, SHAPE)).astype(np.float32)
    path = tmp_path / "rt.nii.gz"
    nib.save(ct.CTVolume(data, affine).to_nifti(dtype), path)
    back = ct.load_ct(path)
    assert back.orientation == "RAS" and back.stored_orientation == "LPS"
    ref = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(back.data, ref.get_fdata(), atol=0.5 if dtype else 1e-4)


def test_nibabel_real_files():
    path = os.path.join(data_path, "anatomical.nii")  # big-endian int16, LAS
    vol = ct.load_ct(path)
    ref = nib.as_closest_canonical(nib.load(path))
    assert vol.stored_orientation == "LAS" and vol.orientation == "RAS"
    np.testing.assert_allclose(vol.affine, ref.affine)
    np.testing.assert_array_equal(vol.data, ref.get_fdata().astype(np.float32))


# ------------------------------------------------------------------------------------------- DICOM

pydicom = pytest.importorskip("pydicom")


def _ct_small():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


def _dicom_world_to_pixel(ds, world_ras):
    """(row, column) of a RAS point on the slice, from the header alone (independent of our affine)."""
    lps = world_ras * np.array([-1.0, -1.0, 1.0])
    d = lps - np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return d @ iop[3:] / dr, d @ iop[:3] / dc


def test_dicom_single_slice_hu_and_geometry(tmp_path):
    shutil.copy(_ct_small(), tmp_path / "slice.dcm")
    (tmp_path / "README.txt").write_text("not dicom")
    vol = ct.load_ct(tmp_path)
    ds = pydicom.dcmread(_ct_small())
    raw = ds.pixel_array.astype(np.float64)
    hu = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert vol.shape == (128, 128, 1) and vol.orientation == "RAS"
    assert vol.spacing == pytest.approx((0.661468, 0.661468, float(ds.SliceThickness)), abs=1e-5)
    assert float(vol.data.min()) == hu.min() and float(vol.data.max()) == hu.max()
    world = _world(vol.affine, vol.shape)[:, :, 0]
    rows, cols = _dicom_world_to_pixel(ds, world.reshape(-1, 3))
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-3)
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-3)
    np.testing.assert_array_equal(
        vol.data[:, :, 0].ravel(), hu[np.round(rows).astype(int), np.round(cols).astype(int)]
    )


def test_dicom_series_sorted_along_normal(tmp_path):
    ds0 = pydicom.dcmread(_ct_small())
    order = [2, 0, 3, 1]  # file names do not follow slice position
    for name, k in enumerate(order):
        ds = pydicom.dcmread(_ct_small())
        ds.ImagePositionPatient = [
            *ds0.ImagePositionPatient[:2],
            float(ds0.ImagePositionPatient[2]) + 2.5 * k,
        ]
        ds.PixelData = (ds.pixel_array + 100 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(tmp_path / f"{name:03d}.dcm")
    vol = ct.load_ct(tmp_path)
    assert vol.shape == (128, 128, 4) and vol.spacing[2] == pytest.approx(2.5)
    base = vol.data[:, :, 0]
    for k in range(4):  # S increases with k after canonicalisation, and so does the stored offset
        np.testing.assert_array_equal(vol.data[:, :, k], base + 100 * k)
    z = _world(vol.affine, vol.shape)[0, 0, :, 2]
    np.testing.assert_allclose(z, float(ds0.ImagePositionPatient[2]) + 2.5 * np.arange(4), atol=1e-4)


def test_resample_never_aliases_its_input():
    labels = ct.CTVolume(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE), AFFINES["RAS"])
    same = ct.resample(labels, SPACING, order=0)
    assert same.shape == SHAPE and not np.shares_memory(same.data, labels.data)
    np.testing.assert_array_equal(same.data, labels.data)


def test_float_label_map_with_integral_values_is_accepted(tmp_path):
    labels = np.zeros(SHAPE, np.float32)
    labels[2, 3, 4] = 104.0
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, AFFINES["LPS"]), path)
    vol = ct.load_label_map(path, reference=ct.load_ct(path))
    assert vol.data.dtype == np.int16 and vol.data.max() == 104 and (vol.data > 0).sum() == 1
