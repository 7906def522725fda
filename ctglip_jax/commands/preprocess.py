"""Write a CT as a canonical (RAS+) NIfTI, resampled to a target spacing, with its label map alongside.

The image is resampled linearly (float32 HU, or rounded int16 HU with --dtype int16), the label map by
nearest neighbour onto exactly the same grid: the first voxel centre and the axis directions are kept and
the grid ends at the last voxel centre inside the input. Without --spacing the native spacing is kept
(the volume is only reoriented). A one-line JSON summary of what was written goes to stdout.

Example:  ctglip preprocess scan.nii.gz --out scan_1.5mm.nii.gz --spacing 1.5,1.5,3
          --mask labels.nii.gz --mask-out labels_1.5mm.nii.gz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "preprocess"
HELP = "reorient a CT to RAS+, resample it (and its label map) and save as NIfTI"


def _spacing(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"spacing must be numbers like 1.5,1.5,3, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacing must be one or three positive numbers (mm), got {text!r}")
    return tuple(values)


def _nifti_path(text: str) -> Path:
    if not text.endswith((".nii", ".nii.gz")):
        raise argparse.ArgumentTypeError(f"output must end in .nii or .nii.gz, got {text!r}")
    return Path(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", metavar="CT", help="CT volume: .nii, .nii.gz or a DICOM series folder")
    parser.add_argument(
        "--out", required=True, type=_nifti_path, metavar="OUT", help="output image (.nii.gz)"
    )
    parser.add_argument(
        "--spacing",
        type=_spacing,
        metavar="X,Y,Z",
        help="target voxel size in mm along R, A, S (one number = isotropic); default: keep native spacing",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "int16"),
        default="float32",
        help="voxel type of the output image: float32 HU (default) or HU rounded to int16",
    )
    parser.add_argument("--mask", metavar="MASK", help="TotalSegmentator-v1 label map on the CT's grid")
    parser.add_argument("--mask-out", type=_nifti_path, metavar="OUT", help="output label map (int16 ids)")


def run(args: argparse.Namespace) -> int:
    import nibabel as nib

    from ctglip_jax.data import ct
    from ctglip_jax.errors import ConfigError

    if (args.mask is None) != (args.mask_out is None):
        raise ConfigError("--mask/--mask-out", "give both options or neither")
    vol = ct.load_ct(args.ct)
    labels = ct.load_label_map(args.mask, reference=vol) if args.mask else None
    if args.spacing is not None:
        vol = ct.resample(vol, args.spacing, order=1)
        labels = ct.resample(labels, args.spacing, order=0) if labels is not None else None
    written = {
        "image": str(args.out),
        "shape": list(vol.shape),
        "spacing_mm": [round(s, 6) for s in vol.spacing],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(vol.to_nifti(args.dtype), args.out)
    if labels is not None:
        args.mask_out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(labels.to_nifti("int16"), args.mask_out)
        written["label_map"] = str(args.mask_out)
    print(json.dumps(written))
    return 0
