"""The label definition: which voxels are face, brain and background (see docs/labels.md).

The face region is defined analytically in MNI (ICBM152) world coordinates, so it can be
evaluated for any voxel of any scan once the scan is registered to MNI space, including
voxels below the template's field of view (lips and chin).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from deface import BACKGROUND, BRAIN, FACE
from deface.anatomy import ball, face_region_mni, largest_component, voxel_world
from deface.preprocessing import voxel_sizes

BRAIN_GAP_MM = 3.0  # face labels keep this distance from the brain label

# BrainWeb crisp tissue classes.
BW_CSF, BW_GM, BW_WM, BW_FAT, BW_MUSCLE, BW_SKIN, BW_SKULL, BW_VESSEL, BW_CONN, BW_DURA, BW_MARROW = range(1, 12)


def compose_labels(head: np.ndarray, brain: np.ndarray, to_mni: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label map from a head mask, a brain mask and the voxel -> MNI world affine.

    Face = head tissue inside the MNI face region and at least ``BRAIN_GAP_MM`` from the brain.
    """
    spacing = voxel_sizes(affine)
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
