"""CT volumes: NIfTI / DICOM loading, canonical RAS+ orientation, resampling and cropping (HU windows:
`augment.window`).

Every volume the project sees passes through `CTVolume`: float32 HU (or int16 label ids), voxel order
canonical RAS+ (`nibabel.as_closest_canonical`), and the (4, 4) affine mapping voxel *centres* to world mm.
Orientation and affines come from nibabel; we never re-derive them by hand.

Speed matters (a training set is thousands of 512x512xN scans), so the loader reads the stored integers
once (one-shot gunzip, no C-order copy: canonical data is a flipped/transposed *view*), and
`load_ct(path, spacing=...)` resamples straight from the stored integers before applying
scl_slope/scl_inter to the small output. Linear interpolation commutes with that affine scaling, so the
result equals `resample(load_ct(path), spacing)` up to float rounding, at a fraction of the memory.

Resampling keeps the first voxel centre and the axis directions (obliquity included) and scales the voxel
axes: output voxel i' sits at input voxel coordinate i' * new_spacing / spacing, and the grid stops at the
last centre inside the input, so nothing is extrapolated. The interpolation is separable (per axis,
linear or nearest), which for an axis-scaling grid is exactly trilinear / nearest-neighbour sampling.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.data.augment import AIR_HU
from ctglip_jax.errors import (
    CorruptFileError,
    CTGlipInputError,
    InputNotFoundError,
    InvalidGeometryError,
    MaskMismatchError,
    NonFiniteVoxelError,
    UnknownLabelError,
    UnreadableFileError,
    VolumeShapeError,
)


class OrganNotFoundError(CTGlipInputError, ValueError):
    """A crop was asked around an organ (or foreground) that the label map does not contain."""


@dataclasses.dataclass(frozen=True, eq=False)
class CTVolume:
    """A 3-D volume in canonical RAS+ voxel order with its voxel-centre -> world-mm affine.

    `data` may be a non-contiguous view (canonicalisation flips/transposes without copying, and
    resampled data keeps the file's memory order); call `np.ascontiguousarray` where a layout matters.
    `stored_orientation` records the axis codes of the file as stored, before canonicalisation ("" for
    volumes built in memory).
    """

    data: np.ndarray
    affine: np.ndarray
    source: str = "<array>"
    stored_orientation: str = ""

    def __post_init__(self):
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{self.source}: affine must be (4, 4), got {affine.shape}")
        if np.ndim(self.data) != 3:
            raise ValueError(f"{self.source}: data must be 3-D, got shape {np.shape(self.data)}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "source", str(self.source))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each voxel axis (column norms of the affine)."""
        return tuple(float(s) for s in nib.affines.voxel_sizes(self.affine))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes, e.g. 'RAS' (always 'RAS' after loading)."""
        return "".join(nib.aff2axcodes(self.affine))

    def replace(self, **changes) -> CTVolume:
        return dataclasses.replace(self, **changes)

    def to_nifti(self, dtype=None) -> nib.Nifti1Image:
        """A NIfTI-1 image of this volume (sform and qform = affine, units mm).

        `dtype` (default: the data's own) converts on the way; floats going to an integer type are
        rounded and clipped to its range, so HU survive an int16 round trip.
        """
        data = self.data
        if dtype is not None:
            dtype = np.dtype(dtype)
            if np.issubdtype(dtype, np.integer) and not np.issubdtype(data.dtype, np.integer):
                info = np.iinfo(dtype)
                data = np.clip(np.rint(data), info.min, info.max)
            data = data.astype(dtype, copy=False)
        img = nib.Nifti1Image(np.asarray(data), self.affine)
        img.set_sform(self.affine, code=1)
        img.set_qform(self.affine, code=1)
        img.header.set_xyzt_units("mm")
        return img


# ----------------------------------------------------------------------------------------------------------
# Reading NIfTI files.


@dataclasses.dataclass(frozen=True)
class _Stored:
    """What a file holds, before canonicalisation: raw values, their scaling, and the geometry."""

    raw: np.ndarray  # (X, Y, Z), stored dtype and voxel order
    slope: float
    inter: float
    affine: np.ndarray
    source: str


def _one_line(error: Exception) -> str:
    """A library's exception text folded onto one line (the CLI prints exactly one)."""
    return " ".join(str(error).split())


def _read_bytes(path: Path) -> bytes:
    blob = path.read_bytes()
    if blob[:2] != b"\x1f\x8b":
        return blob
    try:
        # One-shot zlib with the output size from the gzip trailer (ISIZE) avoids growing the buffer by
        # repeated copies; multi-member or > 4 GiB files fall back to gzip.decompress.
        size = struct.unpack("<I", blob[-4:])[0] if len(blob) >= 18 else 0
        out = zlib.decompress(blob, wbits=31, bufsize=max(size, 1 << 14))
        return out if len(out) == size else gzip.decompress(blob)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptFileError(path, f"gzip stream is truncated or damaged ({_one_line(e)})") from None


def _nifti_class(blob: bytes, path: Path):
    """NIfTI-1 or NIfTI-2 image class from the header size field (either byte order)."""
    if len(blob) >= 4:
        for fmt in ("<i", ">i"):
            size = struct.unpack(fmt, blob[:4])[0]
            if size == 348 and len(blob) >= 348 and blob[344:347] == b"n+1":
                return nib.Nifti1Image
            if size == 540 and len(blob) >= 540 and blob[4:7] == b"n+2":
                return nib.Nifti2Image
    if len(blob) < 348:
        raise UnreadableFileError(path, f"not a NIfTI file (only {len(blob)} bytes, a header needs 348)")
    raise UnreadableFileError(path, "not a single-file NIfTI (.nii / .nii.gz): no NIfTI header magic")


def _check_pixdim(pixdim: np.ndarray, path) -> None:
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InvalidGeometryError(path, f"voxel spacing (pixdim) must be positive, got {pixdim.tolist()}")


def _check_affine(affine: np.ndarray, path) -> None:
    if not np.all(np.isfinite(affine)):
        raise InvalidGeometryError(path, "affine holds NaN or Inf")
    norms = nib.affines.voxel_sizes(affine)
    det = abs(np.linalg.det(affine[:3, :3]))
    if np.any(norms <= 0) or det <= 1e-6 * float(np.prod(norms)):
        raise InvalidGeometryError(
            path, f"singular affine (voxel axes are degenerate): {affine[:3].tolist()}"
        )


def _squeeze_to_3d(shape: tuple[int, ...], path) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        kind = f"{len(shape)}-D"
        hint = "; pick one 3-D volume from the series first" if len(shape) > 3 else ""
        raise VolumeShapeError(path, f"image is {kind} (shape {shape}), expected a 3-D volume{hint}")
    if min(shape) < 1:
        raise VolumeShapeError(path, f"image has an empty axis (shape {shape})")
    return shape


def _read_nifti(path: Path) -> _Stored:
    blob = _read_bytes(path)
    klass = _nifti_class(blob, path)
    try:
        # check=False: nibabel would 'fix' zero/negative pixdim (and log it); we refuse them instead.
        raw_header = klass.header_class(blob[: klass.header_class.sizeof_hdr], check=False)
        stored_shape = raw_header.get_data_shape()
    except Exception as e:  # nibabel raises a zoo of types for broken headers
        raise UnreadableFileError(
            path, f"unreadable NIfTI header ({type(e).__name__}: {_one_line(e)})"
        ) from None
    shape = _squeeze_to_3d(stored_shape, path)
    _check_pixdim(np.asarray(raw_header["pixdim"][1 : min(len(stored_shape), 3) + 1], np.float64), path)
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = klass.from_bytes(blob)
    except Exception as e:
        raise UnreadableFileError(
            path, f"unreadable NIfTI header ({type(e).__name__}: {_one_line(e)})"
        ) from None
    _check_affine(img.affine, path)
    try:
        raw = np.asarray(img.dataobj.get_unscaled())
    except (OSError, ValueError, EOFError) as e:
        raise CorruptFileError(path, f"voxel data is truncated or damaged ({_one_line(e)})") from None
    slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    if not (math.isfinite(slope) and math.isfinite(inter)):
        raise NonFiniteVoxelError(path, f"scl_slope/scl_inter are not finite ({slope}, {inter})")
    raw = raw.reshape(shape, order="F") if raw.shape != shape else raw
    if raw.dtype.kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise NonFiniteVoxelError(path, f"{bad} NaN/Inf voxels")
    elif raw.dtype.kind not in "iub":
        raise UnreadableFileError(path, f"unsupported voxel type {raw.dtype} (expected integers or floats)")
    return _Stored(raw, slope, inter, np.asarray(img.affine, np.float64), str(path))


def _read_any(path) -> _Stored:
    path = Path(os.fspath(path))
    if not path.exists():
        raise InputNotFoundError(path, "no such file or folder")
    if path.is_dir():
        from ctglip_jax.data import dicom  # pydicom is an optional extra

        raw, affine, slope, inter = dicom.read_series(path)
        _check_affine(affine, path)
        return _Stored(raw, slope, inter, affine, str(path))
    return _read_nifti(path)


def _canonical(stored: _Stored) -> tuple[np.ndarray, np.ndarray]:
    """(canonical view of the raw values, canonical affine), via nibabel.as_closest_canonical."""
    img = nib.Nifti1Image(stored.raw, stored.affine)
    canon = nib.as_closest_canonical(img)
    return np.asanyarray(canon.dataobj), np.asarray(canon.affine, np.float64)


def _scale(values: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """float32 `values * slope + inter`, in place when `values` is already a fresh float32 array."""
    out = values if values.dtype == np.float32 else values.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if inter != 0.0:
        out += np.float32(inter)
    return out


def load_ct(path, *, spacing: Sequence[float] | float | None = None) -> CTVolume:
    """Load a CT (.nii, .nii.gz, or a DICOM series folder) as float32 HU in canonical RAS+ order.

    Applies scl_slope/scl_inter (DICOM: RescaleSlope/Intercept). With `spacing` (mm), resamples
    linearly from the stored integers on the way (see the module docstring); equal to
    `resample(load_ct(path), spacing)`.
    """
    stored = _read_any(path)
    view, affine = _canonical(stored)
    orient = "".join(nib.aff2axcodes(stored.affine))
    if spacing is None:
        data = _scale(view.astype(np.float32), stored.slope, stored.inter)
        return CTVolume(data, affine, stored.source, orient)
    data, affine = _resample_array(view, affine, spacing, order=1)
    return CTVolume(_scale(data, stored.slope, stored.inter), affine, stored.source, orient)


def _check_ids(
    values: np.ndarray, source: str, high: int = organs.NUM_CLASSES, what: str = "TotalSegmentator v1 ids"
) -> np.ndarray:
    """Label values as int16 ids in 0..high (default 104), or UnknownLabelError naming the offenders."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise UnknownLabelError(source, "label map holds NaN/Inf values")
        if not np.array_equal(values, np.round(values)):
            frac = values[values != np.round(values)]
            raise UnknownLabelError(source, f"label map holds non-integer values, e.g. {float(frac[0])}")
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > high:
        bad = np.unique(values[(values < 0) | (values > high)])
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise UnknownLabelError(source, f"label ids outside the vocabulary 0..{high}: {shown} ({what})")
    return values.astype(np.int16)


def _check_same_grid(vol: CTVolume, reference: CTVolume, atol_mm: float) -> None:
    if vol.shape != reference.shape:
        raise MaskMismatchError(
            vol.source,
            f"label map shape {vol.shape} differs from image {reference.source} shape {reference.shape}",
        )
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in vol.shape], indexing="ij")).reshape(3, -1).T
    gap = np.linalg.norm(
        nib.affines.apply_affine(vol.affine, corners) - nib.affines.apply_affine(reference.affine, corners),
        axis=1,
    ).max()
    if gap > atol_mm:
        raise MaskMismatchError(
            vol.source,
            f"label map affine differs from image {reference.source}: voxel centres up to {gap:.4g} mm apart "
            f"(tolerance {atol_mm} mm)",
        )


def load_label_map(
    path, reference: CTVolume | None = None, *, atol_mm: float = 1e-3, lut: Sequence[int] | None = None
) -> CTVolume:
    """Load a TotalSegmentator-v1 label map (int16 ids 0..104) in canonical RAS+ order.

    With `reference`, checks that it lies on the same voxel grid: same canonical shape, and the affines
    put every corner voxel centre within `atol_mm` of each other (so a map stored in another axis order
    than its image is fine). With `lut` (e.g. `organs.v2_to_v1_lut()` for a TotalSegmentator v2 map), the
    stored ids are mapped through it first; ids beyond the table raise UnknownLabelError.
    """
    stored = _read_any(path)
    values = stored.raw
    if (stored.slope, stored.inter) != (1.0, 0.0):
        values = values * stored.slope + stored.inter
    if lut is not None:
        table = np.asarray(lut, np.int16)
        values = table[_check_ids(values, stored.source, len(table) - 1, "ids of the given look-up table")]
    ids = _check_ids(values, stored.source)
    view, affine = _canonical(dataclasses.replace(stored, raw=ids))
    vol = CTVolume(view, affine, stored.source, "".join(nib.aff2axcodes(stored.affine)))
    if reference is not None:
        _check_same_grid(vol, reference, atol_mm)
    return vol


# ----------------------------------------------------------------------------------------------------------
# Resampling.


def _parse_spacing(spacing) -> np.ndarray:
    target = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(target)) or np.any(target <= 0):
        raise ValueError(f"target spacing must be three positive numbers (mm), got {spacing!r}")
    return target


def resampled_grid(shape, affine, spacing) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """(shape, affine, step) of the grid `resample` produces; step = new/old spacing in input voxels."""
    step = _parse_spacing(spacing) / nib.affines.voxel_sizes(affine)
    new_shape = tuple(int(math.floor((n - 1) / s + 1e-6)) + 1 for n, s in zip(shape, step, strict=True))
    new_affine = np.asarray(affine, np.float64) @ np.diag([*step, 1.0])
    return new_shape, new_affine, step


def _interp_axis(a: np.ndarray, pos: np.ndarray, axis: int, order: int) -> np.ndarray:
    n = a.shape[axis]
    if order == 0:
        idx = np.clip(np.floor(pos + 0.5).astype(np.intp), 0, n - 1)
        return np.take(a, idx, axis=axis)
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    if axis == 0:  # outermost: blend whole slabs straight into float32, no gathered temporaries
        out = np.empty((len(pos), *a.shape[1:]), np.float32)
        scratch = np.empty(a.shape[1:], np.float32)
        for k, (lo_i, hi_i, w) in enumerate(zip(i0, i1, (pos - i0).astype(np.float32), strict=True)):
            np.multiply(a[lo_i], np.float32(1.0) - w, out=out[k], dtype=np.float32)
            if w:
                out[k] += np.multiply(a[hi_i], w, out=scratch, dtype=np.float32)
        return out
    w = (pos - i0).astype(np.float32).reshape([-1 if k == axis else 1 for k in range(a.ndim)])
    lo = np.take(a, i0, axis=axis).astype(np.float32, copy=False)
    out = np.take(a, i1, axis=axis).astype(np.float32)
    out -= lo
    out *= w
    out += lo
    return out


def _resample_array(data: np.ndarray, affine: np.ndarray, spacing, order: int):
    """Separable resampling of a (possibly flipped/transposed) view, walking memory outermost-first."""
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    new_shape, new_affine, step = resampled_grid(data.shape, affine, spacing)
    # Work on the memory-order view: axes sorted outermost first, flips undone, so every np.take reads
    # whole contiguous slabs or rows; the output comes out in canonical order along each axis.
    perm = sorted(range(3), key=lambda k: -abs(data.strides[k]))
    a = data.transpose(perm)
    flips = [a.strides[k] < 0 for k in range(3)]
    a = a[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    for k, ax in enumerate(perm):
        pos = np.arange(new_shape[ax], dtype=np.float64) * step[ax]
        if flips[k]:
            pos = (a.shape[k] - 1) - pos
        if new_shape[ax] != a.shape[k] or step[ax] != 1.0 or flips[k]:
            a = _interp_axis(a, pos, k, order)
    out = a.transpose(np.argsort(perm))  # memory order of the stored file (F-order for most NIfTIs)
    dtype = np.float32 if order == 1 else data.dtype
    # Always a fresh array, never an alias of the input, even when nothing needed resampling.
    out = np.array(out, dtype=dtype, order="K", copy=np.shares_memory(out, data) or None)
    return out, new_affine


def resample(vol: CTVolume, spacing, *, order: int = 1) -> CTVolume:
    """Resample to `spacing` mm: order=1 linear (images, float32), order=0 nearest (label maps, dtype kept).

    The first voxel centre and the axis directions stay; see the module docstring for the grid.
    """
    data, affine = _resample_array(np.asarray(vol.data), vol.affine, spacing, order)
    return vol.replace(data=data, affine=affine)


# ----------------------------------------------------------------------------------------------------------
# Intensity window and crops.


def _crop(vol: CTVolume, start: Sequence[int], shape: Sequence[int], pad_value) -> CTVolume:
    """Window of `shape` starting at voxel `start` (may stick out: padded); affine shifted to match."""
    start = np.asarray(start, dtype=np.int64)
    shape = tuple(int(n) for n in shape)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + shape, vol.shape)
    out = np.full(shape, pad_value, dtype=vol.data.dtype)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(lo - s, hi - s) for lo, hi, s in zip(src_lo, src_hi, start, strict=True))
        src = tuple(slice(lo, hi) for lo, hi in zip(src_lo, src_hi, strict=True))
        out[dst] = vol.data[src]
    affine = vol.affine @ nib.affines.from_matvec(np.eye(3), start.astype(np.float64))
    return vol.replace(data=out, affine=affine)


def crop_or_pad(vol: CTVolume, shape, *, center=None, pad_value: float | None = None) -> CTVolume:
    """Cut or pad to `shape` around `center` (voxel indices; default the volume centre).

    Output voxel shape // 2 lies on input voxel round(center); the default centres the window
    (start = (n - shape) // 2). pad_value defaults to air (-1024 HU) for float data and 0 (background)
    for integer label maps.
    """
    shape = tuple(int(n) for n in np.broadcast_to(shape, (3,)))
    if min(shape) < 1:
        raise ValueError(f"crop shape must be positive, got {shape}")
    if center is None:
        start = [(n - s) // 2 for n, s in zip(vol.shape, shape, strict=True)]
    else:
        start = [
            int(round(float(c))) - s // 2 for c, s in zip(np.broadcast_to(center, (3,)), shape, strict=True)
        ]
    if pad_value is None:
        pad_value = 0 if np.issubdtype(vol.data.dtype, np.integer) else AIR_HU
    return _crop(vol, start, shape, pad_value)


def crop_to_mask_bbox(
    vol: CTVolume,
    mask: CTVolume,
    *,
    margin_mm: float | Sequence[float] = 10.0,
    organ_id: int | Sequence[int] | None = None,
) -> tuple[CTVolume, CTVolume]:
    """Crop image and label map to the bounding box of `organ_id` (one id or several; default: all
    foreground) grown by `margin_mm` on each side, clipped to the volume (never padded)."""
    _check_same_grid(mask, vol, atol_mm=1e-3)
    if organ_id is None:
        inside = mask.data > 0
        what = "any labelled organ"
    else:
        ids = np.atleast_1d(np.asarray(organ_id, dtype=np.int64))
        inside = np.isin(mask.data, ids)
        what = "organ id(s) " + ", ".join(f"{i} ({organs.v1_names().get(int(i), '?')})" for i in ids)
    if not inside.any():
        raise OrganNotFoundError(mask.source, f"label map contains no voxel of {what}")
    hits = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    lo = np.array([h[0] for h in hits])
    hi = np.array([h[-1] for h in hits])
    margin = np.ceil(np.broadcast_to(np.asarray(margin_mm, np.float64), (3,)) / np.array(vol.spacing) - 1e-9)
    lo = np.maximum(lo - margin.astype(np.int64), 0)
    hi = np.minimum(hi + margin.astype(np.int64), np.array(vol.shape) - 1)
    shape = hi - lo + 1
    return _crop(vol, lo, shape, AIR_HU), _crop(mask, lo, shape, 0)
