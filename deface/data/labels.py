"""The label definition: which voxels are face, brain and background (see docs/labels.md).

The face region is defined analytically in MNI (ICBM152) world coordinates, so it can be
evaluated for any voxel of any scan once the scan is registered to MNI space, including
voxels below the template's field of view (lips and chin).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from deface import BACKGROUND, BRAIN, FACE

# Sagittal boundary of the face region: (y, z) knots in MNI mm; the region lies anterior.
FACE_BOUNDARY_Z = np.array([-200.0, -90.0, -30.0, 20.0])
FACE_BOUNDARY_Y = np.array([0.0, 0.0, 30.0, 60.0])
FACE_TOP_Z = 20.0  # brow ridge / lower forehead
FACE_BOTTOM_Z = -125.0  # below the chin
BRAIN_GAP_MM = 3.0  # face labels keep this distance from the brain label

# BrainWeb crisp tissue classes.
BW_CSF, BW_GM, BW_WM, BW_FAT, BW_MUSCLE, BW_SKIN, BW_SKULL, BW_VESSEL, BW_CONN, BW_DURA, BW_MARROW = range(1, 12)


def face_region_mni(points: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
    """Whether MNI-space points (..., 3) lie in the face region (anterior-inferior wedge),
    optionally grown by ``margin_mm`` backwards, upwards and downwards."""
    y, z = points[..., 1], points[..., 2]
    boundary = np.interp(z, FACE_BOUNDARY_Z, FACE_BOUNDARY_Y)
    return (y >= boundary - margin_mm) & (z <= FACE_TOP_Z + margin_mm) & (z >= FACE_BOTTOM_Z - margin_mm)


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


def compose_labels(head: np.ndarray, brain: np.ndarray, to_mni: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label map from a head mask, a brain mask and the voxel -> MNI world affine.

    Face = head tissue inside the MNI face region and at least ``BRAIN_GAP_MM`` from the brain.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    mni = voxel_world(head.shape, to_mni @ affine)
    near_brain = ndi.binary_dilation(brain, ball(BRAIN_GAP_MM / spacing))
    face = head & face_region_mni(mni) & ~near_brain
    labels = np.full(head.shape, BACKGROUND, np.uint8)
    labels[face] = FACE
    labels[brain] = BRAIN
    return labels


def brainweb_brain(tissue: np.ndarray) -> np.ndarray:
    """Brain + CSF + dura from BrainWeb tissue classes, holes and vessels inside filled."""
    mask = np.isin(tissue, [BW_CSF, BW_GM, BW_WM, BW_DURA])
    mask = ndi.binary_opening(mask, iterations=2)
    mask = largest_component(mask)
    mask = ndi.binary_closing(mask, iterations=3)
    return ndi.binary_fill_holes(mask)


def brainweb_labels(tissue: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Labels for a BrainWeb crisp model (already in MNI space, so ``to_mni`` is identity)."""
    brain = brainweb_brain(tissue)
    head = ndi.binary_fill_holes(tissue > 0)
    return compose_labels(head, brain, np.eye(4), affine)
