"""A second, contrast-agnostic opinion on where the brain is: a brain atlas registered to each image.

The network can take brain for face in a contrast or anatomy it has not learned (a clinical T2
lost its orbitofrontal cortex this way). The atlas does not depend on the network: the mean
T1-like head and brain of the 20 BrainWeb models (``deface/assets``, built by
``scripts/build_atlas.py``) is registered to the canonical image (12-parameter affine) on the
head's outline (mean squares of the filled head masks, blind to contrast), then refined on
intensities (Mattes mutual information); the refinement is kept unless it spoils the outline fit;
a last refinement looks only at the intensities around the atlas brain (``refine_on_brain``).
The wrapper registers a result that fits poorly (whole-head MI above ``GOOD_FIT_MI``) again from
a coarse search over rotations of the head outline (``head_pose``), so a head tilted beyond the
optimiser's reach is found too, and turns a head that is far from upright onto a rotated grid
(``preprocessing.canonical_grid(rotation=...)``) before the network sees it, registered on that grid.
A fit that leaves the head asymmetric about the atlas's mid-sagittal plane is refused
(``mirror_symmetry``): the pose search's other poses, or the network alone, are used instead.
Its brain probability, thresholded, is protected like the network's brain. The labeller
registers its template with the same ``register_head``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from deface.anatomy import fill_slices, largest_component, region_box
from deface.preprocessing import Grid, antialias, resample, voxel_sizes, world_bbox

ATLAS_FILE = Path(__file__).parent / "assets" / "brainweb_atlas_2mm.npz"
# Registration is judged implausible when it stretches the head beyond these factors.
PLAUSIBLE_SCALE = (0.7, 1.45)
# register_head keeps the intensity (MI) fit if the head-outline overlap drops by no more than
# OUTLINE_TOLERANCE, or by no more than OUTLINE_TOLERANCE_WIDE when the whole-head MI is better by MI_GAIN.
# The wide tolerance was 0.03 until 2026-12-07 (j): MI fits that loosen the outline by 0.031-0.039
# were right where looked at (the outline alone left the pitch up to 14 degrees short: the s21 FLAIR
# in 6 mm sagittal slices FLAIR-like and the s21 T1 T2-like kept 44 % and 50 % of their face); the
# wrong fits known (shrunken templates) loosen it by 0.07-0.15; 0.04-0.06 (s21 T1, IXI 212) not looked at.
OUTLINE_TOLERANCE = 0.01
OUTLINE_TOLERANCE_WIDE = 0.04
MI_GAIN = 0.05
# register_affine runs a dense full-resolution last level on the fixed image cropped to the metric region
CROP_LAST_LEVEL = True
RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # world RAS <-> SimpleITK's LPS (its own inverse)
# A fit with whole-head MI above this may be off (upright T1 heads as scanned reach about -0.45,
# misregistered ones -0.2; FLAIRs reach only -0.23 to -0.32 when right): the wrapper then searches the pose.
GOOD_FIT_MI = -0.35
# A registration whose image, mapped into the atlas's space, correlates less than this with its own
# mirror image (``mirror_symmetry``) is refused ("asymmetric"): a head is close to mirror-symmetric
# about its mid-sagittal plane, whatever its contrast and pose, so a fit rolled or turned off that
# plane shows. Other fits: 0.85-0.99 (the 34 validation heads as scanned, cut at the mouth and
# FLAIR-like; 13 of them tilted, turned, rolled, cut, in thick slices, in other contrasts); the four
# wrong fits found, all heads cut at the mouth in a contrast unlike T1 whose face completion removed
# brain (up to 23,246 deepbet voxels): 0.31-0.69, 20-52 degrees rolled or turned;
# docs/evaluation.md 2026-12-07 (b).
MIN_SYMMETRY = 0.75


@dataclass
class Atlas:
    """A head template and its brain probability on one axis-aligned RAS grid."""

    image: np.ndarray  # (X, Y, Z) float32, T1-like intensities in [0, 1]
    brain: np.ndarray  # (X, Y, Z) float32, fraction of subjects with brain at each voxel
    affine: np.ndarray

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Atlas":
        z = np.load(Path(path) if path else ATLAS_FILE)
        return cls(z["image"].astype(np.float32) / 255.0, z["brain"].astype(np.float32) / float(z["subjects"]),
                   z["affine"].astype(np.float64))

    @cached_property
    def head(self) -> "Head":
        """The atlas head prepared for registration, once for every image it is registered to."""
        return Head(self.image, self.affine)


@dataclass
class Head:
    """A normalised head image on an axis-aligned RAS grid and the masks registration needs,
    each computed once however many registration stages use it."""

    image: np.ndarray
    affine: np.ndarray

    @cached_property
    def solid(self) -> np.ndarray:
        return head_silhouette(self.image)

    @cached_property
    def tissue(self) -> np.ndarray:
        """The head's brighter tissue in one piece, from which ``top`` and ``near_top`` are cut."""
        return head_tissue(self.image)

    @cached_property
    def top(self) -> np.ndarray:
        """The top 170 mm: the metric region and the start of every registration."""
        return top_of(self.tissue, self.affine, 170.0)

    @cached_property
    def metric_region(self) -> np.ndarray:
        """The top, slightly dilated: where intensity metrics are evaluated by default."""
        return ndi.binary_dilation(self.top, iterations=3)

    @cached_property
    def near_top(self) -> np.ndarray:
        """Head voxels within 130 mm of the top: where outline fits are compared."""
        return top_of(self.tissue, self.affine, 130.0)

    @cached_property
    def outline(self) -> np.ndarray:
        """The solid head smoothed (float32): what the "outline" metric compares."""
        return ndi.gaussian_filter(self.solid.astype(np.float32), 1.5)

    def array(self, kind: str) -> np.ndarray:
        """``image`` (kind "image") or ``outline`` ("outline"): what a registration metric compares."""
        return self.outline if kind == "outline" else self.image

    @cached_property
    def metric_mask(self):
        """``metric_region`` as a SimpleITK mask, for every metric evaluated there."""
        import SimpleITK as sitk

        return sitk.Cast(_to_sitk(self.metric_region.astype(np.float32), self.affine), sitk.sitkUInt8)

    def smoothed(self, kind: str, sigma: float):
        """``array(kind)`` as a SimpleITK image smoothed by ``sigma`` mm as ITK's registration
        smooths a level (a recursive Gaussian; none at 0), made once for every stage and level
        (and ``head_mi``) that uses it."""
        import SimpleITK as sitk

        key = (kind, float(sigma))
        if key not in self._smoothed:
            image = _to_sitk(self.array(kind), self.affine)
            self._smoothed[key] = sitk.SmoothingRecursiveGaussian(image, float(sigma)) if sigma > 0 else image
        return self._smoothed[key]

    @cached_property
    def _smoothed(self) -> dict:
        return {}

    @cached_property
    def measured(self) -> dict:
        """``outline_overlap`` and ``head_mi`` results with this head fixed (``_measure``): a
        registration asks for the same one more than once."""
        return {}


def _measure(name: str, fixed: Head, moving: Head, to_moving: np.ndarray, compute) -> float:
    """``compute(fixed, moving, to_moving)``, once per fixed head, moving head and transform."""
    key = (name, id(moving), np.asarray(to_moving, dtype=np.float64).tobytes())
    if key not in fixed.measured:  # moving is kept with the value, so its id is not reused meanwhile
        fixed.measured[key] = (moving, compute(fixed, moving, to_moving))
    return fixed.measured[key][1]


@dataclass
class Registration:
    """How the atlas registration of one image went."""

    to_atlas: np.ndarray | None  # 4x4 world transform, image -> atlas; None when failed, implausible or asymmetric
    status: str  # "ok", "implausible", "asymmetric" or "failed: <reason>" (deface.inference adds DEFERRED, NOT_NEEDED)
    seconds: float
    mi: float = float("inf")  # ``head_mi`` of the result on the grid it was registered on (lower: better)
    symmetry: float = float("nan")  # ``mirror_symmetry`` of the result (higher: better)


def plausible(to_atlas: np.ndarray) -> bool:
    """True when the linear part only rotates and scales the head by a plausible amount."""
    if not np.all(np.isfinite(to_atlas)) or np.linalg.det(to_atlas[:3, :3]) <= 0:
        return False
    sv = np.linalg.svd(to_atlas[:3, :3], compute_uv=False)
    return bool(sv.min() >= PLAUSIBLE_SCALE[0] and sv.max() <= PLAUSIBLE_SCALE[1])


def outline_overlap(fixed: Head, moving: Head, to_moving: np.ndarray) -> float:
    """Dice of the solid heads of ``fixed`` and of ``moving`` mapped onto it, within 130 mm of the top."""
    return _measure("overlap", fixed, moving, to_moving, _outline_overlap)


def _outline_overlap(fixed: Head, moving: Head, to_moving: np.ndarray) -> float:
    warped = resample(torch.from_numpy(moving.solid.astype(np.float32))[None],
                      np.linalg.inv(to_moving) @ moving.affine, Grid(tuple(fixed.image.shape), fixed.affine))[0].numpy()
    scan = fixed.solid & fixed.near_top
    warped = (warped >= 0.5) & fixed.near_top
    total = scan.sum() + warped.sum()
    return float(2 * (scan & warped).sum() / total) if total else 0.0


BRAIN_REGION_MM = 4.0  # the brain refinement's metric region: the template brain dilated by this
BRAIN_OUTLINE_TOLERANCE = 0.02  # ... kept unless the head outline fit drops by more than this


def refine_on_brain(fixed: Head, moving: Head, to_moving: np.ndarray, prior: tuple[np.ndarray, np.ndarray],
                    shrink: tuple[int, ...] = (4, 2)) -> np.ndarray:
    """``to_moving`` (fixed -> moving world) refined by mutual information within the moving
    head's brain ``prior`` (probability, affine) as currently placed plus a margin, where the
    brain, CSF and skull edges fix the head's pitch; kept only if the head outline still fits
    and the transform stays plausible. The outline of a round skull leaves pitch loose: an
    IXI head's atlas brain reached into its orbits without this."""
    prob, prior_affine = prior
    grid = Grid(tuple(fixed.image.shape), fixed.affine)
    brain = resample(torch.from_numpy(prob)[None], np.linalg.inv(to_moving) @ prior_affine, grid)[0].numpy() >= 0.5
    if not brain.any():
        return to_moving
    step = float(np.abs(fixed.affine[0, 0]))
    region = ndi.binary_dilation(brain, iterations=max(1, int(round(BRAIN_REGION_MM / step))))
    refined = register_affine(fixed, moving, shrink=shrink, metric="mi", init=to_moving,
                              region=region)
    before, after = outline_overlap(fixed, moving, to_moving), outline_overlap(fixed, moving, refined)
    if plausible(refined) and after >= before - BRAIN_OUTLINE_TOLERANCE:
        return refined
    return to_moving


def register_head(fixed: Head, moving: Head, shrink: tuple[int, ...] = (4, 2),
                  init: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """(fixed -> moving world transform, "mi" or "outline"): the head outline first, then
    intensities refined from it, and the refinement kept unless it spoils the outline fit.

    Mutual information alone can settle on a shrunken template whose bright scalp sits on the
    bright CSF of a T2 or PD image; the head outline cannot, but it knows nothing of the inside.
    Such a failure loosens the outline fit a lot (a stroke T2: 0.07-0.11, an IXI T1: 0.15) and does
    not fit the intensities better; the MI fit of FLAIRs and some IXI T1s loosens it by 0.01-0.04 and
    fits the whole head far better (MI 0.07-0.23 lower), with the atlas brain off the orbits: kept.
    """
    outline = register_affine(fixed, moving, shrink=shrink, metric="outline", init=init)
    refined = register_affine(fixed, moving, shrink=shrink, metric="mi", init=outline)
    drop = outline_overlap(fixed, moving, outline) - outline_overlap(fixed, moving, refined)
    if drop <= OUTLINE_TOLERANCE or (
            drop <= OUTLINE_TOLERANCE_WIDE
            and head_mi(fixed, moving, refined) <= head_mi(fixed, moving, outline) - MI_GAIN):
        return refined, "mi"
    return outline, "outline"


def register_atlas(atlas: Atlas, image: np.ndarray, affine: np.ndarray, shrink: tuple[int, ...] = (4, 2),
                   start: np.ndarray | None = None, head: Head | None = None) -> Registration:
    """Register ``atlas`` to a normalised ``image`` (X, Y, Z) on an isotropic grid (``affine``:
    axis-aligned RAS, or rotated, e.g. by ``head_pose``), optionally from ``start`` (world ->
    atlas). Returns the world -> atlas transform. ``head``: the caller's ``Head`` of an axis-aligned
    ``image``, whose masks then serve the caller and the registration alike.

    Never raises: a failed or implausible registration has ``to_atlas=None`` and says why, and
    the caller decides (the wrapper warns and relies on the network alone).
    """
    t0 = time.perf_counter()
    # A rotated grid is registered as if it were axis-aligned (a virtual world: the grid's own
    # axes), then the result is taken back to the real world.
    virtual = np.diag([*voxel_sizes(affine), 1.0])
    virtual[:3, 3] = affine[:3, 3]
    to_virtual = virtual @ np.linalg.inv(affine)
    try:
        init = None if start is None else start @ np.linalg.inv(to_virtual)
        fixed = head if head is not None and np.array_equal(head.affine, virtual) else Head(image, virtual)
        to_virtual_atlas, mi = register_pose(fixed, atlas, shrink, init)
        to_atlas = to_virtual_atlas @ to_virtual
    except Exception as exc:  # SimpleITK raises RuntimeError with a long message
        return Registration(None, f"failed: {str(exc).strip().splitlines()[-1][:120]}", time.perf_counter() - t0)
    if not plausible(to_atlas):
        return Registration(None, "implausible", time.perf_counter() - t0)
    symmetry = mirror_symmetry(atlas, image, affine, to_atlas)
    if symmetry < MIN_SYMMETRY:
        return Registration(None, "asymmetric", time.perf_counter() - t0, symmetry=symmetry)
    return Registration(to_atlas, "ok", time.perf_counter() - t0, mi, symmetry)


def mirror_symmetry(atlas: Atlas, image: np.ndarray, affine: np.ndarray, to_atlas: np.ndarray) -> float:
    """Correlation of ``image`` (X, Y, Z on ``affine``, 0 in the air) mapped into ``atlas``'s space
    through ``to_atlas`` (world -> atlas world) with its own mirror image about the atlas's
    mid-sagittal plane (x = 0), over the voxels where either has signal. A head is close to
    mirror-symmetric, so a registration that fits its midline gives a high value whatever the
    contrast and the pose; one rolled, turned or shifted off it gives a low one (the atlas head:
    0.97 as it is, 0.72 rolled 10 degrees, 0.68 moved 5 mm sideways). Air and tissue count alike,
    so a field of view cut through one side of the head lowers it too (the atlas head cut 55 mm
    right of its midline: 0.68); over the voxels where both have signal only, the s18 FLAIR made
    FLAIR-like and cut at the mouth, registered 25 degrees off, scored 0.81, within reach of right
    fits (0.85-0.97; the s20 FLAIR's 39 degrees off: 0.62)."""
    grid = Grid(tuple(atlas.brain.shape), atlas.affine)
    mirrored = Grid(grid.shape, np.diag([-1.0, 1.0, 1.0, 1.0]) @ atlas.affine)  # voxel i at (-x_i, y_i, z_i)
    source = torch.from_numpy(np.asarray(image, dtype=np.float32))[None]
    a = resample(source, to_atlas @ affine, grid)[0].numpy()
    b = resample(source, to_atlas @ affine, mirrored)[0].numpy()
    signal = (a > 0) | (b > 0)
    if signal.sum() < 2:
        return 0.0
    a, b = a[signal] - a[signal].mean(), b[signal] - b[signal].mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denominator if denominator > 0 else 0.0


def head_poses(atlas: Atlas, head: Head, candidates: int = 1) -> list[np.ndarray]:
    """First world -> atlas transforms (rotation, size and translation, ``rotation_search``) of a
    normalised ``head`` on an axis-aligned RAS grid, whatever its pose, best outline fit first: the
    wrapper registers from them, keeps the best intensity fit and turns the network's grid upright
    with it."""
    return rotation_search(head, atlas.head, candidates)


def head_pose(atlas: Atlas, head: Head) -> np.ndarray:
    """``head_poses``' best outline fit."""
    return head_poses(atlas, head)[0]


def head_mi(fixed: Head, moving: Head, to_moving: np.ndarray) -> float:
    """Mattes mutual information (negative: lower is better) of the two heads over the fixed
    head's top 170 mm, with ``moving`` mapped through ``to_moving`` (fixed -> moving world)."""
    return _measure("mi", fixed, moving, to_moving, _head_mi)


def _head_mi(fixed: Head, moving: Head, to_moving: np.ndarray) -> float:
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricFixedMask(fixed.metric_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    lps = RAS_LPS @ to_moving @ RAS_LPS
    tx = sitk.AffineTransform(3)
    tx.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
    tx.SetTranslation([float(v) for v in lps[:3, 3]])
    reg.SetInitialTransform(tx)
    return float(reg.MetricEvaluate(fixed.smoothed("image", 0), moving.smoothed("image", 0)))


SEARCH_SPACING_MM = 4.0  # rotation_search compares the head outlines on grids this coarse
SEARCH_STEPS_DEG = ((range(-45, 46, 15), range(-30, 31, 15), range(-30, 31, 15)), (range(-10, 11, 5),) * 3)
# ... and sizes (head -> atlas scale) in its coarse stage: a small head (IXI 296, registered at
# scale 1.1-1.2) matched the atlas outline best 100 mm off at scale 1, within 12 mm at 1.2.
SEARCH_SCALES = (0.9, 1.0, 1.1, 1.2)
SEARCH_DISTINCT_DEG = 20.0  # rotation_search's candidates lie at least this far apart


def euler(pitch: float, roll: float, yaw: float) -> np.ndarray:
    """Rotation (3x3) about the RAS axes by degrees: pitch about x, then roll about y, then yaw about z."""
    a, b, c = np.deg2rad([pitch, roll, yaw])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotation_about(rotation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """The 4x4 world transform that turns points by ``rotation`` (3x3) about ``centre`` (RAS mm)."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre - rotation @ centre
    return out


def head_top_centre(head: Head) -> np.ndarray:
    """The centroid (RAS mm) of ``head``'s top 170 mm, where every registration starts from."""
    return head.affine[:3, :3] @ np.argwhere(head.top).mean(0) + head.affine[:3, 3]


def roll_yaw_deg(rotation: np.ndarray) -> float:
    """The angle (degrees) of a 3x3 rotation (``euler`` order: pitch, then roll, then yaw) left
    once its pitch is taken out: how far a head is rolled and turned, not nodded."""
    pitch = float(np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2])))
    return rotation_deg(rotation @ euler(-pitch, 0.0, 0.0))


def rotation_deg(rotation: np.ndarray) -> float:
    """The angle of a 3x3 rotation, in degrees."""
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0))))


def _coarse(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` averaged onto a grid of about SEARCH_SPACING_MM (float32, (X, Y, Z)) and its affine."""
    pooled, pooled_affine = antialias(torch.from_numpy(mask.astype(np.float32))[None], affine, SEARCH_SPACING_MM)
    return pooled[0].numpy(), pooled_affine


def rotation_search(fixed: Head, moving: Head, candidates: int = 1) -> list[np.ndarray]:
    """Fixed -> moving world starts for the registration of a head in any pose to within +-45
    degrees of pitch and +-30 of roll and yaw: every rotation on a coarse grid at every size of
    SEARCH_SCALES, then a finer grid of rotations around each of the ``candidates`` best (seeded at
    least ``SEARCH_DISTINCT_DEG`` apart; best first), scored by the overlap (Dice,
    volumes in the moving head's space) of the two head outlines (blind to contrast) within the
    moving head's field of view; each rotation's translation matches the centroids of the two
    outlines over the anatomy both cover. Starts near upright are all the affine optimiser
    can reach: a head pitched 25 degrees and rolled 12 was registered 40 mm off at the face.

    Plain numpy (float32, points as rows of a (3, N) array): ~800 scores of ~45k points each ran
    in torch 2.4 s on an idle 2-core machine and 76 s beside another busy process (its thread team
    waits on every small operation); here 1.2 s, with the same poses."""
    f, f_affine = _coarse(fixed.solid, fixed.affine)
    m, m_affine = _coarse(moving.solid, moving.affine)
    shape = np.array(m.shape)
    padded = np.pad(m, 1).ravel()  # zeros around: a point up to a voxel outside still blends with them
    sx, sy = (shape[1] + 2) * (shape[2] + 2), shape[2] + 2
    corners = [(dx * sx + dy * sy + dz, dx, dy, dz) for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)]
    weight = f[f > 0].astype(np.float32)  # only voxels of the fixed outline count
    points = (f_affine[:3, :3] @ np.nonzero(f > 0) + f_affine[:3, 3:]).astype(np.float32)
    m_centre = (m_affine[:3, :3] @ np.argwhere(m >= 0.5).mean(0) + m_affine[:3, 3]).astype(np.float32)
    to_m = np.linalg.inv(m_affine).astype(np.float32)
    last = shape.astype(np.float32) - 0.5
    volume_m = float(m.sum())
    start = head_top_centre(fixed).astype(np.float32)

    def moving_index(rot: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # ((points - centre) @ rot.T + m_centre) in moving voxels (3, N), as one linear map (rot: scale included)
        linear = to_m[:3, :3] @ rot
        offset = to_m[:3, :3] @ (m_centre - rot @ centre) + to_m[:3, 3]
        vox = linear @ points + offset[:, None]
        inside = np.ones(vox.shape[1], bool)
        for axis in range(3):
            inside &= (vox[axis] >= -0.5) & (vox[axis] <= last[axis])
        return vox, inside

    def sample(vox: np.ndarray) -> np.ndarray:
        """Trilinear values of the moving outline at voxel coordinates (3, N), 0 outside."""
        base = np.floor(vox)
        frac = vox - base
        i = base.astype(np.int64) + 1  # in the padded array
        valid = np.ones(vox.shape[1], bool)
        for axis in range(3):
            valid &= (i[axis] >= 0) & (i[axis] <= shape[axis])
        np.clip(i, 0, shape[:, None], out=i)
        index = i[0] * sx + i[1] * sy + i[2]
        blend = [(1 - frac[axis], frac[axis]) for axis in range(3)]
        out = np.zeros(vox.shape[1], np.float32)
        for step, dx, dy, dz in corners:
            out += padded[index + step] * (blend[0][dx] * blend[1][dy] * blend[2][dz])
        return np.where(valid, out, 0.0)

    def score(rot: np.ndarray, scale: float) -> tuple[float, np.ndarray]:
        r, centre = (scale * rot).astype(np.float32), start
        for _ in range(2):  # the fixed outline's centroid over the anatomy the moving grid covers
            _, inside = moving_index(r, centre)
            w = weight * inside
            total = float(w.sum())
            if total < 1:
                return 0.0, centre.astype(np.float64)
            centre = (points @ w) / total
        vox, inside = moving_index(r, centre)
        v = scale**3  # a fixed voxel's volume in moving voxels
        return (2 * v * float(sample(vox) @ weight) / (v * float(weight @ inside.astype(np.float32)) + volume_m),
                centre.astype(np.float64))

    upright = score(np.eye(3), 1.0)
    coarse = [(upright[0], np.eye(3), upright[1], 1.0)]
    for scale in SEARCH_SCALES:
        for pitch in SEARCH_STEPS_DEG[0][0]:
            for roll in SEARCH_STEPS_DEG[0][1]:
                for yaw in SEARCH_STEPS_DEG[0][2]:
                    rot = euler(pitch, roll, yaw)
                    s, centre = score(rot, scale)
                    coarse.append((s, rot, centre, scale))
    coarse.sort(key=lambda c: -c[0])
    picked = []
    for c in coarse:  # the best poses at least SEARCH_DISTINCT_DEG apart
        if all(rotation_deg(c[1] @ p[1].T) >= SEARCH_DISTINCT_DEG for p in picked):
            picked.append(c)
        if len(picked) == candidates:
            break
    outs = []
    for best in picked:
        base, scale = best[1], best[3]
        steps = SEARCH_STEPS_DEG[1]
        for pitch in steps[0]:
            for roll in steps[1]:
                for yaw in steps[2]:
                    rot = euler(pitch, roll, yaw) @ base
                    s, centre = score(rot, scale)
                    if s > best[0]:
                        best = (s, rot, centre, scale)
        _, rot, centre, scale = best
        out = np.eye(4)
        out[:3, :3] = scale * rot
        out[:3, 3] = m_centre - scale * rot @ centre
        outs.append(out)
    return outs


def register_pose(fixed: Head, atlas: Atlas, shrink: tuple[int, ...] = (4, 2), start: np.ndarray | None = None
                  ) -> tuple[np.ndarray, float]:
    """``register_head`` from ``start`` (fixed -> atlas world, e.g. ``rotation_search``'s; default:
    upright, the centroids aligned) then ``refine_on_brain``: (the transform, its whole-head MI).
    The optimiser stays near its start, so a start far off (a head tilted 15 degrees registered
    upright) needs the pose search (``head_pose``), which the wrapper runs for a poor fit."""
    to_atlas, _ = register_head(fixed, atlas.head, shrink, start)
    to_atlas = refine_on_brain(fixed, atlas.head, to_atlas, (atlas.brain, atlas.affine), (4, 2, 1))
    return to_atlas, head_mi(fixed, atlas.head, to_atlas)


def brain_on_grid(atlas: Atlas, to_atlas: np.ndarray, grid: Grid, threshold: float) -> torch.Tensor:
    """The atlas brain (probability >= ``threshold``) on any grid, through a registration."""
    # Grid voxel -> world -> atlas world -> atlas voxel.
    prob = resample(torch.from_numpy(atlas.brain)[None], np.linalg.inv(to_atlas) @ atlas.affine, grid)[0]
    return prob >= threshold


def atlas_points(to_atlas: np.ndarray, grid: Grid) -> np.ndarray:
    """Atlas (MNI) world coordinates (X, Y, Z, 3) of every voxel of ``grid`` through a
    registration, for the regions of deface.anatomy (``face_region_mni``, ``ear_region_mni``;
    the BrainWeb atlas is in MNI space). Computed once per image, whatever number of regions."""
    from deface.anatomy import voxel_world

    return voxel_world(grid.shape, to_atlas @ grid.affine)


def physical_shift_scales(shape: tuple[int, ...], affine: np.ndarray, centre_lps: np.ndarray) -> list[float]:
    """The optimiser scales SimpleITK's ``SetOptimizerScalesFromPhysicalShift`` estimates for a
    3D affine transform about ``centre_lps`` on a dense virtual grid (``shape``, ``affine``): the
    squared largest shift of the grid's corner voxels per unit change of each parameter (matrix
    entry (j, k): the corners' largest |x_k - c_k|; translations: 1)."""
    lps = np.array([-1.0, -1.0, 1.0])
    lo, hi = world_bbox(Grid(tuple(shape), affine))  # the farthest corner along an axis is at one end
    reach = np.maximum(np.abs(lo * lps - centre_lps), np.abs(hi * lps - centre_lps)) ** 2
    return [float(reach[k]) for _ in range(3) for k in range(3)] + [1.0, 1.0, 1.0]


def _to_sitk(image: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS physical space) from an axis-aligned RAS array and affine."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0), dtype=np.float32))
    img.SetSpacing([float(s) for s in voxel_sizes(affine)])
    img.SetOrigin([float(-affine[0, 3]), float(-affine[1, 3]), float(affine[2, 3])])
    img.SetDirection([-1, 0, 0, 0, -1, 0, 0, 0, 1])
    return img


def head_silhouette(image: np.ndarray) -> np.ndarray:
    """The head as a solid: tissue above a low threshold, largest component, holes filled slice
    by slice (dark skull, sinuses and CSF of any contrast end up inside)."""
    mask = ndi.gaussian_filter(image, 1.0) > 0.1
    mask = largest_component(mask) if mask.any() else mask
    for axis in range(3):
        mask = fill_slices(mask, axis)
    return mask


def head_tissue(image: np.ndarray) -> np.ndarray:
    """Tissue above a moderate threshold, opened, largest component: the head without its dark
    surroundings, for ``top_of``."""
    mask = ndi.gaussian_filter(image, 1.0) > 0.2
    mask = ndi.binary_opening(mask, iterations=2)
    return largest_component(mask) if mask.any() else mask


def top_of(mask: np.ndarray, affine: np.ndarray, depth_mm: float) -> np.ndarray:
    """The voxels of ``mask`` (``head_tissue``) within ``depth_mm`` of its top (the part the template covers)."""
    z = affine[2, 2] * np.arange(mask.shape[2]) + affine[2, 3]
    top = z[np.nonzero(mask.any(axis=(0, 1)))[0].max()] if mask.any() else z.max()
    return mask & (z >= top - depth_mm)[None, None, :]


def register_affine(fixed: Head, moving: Head, shrink: tuple[int, ...] = (4, 2, 1),
                    iterations: int = 300, metric: str = "mi",
                    min_step: float = 1e-4, init: np.ndarray | None = None,
                    region: np.ndarray | None = None) -> np.ndarray:
    """4x4 RAS world transform taking fixed (scan) world points to moving (template) points.

    Both heads are normalised, axis-aligned RAS grids (see preprocessing.to_canonical). The
    start aligns the centroids of the top 170 mm of both heads (a neck in the scan would pull
    a moments start down); a similarity stage then a 12-parameter affine stage follow, with
    the metric restricted to that top part of the scan. ``shrink``: pyramid levels (grid
    subsampling factors); ``iterations``: optimiser steps per level; the metric visits every voxel
    of the region (random sampling moved the atlas brain by 0.2-1.1 mm and was not faster); ``metric``: "mi"
    (Mattes mutual information of the intensities) or "outline" (mean squares of the smoothed,
    filled head masks: blind to contrast, it matches the head's outline only); ``init``: a
    fixed -> moving transform to start the affine stage from (the similarity stage is skipped);
    ``region``: where on the fixed grid the metric is evaluated (default: the top 170 mm).
    """
    import SimpleITK as sitk

    fixed_affine, moving_affine = fixed.affine, moving.affine
    fmask, mmask = fixed.top, moving.top
    kind = "outline" if metric == "outline" else "image"

    def centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
        c = np.argwhere(mask).mean(0)
        ras = affine[:3, :3] @ c + affine[:3, 3]
        return ras * np.array([-1.0, -1.0, 1.0])  # LPS

    cf, cm = centroid(fmask, fixed_affine), centroid(mmask, moving_affine)
    if region is None:
        region, fixed_mask = fixed.metric_region, fixed.metric_mask
    else:
        fixed_mask = sitk.Cast(_to_sitk(region.astype(np.float32), fixed_affine), sitk.sitkUInt8)
    # A dense last level at full resolution is run on its own, on the fixed image cropped to the
    # region (ITK visits every voxel of the fixed grid and asks the mask of each), with the step
    # scales ITK would estimate on the whole grid: the same transform (to 4e-9 mm on 10 heads, 4e-4
    # mm on one), that level 40 % faster on a 144^3 grid.
    split = CROP_LAST_LEVEL and len(shrink) > 1 and shrink[-1] == 1  # the affine stage only
    if split:
        box = region_box(region, margin=int(np.ceil(4.0 / min(voxel_sizes(fixed_affine)))) + 1)
        full_grid_scales = physical_shift_scales(fixed.image.shape, fixed_affine, cf)
        box_affine = fixed_affine.copy()
        box_affine[:3, 3] = fixed_affine[:3, :3] @ [s.start for s in box] + fixed_affine[:3, 3]
        f_box = sitk.SmoothingRecursiveGaussian(_to_sitk(fixed.array(kind)[box], box_affine), 1.0)
        mask_box = sitk.Cast(_to_sitk(region[box].astype(np.float32), box_affine), sitk.sitkUInt8)

    def run(tx, level, fixed_image=None, mask=None, scales=None):
        """One pyramid level (grid subsampled by ``level``, images smoothed by ``level`` mm)
        as its own ITK registration, on images smoothed beforehand and kept by the heads (ITK
        restarts the optimiser at each level: the multi-level result to 3e-14 mm)."""
        reg = sitk.ImageRegistrationMethod()
        if metric == "outline":
            reg.SetMetricAsMeanSquares()
        else:
            reg.SetMetricAsMattesMutualInformation(32)
        reg.SetMetricFixedMask(fixed_mask if mask is None else mask)
        if metric == "mi":
            # ITK's Mattes metric adds each work unit's derivative under a lock in the order the
            # threads arrive, so the sum, and through the optimiser the transform, changed with
            # the machine's load (NiChart s21 T1: 1,626 vs 1,801 mL removed); one work unit is
            # reproducible and costs about 1 s a head (two are not). Mean squares sums in a fixed order.
            reg.SetNumberOfWorkUnits(1)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(1.0, min_step, iterations, relaxationFactor=0.6)
        if scales is None:
            reg.SetOptimizerScalesFromPhysicalShift()
        else:
            reg.SetOptimizerScales(scales)
        reg.SetShrinkFactorsPerLevel([level])
        reg.SetSmoothingSigmasPerLevel([0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(tx, inPlace=True)
        reg.Execute(fixed.smoothed(kind, level) if fixed_image is None else fixed_image, moving.smoothed(kind, level))
        return tx

    def run_all(tx, crop: bool):
        for level in shrink[:-1] if crop else shrink:
            run(tx, level)
        if crop:
            run(tx, 1, f_box, mask_box, full_grid_scales)
        return tx

    aff = sitk.AffineTransform(3)
    aff.SetCenter([float(v) for v in cf])
    if init is None:
        sim = sitk.Similarity3DTransform()
        sim.SetCenter([float(v) for v in cf])
        sim.SetTranslation([float(v) for v in cm - cf])
        sim = run_all(sim, crop=False)
        aff.SetMatrix(sim.GetMatrix())
        aff.SetTranslation(sim.GetTranslation())
    else:
        start = RAS_LPS @ init @ RAS_LPS  # x -> A x + b in LPS; with centre c the translation is b + A c - c
        a0, b0 = start[:3, :3], start[:3, 3]
        aff.SetMatrix([float(v) for v in a0.ravel()])
        aff.SetTranslation([float(v) for v in b0 + a0 @ cf - cf])
    tx = run_all(aff, crop=split)
    a = np.array(tx.GetMatrix()).reshape(3, 3)
    c = np.array(tx.GetCenter())
    t = np.array(tx.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + c - a @ c
    return RAS_LPS @ lps @ RAS_LPS
