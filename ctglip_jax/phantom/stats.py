"""How visible the phantom's findings are: lesion voxel counts and contrast-to-noise in the model's windows.

Measured on what a model sees, the windowed image (`augment.apply_windows(volume, DEFAULT_WINDOWS)`: lung,
soft-tissue and bone windows, each mapped to [0, 1]), from a case's public arrays only (volume, label map,
lesion map, findings), never from the generator's internals:

- localized findings (focal, fluid, wall): CNR = |mean(lesion voxels) - mean(reference voxels)| / noise,
  per window, and the best of the windows. Lesion voxels: all of `lesion_map == mark`, its blurred rim
  included. Reference, as a radiologist places a background ROI: voxels of the lesion's own organ in the
  ring two to three voxels out from the lesion (past its blurred rim: a few mm at fine spacing), not on the
  organ's border with other tissue and not touching any other lesion; where that leaves fewer than
  `MIN_REFERENCE` voxels (thin organs, the lumen inside a thick bladder wall), the organ's voxels of the
  ring, then those touching the lesion too, then the whole ring. Adrenal nodules are measured against the
  fat round them instead: the gland is a limb a few mm thick, partial volume with fat at these voxel
  sizes, and on CT an adrenal nodule is a round mass in periadrenal fat.
  Noise: the standard deviation of the windowed image over a homogeneous region, the liver's interior
  (one voxel in from its border) away from every lesion; every default window maps liver attenuation
  linearly (no clipping), so this is the image noise (white noise plus texture) in each window's units.
  CNR is a ratio, so a linear window leaves it unchanged; the windows differ only where one clips.
- organ-wide findings: diffuse ones, |mean(organ) - mean(organ of the same patient without the finding)|
  / noise (the twin shares anatomy, base attenuation and noise: `generate_case` draws them from streams
  independent of the findings); enlargements, the organ's volume over the twin's.

Used by tests/test_phantom_visibility.py and scripts/phantom_stats.py (the tables in the builder README).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from ctglip_jax.data import organs
from ctglip_jax.data.augment import DEFAULT_WINDOWS, apply_windows
from ctglip_jax.phantom import findings as fcat

LOCALIZED = ("focal", "fluid", "wall")
FAT_REFERENCE = ("adrenal_nodule",)  # measured against the fat round them (see the module docstring)
_INDEX = {f.name: i for i, f in enumerate(fcat.FINDINGS)}
MIN_REFERENCE = 10  # reference voxels needed for a mean steadier than the contrast measured
RING_VOX = 2  # reference ring: the voxels 2 to 1 + RING_VOX steps from the lesion (26-neighbourhood)


def shell_mm(spacing) -> float:
    """How far from every lesion the noise region keeps: 10 mm, or two voxels where voxels are coarser."""
    return max(10.0, 2.0 * float(np.max(spacing)))


def noise_std(image: np.ndarray, label_map: np.ndarray, lesion_map: np.ndarray, spacing) -> np.ndarray:
    """(C,) std of the windowed image over the liver's interior, farther than `shell_mm` from any lesion."""
    liver = ndimage.binary_erosion(label_map == organs.organ_id("liver"))
    lesions = lesion_map > 0
    if lesions.any():
        liver &= ndimage.distance_transform_edt(~lesions, sampling=spacing) > shell_mm(spacing)
    if liver.sum() < 50:
        raise ValueError("no homogeneous liver region to measure noise in")
    return image[liver].reshape(-1, image.shape[-1]).std(axis=0)


def localized_contrast(case, windows=DEFAULT_WINDOWS) -> list[dict]:
    """One row per localized finding of `case`: name, organ, n_voxels (its voxels in the lesion map),
    cnr (per window), best_cnr, best_window (index into `windows`), reference (which voxels: 'organ
    interior', 'organ', 'organ next to the lesion', the same for 'fat', or 'ring')."""
    spacing = np.asarray(case.spacing, float)
    image = apply_windows(case.volume, windows)
    if image.ndim == 3:
        image = image[..., None]
    noise = noise_std(image, case.label_map, case.lesion_map, spacing)
    lesion_map = np.asarray(case.lesion_map)
    cube = np.ones((3, 3, 3), bool)
    near = lambda m: ndimage.binary_dilation(m, structure=cube)  # m and the voxels touching it
    rows = []
    for fd in case.findings:
        if fd["kind"] not in LOCALIZED:
            continue
        mark = _INDEX[fd["name"]] + 1
        where = np.argwhere(lesion_map == mark)
        row = dict(name=fd["name"], organ=fd["organ"], n_voxels=len(where))
        if not len(where):
            rows.append(row | dict(cnr=None, best_cnr=0.0, best_window=None, reference=None))
            continue
        pad = RING_VOX + 3  # the ring, and one voxel beyond it for the erosion
        box = tuple(
            slice(max(int(lo) - pad, 0), int(hi) + pad + 1)
            for lo, hi in zip(where.min(0), where.max(0), strict=True)
        )
        les, lab, vol, img = lesion_map[box], case.label_map[box], case.volume[box], image[box]
        mine, lesions = les == mark, les > 0
        ring = ndimage.binary_dilation(mine, structure=cube, iterations=1 + RING_VOX)
        ring &= ~lesions & ~near(lesions & ~mine)
        off_border = ring & ~near(mine)  # clear of the lesion's own blurred edge
        if fd["name"] in FAT_REFERENCE:
            kind, tissue = "fat", (lab == 0) & (vol > -500)
        else:
            kind, tissue = "organ", lab == organs.organ_id(fd["organ"])
        interior = ndimage.binary_erosion(tissue, structure=cube)  # off the tissue's border with others
        options = (
            (f"{kind} interior", off_border & interior),
            (kind, off_border & tissue),
            (f"{kind} next to the lesion", ring & tissue),  # small organs, lumens inside a thick wall
        )
        reference, ref = next((o for o in options if o[1].sum() >= MIN_REFERENCE), ("ring", ring))
        cnr = np.abs(img[mine].mean(axis=0) - img[ref].mean(axis=0)) / noise
        best = int(np.argmax(cnr))
        rows.append(
            row | dict(cnr=cnr.tolist(), best_cnr=float(cnr[best]), best_window=best, reference=reference)
        )
    return rows


def organ_wide_contrast(case, twin, windows=DEFAULT_WINDOWS) -> list[dict]:
    """One row per organ-wide finding of `case`, against `twin` (the same seed without that finding):
    diffuse -> best_cnr of the organ's mean attenuation change; enlargement -> volume_ratio."""
    spacing = np.asarray(case.spacing, float)
    image, twin_image = apply_windows(case.volume, windows), apply_windows(twin.volume, windows)
    if image.ndim == 3:
        image, twin_image = image[..., None], twin_image[..., None]
    noise = noise_std(image, case.label_map, case.lesion_map, spacing)
    rows = []
    for fd in case.findings:
        if fd["kind"] in LOCALIZED:
            continue
        oid = organs.organ_id(fd["organ"])
        organ, twin_organ = case.label_map == oid, twin.label_map == oid
        row = dict(name=fd["name"], organ=fd["organ"], n_voxels=int(organ.sum()))
        if fd["kind"] == "enlargement":
            rows.append(row | dict(volume_ratio=float(organ.sum() / max(twin_organ.sum(), 1))))
            continue
        a, b = _parenchyma(organ, case.lesion_map, spacing), _parenchyma(twin_organ, twin.lesion_map, spacing)
        cnr = np.abs(image[a].mean(axis=0) - twin_image[b].mean(axis=0)) / noise
        rows.append(row | dict(cnr=cnr.tolist(), best_cnr=float(cnr.max()), best_window=int(np.argmax(cnr))))
    return rows


def _parenchyma(organ: np.ndarray, lesion_map: np.ndarray, spacing) -> np.ndarray:
    """The organ's interior farther than `shell_mm` from any lesion."""
    out = ndimage.binary_erosion(organ)
    if (lesion_map > 0).any():
        out &= ndimage.distance_transform_edt(lesion_map == 0, sampling=spacing) > shell_mm(spacing)
    return out


def without(config, name: str):
    """`config` with finding `name` switched off (its twin for `organ_wide_contrast`)."""
    prev = config.finding_prevalence
    if prev is None or isinstance(prev, float | int):
        prev = {f.name: (f.prevalence if prev is None else float(prev)) for f in fcat.FINDINGS}
    return dataclasses.replace(config, finding_prevalence={**prev, name: 0.0})
