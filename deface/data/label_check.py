"""Plausibility checks of a silver-standard label map, so a bad registration never reaches training.

Each check returns a short reason when it fails; an empty list means the labels look like a head.
The ranges come from the labelled heads of this project (BrainWeb: brain incl. CSF and dura
1.4-1.8 L; real adult heads 1.2-2.1 L) with room for small and atrophic brains.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from deface import BRAIN, FACE
from deface.anatomy import ball
from deface.preprocessing import voxel_sizes

BRAIN_ML = (900.0, 2400.0)
MIN_FACE_ML = 60.0
FACE_ANTERIOR_MM = 30.0  # the face's centroid lies at least this far in front of the brain's
MIN_GAP_MM = 2.0  # face voxels this close to a brain voxel (the label keeps labels.BRAIN_GAP_MM) ...
MIN_BRAIN_DICE = 0.9  # against an independent brain extractor's mask, when one is at hand (deepbet:
# 0.936-0.968 on 14 held-out heads; IXI 212 labelled with its brain in the orbits: 0.776)
MAX_TOUCHING = 0.01  # ... as a fraction of the face: more is a flag (a 4.8 mm-slice head resampled
# to the cache's 1 mm grid has 0.1 % there from nearest-neighbour steps alone)


def check_labels(labels: np.ndarray, affine: np.ndarray) -> list[str]:
    """Reasons why a label map (on a RAS-oriented grid with ``affine``) is implausible."""
    spacing = voxel_sizes(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    face, brain = labels == FACE, labels == BRAIN
    flags = []
    brain_ml = brain.sum() * voxel_ml
    if not BRAIN_ML[0] <= brain_ml <= BRAIN_ML[1]:
        flags.append(f"brain {brain_ml:.0f} mL outside {BRAIN_ML[0]:.0f}-{BRAIN_ML[1]:.0f}")
    face_ml = face.sum() * voxel_ml
    if face_ml < MIN_FACE_ML:
        flags.append(f"face {face_ml:.0f} mL < {MIN_FACE_ML:.0f}")
    if face.any() and brain.any():
        def centroid(mask: np.ndarray) -> np.ndarray:
            return affine[:3, :3] @ np.argwhere(mask).mean(0) + affine[:3, 3]

        cf, cb = centroid(face), centroid(brain)
        if cf[1] - cb[1] < FACE_ANTERIOR_MM:
            flags.append(f"face centroid only {cf[1] - cb[1]:.0f} mm in front of the brain's")
        if cf[2] >= cb[2]:
            flags.append("face centroid not below the brain's")
        near = ndi.binary_dilation(brain, ball(MIN_GAP_MM / spacing))
        touching = int((face & near).sum())
        if touching > MAX_TOUCHING * face.sum():
            flags.append(f"{touching} face voxels within {MIN_GAP_MM:.0f} mm of the brain")
    if brain.any():
        lab, n = ndi.label(brain)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            if sizes.max() < 0.98 * sizes.sum():
                flags.append(f"brain in {n} pieces")
    return flags


def check_against(labels: np.ndarray, brain: np.ndarray, tool: str = "deepbet") -> list[str]:
    """A flag when the brain label and an independent brain mask on the same grid disagree.

    The atlas-propagated brain label includes CSF and dura, so it is larger than an extractor's
    brain; a registration that put the brain into the orbits is still caught."""
    from deface.evaluation import dice

    agreement = dice(labels == BRAIN, brain)  # nan (both empty) is no disagreement
    return [f"brain label vs {tool} Dice {agreement:.3f} < {MIN_BRAIN_DICE}"] if agreement < MIN_BRAIN_DICE else []
