"""Synthetic abdominal CT phantoms with realistic Hounsfield units and liver/tumour ground truth.

Geometry is defined in millimetres in patient coordinates (DICOM LPS: +x patient left, +y posterior, +z head), so
the field of view stays that of a real abdomen at any matrix size. Every random choice comes from one
`numpy.random.Generator`, so a phantom is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from livernode.imaging.volume import LIVER, TUMOUR

HU_AIR, HU_FAT, HU_MUSCLE, HU_BLOOD = -1000.0, -100.0, 50.0, 160.0


@dataclass(frozen=True)
class Phantom:
    """HU volume (slices, rows, cols) int16 with labels, ordered inferior to superior (ascending z)."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]  # (slice step, row, col) mm
    origin: tuple[float, float, float]  # position of the first voxel of the first slice, mm
    tumour_count: int


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _ellipsoid_section(x, y, z, c, r) -> np.ndarray:
    """Cross-section of an axis-aligned ellipsoid (centre c, semi-axes r) at height z."""
    dz = (z - c[2]) / r[2]
    if abs(dz) >= 1:
        return np.zeros_like(x, dtype=bool)
    s = np.sqrt(1 - dz * dz)
    return _ellipse(x, y, c[0], c[1], r[0] * s, r[1] * s)


def make_phantom(rng: np.random.Generator, size: int = 512, slices: int = 64,
                 thickness: float | None = None) -> Phantom:
    """One synthetic abdomen: body wall, fat, muscle, spine, ribs, aorta and IVC, kidneys, spleen, stomach,
    bowel, and a liver with hepatic vessels and 0-6 hypodense tumours of 5-40 mm diameter. `thickness` (mm) fixes
    the slice step, which is otherwise drawn from 1 to 5 mm; every other draw is the same either way."""
    spacing_512 = rng.uniform(0.6, 0.9)
    px = spacing_512 * 512 / size  # same field of view as a 512 matrix
    drawn = float(np.round(rng.uniform(1.0, 5.0) * 2) / 2)
    thickness = drawn if thickness is None else float(thickness)
    coords = (np.arange(size) - (size - 1) / 2) * px
    x, y = np.meshgrid(coords, coords)  # x along columns (patient left), y along rows (posterior)

    body_a, body_b = rng.uniform(140, 175), rng.uniform(105, 130)
    fat = rng.uniform(8, 25)
    wall = rng.uniform(8, 14)
    cav_a, cav_b = body_a - fat - wall, body_b - fat - wall

    liver_c = np.array([-cav_a * rng.uniform(0.3, 0.45), -cav_b * rng.uniform(0.05, 0.2), 0.0])
    liver_r = np.array([rng.uniform(55, 80), rng.uniform(55, 75), rng.uniform(65, 85)])
    harmonics = [(k, rng.uniform(0.03, 0.09) / k**0.5, rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 2.5),
                  rng.uniform(0, 2 * np.pi)) for k in range(2, 6)]
    lobe_shift = rng.uniform(20, 45)  # left lobe reaches towards the midline in the upper liver
    liver_hu = rng.uniform(55, 65)

    # 8-14 HU of quantum noise at 512 px; a coarser matrix averages neighbouring detector samples, and since CT
    # noise is spatially correlated the reduction is taken as the square root of the pixel-size ratio.
    noise_sd = rng.uniform(8, 14) * np.sqrt(min(1.0, size / 512))
    span = slices * thickness
    z0 = -span / 2 + rng.uniform(-0.15, 0.15) * min(span, 2 * liver_r[2]) + thickness / 2
    zs = z0 + np.arange(slices) * thickness

    spleen_c = (cav_a * rng.uniform(0.45, 0.6), cav_b * rng.uniform(0.1, 0.35), liver_r[2] * rng.uniform(0.1, 0.4))
    spleen_r = (rng.uniform(25, 40), rng.uniform(35, 55), rng.uniform(40, 60))
    kid_z = -liver_r[2] * rng.uniform(0.3, 0.6)
    kidneys = [((s * rng.uniform(55, 75), cav_b * 0.45, kid_z + rng.uniform(-15, 15)),
                (rng.uniform(25, 32), rng.uniform(30, 38), rng.uniform(45, 60))) for s in (-1, 1)]
    stomach_c = (cav_a * rng.uniform(0.1, 0.35), -cav_b * rng.uniform(0.3, 0.5), liver_r[2] * rng.uniform(0.2, 0.5))
    stomach_r = (rng.uniform(30, 50), rng.uniform(25, 40), rng.uniform(35, 55))
    spine_c = (0.0, cav_b * rng.uniform(0.55, 0.7))
    bowel = [(rng.uniform(-cav_a * 0.7, cav_a * 0.7), rng.uniform(-cav_b * 0.7, cav_b * 0.3),
              rng.uniform(-liver_r[2] * 1.5, liver_r[2] * 0.2), rng.uniform(8, 18), rng.uniform(-60, 30),
              rng.random() < 0.4) for _ in range(rng.integers(8, 16))]
    vessels = []  # hepatic vessel segments inside the liver: (start, direction, length, radius)
    for _ in range(rng.integers(3, 7)):
        d = rng.normal(size=3)
        vessels.append((liver_c + rng.normal(scale=15, size=3), d / np.linalg.norm(d), rng.uniform(30, 70),
                        rng.uniform(2.0, 4.5)))

    def liver_mask(z: float) -> np.ndarray:
        dz = (z - liver_c[2]) / liver_r[2]
        if abs(dz) >= 1.05:
            return np.zeros_like(x, dtype=bool)
        cx = liver_c[0] + (lobe_shift * max(dz, 0.0))
        theta = np.arctan2(y - liver_c[1], x - cx)
        bound = np.ones_like(x)
        for k, amp, ph, m, q in harmonics:
            bound += amp * np.sin(k * theta + ph) * np.cos(m * dz + q)
        rr = ((x - cx) / liver_r[0]) ** 2 + ((y - liver_c[1]) / liver_r[1]) ** 2 + dz * dz
        return (rr <= bound**2) & _ellipse(x, y, 0, 0, cav_a, cav_b)

    livers = np.stack([liver_mask(z) for z in zs])
    # Tumours: centres drawn from liver voxels so they sit in the parenchyma; clipped to the liver.
    tumours = []
    n_tumours = int(rng.integers(0, 7))
    idx = np.argwhere(livers)
    for _ in range(n_tumours if len(idx) else 0):
        k, r, c = idx[rng.integers(len(idx))]
        centre = (coords[c], coords[r], zs[k])
        radius = rng.uniform(2.5, 20.0)
        tumours.append((centre, radius * rng.uniform(0.8, 1.2, size=3), liver_hu - rng.uniform(25, 50)))

    hu = np.empty((slices, size, size), np.int16)
    labels = np.zeros((slices, size, size), np.uint8)
    for k, z in enumerate(zs):
        img = np.full(x.shape, HU_AIR, np.float32)
        img[_ellipse(x, y, 0, 0, body_a, body_b)] = HU_FAT
        img[_ellipse(x, y, 0, 0, body_a - fat, body_b - fat)] = HU_MUSCLE
        cavity = _ellipse(x, y, 0, 0, cav_a, cav_b)
        img[cavity] = -80.0  # visceral fat
        for bx, by, bz, br, bhu, gas in bowel:
            if abs(z - bz) < br * 2:
                m = _ellipse(x, y, bx, by, br, br * 0.8) & cavity
                img[m] = bhu
                if gas:
                    img[m & _ellipse(x, y, bx, by - br * 0.3, br * 0.5, br * 0.4)] = -900.0
        img[_ellipsoid_section(x, y, z, stomach_c, stomach_r)] = 15.0
        g = _ellipsoid_section(x, y, z, (stomach_c[0], stomach_c[1] - stomach_r[1] * 0.5, stomach_c[2]),
                               (stomach_r[0] * 0.6, stomach_r[1] * 0.35, stomach_r[2] * 0.6))
        img[g] = -850.0
        for kc, kr in kidneys:
            m = _ellipsoid_section(x, y, z, kc, kr)
            img[m] = 150.0
            img[m & _ellipse(x, y, kc[0], kc[1], kr[0] * 0.4, kr[1] * 0.4)] = 25.0  # sinus
        img[_ellipsoid_section(x, y, z, spleen_c, spleen_r)] = rng.uniform(45, 52)
        # the liver gives way to spine, aorta and psoas, which are drawn over it below
        keep_out = _ellipse(x, y, *spine_c, 24, 21) | _ellipse(x, y, 12, spine_c[1] - 28, 12, 12)
        for s in (-1, 1):
            keep_out |= _ellipse(x, y, s * 35, spine_c[1] + 5, 19, 23)
        liver = livers[k] & ~keep_out
        img[liver] = liver_hu
        lab = np.where(liver, LIVER, 0).astype(np.uint8)
        for start, d, length, rad in vessels:
            # distance from each pixel (at height z) to the segment start + t*d, t in [0, length]
            px_ = np.stack([x - start[0], y - start[1], np.full_like(x, z - start[2])], -1)
            t = np.clip(px_ @ d, 0, length)
            dist = np.linalg.norm(px_ - t[..., None] * d, axis=-1)
            img[(dist < rad) & liver] = HU_BLOOD - 20
        for (cx, cy, cz), r3, thu in tumours:
            m = _ellipsoid_section(x, y, z, (cx, cy, cz), r3) & liver
            if m.any():
                img[m] = thu
                lab[m] = TUMOUR
        # psoas and paraspinal muscles, spine, aorta, IVC
        for s in (-1, 1):
            img[_ellipse(x, y, s * 35, spine_c[1] + 5, 18, 22) & cavity] = HU_MUSCLE
            img[_ellipse(x, y, s * 30, body_b - fat - 25, 28, 20)] = HU_MUSCLE + 5
        img[_ellipse(x, y, *spine_c, 20, 17)] = 700.0
        img[_ellipse(x, y, *spine_c, 16, 13)] = 250.0
        img[_ellipse(x, y, spine_c[0], spine_c[1] + 27, 8, 7)] = 20.0  # spinal canal
        img[_ellipse(x, y, 12, spine_c[1] - 28, 11, 11)] = HU_BLOOD
        img[_ellipse(x, y, -22, spine_c[1] - 30, 12, 9)] = HU_BLOOD - 30
        # ribs around the upper abdomen, on the ring between muscle wall and fat
        if z > liver_c[2] - liver_r[2] * 0.3:
            for ang in np.radians([20, 45, 70, 110, 135, 160, -25, -155]):
                rx = np.cos(ang) * (body_a - fat - wall / 2)
                ry = np.sin(ang) * (body_b - fat - wall / 2)
                img[_ellipse(x, y, rx, ry, 6, 5)] = 650.0
        # structures that sit outside the liver even where the liver ellipsoid reaches them
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=max(0.5, 0.6 / px * 0.9))
        img += rng.normal(0, noise_sd, img.shape).astype(np.float32)
        hu[k] = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
        labels[k] = lab
    origin = (float(coords[0]), float(coords[0]), float(zs[0]))
    return Phantom(hu=hu, labels=labels, spacing=(thickness, px, px), origin=origin,
                   tumour_count=len(tumours))
