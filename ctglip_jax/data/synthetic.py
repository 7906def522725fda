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
from collections.abc import Callable, Mapping

import numpy as np
from scipy import ndimage

from ctglip_jax.data import findings as fcat
from ctglip_jax.data import organs, report_writer
from ctglip_jax.errors import ConfigError

CANON_EXTENT = np.array([384.0, 308.0, 672.0])  # canonical field of view, mm
CANON_CENTER = np.array([0.0, 0.0, 336.0])

_PRESETS = {
    "tiny": dict(shape=(48, 48, 64), spacing=(8.0, 6.5, 10.5)),
    "small": dict(shape=(64, 64, 96), spacing=(6.0, 4.8, 7.0)),
    "medium": dict(shape=(96, 96, 128), spacing=(4.0, 3.2, 5.25)),
    "large": dict(shape=(160, 160, 224), spacing=(2.4, 1.95, 3.0)),
}

# Base attenuation (HU) of each tissue before per-patient jitter, texture and noise.
HU = {
    "air": -1000,
    "fat": -100,
    "muscle": 48,
    "lung": -850,
    "liver": 55,
    "spleen": 45,
    "kidney": 35,
    "adrenal": 30,
    "pancreas": 40,
    "gallbladder": 10,
    "bladder": 8,
    "stomach": 20,
    "bowel": 25,
    "blood": 150,
    "myocardium": 90,
    "trachea": -1000,
    "esophagus": 40,
    "marrow": 420,
    "cortex": 900,
    "csf": 10,
}
BONES = (
    tuple(fcat.VERTEBRAE)
    + tuple(f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13))
    + (
        "sacrum",
        "hip_left",
        "hip_right",
        "femur_left",
        "femur_right",
        "scapula_left",
        "scapula_right",
        "clavicula_left",
        "clavicula_right",
    )
)


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
# Shapes: functions of canonical coordinates (X, Y, Z broadcastable arrays) -> bool mask, with a bbox.

Shape = tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], np.ndarray, np.ndarray]


def _rotation(yaw: float, tilt: float) -> np.ndarray:
    cz, sz, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(tilt), np.sin(tilt)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


def ellipsoid(c, r, *, p: float = 2.0, yaw: float = 0.0, tilt: float = 0.0, wobble=None) -> Shape:
    """Superellipsoid |x/rx|^p + ... <= 1 (p > 2 is boxier), rotated, with an optional lumpy surface:
    `wobble` = (amplitudes, unit directions) scales the radius by 1 + sum a_i * (u . n_i)."""
    c, r = np.asarray(c, float), np.asarray(r, float)
    rot = _rotation(yaw, tilt)
    rotated = bool(yaw or tilt)
    # Python floats keep float32 grids in float32 (numpy scalars would promote them to float64).
    cx, cy, cz = (float(v) for v in c)
    inv_r = [1.0 / float(v) for v in r]
    rt = [[float(rot[i, k]) for i in range(3)] for k in range(3)]
    amp, w = 0.0, None
    if wobble is not None:  # sum_i a_i (u . n_i) == u . (sum_i a_i n_i): one dot product
        amp = float(np.abs(wobble[0]).sum())
        w = [float(v) for v in np.asarray(wobble[0], float) @ np.asarray(wobble[1], float)]

    def fn(X, Y, Z):
        d = (X - cx, Y - cy, Z - cz)
        loc = [rt[k][0] * d[0] + rt[k][1] * d[1] + rt[k][2] * d[2] for k in range(3)] if rotated else d
        if p == 2.0:
            q = (loc[0] * inv_r[0]) ** 2 + (loc[1] * inv_r[1]) ** 2 + (loc[2] * inv_r[2]) ** 2
        else:
            q = sum(np.abs(loc[k] * inv_r[k]) ** p for k in range(3))
        if w is None:
            return q <= 1.0
        norm = np.sqrt(loc[0] ** 2 + loc[1] ** 2 + loc[2] ** 2) + 1e-6
        scale = 1.0 + (w[0] * loc[0] + w[1] * loc[1] + w[2] * loc[2]) / norm
        return q <= scale**p

    half = r.max() * (1 + amp) * (3**0.5 if p > 2 else 1.0)
    return fn, c - half, c + half


def tube(points, radii, min_r: float = 0.0) -> Shape:
    """Union of capsules along a polyline; `radii` per point (linearly interpolated along each segment)."""
    pts = np.asarray(points, float)
    rad = np.maximum(np.broadcast_to(np.asarray(radii, float), (len(pts),)), min_r)

    segments = [
        (
            [float(v) for v in a],
            [float(v) for v in b - a],
            float(max((b - a) @ (b - a), 1e-9)),
            float(ra),
            float(rb),
            np.minimum(a, b) - max(ra, rb),
            np.maximum(a, b) + max(ra, rb),
        )
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:], strict=True)
    ]

    def fn(X, Y, Z):  # X, Y, Z: ascending coordinates shaped (n, 1, 1), (1, n, 1), (1, 1, n)
        axes = (X.ravel(), Y.ravel(), Z.ravel())
        out = np.zeros((len(axes[0]), len(axes[1]), len(axes[2])), bool)
        for a, ab, ab2, ra, rb, lo, hi in segments:  # each capsule on its own bounding box
            sl = tuple(
                slice(np.searchsorted(ax, low), np.searchsorted(ax, high, side="right"))
                for ax, low, high in zip(axes, lo, hi, strict=True)
            )
            x, y, z = X[sl[0]], Y[:, sl[1]], Z[:, :, sl[2]]
            t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) * (1 / ab2), 0.0, 1.0)
            d2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
            out[sl] |= d2 <= (ra + t * (rb - ra)) ** 2
        return out

    return fn, pts.min(0) - rad.max(), pts.max(0) + rad.max()


def clipped(shape: Shape, predicate: Callable) -> Shape:
    """A shape restricted by a predicate on canonical coordinates (lobes cut by fissure planes)."""
    fn, lo, hi = shape
    return (lambda X, Y, Z: fn(X, Y, Z) & predicate(X, Y, Z)), lo, hi


class _Canvas:
    """Label and HU arrays plus the canonical coordinate of every voxel index along each axis."""

    def __init__(self, config: PhantomConfig, scale: np.ndarray, shift: np.ndarray):
        self.shape, self.spacing = tuple(config.shape), np.asarray(config.spacing, float)
        self.k = np.asarray(config.shape) * self.spacing / CANON_EXTENT * scale  # world mm per canonical mm
        self.shift = shift
        world = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(self.shape, self.spacing, strict=True)]
        self.axes = [
            ((w - shift[i]) / self.k[i] + CANON_CENTER[i]).astype(np.float32) for i, w in enumerate(world)
        ]
        self.label = np.zeros(self.shape, np.int16)
        self.hu = np.full(self.shape, float(HU["air"]), np.float32)
        self.regions: dict[str, np.ndarray] = {}
        self.min_r = 0.6 * float((self.spacing / self.k).max())  # thinnest tube still drawn continuously
        self.lesion_min_r = config.min_lesion_vox * self.spacing  # world mm per axis

    def index_window(self, lo, hi) -> tuple[slice, ...] | None:
        sl = []
        for i in range(3):
            a = np.searchsorted(self.axes[i], lo[i])
            b = np.searchsorted(self.axes[i], hi[i], side="right")
            if b <= a:
                return None
            sl.append(slice(a, b))
        return tuple(sl)

    def grid(self, sl):
        return (
            self.axes[0][sl[0], None, None],
            self.axes[1][None, sl[1], None],
            self.axes[2][None, None, sl[2]],
        )

    def paint(self, label: int, hu: float, shape: Shape, within: str = "body", over=None) -> None:
        fn, lo, hi = shape
        sl = self.index_window(lo, hi)
        if sl is None:
            return
        m = fn(*self.grid(sl)) & self.regions[within][sl]
        if over is not None:
            m &= np.isin(self.label[sl], over)
        self.label[sl][m] = label
        self.hu[sl][m] = hu


# ----------------------------------------------------------------------------------------------------
# Anatomy

_TRUNK_Z = [95, 150, 250, 330, 430, 520, 600, 628, 645, 672]
_TRUNK_RX = [160, 165, 150, 145, 150, 150, 150, 140, 60, 55]
_TRUNK_RY = [105, 105, 100, 100, 105, 110, 105, 95, 55, 50]
_TRUNK_YC = [0, 0, 0, 0, 0, 0, 0, -5, -10, -10]
_SPINE_Z, _SPINE_Y = [245, 320, 420, 540, 665], [-58, -50, -62, -74, -56]


def _vertebra_levels() -> list[tuple[str, float, float]]:
    """(name, z bottom, z top) from L5 up to C7."""
    heights = [30] * 5 + [24, 23, 23, 22, 22, 21, 21, 20, 20, 19, 19, 19] + [17]
    out, z = [], 245.0
    for name, h in zip(fcat.VERTEBRAE, heights, strict=True):
        out.append((name, z, z + h))
        z += h
    return out


def _body_regions(cv: _Canvas, rng, j: float) -> None:
    """Body outline, subcutaneous fat, muscle wall and the visceral core; thighs below the pelvis."""
    X, Y, Z = cv.grid((slice(None),) * 3)
    z = Z[0, 0]
    habitus = 1 + j * rng.uniform(-0.05, 0.05, 2)
    rx, ry = np.interp(z, _TRUNK_Z, _TRUNK_RX) * habitus[0], np.interp(z, _TRUNK_Z, _TRUNK_RY) * habitus[1]
    yc = np.interp(z, _TRUNK_Z, _TRUNK_YC)
    fat = 14 + j * rng.uniform(0, 16)
    ell = lambda ax, ay, y0: (X / ax) ** 2 + ((Y - y0) / ay) ** 2 <= 1
    above = Z >= 90
    trunk = ell(rx, ry, yc) & above
    body = ell(rx + fat, ry + fat, yc) & above
    core = ell(rx - 14, ry - 12, yc) & above
    thigh = Z < 125
    for side in (-1, 1):
        t = ((X - side * 95) / 72) ** 2 + ((Y + 5) / 80) ** 2
        trunk |= thigh & (t <= 1)
        body |= thigh & (t <= (1 + fat / 72) ** 2)
    cv.regions.update(body=body, trunk=trunk, core=core & (Z < 640))
    cv.hu[body] = HU["fat"]
    cv.hu[trunk] = HU["muscle"]
    cv.hu[core & (Z < 640)] = HU["fat"] + 8


class _Anatomy:
    """Paints organs onto a canvas with per-patient jitter; `base` keeps each organ's base HU, which
    lesions with relative attenuation are drawn against."""

    def __init__(self, cv: _Canvas, rng, jitter: float):
        self.cv, self.rng, self.j = cv, rng, jitter
        self.ids = organs.v1_ids()
        self.base: dict[str, float] = {}

    def hu(self, tissue: str) -> float:
        return HU[tissue] + self.j * self.rng.uniform(-6, 6)

    def E(self, c, r, **kw) -> Shape:
        """A jittered superellipsoid: centre, radii, exponent and a lumpy surface vary per patient."""
        rng, j = self.rng, self.j
        c = np.asarray(c, float) + j * rng.normal(0, 4, 3)
        r = np.maximum(np.asarray(r, float) * (1 + j * rng.uniform(-0.1, 0.1, 3)), self.cv.min_r)
        amps, dirs = j * rng.uniform(0, 0.08, 3), rng.normal(size=(3, 3))
        wobble = (amps, dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
        return ellipsoid(c, r, p=kw.pop("p", 2.0) + j * rng.uniform(0, 0.5), wobble=wobble, **kw)

    def T(self, points, radii) -> Shape:
        """A jittered tube through `points`."""
        pts = np.asarray(points, float) + self.j * self.rng.normal(0, 3, (len(points), 3))
        return tube(pts, radii, self.cv.min_r)

    def paint(self, name, tissue, shape, within="core", over=None, hu=None) -> None:
        value = self.base.setdefault(name, self.hu(tissue)) if hu is None else hu
        over_ids = None if over is None else [self.ids.get(o, 0) for o in over]
        self.cv.paint(self.ids[name], value, shape, within, over_ids)

    # fmt: off
    def soft_tissue(self, mods: dict) -> None:
        E, T, paint, base = self.E, self.T, self.paint, self.base
        mirror = lambda pts, s: [(s * x, y, z) for x, y, z in pts]
        for side, s in _SIDES:  # muscles of the back, pelvis and hips, in the trunk wall under the fat
            paint(f"autochthon_{side}", "muscle",
                  T(mirror([(30, -85, 240), (30, -90, 420), (28, -90, 640)], s), [24, 21, 18]), "trunk")
            paint(f"iliopsoas_{side}", "muscle",
                  T(mirror([(40, -40, 390), (55, -35, 300), (70, -15, 210), (72, 20, 120)], s),
                    [10, 20, 22, 17]), "trunk")
            paint(f"gluteus_maximus_{side}", "muscle", E((s * 85, -80, 150), (55, 32, 65)), "trunk")
            paint(f"gluteus_medius_{side}", "muscle", E((s * 110, -45, 200), (28, 40, 40)), "trunk")
            paint(f"gluteus_minimus_{side}", "muscle", E((s * 100, -25, 180), (16, 26, 28)), "trunk")

        # Lungs, split into lobes by the oblique and (right) horizontal fissures.
        lung_hu = base.setdefault("lung", self.hu("lung"))
        fissure = 575 + self.j * self.rng.normal(0, 8)
        lower = lambda X, Y, Z: Z < fissure - 0.8 * (Y + 90)
        middle = lambda X, Y, Z: ~lower(X, Y, Z) & (Z < 515) & (Y > -25)
        for side, s in _SIDES:
            lung = E((s * 74, -2, 545), (62, 92, 112), p=2.4)
            paint(f"lung_upper_lobe_{side}", "lung", lung, hu=lung_hu)
            paint(f"lung_lower_lobe_{side}", "lung", clipped(lung, lower), hu=lung_hu)
            if side == "right":
                paint("lung_middle_lobe_right", "lung", clipped(lung, middle), hu=lung_hu)
        base.update({name: lung_hu for name in fcat.LUNG_LOBES})

        # Heart and airway.
        blood = base.setdefault("blood", self.hu("blood"))
        paint("heart_myocardium", "myocardium", E((-25, 30, 490), (50, 44, 48), yaw=0.4))
        paint("heart_ventricle_left", "blood", E((-38, 25, 485), (26, 24, 32), yaw=0.4), hu=blood)
        paint("heart_ventricle_right", "blood", E((12, 55, 485), (30, 18, 32), yaw=0.3), hu=blood)
        paint("heart_atrium_right", "blood", E((42, 22, 510), (22, 22, 25)), hu=blood)
        paint("heart_atrium_left", "blood", E((-5, -12, 520), (28, 18, 18)), hu=blood)
        paint("trachea", "trachea", T([(0, 10, 672), (0, 0, 575)], 10), within="body")
        esophagus = [(-5, -28, 672), (-8, -32, 560), (-15, -25, 460), (-35, 10, 432)]
        paint("esophagus", "esophagus", T(esophagus, 8), within="body")

        # Abdomen and pelvis.
        paint("liver", "liver", E((62, 5, 410), (100, 90, 66), p=2.3, yaw=0.2))
        paint("liver", "liver", E((-10, 35, 425), (55, 45, 35)))  # left lobe
        spleen_r = np.array([32.0, 48.0, 55.0]) * mods.get("spleen_scale", 1.0)
        paint("spleen", "spleen", E((-100 - (spleen_r[0] - 32) * 0.5, -45, 420), spleen_r, yaw=-0.5))
        stomach = E((-55, 25, 425), (45, 38, 48))
        paint("stomach", "stomach", stomach)
        paint("stomach", "stomach", E((-10, 40, 392), (25, 20, 18)))  # antrum
        paint("stomach", "air", clipped(stomach, lambda X, Y, Z: Y > 42), hu=-950)  # gas cap, anterior
        paint("gallbladder", "gallbladder", E((65, 55, 365), (15, 18, 30), tilt=0.3))
        kidney = base.setdefault("kidney", self.hu("kidney"))
        adrenal = base.setdefault("adrenal", self.hu("adrenal"))
        for side, s in _SIDES:
            dz = 0 if side == "right" else 15  # the right kidney sits lower, under the liver
            paint(f"kidney_{side}", "kidney",
                  E((s * 70, -55, 345 + dz), (28, 24, 55), yaw=s * 0.3, tilt=0.15), hu=kidney)
            paint(f"adrenal_gland_{side}", "adrenal",
                  E((s * 45, -42, 410 + dz / 3), (6, 14, 18), yaw=s * 0.4), hu=adrenal)
            base[f"kidney_{side}"], base[f"adrenal_gland_{side}"] = kidney, adrenal
        paint("pancreas", "pancreas", T([(30, 0, 362), (-10, 15, 377), (-75, -20, 395)], [16, 12, 11]))
        paint("small_bowel", "bowel", E((0, 25, 285), (100, 72, 80), p=2.5), over=[0])
        paint("duodenum", "bowel",
              T([(-5, 38, 392), (30, 15, 385), (45, 0, 360), (40, 0, 330), (5, -5, 325), (-25, 0, 340)], 11))
        colon = [(85, 10, 230), (90, 0, 350), (80, 30, 380), (0, 60, 355), (-85, 10, 395), (-95, -10, 300),
                 (-85, 0, 230), (-40, 20, 190), (0, -10, 170), (0, -60, 140), (0, -62, 110)]
        paint("colon", "bowel", T(colon, 22))
        paint("urinary_bladder", "bladder", E((0, 45, 135), (40, 35, 32)))

    def vessels(self, mods: dict) -> None:
        """Contrast-enhanced vessels, drawn over the organs they run beside."""
        T, paint, blood = self.T, self.paint, self.base["blood"]
        paint("pulmonary_artery", "blood", T([(8, 58, 505), (-10, 40, 550), (-48, 5, 552)], [12, 12, 9]),
              hu=blood)
        paint("pulmonary_artery", "blood", T([(-10, 40, 550), (35, 10, 548)], [10, 9]), hu=blood)
        aorta = [(5, 30, 520), (5, 30, 575), (-10, 0, 600), (-25, -45, 585), (-22, -50, 520), (-15, -45, 440),
                 (-10, -30, 380), (-8, -25, 300), (-5, -25, 265)]
        paint("aorta", "blood", T(aorta, [14, 14, 13, 12, 12, 11, 11, 10, 9]), hu=blood)
        if "aneurysm_radius" in mods:  # infrarenal bulge, in world millimetres
            r = mods["aneurysm_radius"] / self.cv.k
            paint("aorta", "blood", ellipsoid((-8, -22, 315), (r[0], r[1], 40)), hu=blood,
                  over=["aorta", "small_bowel", "duodenum", "colon", "inferior_vena_cava"])
        ivc = [(22, -28, 265), (25, -28, 380), (28, -10, 445), (40, 20, 490)]
        paint("inferior_vena_cava", "blood", T(ivc, 11), hu=blood)
        paint("portal_vein_and_splenic_vein", "blood",
              T([(55, 10, 412), (25, 5, 385), (-40, -15, 390), (-85, -30, 405)], [8, 7, 6, 6]), hu=blood)
        for side, s in _SIDES:
            artery = [(-5, -25, 265), (s * 45 - 5, -15, 200), (s * 70, 5, 130)]
            vein = [(22, -28, 265), (s * 45 + 10, -28, 200), (s * 70, -5, 130)]
            paint(f"iliac_artery_{side}", "blood", T(artery, 6), hu=blood)
            paint(f"iliac_vena_{side}", "blood", T(vein, 7), hu=blood)

    def skeleton(self) -> None:
        """Bones last, so they stay whole; all get marrow HU here and a cortex later (`_cortex`)."""
        E, T, cv = self.E, self.T, self.cv
        marrow = self.base.setdefault("marrow", self.hu("marrow"))
        bone = lambda name, shape, **kw: self.paint(name, "marrow", shape, "body", hu=marrow, **kw)
        for name, z0, z1 in _vertebra_levels():  # body, arch around the canal, spinous process
            zc, y = (z0 + z1) / 2, float(np.interp((z0 + z1) / 2, _SPINE_Z, _SPINE_Y))
            rv, h = (22 if "L" in name else 16 if "T" in name else 12), (z1 - z0) / 2 - 2
            bone(name, ellipsoid((0, y, zc), (rv, rv * 0.8, h), p=4))
            bone(name, ellipsoid((0, y - rv - 8, zc), (rv + 2, 14, h), p=3))
            bone(name, ellipsoid((0, y - rv - 26, zc - 4), (5, 16, h * 0.8)))
            cv.paint(0, HU["csf"], ellipsoid((0, y - rv - 6, zc), (max(7, cv.min_r), 6, h + 3)), "body",
                     over=[self.ids[name]])
        for i, (_, z0, z1) in enumerate(_vertebra_levels()[5:17]):  # T12 .. T1 carry ribs 12 .. 1
            rib, zt = 12 - i, (z0 + z1) / 2
            rx, ry = np.interp(zt, _TRUNK_Z, _TRUNK_RX) - 9, np.interp(zt, _TRUNK_Z, _TRUNK_RY) - 8
            reach = np.deg2rad(150 if rib <= 10 else 95 - 10 * (rib - 11))  # 11 and 12 float short
            phi = np.linspace(np.deg2rad(25), reach, 7)  # angle from the back, round the side to the front
            drop = 45 * (phi - phi[0]) / (np.deg2rad(150) - phi[0])  # ribs slope down anteriorly
            for side, s in _SIDES:
                path = zip(s * rx * np.sin(phi), -ry * np.cos(phi), zt - drop, strict=True)
                bone(f"rib_{side}_{rib}", T(list(path), 6))
        bone("sacrum", ellipsoid((0, -78, 200), (46, 22, 48), tilt=-0.4))
        for side, s in _SIDES:
            for c, r, kw in (((s * 85, -45, 205), (20, 55, 45), dict(yaw=s * 0.5)),  # iliac wing
                             ((s * 80, 0, 140), (30, 30, 35), {}),                  # acetabulum
                             ((s * 35, 45, 120), (35, 12, 15), {}),                 # pubis
                             ((s * 60, -15, 105), (18, 25, 25), {})):               # ischium
                bone(f"hip_{side}", E(c, r, **kw))
            bone(f"femur_{side}", ellipsoid((s * 85, 5, 138), (23, 23, 23)))
            bone(f"femur_{side}", T([(s * 85, 5, 138), (s * 110, -5, 110), (s * 102, 0, -10)], [15, 16, 15]))
            bone(f"scapula_{side}", E((s * 105, -86, 580), (40, 7, 50), yaw=s * 0.6), over=[0])  # on the back
            bone(f"clavicula_{side}", T([(s * 15, 40, 640), (s * 70, 35, 652), (s * 130, 0, 648)], 8))
    # fmt: on


_SIDES = (("right", 1), ("left", -1))


def _draw_anatomy(cv: _Canvas, rng, j: float, mods: dict) -> dict[str, float]:
    """Paint every organ; returns the per-patient base HU of each label (lesions are drawn relative to it)."""
    anatomy = _Anatomy(cv, rng, j)
    anatomy.soft_tissue(mods)
    anatomy.vessels(mods)
    anatomy.skeleton()
    return anatomy.base


def _cortex(cv: _Canvas, rng, j: float) -> None:
    """Bone voxels on the bone's surface get cortical attenuation, the inside keeps marrow."""
    bone_ids = [organs.organ_id(n) for n in BONES]
    bone = np.isin(cv.label, bone_ids)
    inner = bone.copy()
    for ax in range(3):
        for step in (1, -1):
            inner &= np.roll(bone, step, axis=ax)
    cv.hu[bone & ~inner] = HU["cortex"] + j * rng.uniform(-60, 60)


def _smooth_field(shape, rng, cells: int = 6) -> np.ndarray:
    """Low-frequency noise (std ~0.5): a coarse random grid, linearly interpolated up one axis at a time
    (gathers and lerps only: no BLAS call, whose thread pool costs more than the work at these sizes)."""
    out = rng.standard_normal(tuple(max(2, n // cells + 2) for n in shape)).astype(np.float32)
    for ax, n in enumerate(shape):
        pos = np.linspace(0, out.shape[ax] - 1, n, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), out.shape[ax] - 2)
        frac = (pos - lo).astype(np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        out = out.take(lo, axis=ax) * (1 - frac) + out.take(lo + 1, axis=ax) * frac
    return out


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


def _choose_findings(rng, config: PhantomConfig) -> list[dict]:
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
_RENDER_ORDER = {"enlargement": 0, "diffuse": 0, "fluid": 1, "wall": 1, "focal": 2}


def _render_finding(cv: _Canvas, fd: dict, base: dict, tumor: np.ndarray, lesions: np.ndarray, rng) -> None:
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
    chosen = _choose_findings(rng_find, config)
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
    cv = _Canvas(config, scale, shift)
    mods: dict = {}
    for fd in chosen:
        if fd["name"] == "splenomegaly":
            mods["spleen_scale"] = fd["size_mm"] / (2 * 55.0 * cv.k[2])
        elif fd["name"] == "aortic_aneurysm":
            mods["aneurysm_radius"] = np.full(3, fd["size_mm"] / 2)
    _body_regions(cv, rng_anat, j)
    base = _draw_anatomy(cv, rng_anat, j, mods)
    _cortex(cv, rng_anat, j)
    sb = cv.label == organs.organ_id("small_bowel")  # loops of bowel with fat between them
    loops = _smooth_field(cv.shape, rng_anat, cells=3)
    gaps = sb & (loops < -0.35)
    cv.label[gaps], cv.hu[gaps] = 0, HU["fat"] + 8
    colon = cv.label == organs.organ_id("colon")
    cv.hu[colon & (loops > 0.1)] = -900  # gas in the colon

    tumor = np.zeros(cv.shape, np.uint8)
    lesions = np.zeros(cv.shape, np.uint8)
    for fd in sorted(chosen, key=lambda fd: _RENDER_ORDER[fd["kind"]]):  # stable: catalogue order within
        _render_finding(cv, fd, base, tumor, lesions, rng_place)

    hu = cv.hu
    if config.blur_vox > 0:
        hu = ndimage.gaussian_filter(hu, config.blur_vox, mode="nearest")
    hu += config.texture_hu * _smooth_field(cv.shape, rng_noise, cells=4)
    hu += rng_noise.normal(0, config.noise_hu, cv.shape).astype(np.float32)
    volume = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return SyntheticCase(
        volume, cv.label, config.affine(), spacing, report, organ_texts, abnormal, chosen, tumor, lesions
    )


PHANTOM_ORGANS = fcat.PHANTOM_ORGANS
_CATALOGUE_INDEX = {f.name: i for i, f in enumerate(fcat.FINDINGS)}
