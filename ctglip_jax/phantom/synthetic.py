"""A synthetic full-body CT phantom with TotalSegmentator-v1 labels, lesions and a matching report.

No real patient data is reachable here, so training, tests and the demo run on this phantom. It is built
to be hard in the way CT is hard: 94 labelled structures with plausible attenuation, texture, noise and
per-patient jitter of size, shape, position and intensity, and findings that are mostly a few millimetres
inside a body of tens of centimetres (where organ-level grounding should beat one global embedding).

Geometry. Anatomy is written once in a canonical body frame (mm; x towards the patient's right, y
anterior, z superior, z=0 at mid-thigh), then mapped into the configured field of view with a per-patient
scale and shift. The volume is in RAS+ voxel order: its affine is diag(spacing) plus an offset that puts
the volume centre at world 0, which nibabel reads as ('R', 'A', 'S') — so the liver lies at larger x
than the spleen. Organs are drawn as superellipsoids and tube polylines evaluated with vectorised numpy
on their bounding boxes only; later structures overwrite earlier ones (bones last).

Lesions are rendered in world millimetres so their reported size is their size in the image; a lesion
is never smaller than `min_lesion_vox` voxels in radius per axis, and never narrower than its contrast
allows the grid to show (`min_lesion_diameter`: 2 voxels across for calcium, stones, bone and lung
lesions, 3-4 for soft-tissue contrasts), so every labelled lesion stays visible at coarse spacing
(tests/test_phantom_visibility.py; measured counts and contrast-to-noise: the ctglip_synthetic README).
Findings are drawn organ-wide first (diffuse, enlargement), then layers (fluid, wall), then focal lesions,
and no finding paints over the voxels of an earlier localized one: `lesion_map`, `tumor_mask` and the
labels always describe what the image shows. Lesion attenuation follows real CT: relative findings are
set against the organ's normal attenuation (a metastasis in a fatty liver stays tumour tissue).
Determinism: every random draw comes from `np.random.SeedSequence(seed)`, split into independent streams
(finding choice, text, anatomy, lesion placement, noise), so the report does not depend on rendering.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from ctglip_jax.data import organs
from ctglip_jax.errors import ConfigError
from ctglip_jax.phantom import anatomy as phantom_anatomy
from ctglip_jax.phantom import findings as fcat
from ctglip_jax.phantom import lesions as phantom_lesions
from ctglip_jax.phantom import report_writer
from ctglip_jax.phantom.anatomy import smooth_field
from ctglip_jax.phantom.canvas import HU, Canvas

_PRESETS = {
    "tiny": dict(shape=(48, 48, 64), spacing=(8.0, 6.5, 10.5)),
    "small": dict(shape=(64, 64, 96), spacing=(6.0, 4.8, 7.0)),
    "medium": dict(shape=(96, 96, 128), spacing=(4.0, 3.2, 5.25)),
    "large": dict(shape=(160, 160, 224), spacing=(2.4, 1.95, 3.0)),
}

@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What a synthetic case looks like. `finding_prevalence`: None keeps each finding's catalogue default,
    a float sets all, a {finding name: p} mapping overrides some. `jitter` scales all per-patient
    anatomical variation (0: the same organ geometry every time, only bowel loops and gas vary)."""

    shape: tuple[int, int, int] = (48, 48, 64)
    spacing: tuple[float, float, float] = (8.0, 6.5, 10.5)
    finding_prevalence: float | Mapping[str, float] | None = None
    noise_hu: float = 12.0
    texture_hu: float = 8.0
    jitter: float = 1.0
    blur_vox: float = 0.5
    min_lesion_vox: float = 1.0

    @classmethod
    def preset(cls, name: str, **overrides) -> PhantomConfig:
        if name not in _PRESETS:
            raise ConfigError(
                "PhantomConfig.preset", f"unknown preset {name!r}; choose from {sorted(_PRESETS)}"
            )
        return cls(**{**_PRESETS[name], **overrides})

    def prevalence(self, finding: fcat.Finding) -> float:
        p = self.finding_prevalence
        if p is None:
            return finding.prevalence
        if isinstance(p, Mapping):
            unknown = set(p) - set(fcat.FINDINGS_BY_NAME)
            if unknown:
                raise ConfigError("finding_prevalence", f"unknown findings {sorted(unknown)}")
            return float(p.get(finding.name, finding.prevalence))
        return float(p)

    def affine(self) -> np.ndarray:
        sp = np.asarray(self.spacing, float)
        a = np.diag([*sp, 1.0])
        a[:3, 3] = -(np.asarray(self.shape) - 1) / 2 * sp
        return a


@dataclasses.dataclass(frozen=True)
class SyntheticCase:
    """One phantom patient. `findings`: one dict per finding (name, organ, kind, is_tumor, size_mm as
    written in the report, location, side, level, center_vox, n_voxels). With `render=False` the arrays
    are empty (shape (0, 0, 0)) and center_vox/n_voxels are None/0; the text is the same either way."""

    volume: np.ndarray  # int16 HU, (X, Y, Z), RAS+
    label_map: np.ndarray  # int16 v1 ids
    affine: np.ndarray  # 4x4
    spacing: tuple[float, float, float]
    report: str
    organ_texts: dict[str, str]
    abnormal: dict[str, bool]
    findings: list[dict]
    tumor_mask: np.ndarray  # uint8
    # uint8: 1 + catalogue index (`findings.FINDINGS`) of the localized finding drawn at each voxel (focal,
    # fluid, wall); 0 elsewhere. Organ-wide findings (diffuse, enlargement) are not marked: they are seen
    # wherever their organ is. Lets training tell whether a crop shows the finding its report names.
    lesion_map: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0, 0), np.uint8))


# ----------------------------------------------------------------------------------------------------


def generate_case(seed: int, config: PhantomConfig, *, render: bool = True) -> SyntheticCase:
    """One deterministic patient from (seed, config). `render=False` skips the arrays (text only, fast)."""
    if len(config.shape) != 3 or min(config.shape) < 8 or min(config.spacing) <= 0:
        raise ConfigError(
            "PhantomConfig",
            f"need a 3-D shape >= 8 voxels and positive spacing, got "
            f"shape={config.shape} spacing={config.spacing}",
        )
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)]
    rng_find, rng_text, rng_anat, rng_place, rng_noise = streams
    chosen = phantom_lesions.choose_findings(rng_find, config)
    report, organ_texts, abnormal = report_writer.write_report(chosen, rng_text)
    empty = np.zeros((0, 0, 0), np.int16)
    spacing = tuple(float(s) for s in config.spacing)
    if not render:
        return SyntheticCase(
            empty,
            empty,
            config.affine(),
            spacing,
            report,
            organ_texts,
            abnormal,
            chosen,
            empty.astype(np.uint8),
        )

    j = float(config.jitter)
    scale = 1 - j * np.array([rng_anat.uniform(0, 0.1), rng_anat.uniform(0, 0.1), rng_anat.uniform(0, 0.06)])
    shift = j * rng_anat.uniform(-0.02, 0.02, 3) * np.asarray(config.shape) * np.asarray(config.spacing)
    cv = Canvas(config, scale, shift)
    mods: dict = {}
    for fd in chosen:
        if fd["name"] == "splenomegaly":
            mods["spleen_scale"] = fd["size_mm"] / (2 * 55.0 * cv.k[2])
        elif fd["name"] == "aortic_aneurysm":
            mods["aneurysm_radius"] = np.full(3, fd["size_mm"] / 2)
    phantom_anatomy.body_regions(cv, rng_anat, j)
    base = phantom_anatomy.draw_anatomy(cv, rng_anat, j, mods)
    phantom_anatomy.cortex(cv, rng_anat, j)
    sb = cv.label == organs.organ_id("small_bowel")  # loops of bowel with fat between them
    loops = smooth_field(cv.shape, rng_anat, cells=3)
    gaps = sb & (loops < -0.35)
    cv.label[gaps], cv.hu[gaps] = 0, HU["fat"] + 8
    colon = cv.label == organs.organ_id("colon")
    cv.hu[colon & (loops > 0.1)] = -900  # gas in the colon

    tumor = np.zeros(cv.shape, np.uint8)
    lesions = np.zeros(cv.shape, np.uint8)
    order = phantom_lesions.RENDER_ORDER
    for fd in sorted(chosen, key=lambda fd: order[fd["kind"]]):  # stable: catalogue order within a kind
        phantom_lesions.render_finding(cv, fd, base, tumor, lesions, rng_place)

    hu = cv.hu
    if config.blur_vox > 0:
        hu = ndimage.gaussian_filter(hu, config.blur_vox, mode="nearest")
    hu += config.texture_hu * smooth_field(cv.shape, rng_noise, cells=4)
    hu += rng_noise.normal(0, config.noise_hu, cv.shape).astype(np.float32)
    volume = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return SyntheticCase(
        volume, cv.label, config.affine(), spacing, report, organ_texts, abnormal, chosen, tumor, lesions
    )
