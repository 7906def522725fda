"""The phantom's drawing surface (`synthetic.py`): tissue attenuations, shapes as functions of canonical
body coordinates (mm) with a bounding box, and the canvas that maps them onto the configured voxel grid."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ctglip_jax.phantom import findings as fcat

CANON_EXTENT = np.array([384.0, 308.0, 672.0])  # canonical field of view, mm
CANON_CENTER = np.array([0.0, 0.0, 336.0])

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


class Canvas:
    """Label and HU arrays plus the canonical coordinate of every voxel index along each axis (`config`: a
    `synthetic.PhantomConfig`)."""

    def __init__(self, config, scale: np.ndarray, shift: np.ndarray):
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
