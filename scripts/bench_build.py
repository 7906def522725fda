"""Dataset build throughput: one process vs Apache Beam's DirectRunner, on the same NIfTI folder (JSON out).

Writes N phantom cases as a user would hand them over (NIfTI CT at the phantom's own spacing,
a TotalSegmentator v1 label map, a report per case, a `cases.jsonl` manifest), then builds `ctglip_nifti`
on a grid that needs resampling, once in one process and once per Beam setting, into fresh data dirs, and
checks the records are identical. Needs `pip install 'ctglip-jax[beam]'`.

    python scripts/bench_build.py --cases 128 --workers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ctglip_jax.data import datasets
from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case
from tfds_builders.beam_options import pipeline_setup

GRID = "grid_3x3x3_128x112x160_m10"  # 3 mm: every case is resampled (phantoms have their own spacing)


def scanner_grid(volume, labels, affine, shape):
    """The phantom resampled to a scanner-sized grid (e.g. 512 x 512 x 300), same extent: what a real CT
    costs to read and resample (linear for HU, nearest for labels)."""
    from scipy import ndimage

    factors = [t / s for t, s in zip(shape, volume.shape, strict=True)]
    volume = ndimage.zoom(volume.astype(np.float32), factors, order=1).round().astype(np.int16)
    labels = ndimage.zoom(labels, factors, order=0)
    affine = affine.copy()
    affine[:3, :3] = affine[:3, :3] / np.asarray(factors)[None, :]
    return volume, labels, affine


def write_folder(
    root: Path,
    n: int,
    preset: str,
    report_fn=lambda report, case: report,
    distinct: int | None = None,
    source_shape=None,
) -> None:
    """n cases; with `distinct` < n the cases cycle through that many phantoms (files written once, read
    once per case by the build, which is what is timed), so large phantoms stay quick to set up."""
    (root / "ct").mkdir(parents=True)
    (root / "seg").mkdir()
    lines = []
    config = PhantomConfig.preset(preset)
    phantoms = []
    for i in range(min(n, distinct or n)):
        case = generate_case(1000 + i, config)
        volume, labels = np.asarray(case.volume, np.int16), np.asarray(case.label_map, np.uint8)
        affine = np.asarray(case.affine, np.float64)
        if source_shape:
            volume, labels, affine = scanner_grid(volume, labels, affine, source_shape)
        nib.save(nib.Nifti1Image(volume, affine), root / f"ct/p{i:04d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / f"seg/p{i:04d}.nii.gz")
        phantoms.append(case.report)
    for i in range(n):
        p = i % len(phantoms)
        split = "test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"
        lines.append(
            {
                "case_id": f"c{i:04d}",
                "ct": f"ct/p{p:04d}.nii.gz",
                "mask": f"seg/p{p:04d}.nii.gz",
                "report": report_fn(phantoms[p], i),
                "split": split,
            }
        )
    (root / "cases.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def timed_build(folder: Path, data_dir: Path, beam, grid: str) -> float:
    start = time.perf_counter()
    summary = datasets.build("ctglip_nifti", grid, str(data_dir), str(folder), beam=beam)
    assert not summary.reused and not summary.skipped, summary
    return time.perf_counter() - start


def same_records(a: Path, b: Path, grid: str) -> bool:
    for split in ("train", "validation", "test"):
        ra = datasets.data_source("ctglip_nifti", grid, split, str(a))
        rb = datasets.data_source("ctglip_nifti", grid, split, str(b))
        if len(ra) != len(rb):
            return False
        for i in range(len(ra)):
            x, y = ra[i], rb[i]
            if any(not np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for k in x):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="medium", help="phantom preset of the written cases")
    parser.add_argument("--grid", default=GRID, help="ctglip_nifti config the folder is built on")
    parser.add_argument("--distinct", type=int, default=16, help="distinct phantoms the cases cycle through")
    parser.add_argument(
        "--source-shape",
        default=None,
        metavar="X,Y,Z",
        help="write the phantoms resampled to this scanner-like grid (e.g. 512,512,300)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="alternating (one process, Beam) pairs")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        start = time.perf_counter()
        shape = tuple(int(v) for v in args.source_shape.split(",")) if args.source_shape else None
        write_folder(root / "cases", args.cases, args.preset, distinct=args.distinct, source_shape=shape)
        written = time.perf_counter() - start
        options = f"--direct_num_workers={args.workers} --direct_running_mode=multi_processing"
        local, beam = [], []
        for r in range(args.repeats):  # alternate, so both see the same machine load
            local.append(timed_build(root / "cases", root / f"local{r}", None, args.grid))
            on_beam = pipeline_setup("DirectRunner", options)
            beam.append(timed_build(root / "cases", root / f"beam{r}", on_beam, args.grid))
        print(
            json.dumps(
                {
                    "cases": args.cases,
                    "grid": args.grid,
                    "preset": args.preset,
                    "distinct_phantoms": min(args.distinct, args.cases),
                    "source_shape": args.source_shape,
                    "write_folder_s": round(written, 1),
                    "one_process_s": [round(t, 1) for t in local],
                    "beam_s": [round(t, 1) for t in beam],
                    "one_process_cases_per_s": round(args.cases / min(local), 2),
                    "beam_cases_per_s": round(args.cases / min(beam), 2),
                    "beam_speedup": round(min(local) / min(beam), 2),
                    "beam_options": options,
                    "identical_records": same_records(root / "local0", root / "beam0", args.grid),
                }
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
