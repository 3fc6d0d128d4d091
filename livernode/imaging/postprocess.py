"""Post-processing of a label volume into findings: one liver, tumours inside it, lesions as 3-D components."""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
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
    diameter_line: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)  # slice, row0, col0, row1, col1: its ends


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


def _longest_axial_diameter(mask: np.ndarray, row_mm: float, col_mm: float
                            ) -> tuple[float, tuple[int, int, int, int, int]]:
    """Largest in-plane distance between two voxels of the lesion on any one slice (voxel centres, mm), and
    where: (slice, row0, col0, row1, col1) of its ends, in `mask`'s coordinates."""
    best, line = 0.0, (0, 0, 0, 0, 0)
    for k, sl in enumerate(mask):
        pts = np.argwhere(sl)
        if len(pts) < 2:
            if len(pts) and min(row_mm, col_mm) > best:
                best, line = min(row_mm, col_mm), (k, *pts[0], *pts[0])
            continue
        if len(pts) > 64:  # the farthest pair are vertices of the convex hull (scaling the axes keeps it a hull)
            pts = cv2.convexHull(pts.astype(np.int32)).reshape(-1, 2)
        xy = pts * np.array([row_mm, col_mm])
        dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        i, j = np.unravel_index(int(dist.argmax()), dist.shape)
        if dist[i, j] > best:
            best, line = float(dist[i, j]), (k, *pts[i], *pts[j])
    return best, tuple(int(v) for v in line)


def _near(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float, slab: int = 32) -> np.ndarray:
    """Voxels within `margin_mm` of `mask` (Euclidean, spacing honoured), computed on the mask's bounding box grown
    by the margin. With square pixels (CT's usual case) from exact 2-D distance maps, one per slice: the 3-D
    distance to the mask is the least, over the slices z' within the margin, of sqrt(d_z'^2 + ((z - z') dz)^2).
    Otherwise a 3-D distance transform a slab of slices at a time (about 20 bytes a voxel for one slab)."""
    out = np.zeros_like(mask)
    box = _grown_box(mask, spacing, margin_mm)
    if box is None:
        return out
    (z0, z1), rows, cols = (box[0].start, box[0].stop), box[1], box[2]
    if np.isclose(spacing[1], spacing[2], rtol=1e-6, atol=0.0):
        out[z0:z1, rows, cols] = _near_by_slices(mask[:, rows, cols], spacing, margin_mm, z0, z1)
        return out
    reach = _margin_voxels(spacing, margin_mm)[0]
    for start in range(z0, z1, slab):
        stop = min(z1, start + slab)
        lo, hi = max(0, start - reach), min(mask.shape[0], stop + reach)
        near = ndimage.distance_transform_edt(~mask[lo:hi, rows, cols], sampling=spacing) <= margin_mm
        out[start:stop, rows, cols] = near[start - lo:stop - lo]
    return out


def _near_by_slices(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float, z0: int,
                    z1: int) -> np.ndarray:
    """`_near` for square pixels, for slices z0:z1 of `mask` (which holds all of the mask's voxels)."""
    reach, within = _square_margin(spacing, margin_mm)
    lo, hi = max(0, z0 - reach), min(mask.shape[0], z1 + reach)
    maps: dict[int, np.ndarray | None] = {}  # the 2 * reach + 1 slices in use: memory of a few slices, not a volume

    def squared(k: int) -> np.ndarray | None:
        """Squared in-plane distance in pixels to slice k's mask (None: no mask there): an integer, recovered
        exactly by rounding from OpenCV's exact (float32) Euclidean map."""
        if k not in maps:
            for old in [j for j in maps if j < k - 2 * reach]:
                del maps[old]
            maps[k] = None
            if mask[k].any():
                d = cv2.distanceTransform((~mask[k]).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
                maps[k] = np.rint(np.square(d, dtype=np.float64)).astype(np.int32)
        return maps[k]

    out = np.zeros((z1 - z0,) + mask.shape[1:], bool)
    for z in range(z0, z1):
        for k in range(max(lo, z - reach), min(hi, z + reach + 1)):
            d2 = squared(k)
            if d2 is not None:
                out[z - z0] |= d2 <= within[abs(k - z)]  # d2 * pixel^2 + ((k - z) dz)^2 <= margin^2
    return out


def _near_at(mask: np.ndarray, query: np.ndarray, spacing: tuple[float, float, float], margin_mm: float,
             budget: int = 20_000_000) -> np.ndarray:
    """`query & _near(mask, spacing, margin_mm)`, looked up around the query's voxels only (a network's stray
    tumour specks outside the liver: a few thousand voxels, where `_near` would make a distance map of every slice of
    the liver). With square pixels, each query voxel is tested against the offsets within the margin, under the
    same exact test as `_near_by_slices`; when that would take more than `budget` look-ups, or the pixels are not
    square, `_near` itself is used."""
    if not np.isclose(spacing[1], spacing[2], rtol=1e-6, atol=0.0):
        return query & _near(mask, spacing, margin_mm)
    reach, within = _square_margin(spacing, margin_mm)
    side = int(np.sqrt(within[0])) + 1
    yy, xx = np.mgrid[-side:side + 1, -side:side + 1]
    yy, xx = yy.ravel(), xx.ravel()
    d2 = yy * yy + xx * xx
    box = _box(query)
    if box is None:
        return np.zeros_like(query)
    points = np.argwhere(query[box])
    if len(points) * sum(int((d2 <= within[abs(z)]).sum()) for z in range(-reach, reach + 1)) > budget:
        return query & _near(mask, spacing, margin_mm)
    offsets = [(z, y, x) for z in range(-reach, reach + 1)
               for y, x in zip(yy[d2 <= within[abs(z)]], xx[d2 <= within[abs(z)]])]
    # the mask around the query's box, grown by the reach and zero beyond the volume: every look-up is inside
    pad = (reach, side, side)
    lo = [b.start - g for b, g in zip(box, pad)]
    grown = np.zeros([b.stop + g - a for b, g, a in zip(box, pad, lo)], bool)
    src = tuple(slice(max(0, a), min(n, b.stop + g)) for a, b, g, n in zip(lo, box, pad, mask.shape))
    grown[tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))] = mask[src]
    flat = np.ravel_multi_index((points + pad).T, grown.shape)
    steps = np.array([grown.shape[1] * grown.shape[2], grown.shape[2], 1])
    shifts = np.array(offsets, np.int64) @ steps
    cells = grown.ravel()
    hit = np.empty(len(flat), bool)
    for i in range(0, len(flat), 512):  # 512 voxels x a few hundred offsets at a time
        hit[i:i + 512] = cells[flat[i:i + 512, None] + shifts[None, :]].any(axis=1)
    out = np.zeros_like(query)
    out[tuple((points[hit] + [b.start for b in box]).T)] = True
    return out


def _square_margin(spacing: tuple[float, float, float], margin_mm: float) -> tuple[int, list[int]]:
    """For square pixels: how many slices away the margin reaches, and for each of those steps the largest
    squared in-plane distance in pixels (an integer) still within the margin: the exact test that `_near_by_slices`
    and `_near_at` share."""
    dz, pixel = spacing[0], spacing[1]
    reach = int(margin_mm // dz)  # slices farther than this are beyond the margin whatever the in-plane distance
    return reach, [_largest_within(pixel**2, (step * dz) ** 2, margin_mm**2) for step in range(reach + 1)]


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


def _margin_voxels(spacing: tuple[float, float, float], margin_mm: float) -> list[int]:
    """Voxels along each axis that cover `margin_mm`, plus one."""
    return [int(np.ceil(margin_mm / s)) + 1 for s in spacing]


def _grown_box(labels: np.ndarray, spacing: tuple[float, float, float],
               margin_mm: float) -> tuple[slice, slice, slice] | None:
    """The bounding box of the non-zero labels grown by `margin_mm` (clipped to the volume); None when empty."""
    box = _box(labels)
    if box is None:
        return None
    return tuple(slice(max(0, b.start - g), min(n, b.stop + g))
                 for b, g, n in zip(box, _margin_voxels(spacing, margin_mm), labels.shape))


def _box(labels: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of the non-zero labels (None: there are none), with no full-size temporary."""
    if labels.size == 0:
        return None
    # the slices that hold any label, then the rows and columns of those slices' projection onto one plane
    held = np.flatnonzero(labels.any(axis=(1, 2)))
    if not len(held):
        return None
    plane = labels[held[0]:held[-1] + 1].any(axis=0)
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in (held, rows, cols))


def postprocess(labels: np.ndarray, spacing: tuple[float, float, float], *, min_lesion_ml: float = 0.05,
                liver_margin_mm: float = 5.0, overwrite: bool = False) -> Findings:
    """Largest 3-D liver component with holes filled; tumour kept only inside the (dilated) liver; lesions below
    `min_lesion_ml` dropped; remaining tumour split into 3-D connected components (26-connectivity).

    Works inside the bounding box of what the network labelled, grown by the liver margin: component labelling
    needs 4 bytes per voxel, and a 600-slice study is 157 million voxels of which the abdomen's organs are few.
    `overwrite`: the cleaned labels are written into `labels` (where it is a writable uint8 volume), which the
    findings then hold, instead of into a new volume: for a caller with no further use for the network's labels
    (the node, where each fresh allocation of a volume's size costs the first touch of that memory)."""
    box = _grown_box(labels, spacing, liver_margin_mm)
    if box is None:
        return Findings(np.zeros_like(labels, np.uint8), 0.0, 0.0, (), False)
    inner = _postprocess(labels[box], spacing, min_lesion_ml, liver_margin_mm)
    if overwrite and labels.dtype == np.uint8 and labels.flags.writeable:  # (Ray's shared arrays are read-only)
        out = labels  # beyond the box it holds no label already
    else:
        out = np.zeros_like(labels, np.uint8)
    out[box] = inner.labels
    offset = tuple(b.start for b in box) * 2
    at = (box[0].start, box[1].start, box[2].start, box[1].start, box[2].start)
    lesions = tuple(Lesion(le.index, le.voxels, le.volume_ml, le.longest_axial_diameter_mm,
                           tuple(int(a + o) for a, o in zip(le.bbox, offset)),
                           tuple(int(a + o) for a, o in zip(le.diameter_line, at))) for le in inner.lesions)
    return Findings(out, inner.liver_volume_ml, inner.tumour_volume_ml, lesions,
                    bool(out[0].any() or out[-1].any()))


def _postprocess(labels: np.ndarray, spacing: tuple[float, float, float], min_lesion_ml: float,
                 liver_margin_mm: float) -> Findings:
    """`postprocess` inside the box. Components are labelled once for the organ and once for the tumour
    (connected-components-3d: the same 26-connected components as scipy's ndimage.label, in a fifth of the time);
    sizes and lesion boxes come from the labelled voxels alone, and each lesion is then visited only inside its own
    box. Components are numbered as ndimage.label numbers them (by their first voxel in C order), so the liver
    among equally large components and the lesions' order are scipy's."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    organ = labels > 0
    comp, n = cc3d.connected_components(organ, connectivity=26, return_N=True)
    keep = _largest(comp, n, organ)
    del organ  # freed before the liver's own mask: the peak stays at comp, labels and one mask
    if keep == 0:
        return Findings(np.zeros_like(labels, np.uint8), 0.0, 0.0, (), False)
    liver = comp == keep
    del comp  # 4 bytes a voxel
    box = _box(liver)
    for k in range(box[0].start, box[0].stop):  # holes are filled slice by slice, inside the organ's box only
        liver[k, box[1], box[2]] = fill_holes_2d(liver[k, box[1], box[2]])
    tumour = labels == TUMOUR
    outside = tumour > liver  # tumour and not liver, in one pass and one mask
    if outside.any():  # only tumour outside the liver needs the distance to it
        tumour &= liver  # the tumour inside it, then that outside it within the margin
        tumour |= _near_at(liver, outside, spacing, liver_margin_mm)
    del outside
    out = liver.view(np.uint8)  # the liver's own mask becomes the output: no copy, no new volume
    out *= LIVER
    del liver
    lesions, tumour_voxels = [], 0
    tbox = _box(tumour)
    if tbox is not None:  # lesions are labelled inside the tumour's own bounding box (4 bytes a voxel)
        inside = tumour[tbox]
        del tumour
        tcomp, tn = cc3d.connected_components(inside, connectivity=26, return_N=True)
        for i, local, vox in _components(tcomp, tn, inside, min_voxels=min_lesion_ml / voxel_ml):
            m = tcomp[local] == i
            sl = tuple(slice(t.start + b.start, t.start + b.stop) for t, b in zip(tbox, local))
            out[sl][m] = TUMOUR
            tumour_voxels += vox
            diameter, (k, r0, c0, r1, c1) = _longest_axial_diameter(m, spacing[1], spacing[2])
            lesions.append(Lesion(
                index=len(lesions) + 1, voxels=vox, volume_ml=vox * voxel_ml, longest_axial_diameter_mm=diameter,
                bbox=(sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop),
                diameter_line=(sl[0].start + k, sl[1].start + r0, sl[2].start + c0, sl[1].start + r1,
                               sl[2].start + c1)))
    return Findings(
        labels=out,
        liver_volume_ml=float(np.count_nonzero(out)) * voxel_ml,  # liver and tumour
        tumour_volume_ml=float(tumour_voxels) * voxel_ml,  # the lesions kept are disjoint
        lesions=tuple(lesions),
        liver_touches_scan_edge=bool(out[0].any() or out[-1].any()),
    )


def _largest(comp: np.ndarray, n: int, mask: np.ndarray, chunk: int = 8) -> int:
    """The label of the largest of the `n` components in `comp` (0: none; `mask`: its non-zero voxels); of equally
    large ones, the one met first in C order (as scipy's numbering and argmax would choose). Counted a few slices
    at a time over the labelled voxels only: np.bincount converts its input to int64 first, 8 bytes a voxel, and
    the background is most of the volume."""
    if n == 0:
        return 0
    sizes = np.zeros(n + 1, np.int64)
    for start in range(0, len(comp), chunk):
        sizes += np.bincount(comp[start:start + chunk][mask[start:start + chunk]], minlength=n + 1)
    sizes[0] = 0
    ties = np.flatnonzero(sizes == sizes.max())
    if len(ties) == 1:
        return int(ties[0])
    first = {}
    for start in range(0, len(comp), chunk):  # rare: where each tied component is first met
        part = comp[start:start + chunk].ravel()
        for t in ties:
            if t not in first and (hit := np.flatnonzero(part == t)).size:
                first[int(t)] = (start, int(hit[0]))
    return min(first, key=first.__getitem__)


def _components(comp: np.ndarray, n: int, mask: np.ndarray, min_voxels: float
                ) -> list[tuple[int, tuple[slice, slice, slice], int]]:
    """(label, bounding box, voxels) of every component in `comp` (labels 1..n; `mask`: its non-zero voxels) with
    at least `min_voxels` voxels, in scipy's order (by first voxel in C order), with no pass over the volume per
    component."""
    # Sizes by counting the labelled voxels, every box from ndimage.find_objects, and a kept component's first
    # voxel from the first slice of its box alone (that slice is the component's smallest index along axis 0).
    if n == 0:
        return []
    sizes = np.bincount(comp[mask], minlength=n + 1)
    boxes = ndimage.find_objects(comp, max_label=n)
    found = []
    for j in np.flatnonzero(sizes[1:] >= max(min_voxels, 1)) + 1:
        box = boxes[j - 1]
        z = box[0].start
        at = int(np.flatnonzero(comp[z, box[1], box[2]].ravel() == j)[0])  # C order within its first slice
        r, c = divmod(at, box[2].stop - box[2].start)
        found.append(((z, box[1].start + r, box[2].start + c), int(j), box, int(sizes[j])))
    found.sort()  # scipy numbers them in the order it meets them
    return [(j, box, size) for _, j, box, size in found]
