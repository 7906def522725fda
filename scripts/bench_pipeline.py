"""Input-side throughput: prints one JSON object.

- `synthetic_build`: time to build `ctglip_synthetic/<config>` (skipped if already built);
- `read`: raw records/s from the TFDS data source (array_record read + zlib decode), one thread;
- `pipeline`: records/s through the whole Grain pipeline (read + crop/flip/jitter/window + organ slots +
  batch), host numpy, after one warm-up batch;
- `nifti_build`: volumes/s of a `ctglip_nifti` build (load .nii.gz -> RAS -> resample -> body crop ->
  fixed shape -> zlib record) over generated phantom CTs written as NIfTI, `--nifti-size realistic` making
  them 512 x 512 x 200 at 0.78 x 0.78 x 2.5 mm (a typical abdominal CT) and `small` 96 x 96 x 128.

    python scripts/bench_pipeline.py --config small --batches 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def bench_read(source, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        source[i % len(source)]
    return n / (time.perf_counter() - t0)


def bench_pipeline(cfg, batches: int) -> float:
    from ctglip_jax.data.pipeline import InputPipeline

    pipeline = InputPipeline(cfg)
    next(pipeline)  # warm-up: opens files, starts threads
    t0 = time.perf_counter()
    for _ in range(batches):
        next(pipeline)
    return batches * cfg.batch_size / (time.perf_counter() - t0)


def write_nifti_folder(root: Path, cases: int, size: str) -> None:
    import nibabel as nib
    from scipy import ndimage

    from ctglip_jax.phantom.synthetic import PhantomConfig, generate_case

    (root / "ct").mkdir(parents=True)
    (root / "seg").mkdir()
    phantom = PhantomConfig.preset("medium")
    lines = []
    for i in range(cases):
        case = generate_case(1000 + i, phantom)
        volume, labels, affine = case.volume, case.label_map, case.affine
        if size == "realistic":
            target_shape, target_spacing = np.array([512, 512, 200]), np.array([0.78, 0.78, 2.5])
            zoom = target_shape / np.asarray(volume.shape)
            volume = ndimage.zoom(volume, zoom, order=1).astype(np.int16)
            labels = ndimage.zoom(labels, zoom, order=0).astype(np.int16)
            affine = np.diag([*target_spacing, 1.0])
            affine[:3, 3] = -(target_shape - 1) / 2 * target_spacing
        nib.save(nib.Nifti1Image(volume, affine), root / f"ct/c{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / f"seg/c{i}.nii.gz")
        lines.append({"case_id": f"c{i}", "ct": f"ct/c{i}.nii.gz", "mask": f"seg/c{i}.nii.gz",
                      "report": case.report, "split": "train"})
    (root / "cases.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="small", help="ctglip_synthetic config")
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "ctglip_bench"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=3, default=(48, 48, 80))
    parser.add_argument("--slots", type=int, default=24)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--read-threads", type=int, default=2)
    parser.add_argument("--nifti-cases", type=int, default=3)
    parser.add_argument("--nifti-size", choices=["small", "realistic"], default="realistic")
    parser.add_argument("--nifti-config", default="default", help="ctglip_nifti config")
    args = parser.parse_args()

    from ctglip_jax.data import datasets
    from ctglip_jax.data.pipeline import PipelineConfig

    out: dict = {"cpu_count": os.cpu_count(), "config": args.config}
    t0 = time.perf_counter()
    summary = datasets.build("ctglip_synthetic", args.config, args.data_dir)
    build_s = time.perf_counter() - t0
    n_records = sum(summary.records.values())
    out["synthetic_build"] = {"records": n_records, "reused": summary.reused, "seconds": round(build_s, 2),
                              "records_per_s": None if summary.reused else round(n_records / build_s, 2)}

    source = datasets.data_source("ctglip_synthetic", args.config, "train", args.data_dir)
    record = source[0]
    out["record_shape"] = list(record["volume"].shape)
    out["read"] = {"records_per_s": round(bench_read(source, 4 * args.batch_size), 1)}

    cfg = PipelineConfig(dataset="ctglip_synthetic", config=args.config, data_dir=args.data_dir,
                         batch_size=args.batch_size, crop_shape=tuple(args.crop), num_slots=args.slots,
                         read_threads=args.read_threads)
    out["pipeline"] = {"records_per_s": round(bench_pipeline(cfg, args.batches), 1),
                       "batch_size": args.batch_size, "crop": list(args.crop), "slots": args.slots,
                       "read_threads": args.read_threads, "batches": args.batches}

    work = Path(tempfile.mkdtemp(prefix="ctglip_nifti_bench_"))
    try:
        write_nifti_folder(work / "user", args.nifti_cases, args.nifti_size)
        t0 = time.perf_counter()
        nifti = datasets.build("ctglip_nifti", args.nifti_config, str(work / "tfds"), str(work / "user"))
        seconds = time.perf_counter() - t0
        built = sum(nifti.records.values())
        out["nifti_build"] = {"volumes": built, "skipped": len(nifti.skipped), "seconds": round(seconds, 2),
                              "volumes_per_s": round(built / seconds, 3), "input_size": args.nifti_size,
                              "nifti_config": args.nifti_config}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
