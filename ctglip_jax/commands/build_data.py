"""Build a TFDS dataset (array_record, no TensorFlow) and print what it holds.

Datasets:
  ctglip_synthetic   the embedded synthetic full-body CT + report phantom; configs tiny (tests, < 1 min),
                     small (demo), medium, large
  ctglip_nifti       your own NIfTI CTs + TotalSegmentator v1 label maps + reports, listed in
                     MANUAL_DIR/cases.jsonl (configs: default 1.5x1.5x3 mm, coarse 3 mm, tiny)
  msd_tumor          a Medical Segmentation Decathlon task folder as MANUAL_DIR (configs: default,
                     liver, pancreas, tiny)

The data dir defaults to $CTGLIP_DATA_DIR, else ~/tensorflow_datasets. An existing build is reused. Broken
user cases are skipped; the summary lists them with reasons (also in skipped.json in the dataset folder).

Example:  ctglip build-data ctglip_nifti --manual-dir ~/my_cts --config coarse
"""

from __future__ import annotations

import argparse
import json

NAME = "build-data"
HELP = "build a TFDS dataset (synthetic phantom, your NIfTI folder, or an MSD task)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("name", choices=["ctglip_synthetic", "ctglip_nifti", "msd_tumor"], help="dataset")
    parser.add_argument("--config", default=None, help="builder config (default: the dataset's first)")
    parser.add_argument("--manual-dir", default=None, help="folder with your files (ctglip_nifti, msd_tumor)")
    parser.add_argument("--data-dir", default=None, help="where datasets are written (default: see above)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ctglip_jax.data import datasets
    from ctglip_jax.errors import CTGlipInputError

    if args.name != "ctglip_synthetic" and not args.manual_dir:
        raise CTGlipInputError(args.name, "needs --manual-dir (the folder holding your files)")
    summary = datasets.build(args.name, args.config, args.data_dir, args.manual_dir)
    if args.json:
        print(json.dumps({
            "name": summary.name, "config": summary.config, "data_dir": summary.data_dir,
            "records": summary.records, "skipped": summary.skipped, "reused": summary.reused,
            "seconds": round(summary.seconds, 2),
        }))
    else:
        print("\n".join(summary.lines()))
    return 0
