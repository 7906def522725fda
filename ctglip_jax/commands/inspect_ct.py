"""Describe a CT (and optionally its organ label map) as JSON on stdout.

CT is a .nii / .nii.gz file or a DICOM series folder. The JSON gives the canonical (RAS+) shape and
spacing (mm), the orientation codes of the file as stored and after canonicalisation, the affine, HU
min/max/mean, and with --mask the TotalSegmentator-v1 organs present with their voxel counts and volumes.

Example:  ctglip inspect-ct scan.nii.gz --mask scan_labels.nii.gz
"""

from __future__ import annotations

import argparse
import json

NAME = "inspect-ct"
HELP = "print a CT's geometry, HU range and organs present (JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct", metavar="CT", help="CT volume: .nii, .nii.gz or a DICOM series folder")
    parser.add_argument(
        "--mask",
        metavar="MASK",
        help="TotalSegmentator-v1 label map (ids 0..104) on the same voxel grid as CT",
    )


def describe(vol, labels=None) -> dict:
    """The JSON-able summary `inspect-ct` prints (also handy in notebooks)."""
    import numpy as np

    from ctglip_jax.data import organs

    data = vol.data
    summary = {
        "source": vol.source,
        "shape": list(vol.shape),
        "spacing_mm": [round(s, 6) for s in vol.spacing],
        "orientation": {"stored": vol.stored_orientation, "canonical": vol.orientation},
        "affine": np.round(vol.affine, 6).tolist(),
        "hu": {
            "min": float(data.min()),
            "max": float(data.max()),
            "mean": float(data.mean(dtype=np.float64)),
        },
    }
    if labels is not None:
        counts = np.bincount(np.asarray(labels.data, np.int64).ravel(), minlength=organs.NUM_CLASSES + 1)
        voxel_ml = float(np.prod(vol.spacing)) / 1000.0
        names = organs.v1_names()
        summary["organs"] = {
            names[i]: {"id": i, "voxels": int(counts[i]), "volume_ml": round(int(counts[i]) * voxel_ml, 3)}
            for i in range(1, organs.NUM_CLASSES + 1)
            if counts[i]
        }
        summary["background_voxels"] = int(counts[0])
    return summary


def run(args: argparse.Namespace) -> int:
    from ctglip_jax.data import ct

    vol = ct.load_ct(args.ct)
    labels = ct.load_label_map(args.mask, reference=vol) if args.mask else None
    print(json.dumps(describe(vol, labels), indent=2))
    return 0
