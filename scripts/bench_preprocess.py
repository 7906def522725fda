"""Time CT preprocessing (load -> RAS -> resample -> HU window) against plain nibabel + scipy.ndimage.zoom.

Writes a synthetic 512x512x200 int16 .nii.gz (LPS, 0.7x0.7x1.25 mm, body-shaped phantom with noise) to a
temp dir, then times, in the same run and process:
  ours_fused     ct.load_ct(path, spacing=...) + augment.window   (resamples from the stored int16)
  ours_two_step  ct.load_ct(path) -> ct.resample(...) -> augment.window   (float32 HU volume first)
  nibabel_zoom   nib.load -> as_closest_canonical -> get_fdata -> scipy.ndimage.zoom(order=1) -> window
and checks our output against scipy.ndimage.affine_transform(order=1) on our own grid.
docs/DESIGN.md ("Baselines") records MONAI's chain at 3.6 s/volume on this machine kind (not installed here).

    python scripts/bench_preprocess.py [--repeats 3] [--spacing 1.5,1.5,3]

Prints one JSON object (seconds per volume: min and median over repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402

from ctglip_jax.data import ct  # noqa: E402
from ctglip_jax.data.augment import window  # noqa: E402

SHAPE = (512, 512, 200)
SPACING = (0.7, 0.7, 1.25)
MONAI_REFERENCE_S = 3.6  # docs/DESIGN.md, "Baselines": same machine kind, 2 threads


def write_phantom(path: str, seed: int = 0) -> None:
    """Body-like int16 volume: air outside an elliptic body of soft tissue, smooth texture, noise."""
    rng = np.random.default_rng(seed)
    x, y, z = (np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE)
    x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    hu = np.where(body, 40 + 30 * np.sin(6 * x) * np.cos(5 * y) * np.cos(3 * z), -1024).astype(np.float32)
    hu += rng.normal(0, 15, size=SHAPE).astype(np.float32)
    data = np.asfortranarray(np.clip(hu, -1024, 3071).astype(np.int16))
    affine = nib.affines.from_matvec(np.diag([-SPACING[0], -SPACING[1], SPACING[2]]), [180.0, 180.0, -120.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(np.int16)
    nib.save(img, path)


def ours_fused(path, spacing):
    vol = ct.load_ct(path, spacing=spacing)
    return window(vol.data), vol


def ours_two_step(path, spacing):
    vol = ct.resample(ct.load_ct(path), spacing)
    return window(vol.data), vol


def nibabel_zoom(path, spacing):
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata()
    zoom = np.array(img.header.get_zooms()[:3]) / np.array(spacing)
    out = ndi.zoom(data, zoom, order=1)
    return np.clip((out + 1150.0) / 1500.0, 0, 1).astype(np.float32), None


def timed(fn, repeats, *args):
    times, result = [], None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spacing", default="1.5,1.5,3")
    args = parser.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "phantom.nii.gz")
        write_phantom(path)
        report = {
            "volume": {"shape": SHAPE, "dtype": "int16", "spacing_mm": SPACING, "orientation": "LPS"},
            "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "target_spacing_mm": spacing,
            "repeats": args.repeats,
        }
        timings = {}
        timings["nibabel_zoom"], (base_out, _) = timed(nibabel_zoom, args.repeats, path, spacing)
        del base_out
        timings["ours_two_step"], _ = timed(ours_two_step, args.repeats, path, spacing)
        timings["ours_fused"], (ours_out, vol) = timed(ours_fused, args.repeats, path, spacing)
        # Correctness on our own grid: scipy trilinear sampling of the canonical nibabel volume.
        canon = nib.as_closest_canonical(nib.load(path))
        step = np.linalg.inv(canon.affine) @ vol.affine
        ref = ndi.affine_transform(
            np.asarray(canon.dataobj, np.float32),
            np.diag(step)[:3],
            step[:3, 3],
            vol.shape,
            order=1,
            mode="nearest",
        )
        report["output_shape"] = vol.shape
        report["max_abs_hu_diff_vs_scipy_affine_transform"] = float(np.abs(vol.data - ref).max())
        report["timings"] = timings
        best = timings["ours_fused"]["median_s"]
        report["speedup_vs_nibabel_zoom_same_run"] = round(timings["nibabel_zoom"]["median_s"] / best, 2)
        report["speedup_vs_monai_reference_3.6s"] = round(MONAI_REFERENCE_S / best, 2)
        del ours_out
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
