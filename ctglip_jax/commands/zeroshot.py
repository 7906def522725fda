"""Run a trained model on one CT: organ recognition and abnormality probabilities, text-to-voxel heatmaps.

Example:
    ctglip zeroshot --workdir /tmp/ctglip_vit --ct scan.nii.gz --mask scan_seg.nii.gz \\
        --query "A liver cyst." --query "The spleen." --out /tmp/zs

The scan goes through the training preprocessing (canonical RAS+, resampling to the training spacing, the
configured HU window) and is covered by sliding windows of the training crop, so any scan size works.
With --mask (TotalSegmentator v1 ids, or v2 with --mask-version v2; same grid as the CT): per organ
present, the top-5 organ names with probabilities, and abnormality probabilities -> zeroshot.json: per
finding of the phantom's catalogue for a phantom-trained model; for a model trained on your data, per organ
the probability of "any abnormality" (its corpus dictionary's abnormal descriptions against its normal
statements). For every --query: `heatmap_NN_<query>.nii.gz`, the cosine similarity of every
voxel to the query on the INPUT scan's grid (same shape and affine: overlay it in any viewer), and a PNG
with axial and coronal slices through its maximum. zeroshot.json's `report` states what was done.
The training spacing is read from the workdir (data.spacing), else from the training dataset (its records
if built here, else its builder config); --spacing overrides it.
"""

from __future__ import annotations

import argparse

NAME = "zeroshot"
HELP = "zero-shot organ/abnormality scores and text-to-voxel heatmaps for one CT"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", required=True, help="a `ctglip train` workdir (config.json, checkpoints/)"
    )
    parser.add_argument("--ct", required=True, help="CT volume: .nii, .nii.gz or a DICOM series folder")
    parser.add_argument("--mask", default=None, help="TotalSegmentator label map on the CT's grid")
    parser.add_argument(
        "--mask-version",
        choices=("v1", "v2"),
        default="v1",
        help="which TotalSegmentator made --mask (v2 is converted to the model's v1 vocabulary)",
    )
    parser.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="TEXT",
        help="a text to localise (repeatable), e.g. 'A liver cyst.'",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="model-grid spacing in mm (default: the training data's)",
    )
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ctglip_jax import zeroshot

    result = zeroshot.run_zeroshot(
        args.workdir,
        args.ct,
        args.out,
        mask_path=args.mask,
        mask_version=args.mask_version,
        queries=args.query,
        step=args.step,
        spacing=args.spacing,
        overlap=args.overlap,
    )
    print(Path(args.out) / "zeroshot.json")
    n_organs = len(result.get("organs", {}))
    if n_organs:
        print(f"organs: {n_organs}, top-1 {result['organ_recognition_top1']:.3f}")
    for query in result.get("queries", []):
        print(f"{query['nifti']}: {query['text']!r} max {query['similarity_max']:.3f}")
    return 0
