"""Render slices of one synthetic phantom case to a PNG, so a person can check the anatomy by eye.

    python scripts/show_phantom.py --config small --seed 3 --out /tmp/phantom.png [--prevalence 0.3]

Top row: the CT in a soft-tissue window (coronal, sagittal, three axial levels) with finding centres
marked; bottom row: the same slices with the label map overlaid. Display convention is radiological:
the patient's right is on the left of axial and coronal images, anterior up in axial images.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ctglip_jax.data import organs  # noqa: E402
from ctglip_jax.phantom import synthetic  # noqa: E402


def _axial(vol, lab, z):
    # Axial: rows = y (anterior up), cols = x (patient right on the left).
    return vol[::-1, :, z].T[::-1], lab[::-1, :, z].T[::-1]


def _slices(case: synthetic.SyntheticCase) -> list[tuple[str, np.ndarray, np.ndarray, float, tuple | None]]:
    """(title, image 2-D, labels 2-D, aspect, marker (row, col) or None) in radiological orientation."""
    vol, lab, sp = case.volume, case.label_map, case.spacing
    ids = organs.v1_ids()
    out = []
    cx = int(np.argwhere(lab == ids["aorta"])[:, 0].mean())
    cy = int(np.argwhere(lab == ids["kidney_right"])[:, 1].mean())
    # Coronal: rows = z (superior up), cols = x (patient right on the left: x decreasing to the right).
    out.append(("coronal", vol[::-1, cy, :].T[::-1], lab[::-1, cy, :].T[::-1], sp[2] / sp[0], None))
    out.append(("sagittal", vol[cx, :, :].T[::-1], lab[cx, :, :].T[::-1], sp[2] / sp[1], None))
    for organ in ("lung_lower_lobe_right", "kidney_left", "urinary_bladder"):
        z = int(np.argwhere(lab == ids[organ])[:, 2].mean())
        out.append((f"axial z={z} ({organ})", *_axial(vol, lab, z), sp[1] / sp[0], None))
    for fd in [f for f in case.findings if f["kind"] == "focal"][:2]:  # a slice through each lesion
        x, y, z = fd["center_vox"]
        marker = (vol.shape[1] - 1 - y, vol.shape[0] - 1 - x)
        title = f"{fd['name']} {fd['size_mm']} mm, z={z}"
        out.append((title, *_axial(vol, lab, z), sp[1] / sp[0], marker))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prevalence", type=float, default=None, help="probability of every finding")
    p.add_argument("--out", default="phantom.png")
    args = p.parse_args()
    config = synthetic.PhantomConfig.preset(args.config, finding_prevalence=args.prevalence)
    case = synthetic.generate_case(args.seed, config)
    views = _slices(case)
    fig, axes = plt.subplots(2, len(views), figsize=(4 * len(views), 8))
    cmap = plt.get_cmap("tab20", 20)
    for col, (title, img, lab, aspect, marker) in enumerate(views):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=-250, vmax=250, aspect=aspect, interpolation="nearest")
            if row == 1:
                over = np.ma.masked_equal(lab % 20 + (lab > 0), 0)
                ax.imshow(over, cmap=cmap, alpha=0.45, aspect=aspect, interpolation="nearest")
            if marker is not None:
                ax.plot(marker[1], marker[0], "o", mfc="none", mec="red", ms=14)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle(
        f"{args.config} seed {args.seed}: " + ", ".join(f"{f['name']}@{f['organ']}" for f in case.findings),
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(case.report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
