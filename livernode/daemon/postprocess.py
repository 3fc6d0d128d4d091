"""Post-processing of a label volume into findings: one liver, tumours inside it, lesions as 3-D components."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from livernode.imaging.volume import LIVER, TUMOUR

FULL_3D = np.ones((3, 3, 3), bool)


@dataclass(frozen=True)
class Lesion:
    """One tumour: a 3-D connected component of the tumour mask."""

    index: int
    voxels: int
    volume_ml: float
    longest_axial_diameter_mm: float
    bbox: tuple[int, int, int, int, int, int]  # slice0, row0, col0, slice1, row1, col1 (exclusive)


@dataclass(frozen=True)
class Findings:
    labels: np.ndarray  # cleaned (slices, rows, cols) uint8
    liver_volume_ml: float  # liver parenchyma + tumours, as the liver is reported clinically
    tumour_volume_ml: float
    lesions: tuple[Lesion, ...]
    liver_touches_scan_edge: bool  # the first or last slice holds liver: the organ may be cut off

    @property
    def tumour_burden_percent(self) -> float:
        return 100.0 * self.tumour_volume_ml / self.liver_volume_ml if self.liver_volume_ml else 0.0


def _longest_axial_diameter(mask: np.ndarray, row_mm: float, col_mm: float) -> float:
    """Largest in-plane distance between two voxels of the lesion on any one slice (voxel centres, mm)."""
    best = 0.0
    for sl in mask:
        pts = np.argwhere(sl)
        if len(pts) < 2:
            best = max(best, min(row_mm, col_mm) if len(pts) else 0.0)
            continue
        if len(pts) > 64:  # the farthest pair are vertices of the convex hull (scaling the axes keeps it a hull)
            pts = cv2.convexHull(pts.astype(np.int32)).reshape(-1, 2)
        xy = pts * np.array([row_mm, col_mm])
        d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def _near(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float, slab: int = 32) -> np.ndarray:
    """Voxels within `margin_mm` of `mask` (Euclidean, spacing honoured), computed on the mask's bounding box grown
    by the margin. With square pixels (CT's usual case) from exact 2-D distance maps, one per slice: the 3-D
    distance to the mask is the least, over the slices z' within the margin, of sqrt(d_z'^2 + ((z - z') dz)^2).
    Otherwise a 3-D distance transform a slab of slices at a time (about 20 bytes a voxel for one slab)."""
    out = np.zeros_like(mask)
    box = ndimage.find_objects(mask.astype(np.uint8))
    if not box or box[0] is None:
        return out
    grow = [int(np.ceil(margin_mm / s)) + 1 for s in spacing]
    rows, cols = (slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box[0][1:], grow[1:],
                                                                                     mask.shape[1:]))
    z0, z1 = max(0, box[0][0].start - grow[0]), min(mask.shape[0], box[0][0].stop + grow[0])
    if np.isclose(spacing[1], spacing[2], rtol=1e-6, atol=0.0):
        out[z0:z1, rows, cols] = _near_by_slices(mask[:, rows, cols], spacing, margin_mm, z0, z1)
        return out
    for start in range(z0, z1, slab):
        stop = min(z1, start + slab)
        lo, hi = max(0, start - grow[0]), min(mask.shape[0], stop + grow[0])
        near = ndimage.distance_transform_edt(~mask[lo:hi, rows, cols], sampling=spacing) <= margin_mm
        out[start:stop, rows, cols] = near[start - lo:stop - lo]
    return out


def _near_by_slices(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float, z0: int,
                    z1: int) -> np.ndarray:
    """`_near` for square pixels, for slices z0:z1 of `mask` (which holds all of the mask's voxels)."""
    dz, pixel = spacing[0], spacing[1]
    reach = int(margin_mm // dz)  # slices farther than this are beyond the margin whatever the in-plane distance
    lo, hi = max(0, z0 - reach), min(mask.shape[0], z1 + reach)
    # Squared in-plane distance in pixels to the nearest mask voxel of each slice: an integer, which the rounding
    # recovers exactly from OpenCV's exact (float32) Euclidean map. Slices without the mask: beyond any reach.
    far = np.iinfo(np.int32).max
    d2 = np.full((hi - lo,) + mask.shape[1:], far, np.int32)
    for k in range(lo, hi):
        if mask[k].any():
            d = cv2.distanceTransform((~mask[k]).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            d2[k - lo] = np.rint(np.square(d, dtype=np.float64))
    out = np.zeros((z1 - z0,) + mask.shape[1:], bool)
    for step in range(-reach, reach + 1):
        within = _largest_within(pixel**2, (step * dz) ** 2, margin_mm**2)  # d2 <= within: inside the margin
        for z in range(max(z0, lo - step), min(z1, hi - step)):
            out[z - z0] |= d2[z + step - lo] <= within
    return out


def _largest_within(scale: float, offset: float, limit: float) -> int:
    """The largest integer n with n * scale + offset <= limit (the exact test, not a rounded quotient)."""
    n = int((limit - offset) // scale)
    while (n + 1) * scale + offset <= limit:
        n += 1
    while n >= 0 and n * scale + offset > limit:
        n -= 1
    return n


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """`mask` with its holes filled: background not 4-connected to the border (scipy's binary_fill_holes with its
    default structure), by one flood fill from outside the border instead of repeated dilations."""
    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)
    outside[1:-1, 1:-1] = mask
    cv2.floodFill(outside, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1, flags=4)
    return mask | (outside[1:-1, 1:-1] == 0)


def _box(labels: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of the non-zero labels, from projections (no full-size temporary)."""
    spans = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(labels.any(axis=others))
        if not len(idx):
            return None
        spans.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(spans)


def postprocess(labels: np.ndarray, spacing: tuple[float, float, float], *, min_lesion_ml: float = 0.05,
                liver_margin_mm: float = 5.0) -> Findings:
    """Largest 3-D liver component with holes filled; tumour kept only inside the (dilated) liver; lesions below
    `min_lesion_ml` dropped; remaining tumour split into 3-D connected components (26-connectivity).

    Works inside the bounding box of what the network labelled, grown by the liver margin: component labelling
    needs 4 bytes per voxel, and a 600-slice study is 157 million voxels of which the abdomen's organs are few."""
    box = _box(labels)
    if box is None:
        return Findings(np.zeros_like(labels, np.uint8), 0.0, 0.0, (), False)
    grow = [int(np.ceil(liver_margin_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, b.start - g), min(n, b.stop + g)) for b, g, n in zip(box, grow, labels.shape))
    inner = _postprocess(labels[box], spacing, min_lesion_ml, liver_margin_mm)
    out = np.zeros_like(labels, np.uint8)
    out[box] = inner.labels
    offset = tuple(b.start for b in box) * 2
    lesions = tuple(Lesion(le.index, le.voxels, le.volume_ml, le.longest_axial_diameter_mm,
                           tuple(int(a + o) for a, o in zip(le.bbox, offset))) for le in inner.lesions)
    return Findings(out, inner.liver_volume_ml, inner.tumour_volume_ml, lesions,
                    bool(out[0].any() or out[-1].any()))


def _postprocess(labels: np.ndarray, spacing: tuple[float, float, float], min_lesion_ml: float,
                 liver_margin_mm: float) -> Findings:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    comp, n = ndimage.label(labels > 0, FULL_3D)
    if n == 0:
        return Findings(np.zeros_like(labels, np.uint8), 0.0, 0.0, (), False)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = int(sizes.argmax())
    liver = comp == keep
    box = ndimage.find_objects(comp, max_label=keep)[keep - 1]
    del comp  # 4 bytes a voxel
    for k in range(box[0].start, box[0].stop):  # holes are filled slice by slice, inside the organ's box only
        liver[k, box[1], box[2]] = fill_holes_2d(liver[k, box[1], box[2]])
    tumour = labels == TUMOUR
    if (tumour & ~liver).any():  # only tumour outside the liver needs the distance to it
        tumour &= _near(liver, spacing, liver_margin_mm)
    tcomp, tn = ndimage.label(tumour, FULL_3D)
    out = liver.astype(np.uint8)  # not np.where(liver, LIVER, 0): that makes an 8-byte-a-voxel temporary
    out *= LIVER
    del liver
    lesions = []
    big = np.bincount(tcomp.ravel(), minlength=tn + 1) * voxel_ml >= min_lesion_ml  # sizes first: a noisy
    big[0] = False  # output can hold thousands of specks, each not worth a look
    for i, sl in enumerate(ndimage.find_objects(tcomp), start=1):
        if sl is None or not big[i]:
            continue
        m = tcomp[sl] == i
        vox = int(m.sum())
        out[sl][m] = TUMOUR
        lesions.append(Lesion(
            index=len(lesions) + 1, voxels=vox, volume_ml=vox * voxel_ml,
            longest_axial_diameter_mm=_longest_axial_diameter(m, spacing[1], spacing[2]),
            bbox=(sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop)))
    counts = np.bincount(out.ravel(), minlength=max(LIVER, TUMOUR) + 1)
    return Findings(
        labels=out,
        liver_volume_ml=float(counts[LIVER] + counts[TUMOUR]) * voxel_ml,
        tumour_volume_ml=float(counts[TUMOUR]) * voxel_ml,
        lesions=tuple(lesions),
        liver_touches_scan_edge=bool(out[0].any() or out[-1].any()),
    )
