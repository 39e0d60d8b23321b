"""The face region of the label definition, in MNI space, and the mask helpers that inference
(the atlas guard) and labelling (deface.data) share. See docs/labels.md.

The region is analytic in MNI (ICBM152) world mm, so it can be evaluated at any voxel of any scan
once the scan is registered to MNI space, including below a template's field of view (lips, chin).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

# Sagittal boundary of the face region: (y, z) knots in MNI mm; the region lies anterior.
FACE_BOUNDARY_Z = np.array([-200.0, -90.0, -30.0, 20.0])
FACE_BOUNDARY_Y = np.array([0.0, 0.0, 30.0, 60.0])
FACE_TOP_Z = 20.0  # brow ridge / lower forehead
FACE_BOTTOM_Z = -125.0  # below the chin

# The ears (--ears): head lateral of the skull at the level of the ear canal, in MNI mm. The
# atlas brain reaches |x| = 72 mm; everything removed here is also kept clear of the protected
# (dilated) brain, so the margin to the temporal lobes is the guard's, whatever the registration.
EAR_MIN_X = 74.0
EAR_Y = (-55.0, 10.0)
EAR_Z = (-60.0, 20.0)


def ear_region_mni(points: np.ndarray) -> np.ndarray:
    """Whether MNI-space points (..., 3) lie in either ear's region (lateral boxes)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return (np.abs(x) >= EAR_MIN_X) & (y >= EAR_Y[0]) & (y <= EAR_Y[1]) & (z >= EAR_Z[0]) & (z <= EAR_Z[1])


def face_region_mni(points: np.ndarray, margin_mm: float = 0.0, bottom_margin_mm: float | None = None) -> np.ndarray:
    """Whether MNI-space points (..., 3) lie in the face region (anterior-inferior wedge),
    optionally grown by ``margin_mm`` backwards and upwards, and by ``bottom_margin_mm``
    (default ``margin_mm``) downwards."""
    y, z = points[..., 1], points[..., 2]
    bottom = margin_mm if bottom_margin_mm is None else bottom_margin_mm
    boundary = np.interp(z, FACE_BOUNDARY_Z, FACE_BOUNDARY_Y)
    return (y >= boundary - margin_mm) & (z <= FACE_TOP_Z + margin_mm) & (z >= FACE_BOTTOM_Z - bottom)


def voxel_world(shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World coordinates (X, Y, Z, 3) of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    return idx @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def ball(radius_vox: np.ndarray) -> np.ndarray:
    """An ellipsoidal structuring element with per-axis radius in voxels."""
    r = np.maximum(np.round(radius_vox).astype(int), 0)
    grid = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((g / max(k, 0.5)) ** 2 for g, k in zip(grid, r)) <= 1.0


def fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` with the holes of every 2D slice across ``axis`` filled (a hole open to the outside
    in 3D, like a sinus or the mouth, is often closed within a slice)."""
    return np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(mask, axis, 0)], axis)


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = ndi.sum(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def region_box(region: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``region`` grown by ``margin`` voxels a side, clipped to the grid."""
    nz = np.argwhere(region)
    if not len(nz):
        return tuple(slice(0, n) for n in region.shape)
    lo, hi = np.maximum(nz.min(0) - margin, 0), np.minimum(nz.max(0) + margin + 1, region.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
