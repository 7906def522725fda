"""Build a TFDS dataset (array_record, no TensorFlow) and print what it holds.

Datasets:
  ctglip_synthetic   the embedded synthetic full-body CT + report phantom; configs tiny (tests, < 1 min),
                     small (demo), medium, large
  ctglip_nifti       your own NIfTI CTs + TotalSegmentator label maps + reports in MANUAL_DIR, either
                     listed in MANUAL_DIR/cases.jsonl (manifest layout) or in the CT-RATE layout below
                     (configs: default 1.5x1.5x3 mm, coarse 3 mm, tiny, or your own grid)
  msd_tumor          a Medical Segmentation Decathlon task folder as MANUAL_DIR (configs: default,
                     liver, pancreas, tiny, or a preset on your own grid)

Your own grid (ctglip_nifti, msd_tumor): --spacing X,Y,Z --shape X,Y,Z [--body-margin MM] builds the
config named from those values, e.g. grid_1.5x1.5x3_224x224x128_m10; use that name wherever a config is
asked for (--config.data.config=grid_... in training). For msd_tumor, --config PRESET picks the preset
whose tumor labels and split apply (the name becomes PRESET_grid_...); for ctglip_nifti it is an error.

CT-RATE layout (ctglip_nifti): reports CSV(s) with a VolumeName column, volumes found by file name
anywhere under MANUAL_DIR, TotalSegmentator outputs in --mask-dir (a multilabel NIfTI named like the
volume, or a folder named after the volume holding <class>.nii.gz masks). case_id = VolumeName without
.nii.gz. --reports-csv PATH:SPLIT sets the split of a CSV's cases (train, validation, test, or auto =
80/10/10 by a stable hash of the patient, train_123_a_1 -> train_123); a train CSV gives
--validation-fraction of its patients to validation. Cases without volume, mask or report are skipped
and listed. CT-RATE itself (its validation set is the usual test set):

  ctglip build-data ctglip_nifti --manual-dir /data/CT-RATE --mask-dir seg --mask-version v2 \\
      --reports-csv train_reports.csv:train --reports-csv validation_reports.csv:test \\
      --spacing 1.5,1.5,3 --shape 224,224,128

Apache Beam (pip install 'ctglip-jax[beam]'): --beam-runner RUNNER [--beam-pipeline-options "..."]
builds the same records, in the same order, with the cases processed by Beam's workers. On this machine:

  ctglip build-data ctglip_nifti --manual-dir ~/my_cts --config coarse --beam-runner DirectRunner \
      --beam-pipeline-options "--direct_num_workers=2 --direct_running_mode=multi_processing"

Dataflow, Flink and Spark: see the README ("Building on Apache Beam").

The data dir defaults to $CTGLIP_DATA_DIR, else ~/tensorflow_datasets. An existing build is reused (the
layout flags do not name the dataset). Broken user cases are skipped; the summary lists them with reasons
(also in skipped.json in the dataset folder).

Example:  ctglip build-data ctglip_nifti --manual-dir ~/my_cts --config coarse
"""

from __future__ import annotations

import argparse
import json
import math

NAME = "build-data"
HELP = "build a TFDS dataset (synthetic phantom, your NIfTI folder or CT-RATE, or an MSD task)"
GRID_DATASETS = ("ctglip_nifti", "msd_tumor")
CTRATE_FLAGS = ("mask_dir", "volume_column", "text_columns", "validation_fraction")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("name", choices=["ctglip_synthetic", "ctglip_nifti", "msd_tumor"], help="dataset")
    parser.add_argument("--config", default=None, help="builder config (default: the dataset's first)")
    parser.add_argument("--manual-dir", default=None, help="folder with your files (ctglip_nifti, msd_tumor)")
    parser.add_argument("--data-dir", default=None, help="where datasets are written (default: see above)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    beam = parser.add_argument_group("Apache Beam (pip install 'ctglip-jax[beam]')")
    beam.add_argument("--beam-runner", metavar="RUNNER",
                      help="build on Beam: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...")
    beam.add_argument("--beam-pipeline-options", metavar='"--k=v ..."',
                      help="Beam pipeline options, one string (e.g. \"--direct_num_workers=2\")")
    grid = parser.add_argument_group("your own grid (ctglip_nifti, msd_tumor)")
    grid.add_argument("--spacing", metavar="X,Y,Z", help="voxel size in mm along R, A, S (with --shape)")
    grid.add_argument("--shape", metavar="X,Y,Z", help="volume shape in voxels (with --spacing)")
    grid.add_argument("--body-margin", metavar="MM", help="air kept around the body box (default 10)")
    layout = parser.add_argument_group("CT-RATE layout (ctglip_nifti)")
    layout.add_argument("--reports-csv", action="append", default=[], metavar="PATH[:SPLIT]",
                        help="reports CSV (relative to MANUAL_DIR or absolute); SPLIT: train, validation, "
                             "test or auto (default); repeatable")
    layout.add_argument("--mask-dir",
                        help="folder of TotalSegmentator outputs (relative to MANUAL_DIR or absolute)")
    layout.add_argument("--mask-version", metavar="v1|v2",
                        help="TotalSegmentator version of the masks; v2 is converted to v1 ids. Required "
                             "with --reports-csv; with a manifest, v2 converts its masks")
    layout.add_argument("--volume-column", help="CSV column naming the volume (default VolumeName)")
    layout.add_argument("--text-columns", metavar="A,B",
                        help="CSV columns joined into the report (default Findings_EN,Impressions_EN)")
    layout.add_argument("--validation-fraction", metavar="F",
                        help="share of a train CSV's patients moved to validation (default 0.05)")


def _numbers(text: str, flag: str, kind: type) -> tuple:
    from ctglip_jax.errors import ConfigError

    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        example = "1.5,1.5,3" if kind is float else "224,224,128"
        raise ConfigError(flag, f"expects three {kind.__name__}s like {example}, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(flag, f"expects three positive numbers, got {text!r}")
    return values


def grid_config(args: argparse.Namespace) -> str | None:
    """The config name the grid flags ask for (None without them); bad combinations raise ConfigError."""
    from ctglip_jax.errors import ConfigError
    from tfds_builders.ctglip_nifti import grid

    if args.spacing is None and args.shape is None:
        if args.body_margin is not None:
            raise ConfigError("--body-margin", "only with --spacing and --shape")
        return None
    if args.name not in GRID_DATASETS:
        raise ConfigError("--spacing/--shape", f"{args.name} has fixed configs; use --config")
    if args.spacing is None or args.shape is None:
        raise ConfigError("--spacing/--shape", "give both --spacing X,Y,Z and --shape X,Y,Z")
    if args.config and args.name == "ctglip_nifti":
        raise ConfigError("--config", "the grid flags name the config: give --config or --spacing/--shape")
    try:
        margin = grid.DEFAULT_BODY_MARGIN_MM if args.body_margin is None else float(args.body_margin)
    except ValueError:
        margin = math.nan
    if not (math.isfinite(margin) and margin >= 0):
        raise ConfigError("--body-margin", f"expects a number of mm >= 0, got {args.body_margin!r}")
    spacing = _numbers(args.spacing, "--spacing", float)
    shape = _numbers(args.shape, "--shape", int)
    name = grid.grid_name(spacing, shape, margin)
    return f"{args.config}_{name}" if args.config else name


def nifti_source(args: argparse.Namespace):
    """The `NiftiSource` the layout flags ask for (None without them); bad combinations raise."""
    from ctglip_jax.errors import ConfigError
    from tfds_builders.ctglip_nifti.source import NiftiSource, ReportsCsv

    given = [f"--{f.replace('_', '-')}" for f in CTRATE_FLAGS if getattr(args, f) is not None]
    if not args.reports_csv and args.mask_version is None and not given:
        return None
    if args.name != "ctglip_nifti":
        raise ConfigError(args.name, "--reports-csv, --mask-dir, --mask-version ... are for ctglip_nifti")
    if not args.reports_csv and given:
        raise ConfigError(given[0], "is for the CT-RATE layout: give --reports-csv too")
    kw = {}
    if args.volume_column is not None:
        kw["volume_column"] = args.volume_column
    if args.text_columns is not None:
        kw["text_columns"] = tuple(args.text_columns.split(","))
    if args.validation_fraction is not None:
        try:
            kw["validation_fraction"] = float(args.validation_fraction)
        except ValueError:
            problem = f"expects a number, got {args.validation_fraction!r}"
            raise ConfigError("--validation-fraction", problem) from None
    return NiftiSource(
        reports_csvs=tuple(ReportsCsv.parse(text) for text in args.reports_csv),
        mask_dir=args.mask_dir, mask_version=args.mask_version, **kw,
    )


def beam_setup(args: argparse.Namespace):
    """(runner, options) for a Beam build, None without --beam-runner; problems raise ConfigError."""
    from ctglip_jax.errors import ConfigError

    if args.beam_runner is None:
        if args.beam_pipeline_options is not None:
            raise ConfigError("--beam-pipeline-options", "only with --beam-runner")
        return None
    from tfds_builders.beam_options import pipeline_setup

    return pipeline_setup(args.beam_runner, args.beam_pipeline_options)


def run(args: argparse.Namespace) -> int:
    from ctglip_jax.data import datasets
    from ctglip_jax.errors import CTGlipInputError

    config = grid_config(args) or args.config
    source = nifti_source(args)
    if args.name != "ctglip_synthetic" and not args.manual_dir:
        raise CTGlipInputError(args.name, "needs --manual-dir (the folder holding your files)")
    beam = beam_setup(args)
    summary = datasets.build(args.name, config, args.data_dir, args.manual_dir, source=source, beam=beam)
    if args.json:
        print(json.dumps({
            "name": summary.name, "config": summary.config, "data_dir": summary.data_dir,
            "records": summary.records, "skipped": summary.skipped, "reused": summary.reused,
            "seconds": round(summary.seconds, 2),
        }))
    else:
        print("\n".join(summary.lines()))
    return 0
