"""Measure a Defacer against reference labels: the figures behind the model card.

For one labelled head (image + labels on the same grid, 0 background, 1 face, 2 brain):
- ``dice_face``, ``dice_brain``, ``hd95_face_mm``: the network's label map (canonical grid,
  mapped back to the native grid) against the reference;
- ``recall_face``: the fraction of reference face voxels holding tissue that the full wrapper
  removed (what a re-identification attack cares about);
- ``brain_changed``: reference brain voxels whose stored value the full wrapper changed (must be 0).
Contrast variants (``contrast_variant``) turn a real T1 into crude T2-, PD- and FLAIR-like images
by remapping intensities inside the head, to probe contrast robustness without new scans.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from deface import BRAIN, FACE
from deface.preprocessing import Grid, resample, voxel_sizes

CONTRASTS = ("original", "t2like", "pdlike", "flairlike")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (nan when both are empty)."""
    denom = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / denom if denom else float("nan")


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: np.ndarray) -> float:
    """95th-percentile symmetric surface distance in mm (nan if a mask is empty)."""
    if not pred.any() or not ref.any():
        return float("nan")
    from monai.metrics import compute_hausdorff_distance

    p = torch.from_numpy(pred)[None, None]
    r = torch.from_numpy(ref)[None, None]
    value = compute_hausdorff_distance(p, r, percentile=95, spacing=[float(s) for s in spacing])
    return float(value.item())


def contrast_variant(image: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
    """A crude other-contrast version of a T1 image (float32), same grid.

    Intensities are rescaled to [0, 1] by the 99.5th percentile; inside the head (labels > 0 or
    signal above 10 %): ``t2like`` inverts them (CSF and fluid bright, white matter dark),
    ``pdlike`` flattens them (gamma 0.35), ``flairlike`` inverts and then darkens the brightest
    (fluid) tail. Air stays dark.
    """
    x = image.astype(np.float32)
    x = np.clip(x / max(float(np.percentile(x, 99.5)), 1e-6), 0, 1)
    if kind == "original":
        return x
    head = (labels > 0) | (x > 0.1)
    if kind == "t2like":
        y = 1.0 - x
    elif kind == "pdlike":
        y = x**0.35
    elif kind == "flairlike":
        y = 1.0 - x
        y = np.where(y > 0.75, (1.0 - y) * 2.0, y)
    else:
        raise ValueError(f"unknown contrast {kind!r}; one of {CONTRASTS}")
    return np.where(head, 0.05 + 0.95 * y, x).astype(np.float32)


def axis_codes() -> list[tuple[tuple[int, int, int], tuple[bool, bool, bool]]]:
    """All 48 (axis permutation, flips) pairs of a 3D array."""
    return [(p, f) for p in itertools.permutations(range(3)) for f in itertools.product((False, True), repeat=3)]


def reorient(data: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]
             ) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with axes permuted then flipped: world space is unchanged."""
    out = np.transpose(data, perm)
    aff = affine[:, list(perm) + [3]].copy()
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
            n = out.shape[axis] - 1
            aff[:3, 3] = aff[:3, 3] + aff[:3, axis] * n
            aff[:3, axis] = -aff[:3, axis]
    return np.ascontiguousarray(out), aff


def undo_reorient(data: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> np.ndarray:
    """Inverse of ``reorient`` for the data array."""
    for axis, flip in enumerate(flips):
        if flip:
            data = np.flip(data, axis)
    return np.transpose(data, np.argsort(perm))


@dataclass
class HeadScore:
    name: str
    dice_face: float
    dice_brain: float
    recall_face: float
    hd95_face_mm: float
    brain_changed: int
    removed_ml: float
    face_found: bool
    seconds: float


def native_labels(defacer, image: nib.Nifti1Image) -> tuple[np.ndarray, "DefaceResult"]:  # noqa: F821
    """(network label map on the native grid, the full wrapper's result) for one image."""
    volume, canon = defacer.prepare(image)
    probs = defacer.predict([canon])[0]
    result = defacer.apply(volume, canon, probs)
    labels = probs.argmax(0)[None].float()
    native = Grid(tuple(volume.raw.shape[:3]), volume.affine)
    return resample(labels, canon.grid.affine, native, mode="nearest")[0].numpy().astype(np.uint8), result


def score_head(defacer, name: str, image: nib.Nifti1Image, reference: np.ndarray) -> HeadScore:
    """Every figure for one labelled head; ``reference`` is on ``image``'s grid."""
    import time

    t0 = time.perf_counter()
    pred, result = native_labels(defacer, image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    tissue = data > 0.05 * float(np.percentile(data, 99.5))
    ref_face = reference == FACE
    face_tissue = ref_face & tissue
    recall = float((result.mask & face_tissue).sum() / face_tissue.sum()) if face_tissue.any() else float("nan")
    changed = (result.raw != result.volume.raw).reshape(data.shape + (-1,)).any(-1)
    return HeadScore(
        name=name,
        dice_face=dice(pred == FACE, ref_face),
        dice_brain=dice(pred == BRAIN, reference == BRAIN),
        recall_face=recall,
        hd95_face_mm=hd95(pred == FACE, ref_face, voxel_sizes(image.affine)),
        brain_changed=int((changed & (reference == BRAIN)).sum()),
        removed_ml=float(result.stats["removed_ml"]),
        face_found=bool(result.stats["face_found"]),
        seconds=time.perf_counter() - t0,
    )


def orientation_agreement(defacer, image: nib.Nifti1Image) -> list[tuple[str, float]]:
    """Dice (world space) of the removal mask for all 48 axis orders against the stored order."""
    data = np.asarray(image.dataobj)
    base = defacer.deface(image).mask
    rows = []
    for perm, flips in axis_codes():
        moved, aff = reorient(data, image.affine, perm, flips)
        code = "".join(nib.aff2axcodes(aff))
        mask = defacer.deface(nib.Nifti1Image(moved, aff)).mask
        rows.append((code, dice(undo_reorient(mask, perm, flips), base)))
    return rows
