"""Read a DICOM CT series folder into stored values + a RAS+ affine (pydicom is an optional extra).

DICOM gives, per slice, ImagePositionPatient (the first pixel's centre, LPS mm), ImageOrientationPatient
(direction cosines of a row, i.e. of increasing column index, then of a column) and PixelSpacing (row
spacing, i.e. between rows, then column spacing). Voxel index (i, j, k) = (column, row, slice) therefore
maps to LPS mm as  IPP_0 + i * colspacing * row_cos + j * rowspacing * col_cos + k * slice_step, where
slices are sorted along the normal row_cos x col_cos and slice_step comes from their positions (from
SliceThickness for a one-slice series). RAS = diag(-1, -1, 1) LPS. `ct.load_ct` canonicalises the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctglip_jax.errors import InputNotFoundError, InvalidGeometryError, UnreadableFileError, VolumeShapeError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def _import_pydicom(folder):
    try:
        import pydicom  # an optional extra
        from pydicom.errors import InvalidDicomError
    except ImportError:
        raise UnreadableFileError(
            folder,
            "is a folder, read as a DICOM series, but pydicom is missing: pip install 'ctglip-jax[dicom]'",
        ) from None
    return pydicom, InvalidDicomError


def _read_slices(folder: Path) -> list:
    pydicom, invalid = _import_pydicom(folder)
    slices = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (invalid, OSError, EOFError, ValueError):
            continue  # not DICOM (README, DICOMDIR without pixels, ...): skip
        if "PixelData" in ds:
            slices.append((path, ds))
    if not slices:
        raise InputNotFoundError(folder, "folder holds no DICOM image files")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise UnreadableFileError(
            folder,
            f"folder holds {len(series)} DICOM series ({', '.join(series[:3])}...); give one series' folder",
        )
    for path, ds in slices:
        missing = [k for k in _REQUIRED if k not in ds]
        if missing:
            raise UnreadableFileError(
                path, f"DICOM slice lacks {', '.join(missing)}: cannot place it in space"
            )
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeShapeError(path, "multi-frame DICOM is not supported; give a folder of single slices")
    return slices


def _slice_step(positions: np.ndarray, normal: np.ndarray, first_ds, folder) -> np.ndarray:
    """LPS vector from one slice centre to the next, after sorting along the normal."""
    if len(positions) == 1:
        thickness = first_ds.get("SpacingBetweenSlices") or first_ds.get("SliceThickness")
        if thickness is None or not float(thickness) > 0:
            raise InvalidGeometryError(folder, "one-slice series without a positive SliceThickness")
        return normal * float(thickness)
    gaps = np.diff(positions @ normal)
    if np.any(gaps < 1e-3):
        raise InvalidGeometryError(folder, "two slices share one position (duplicate or mixed acquisitions)")
    if gaps.max() - gaps.min() > 1e-2 * gaps.mean() + 1e-3:
        raise InvalidGeometryError(
            folder, f"slice spacing is not uniform ({gaps.min():.4g}..{gaps.max():.4g} mm): missing slices?"
        )
    return (positions[-1] - positions[0]) / (len(positions) - 1)


def read_series(folder: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(values (columns, rows, slices), RAS affine, slope, inter) of the one series in `folder`.

    Values are the stored integers when every slice shares RescaleSlope/Intercept, else float32 HU
    (then slope=1, inter=0).
    """
    slices = _read_slices(folder)
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in slices])
    if np.abs(iops - iops[0]).max() > 1e-4:
        raise InvalidGeometryError(folder, "slices have different ImageOrientationPatient")
    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    normal = np.cross(row_cos, col_cos)
    if np.linalg.norm(normal) < 0.5:
        raise InvalidGeometryError(folder, f"degenerate ImageOrientationPatient {iops[0].tolist()}")
    normal /= np.linalg.norm(normal)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    first = slices[0][1]
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = _slice_step(positions, normal, first, folder)
    lps[:3, 3] = positions[0]

    rows, cols = int(first.Rows), int(first.Columns)
    scales = [
        (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)) for _, ds in slices
    ]
    uniform = len(set(scales)) == 1
    values = None
    for k, (path, ds) in enumerate(slices):
        try:
            pixels = ds.pixel_array
        except Exception as e:  # missing decoder plugins raise various types
            raise UnreadableFileError(
                path, f"cannot decode DICOM pixel data ({type(e).__name__}: {' '.join(str(e).split())})"
            ) from None
        if pixels.shape != (rows, cols):
            raise VolumeShapeError(
                path, f"slice is {pixels.shape}, the series' first slice is {(rows, cols)}"
            )
        if values is None:
            values = np.empty((cols, rows, len(slices)), pixels.dtype if uniform else np.float32, order="F")
        if uniform:
            values[:, :, k] = pixels.T
        else:
            slope, inter = scales[k]
            values[:, :, k] = pixels.T.astype(np.float32) * np.float32(slope) + np.float32(inter)
    slope, inter = scales[0] if uniform else (1.0, 0.0)
    return values, LPS_TO_RAS @ lps, slope, inter
