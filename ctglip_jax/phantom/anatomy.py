"""The phantom's anatomy (`synthetic.py`): body outline, organs, vessels and skeleton painted onto a
`Canvas` with per-patient jitter of size, shape, position and attenuation."""

from __future__ import annotations

import numpy as np

from ctglip_jax.data import organs
from ctglip_jax.phantom import findings as fcat
from ctglip_jax.phantom.canvas import BONES, HU, Canvas, Shape, clipped, ellipsoid, tube

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


def body_regions(cv: Canvas, rng, j: float) -> None:
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

    def __init__(self, cv: Canvas, rng, jitter: float):
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


def draw_anatomy(cv: Canvas, rng, j: float, mods: dict) -> dict[str, float]:
    """Paint every organ; returns the per-patient base HU of each label (lesions are drawn relative to it)."""
    anatomy = _Anatomy(cv, rng, j)
    anatomy.soft_tissue(mods)
    anatomy.vessels(mods)
    anatomy.skeleton()
    return anatomy.base


def cortex(cv: Canvas, rng, j: float) -> None:
    """Bone voxels on the bone's surface get cortical attenuation, the inside keeps marrow."""
    bone_ids = [organs.organ_id(n) for n in BONES]
    bone = np.isin(cv.label, bone_ids)
    inner = bone.copy()
    for ax in range(3):
        for step in (1, -1):
            inner &= np.roll(bone, step, axis=ax)
    cv.hu[bone & ~inner] = HU["cortex"] + j * rng.uniform(-60, 60)


def smooth_field(shape, rng, cells: int = 6) -> np.ndarray:
    """Low-frequency noise (std ~0.5): a coarse random grid, linearly interpolated up one axis at a time
    (gathers and lerps only: no BLAS call, whose thread pool costs more than the work at these sizes)."""
    out = rng.standard_normal(tuple(max(2, n // cells + 2) for n in shape)).astype(np.float32)
    for ax, n in enumerate(shape):
        pos = np.linspace(0, out.shape[ax] - 1, n, dtype=np.float32)
        lo = np.minimum(pos.astype(np.int64), out.shape[ax] - 2)
        frac = (pos - lo).astype(np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        out = out.take(lo, axis=ax) * (1 - frac) + out.take(lo + 1, axis=ax) * frac
    return out
