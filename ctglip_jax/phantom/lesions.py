"""The phantom's findings (`synthetic.py`): which ones a patient has (text side, no pixels) and how each
is rendered onto the canvas, never over an earlier localized one."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.phantom import findings as fcat
from ctglip_jax.phantom.canvas import HU, Canvas, ellipsoid

_CATALOGUE_INDEX = {f.name: i for i, f in enumerate(fcat.FINDINGS)}

# ----------------------------------------------------------------------------------------------------
# Findings: choice (text-side, no pixels) and rendering.


# Tissue of each organ a finding can occur in (its nominal attenuation is `HU[tissue]`).
_FINDING_TISSUE = {
    "liver": "liver",
    "kidney": "kidney",
    "lung": "lung",
    "pancreas": "pancreas",
    "gallbladder": "gallbladder",
    "adrenal": "adrenal",
    "vertebrae": "marrow",
    "colon": "bowel",
    "urinary": "bladder",
    "spleen": "spleen",
    "aorta": "blood",
}


def lesion_contrast_hu(finding: fcat.Finding, organ: str, diffuse: fcat.Finding | None = None) -> float:
    """Nominal attenuation of a focal lesion minus that of the parenchyma round it (HU), the parenchyma
    changed by `diffuse` (hepatic steatosis) where the organ has that finding too."""
    base = HU[_FINDING_TISSUE[organ.split("_")[0]]]
    delta = finding.hu if finding.hu_relative else finding.hu - base
    if diffuse is not None:
        delta -= diffuse.hu if diffuse.hu_relative else diffuse.hu - base
    return float(delta)


def min_lesion_diameter(contrast_hu: float, spacing, min_lesion_vox: float = 1.0) -> float:
    """Smallest diameter (mm) a focal lesion of this contrast is drawn with on this grid.

    In voxels of the grid's largest in-plane spacing: 2 for contrasts of 100 HU and more (calcium, stones,
    bone, soft tissue in aerated lung), 3 for 45-100 HU, 4 below 45 HU (a cyst or tumour against
    soft tissue). Every voxel of a 2-voxel blob is a border voxel, blurred with its neighbours to about
    half its contrast; larger blobs have a core at full contrast. With the phantom's ~12 HU noise these
    sizes keep every focal lesion's mean per-voxel contrast-to-noise above the visibility floor of
    tests/test_phantom_visibility.py. Times `PhantomConfig.min_lesion_vox` (1 by default).
    """
    a = abs(contrast_hu)
    vox = 2.0 if a >= 100 else 3.0 if a >= 45 else 4.0
    return vox * min_lesion_vox * float(np.max(np.asarray(spacing, float)[:2]))


def choose_findings(rng, config) -> list[dict]:
    """The findings of one patient, decided before (and independently of) rendering, so the report can be
    written first. A focal lesion's size is drawn from the part of its catalogue range the grid can show
    at its contrast (`min_lesion_diameter`; the minimum where the whole range lies below it). Focal
    findings are given room of their own: one that may occur in several organs (a side, a lobe) goes to
    one without a focal finding yet where there is one, and two in one organ get different named
    sub-regions. At the catalogue's prevalences (<= 12 % each) this rarely matters."""
    spacing = np.asarray(config.spacing, float)
    out, fractions = [], []
    used: dict[str, set[str]] = {}  # organ holding a focal finding -> the sub-regions they took
    for f in fcat.FINDINGS:
        if rng.random() >= config.prevalence(f):
            continue
        options = list(f.organs)
        if f.kind == "focal":  # a paired organ or a lobe not yet holding a focal lesion, where there is one
            options = [o for o in options if o not in used] or options
        organ = str(rng.choice(options))
        fractions.append(float(rng.random()))  # where in the (feasible) size range
        loc = ""
        taken = used.setdefault(organ, set()) if f.kind == "focal" else set()
        if f.location_set:
            free = [name for name in fcat.LOCATIONS[f.location_set] if name not in taken]
            loc = str(rng.choice(free or list(fcat.LOCATIONS[f.location_set])))
            taken.add(loc)
        elif organ.startswith("lung_"):
            loc = fcat.organ_text(organ)
        side = "left" if organ.endswith("left") else ("right" if organ.endswith("right") else "")
        out.append(
            dict(
                name=f.name,
                organ=organ,
                kind=f.kind,
                is_tumor=f.is_tumor,
                size_mm=0,
                location=loc,
                side=side,
                level=organ.removeprefix("vertebrae_") if organ.startswith("vertebrae_") else "",
                center_vox=None,
                n_voxels=0,
            )
        )
    diffuse = {fd["organ"]: fcat.FINDINGS_BY_NAME[fd["name"]] for fd in out if fd["kind"] == "diffuse"}
    for fd, t in zip(out, fractions, strict=True):
        f = fcat.FINDINGS_BY_NAME[fd["name"]]
        lo, hi = f.size_mm
        if f.kind == "focal":
            contrast = lesion_contrast_hu(f, fd["organ"], diffuse.get(fd["organ"]))
            least = min_lesion_diameter(contrast, spacing, config.min_lesion_vox)
            lo, hi = max(lo, least), max(hi, least)
        d = lo + t * (hi - lo)
        if f.kind == "wall":
            d = max(d, float(spacing.max()))
        fd["size_mm"] = round(d)
    return out


def _organ_box(mask: np.ndarray) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


# Render order: organ-wide changes first, then layers (fluid, wall), then focal lesions; a later finding
# never paints over the voxels of an earlier localized one, so every labelled lesion keeps its voxels.
RENDER_ORDER = {"enlargement": 0, "diffuse": 0, "fluid": 1, "wall": 1, "focal": 2}


def render_finding(cv: Canvas, fd: dict, base: dict, tumor: np.ndarray, lesions: np.ndarray, rng) -> None:
    """Draw one finding onto the canvas; records `n_voxels` and `center_vox` in `fd`.

    Localized findings (focal, fluid, wall) are marked in `lesions` and never overwrite voxels an earlier
    localized finding holds: those are left out of the new lesion, and a focal lesion's centre is chosen
    clear of them where the organ has room (two focal findings in one organ are also given different
    sub-regions by `_choose_findings`). Raises ConfigError if the finding's organ has no free voxel (a grid
    too coarse for the organ): the report, written before rendering, must never name an undrawn lesion.
    """
    f = fcat.FINDINGS_BY_NAME[fd["name"]]
    mark = _CATALOGUE_INDEX[f.name] + 1
    oid = organs.organ_id(fd["organ"])
    organ_mask = cv.label == oid
    if not (organ_mask & (lesions == 0)).any():
        raise ConfigError(
            "PhantomConfig",
            f"shape={cv.shape} spacing={tuple(float(s) for s in cv.spacing)} leaves no voxel of "
            f"{fd['organ']} to draw {fd['name']} in (the report names it); use a finer grid",
        )
    box = _organ_box(organ_mask)
    om = organ_mask[box]
    if f.kind == "diffuse":  # the organ's parenchyma: every organ voxel, drawn before any focal lesion
        value = base.get(fd["organ"], 40.0) + f.hu if f.hu_relative else f.hu
        cv.hu[organ_mask & (lesions == 0)] = value + rng.uniform(-4, 4)
        fd["n_voxels"] = int(organ_mask.sum())
        return
    if f.kind == "enlargement":  # drawn at anatomy time
        fd["n_voxels"] = int(organ_mask.sum())
        return
    free = om & (lesions[box] == 0)
    if f.kind in ("fluid", "wall"):
        if f.kind == "fluid":  # dependent (posterior) fluid layer of the lobe
            ymin = np.flatnonzero(free.any(axis=(0, 2)))[0]
            depth = max(1, round(fd["size_mm"] / cv.spacing[1]))
            m = np.zeros_like(om)
            m[:, ymin : ymin + depth, :] = True
            m &= free
        else:
            edt = ndimage.distance_transform_edt(np.pad(om, 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
            m = free & (edt <= fd["size_mm"])
        cv.hu[box][m] = f.hu + rng.uniform(-5, 5)
        lesions[box][m] = mark
        fd["n_voxels"] = int(m.sum())
        fd["center_vox"] = [int(s.start + np.mean(i)) for s, i in zip(box, np.nonzero(m), strict=True)]
        return
    # Focal: pick a centre deep inside the named sub-region and clear of earlier lesions, draw a blob in
    # world millimetres.
    cand = free
    if f.location_set:
        u = [np.linspace(0, 1, n) for n in om.shape]
        b = fcat.LOCATIONS[f.location_set][fd["location"]]
        region = ((u[0] >= b[0]) & (u[0] <= b[1]))[:, None, None] & ((u[1] >= b[2]) & (u[1] <= b[3]))[
            None, :, None
        ]
        region = region & ((u[2] >= b[4]) & (u[2] <= b[5]))[None, None, :]
        if (free & region).any():
            cand = free & region
    edt = ndimage.distance_transform_edt(np.pad(om, 1), sampling=cv.spacing)[1:-1, 1:-1, 1:-1]
    r = fd["size_mm"] / 2
    others = lesions[box] > 0
    clear = ndimage.distance_transform_edt(~others, sampling=cv.spacing) if others.any() else None
    deep = cand & (edt >= min(r + 0.5 * cv.spacing.max(), np.max(edt[cand])))  # prefer the middle
    if clear is not None:  # keep a voxel of the organ between this lesion and an earlier one
        apart = clear >= r + cv.spacing.max()
        deep = next(c for c in (deep & apart, cand & apart, cand & (clear >= np.max(clear[cand]))) if c.any())
    choices = np.argwhere(deep)
    center = np.array([s.start for s in box]) + choices[rng.integers(len(choices))]
    radii = np.maximum(
        r * (1 + rng.uniform(-0.15, 0.15, 3)) if f.shape != "sphere" else np.full(3, r), cv.lesion_min_r
    )
    lo = np.maximum(center - np.ceil(radii * 1.4 / cv.spacing), 0).astype(int)
    hi = np.minimum(center + np.ceil(radii * 1.4 / cv.spacing) + 1, cv.shape).astype(int)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    off = [((np.arange(a, b) - c) * s) for a, b, c, s in zip(lo, hi, center, cv.spacing, strict=True)]
    wob = None
    if f.shape == "lobulated":
        n = rng.normal(size=(4, 3))
        wob = (rng.uniform(0.05, 0.2, 4), n / np.linalg.norm(n, axis=1, keepdims=True))
    blob = ellipsoid((0, 0, 0), radii, wobble=wob)[0](
        off[0][:, None, None], off[1][None, :, None], off[2][None, None, :]
    )
    inside = cv.label[sl] == oid
    if f.expands_organ:
        inside |= cv.label[sl] == 0
    m = blob & inside & (lesions[sl] == 0)
    m[tuple(center - lo)] = True  # free by construction
    value = base.get(fd["organ"], 40.0) + f.hu if f.hu_relative else f.hu
    cv.hu[sl][m] = value + rng.uniform(-5, 5)
    cv.label[sl][m] = oid
    lesions[sl][m] = mark
    if f.is_tumor:
        tumor[sl][m] = 1
    fd["center_vox"] = [int(c) for c in center]
    fd["n_voxels"] = int(m.sum())
