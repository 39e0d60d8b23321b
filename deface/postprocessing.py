"""Turn network probabilities into the voxels to remove, with the brain protected by construction.

On the canonical grid: face = argmax face holding tissue signal, small islands and components
that do not touch air dropped; protected = predicted brain
(probability >= ``brain_threshold``) grown by ``brain_margin_mm`` (Euclidean); the air in front of the
face (along the face direction, through voxels predicted background) is removed too. On the
native grid: a voxel is removed only if it maps onto the removal mask and touches no protected
canonical voxel at all, so no voxel of the dilated brain can change whatever the network says.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from deface import BACKGROUND, BRAIN, FACE
from deface.anatomy import region_box
from deface.preprocessing import Grid, resample


@dataclass
class PostprocessConfig:
    brain_margin_mm: float = 6.0
    brain_threshold: float = 0.25
    min_face_ml: float = 3.0
    min_component_ml: float = 0.5
    clear_air: bool = True
    tissue_threshold: float = 0.08
    min_air_ml: float = 2.0  # a face must touch an air region at least this large
    # Brain-only guard: an image whose head tissue lies almost all within ``brain_only_margin_mm``
    # of the predicted brain (fraction and volume below both limits) is skull-stripped: keep it whole.
    # The network's first look decides alone only below ``brain_only_ml``: skull-stripped brains of
    # the 34 validation people (3 acquisitions x 4 contrasts) have 1-88 mL beyond, but for the s20
    # FLAIR (103-252) and the stroke T2 (265-370), which are then registered and left whole (the
    # atlas check calls them skull-stripped, or their fits are refused); heads cut at the mouth or the
    # nose 170-1,656 mL (the s22 T1 made T2-like 170: its scalp called brain, whole face kept at 400).
    brain_only_margin_mm: float = 8.0
    brain_only_fraction: float = 0.2
    brain_only_ml: float = 100.0
    # ... and only if the image's filled tissue and the predicted brain are no larger than an
    # adult brain with its CSF can be: a network confused by an unusual head (tilted 25 degrees:
    # 2,450-2,980 mL of "brain") must not make a whole head pass as skull-stripped.
    brain_only_max_tissue_ml: float = 2400.0
    brain_only_max_brain_ml: float = 2200.0
    # ... and only if no more than ``brain_only_max_far_face_ml`` of the network's face lies beyond
    # ``brain_only_far_face_mm`` of its brain: a field of view cut at the mouth leaves little
    # tissue beyond the brain (IXI 296: 349 mL, 17 %, as little as a skull-stripped stroke T2's
    # 294 mL), but its nose and cheeks lie far from the brain (63-82 mL of face beyond 15 mm),
    # while frontal lobe a network calls face in a skull-stripped image lies near it (<= 29 mL).
    # Only face in front of the brain's centre counts: a network can call the cerebellum of a
    # skull-stripped brain face too (s20 FLAIR made FLAIR-like: 51 mL far, 8 mL of it in front).
    brain_only_far_face_mm: float = 15.0
    brain_only_max_far_face_ml: float = 45.0
    # ... and an image with no more tissue than a brain that the network does not call skull-stripped
    # is called so after its registration when no more than ``brain_only_atlas_ml`` of its tissue
    # lies beyond ``brain_only_atlas_mm`` of the registered atlas brain: a face reaches further (a
    # head cut at the mouth: 10-283 mL beyond 14 mm), while the skull-stripped T2- and FLAIR-like brains
    # in thick slices whose bright rim the network called face had 0 mL there (other stripped brains,
    # which the network does call skull-stripped: 3-13 mL; 2026-12-07).
    brain_only_atlas_mm: float = 14.0
    brain_only_atlas_ml: float = 5.0
    # ... but an image the first look would call skull-stripped at ``brain_only_band_ml`` (the limit
    # until 2026-12-07 (d)) is defaced only on clear evidence of a head from its registration: a fit
    # at least ``brain_only_band_min_symmetry`` symmetric with more than ``brain_only_band_atlas_ml``
    # of tissue beyond ``brain_only_atlas_mm`` of the atlas brain (else it is left whole). The s22 T1
    # cut at the mouth T2-like: 0.937, 158 mL; the s19 FLAIR skull-stripped within 4 mm of its brain,
    # in 6 mm slices, T2-/FLAIR-like: fits 0.77 / 0.76 symmetric (MI -0.16), 17 / 119 mL, and 2,374
    # deepbet brain voxels removed from the FLAIR-like one when the 5 mL rule above alone judged it.
    brain_only_band_ml: float = 400.0
    brain_only_band_min_symmetry: float = 0.85
    brain_only_band_atlas_ml: float = 50.0
    # Atlas guard (deface.atlas): the registered atlas brain (probability >= atlas_threshold),
    # grown by atlas_margin_mm, is protected too, whatever the network says.
    atlas: bool = True
    atlas_threshold: float = 0.5
    # An image stored obliquely (voxel axes more than ``acquisition_frame_deg`` from the world's: a
    # slab planned on the head) is seen by the network and registered along its own voxel axes
    # (``Defacer.acquisition_frame``): the network learned heads near upright and called the scalp
    # of heads tilted 23-32 degrees and cut at the mouth brain (26 of 39 passed as skull-stripped and
    # kept their whole face); the 213 real heads in ../shared are stored within 4.1 degrees.
    acquisition_frame_deg: float = 5.0
    # Tilted heads (Defacer.prepare): a head the outline search (deface.atlas.head_pose) finds more
    # than ``atlas_search_deg`` from the atlas pose is registered from the search's pose as well as
    # from upright (the better intensity fit is kept); a head that the search finds more than
    # ``atlas_search_deg`` and the kept registration more than ``atlas_upright_deg`` from the atlas
    # pose is resampled upright (pitched forward by ``atlas_upright_pitch_deg``) for the network.
    # Heads as scanned registered 8-22 degrees from the atlas pose (10 held-out heads) but one FLAIR
    # (s19: 31 degrees, search 0: an upright outline); turning them cost face recall (the network's
    # brain grew on the resampled grid: IXI 052 0.839 -> 0.755; s19 surface kept 0.12 -> 0.27); the
    # same heads pitched 25 and rolled 12 degrees more registered 26-51 degrees off, searched 27-56,
    # and gained. The network found the most face on heads turned 10 degrees past the atlas pose
    # (face Dice on IXI 015, 052, niivue).
    atlas_search_deg: float = 20.0
    atlas_search_mi_margin: float = 0.0  # the search's fit is kept when its MI is lower by more than this
    # ... registered from this many of the search's best poses (at least ``SEARCH_DISTINCT_DEG`` apart;
    # the best intensity fit kept): the head outline fits some wrong poses best (docs/evaluation.md
    # 2026-12-06 (c))
    atlas_search_candidates: int = 3
    # ... and before that search, for an image with no more tissue than a brain (a head cut at the
    # mouth, registered after the network), from the upright fit itself nodded by +- this many
    # degrees about the top of the head (0: off), the better intensity fit kept: with the chin and
    # jaw cut off the outline leaves pitch loose, and the optimiser stops in the nearest optimum (IXI
    # 212 cut at the mouth, FLAIR-like: the atlas brain 10 mm forward over the brows at MI -0.258, the
    # search's poses all asymmetric; from 10 degrees nodded MI -0.316 and 0.5 mm; docs/evaluation.md
    # 2026-12-07 (c)). Whole heads do not pay for it: such retries gained them little (2026-12-05 (f)).
    atlas_restart_pitch_deg: float = 10.0
    atlas_upright_deg: float = 25.0
    atlas_upright_pitch_deg: float = 10.0
    # ... and so is a head the kept registration finds turned more than this about the other two
    # axes (roll and yaw, ``deface.atlas.roll_yaw_deg``): the 34 validation heads as scanned reach
    # 5.9 degrees; heads are pitched, rarely turned, and the network learned them so (IXI 162 chin
    # up 20 and turned 25 degrees: registered 22 degrees off, not turned, network brain Dice 0.72;
    # 0.95 turned at 10). Off by default (180): at 10, that head made FLAIR-like lost 72 labelled
    # brain voxels (0 of deepbet's, 0 unturned); see docs/evaluation.md 2026-12-05 (i).
    atlas_upright_roll_yaw_deg: float = 180.0
    # A head the pose search finds rolled or turned more than this is registered from the search's
    # pose too, however small its whole angle (the stroke T2 rolled 18 and turned 15 degrees: searched
    # at 19.3, under ``atlas_search_deg``; its upright fit, MI -0.08, was kept 17 mm off and 59 % of
    # the face surface stayed). The search's poses lie on a 5-degree lattice, hence not 10.
    atlas_search_roll_yaw_deg: float = 12.0
    # Both margins are Euclidean (``grow``). Until 2026-12-03 they were cubes (a "4 mm" cube
    # reached 6.9 mm diagonally): with cubes, 4 mm left 0 brain voxels changed on the held-out heads;
    # with balls, 4 mm changed 6 labelled brain voxels of the tilted stroke T2 (its network brain
    # Dice 0.67, so the atlas does the work there) and 6 mm none, the closest change 1.4 mm from
    # the labelled brain (docs/evaluation.md, 2026-12-03). At 6 mm this margin kept the brows and
    # upper lids (most of the face surface left: IXI 052, 383, 484, 544, 572, the s20 FLAIR); 5 mm
    # (not rounded up to 6 on the 2 mm grid any more) is where 0 brain voxels changed still held on
    # the 34 validation heads, against the labels and deepbet (docs/evaluation.md, 2026-12-03 (d)),
    # but a FLAIR-like IXI 012 then lost 4 labelled voxels of its temporal pole (the network's
    # brain missed it, the atlas brain 5.7 mm away; 2026-12-04). So the margin is 6 mm, and only
    # in front of MNI y = ``atlas_front_y_mm`` (the frontal lobe over the orbits, eyes and brows,
    # where the margin costs face; the temporal poles' tips lie at y 10-25) it is
    # ``atlas_margin_front_mm`` - when the network's brain + ``brain_margin_mm`` covers at least
    # ``atlas_cover_min`` of the registered atlas brain in front of that plane. Below that the network
    # has missed brain there (the stroke T2: 0.73, it takes the orbitofrontal cortex for face; the
    # s20/s21 FLAIRs 0.75/0.74, the s21 T1 0.54-0.86 as registered; 30 other validation heads
    # 0.95-1.00) and the atlas alone protects: 6 mm there too. Until 2026-12-05 the whole atlas
    # brain counted, so a field of view cut at the mouth (the network's brain clipped at the
    # cerebellum: IXI 162 0.81 overall, 0.998 in front) kept the wide margin over the eyes
    # (docs/evaluation.md, 2026-12-05).
    atlas_margin_mm: float = 6.0
    atlas_margin_front_mm: float = 5.0
    # Optional (0: off): a head with no more tissue than a brain (cut at the mouth:
    # ``brain_only_max_tissue_ml``) whose network misses the front of the atlas brain gets this margin
    # there instead. Without chin and jaw the registration's pitch is loose: IXI 015 cut at the mouth,
    # FLAIR-like, loses 158 labelled brain voxels (CSF and dura in front of the frontal pole, which its
    # network calls face; 0 of deepbet's and ROBEX's brains, 2.8 mm to deepbet's) at 6 mm, none at 8.
    # Off because 8 mm doubles what the attack finds of the face on a third of the heads cut at the
    # mouth (IXI 012: surface kept 0.116 -> 0.255; docs/evaluation.md, 2026-12-07 (e)).
    atlas_margin_cut_mm: float = 0.0
    atlas_front_y_mm: float = 25.0
    atlas_cover_min: float = 0.95
    # ... and nothing is removed outside the label definition's face region (deface.anatomy)
    # mapped through the same registration and grown by this margin: a face is where faces are.
    atlas_face_margin_mm: float = 10.0
    # ... except downwards, far from any brain: an affine fitted to the top of the head places the
    # chin least well (IXI 212: its chin and the front of its neck 20-50 mm below the region's
    # bottom, so they were kept whatever the network found).
    atlas_face_bottom_margin_mm: float = 60.0
    # ... and the head tissue inside that face region (no margin) is removed too, wherever nothing
    # protects it: the label definition itself, placed by the registration, completes a face the
    # network found only in part (the network missed 11 % of the labelled face surface on 10
    # held-out heads; the guards kept 7 %). On those heads: face surface kept median 0.179 -> 0.133,
    # 0 brain voxels changed (labels and deepbet), skull-stripped and tilted versions safe too.
    atlas_complete: bool = True
    # With a registration that agrees with the network (at least ``atlas_brain_agreement`` of the
    # network's brain within this distance of the registered atlas brain), the network's brain is
    # protected only within that distance: "brain" far from any brain is the network mistaking face
    # for brain (IXI 212: 55 mL in the tongue and the floor of the mouth, keeping its lips and chin;
    # the NiChart s19 T1, pitched far down: "brain" down the front of its face). The registered atlas
    # brain fits deepbet's to at most 12 mm (scripts/registration_accuracy.py). Where they disagree,
    # the network's brain is protected whole, wherever it lies, unless it is larger than any brain
    # (``brain_only_max_brain_ml``; the s19 T1: 3.3 L): then the network is the one confused.
    atlas_brain_support_mm: float = 20.0
    atlas_brain_agreement: float = 0.9
    # In the registered face region in front of MNI y = ``atlas_front_y_mm`` the network's protected
    # brain (+ ``brain_margin_mm``) reaches at most this far from the registered atlas brain (0: no
    # limit). A field of view cut at the mouth makes the network's brain spill towards the eyes and
    # brows (s19 FLAIR: 58 mL in the face region that is not brain, almost all within 8 mm of the
    # atlas brain, its margin keeping 35 % of the face surface), while the labelled and deepbet
    # brain in the face region lay within 4.9 mm of the atlas brain (26 validation heads and 3 cut
    # at the mouth, a probe): 8 mm leaves 3 mm (docs/evaluation.md, 2026-12-05 (c)).
    atlas_network_reach_mm: float = 8.0
    # ... unless more than ``atlas_network_reach_max_ml`` of the network's brain lies beyond that
    # reach (``brain_beyond_reach_ml`` in the stats), or more than ``atlas_network_reach_cut_max_ml``
    # of it within ``cut_band_mm`` of the edge of the field of view (``brain_beyond_reach_cut_ml``:
    # the registration extrapolated past a cut): then the registration is taken to be off over the
    # face and the network's brain + margin protects there, by ``cut_brain_margin_mm`` within
    # ``cut_band_mm`` of the edge (there the network sees the anatomy cut off). Heads chin up 20
    # degrees, turned 25 and cut at the mouth: IXI 052 83 mL beyond, registered 10-20 mm off, 14,859
    # labelled brain voxels changed; IXI 012 14 mL beyond, 2.0 of it at the cut, 775 voxels; 0 now.
    # Heads merely turned reach 49 mL beyond with the registration right and the network confused (a
    # gate at 5 mL kept niivue's face: surface 0.10 -> 0.24), none at a cut; the other suites 3.5 mL,
    # at a cut 0.53 mL; docs/evaluation.md 2026-12-05 (j). A network whose "brain" is larger than any
    # brain (``brain_only_max_brain_ml``) is the one confused, and its brain beyond the reach says
    # nothing against the registration: the reach rule holds (the NiChart s21 T1 made T2-like: 2.6 L of
    # "brain" down the face and jaw, 71 mL beyond the reach, the registration 0.945 symmetric, nose
    # and eyes kept as "brain": face surface kept 0.519; docs/evaluation.md 2026-12-07 (f)).
    atlas_network_reach_max_ml: float = 60.0
    atlas_network_reach_cut_max_ml: float = 1.0
    cut_band_mm: float = 12.0
    cut_brain_margin_mm: float = 10.0
    # A registered image whose network face lies more than this share inside the registered atlas
    # brain (``face_in_atlas_brain`` in the stats) gets a warning: network and registration disagree
    # over the face, and the atlas guard keeps what the network calls face, so less face may have
    # gone than usual. Either can be the one wrong: the clinical stroke T2's network takes its
    # frontal lobe for face (0.57 as scanned, 0.75 cut at the mouth), IXI 212 cut at the mouth
    # FLAIR-like is registered 10 mm forward (0.66, face surface recall 0.11); 0.016-0.14 on other
    # heads probed, whole or cut at the mouth (docs/evaluation.md 2026-12-07 (c)).
    atlas_disagreement_warn: float = 0.3


@dataclass
class CanonicalMasks:
    remove: torch.Tensor  # (X, Y, Z) bool, canonical grid
    protect: torch.Tensor  # (X, Y, Z) bool
    face_ml: float
    face_found: bool
    brain_only: bool = False
    brain_dropped_ml: float = 0.0  # network "brain" not protected: far from the registered atlas brain
    brain: torch.Tensor | None = None  # (X, Y, Z) bool: the network's brain that ``protect`` is grown from
    brain_confused: bool = False  # the network's "brain" is larger than any brain (``brain_only_max_brain_ml``)


def dilate(mask: torch.Tensor, radius_vox: int) -> torch.Tensor:
    """Binary dilation with a cube of side 2r+1 (max-pooling), separable and fast."""
    if radius_vox <= 0:
        return mask
    x = mask.float()[None, None]
    k, r = 2 * radius_vox + 1, radius_vox
    for kernel, pad in (((k, 1, 1), (r, 0, 0)), ((1, k, 1), (0, r, 0)), ((1, 1, k), (0, 0, r))):
        x = F.max_pool3d(x, kernel, stride=1, padding=pad)
    return (x > 0)[0, 0]


MAX_BALL_VOX = 4  # ``grow`` dilates by a ball up to this radius (faster than the distance transform there)


def grow(mask: torch.Tensor, margin_mm: float, spacing: float) -> torch.Tensor:
    """``mask`` grown by ``margin_mm`` in Euclidean distance: every voxel whose centre lies within
    ``margin_mm`` of a mask voxel's centre (a ball, not ``dilate``'s cube, whose corners reach
    sqrt(3) times as far: a "6 mm" cube kept skin up to 10 mm from the brain). Margins that are not
    a multiple of ``spacing`` are not rounded up (5 mm on a 2 mm grid reaches (2, 1, 0) voxels away,
    not (3, 0, 0)). The protection margins use it; wide ones (the atlas brain's 20 mm support)
    through a distance transform, whose cost does not grow with the radius (a 10-voxel ball
    convolved: 6 s on 2 cores)."""
    radius = margin_mm / spacing
    r = int(np.floor(radius + 1e-6))
    if r <= 0:
        return mask
    if not bool(mask.any()):
        return mask.clone()
    box = region_box(mask.numpy(), r)  # only the mask's box grown by the radius can change
    part = mask[box]
    if r > MAX_BALL_VOX:
        grown = torch.from_numpy(ndi.distance_transform_edt(~part.numpy()) <= radius + 1e-6)
    else:
        grown = ball_dilate(part.contiguous(), radius * radius + 1e-6)
    out = torch.zeros_like(mask)
    out[box] = grown
    return out


def ball_dilate(mask: torch.Tensor, limit: float) -> torch.Tensor:
    """``mask`` (X, Y, Z) dilated by the voxel offsets (dx, dy, dz) with dx^2 + dy^2 + dz^2 <= ``limit``.
    Such a ball is the union of the boxes [-a, a] x [-b, b] x [-c, c] for its points (a, b, c) >= 0
    (a box lies in the ball when its corner does), so it is the OR of a few box dilations, each
    three 1-D max filters (the same voxels as convolving the ball, a quarter of the time on a head's
    2 mm grid)."""
    r = int(np.floor(np.sqrt(limit)))
    corners = [(a, b, c) for a in range(r + 1) for b in range(r + 1) for c in range(r + 1)
               if a * a + b * b + c * c <= limit]
    # only the largest boxes: one whose corner another's covers adds nothing
    corners = [p for p in corners if not any(q != p and all(qi >= pi for qi, pi in zip(q, p)) for q in corners)]
    voxels = mask.numpy().view(np.uint8)
    out = np.zeros_like(voxels)
    for corner in corners:
        box = voxels
        for axis, half in enumerate(corner):
            if half:
                box = ndi.maximum_filter1d(box, 2 * half + 1, axis=axis, mode="constant")
        out |= box
    return torch.from_numpy(out.view(bool))


def cut_band(inside: torch.Tensor, cfg: PostprocessConfig, spacing: float) -> torch.Tensor | None:
    """The voxels of the field of view ``inside`` within ``cut_band_mm`` of its edge (None: off)."""
    if cfg.cut_band_mm <= 0:
        return None
    return inside & grow(~inside, cfg.cut_band_mm, spacing)


def drop_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def keep_components_touching(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` with a voxel next to ``other``.

    Facial soft tissue lies under the skin, so every real face component touches the air in
    front of it; a "face" found deep in tissue (or in an image with no air at all) is not one.
    """
    lab, n = ndi.label(mask)
    if n == 0:
        return mask
    touching = np.unique(lab[ndi.binary_dilation(other) & mask])
    keep = np.zeros(n + 1, bool)
    keep[touching] = True
    keep[0] = False
    return keep[lab]


def anterior_air(face: np.ndarray, background: np.ndarray, direction: tuple[int, int]) -> np.ndarray:
    """Background voxels lying beyond the face along ``direction`` = (axis, +1/-1)."""
    axis, sign = direction
    f = np.flip(face, axis) if sign < 0 else face
    beyond = np.maximum.accumulate(f, axis=axis)
    beyond = np.flip(beyond, axis) if sign < 0 else beyond
    return beyond & background & ~face


def face_direction(face: np.ndarray, brain: np.ndarray) -> tuple[int, int]:
    """The canonical axis and sign pointing from the brain centre to the face centre (+y if unknown)."""
    if not face.any() or not brain.any():
        return 1, 1
    d = np.argwhere(face).mean(0) - np.argwhere(brain).mean(0)
    axis = int(np.argmax(np.abs(d)))
    return axis, (1 if d[axis] >= 0 else -1)


def tissue_signal(image: torch.Tensor, inside: torch.Tensor | None, cfg: PostprocessConfig) -> torch.Tensor:
    """Voxels of the normalised canonical ``image`` holding tissue signal (above
    ``tissue_threshold``), within the field of view ``inside`` when given."""
    signal = image > cfg.tissue_threshold
    return signal & inside if inside is not None else signal


def filled_tissue_ml(tissue: np.ndarray, spacing: float) -> float:
    """The volume (mL) of ``tissue`` (bool, isotropic ``spacing`` mm) with its holes filled (the
    ventricles of a dark-CSF contrast count): a skull-stripped brain has at most
    ``brain_only_max_tissue_ml`` of it."""
    return float(ndi.binary_fill_holes(tissue).sum()) * spacing**3 / 1000.0


def looks_brain_only(tissue: np.ndarray, brain: torch.Tensor, spacing: float, cfg: PostprocessConfig,
                     face: np.ndarray | None = None) -> bool:
    """True when nearly all head tissue lies within a margin of the brain (a skull-stripped image):
    ``brain_only_excess_ml`` below ``brain_only_ml``."""
    return brain_only_excess_ml(tissue, brain, spacing, cfg, face, cfg.brain_only_ml) < cfg.brain_only_ml


def brain_only_excess_ml(tissue: np.ndarray, brain: torch.Tensor, spacing: float, cfg: PostprocessConfig,
                         face: np.ndarray | None = None, stop_ml: float = float("inf")) -> float:
    """mL of head tissue beyond ``brain_only_margin_mm`` of the brain when the image otherwise looks
    skull-stripped, else infinity (also from ``stop_ml`` on: the caller's largest limit, so a whole
    head costs no distance transform). One look serves several limits (``brain_only_ml``, ``_band_ml``).

    ``tissue``: voxels holding signal; ``brain``: predicted brain; ``face``: predicted face, all on
    the canonical grid. A whole head, even cropped tightly around the face, has hundreds of mL of
    scalp, skull, face and neck beyond the margin; a brain-extracted image has only stray rim
    voxels there. Both volumes must also fit one brain (``brain_only_max_*_ml``), whatever the
    network says, and the face in front of the brain's centre must lie near the brain
    (``brain_only_*far_face*``; the canonical grid's second axis points forward, turned or not).
    """
    filled = ndi.binary_fill_holes(tissue)
    total = int(filled.sum())
    voxel_ml = spacing**3 / 1000.0
    if total == 0 or total * voxel_ml > cfg.brain_only_max_tissue_ml:
        return float("inf")
    if float(brain.sum()) * voxel_ml > cfg.brain_only_max_brain_ml:
        return float("inf")
    near = dilate(brain, int(np.ceil(cfg.brain_only_margin_mm / spacing))).numpy()
    beyond = int((filled & ~near).sum())
    if not (beyond / total < cfg.brain_only_fraction and beyond * voxel_ml < stop_ml):
        return float("inf")
    if face is not None and face.any() and brain.any():
        far = ndi.distance_transform_edt(~brain.numpy()) * spacing > cfg.brain_only_far_face_mm
        front = np.arange(face.shape[1]) > np.nonzero(brain.numpy())[1].mean()
        if float((face & far & front[None, :, None]).sum()) * voxel_ml > cfg.brain_only_max_far_face_ml:
            return float("inf")
    return beyond * voxel_ml


def class_map(probs: torch.Tensor) -> torch.Tensor:
    """``probs.argmax(0)`` for (C, X, Y, Z) probabilities, the first class on ties, as argmax;
    a loop over the few classes is 2-3x faster than torch's reduction over the first axis."""
    best, labels = probs[0].clone(), torch.zeros(probs.shape[1:], dtype=torch.long)
    for c in range(1, probs.shape[0]):
        higher = probs[c] > best
        labels[higher] = c
        best = torch.maximum(best, probs[c])
    return labels


def network_face(probs: torch.Tensor, spacing: float, cfg: PostprocessConfig, inside: torch.Tensor | None = None,
                 image: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray]:
    """(class labels, tissue signal or None without ``image``, the face the rules accept) from
    probabilities (C, X, Y, Z): the network's face within the field of view, holding signal, without
    small components and touching real air (not dark specks)."""
    labels = class_map(probs)
    voxel_ml = spacing**3 / 1000.0
    fov = inside.numpy() if inside is not None else np.ones(labels.shape, bool)
    signal = tissue_signal(image, inside, cfg).numpy() if image is not None else None
    face = (labels == FACE).numpy() & fov
    if signal is not None:
        face &= signal
    face = drop_small_components(face, int(np.ceil(cfg.min_component_ml / voxel_ml)))
    if signal is not None:
        air = drop_small_components(fov & ~signal, int(np.ceil(cfg.min_air_ml / voxel_ml)))  # not dark specks
        face = keep_components_touching(face, air)
    return labels, signal, face


def skull_stripped_excess_ml(probs: torch.Tensor, spacing: float, cfg: PostprocessConfig, inside: torch.Tensor,
                             image: torch.Tensor, stop_ml: float = float("inf")) -> float:
    """``brain_only_excess_ml`` of the network's output, a face found or not (infinity: a head):
    below ``brain_only_ml`` nothing is removed either way (``canonical_masks``), so such an image
    needs no atlas registration."""
    labels, signal, face = network_face(probs, spacing, cfg, inside, image)
    return brain_only_excess_ml(signal, labels == BRAIN, spacing, cfg, face, stop_ml)


def canonical_masks(probs: torch.Tensor, spacing: float, cfg: PostprocessConfig,
                    inside: torch.Tensor | None = None, image: torch.Tensor | None = None,
                    brain_support: torch.Tensor | None = None, brain_only: bool | None = None) -> CanonicalMasks:
    """Removal and protection masks on the canonical grid from probabilities (C, X, Y, Z).

    With the normalised ``image`` (X, Y, Z), a face counts as found only if its voxels hold
    tissue signal (an already defaced image has only air where a face was), and nothing is
    removed from an image that is brain-only: ``brain_only`` when the caller knows (a registered
    head is not: the first pass on the unturned grid said so; an image ``skull_stripped_excess_ml``
    puts below ``brain_only_ml`` is), else as ``looks_brain_only`` judges it.
    With ``brain_support`` (X, Y, Z; e.g. the registered atlas brain grown by
    ``atlas_brain_support_mm``) holding at least ``atlas_brain_agreement`` of the network's brain
    (or with a network "brain" larger than ``brain_only_max_brain_ml``), only the network's brain
    within it is protected.
    """
    labels, signal, face = network_face(probs, spacing, cfg, inside, image)
    voxel_ml = spacing**3 / 1000.0
    face_ml = float(face.sum() * voxel_ml)
    brain_like = (probs[BRAIN] >= cfg.brain_threshold) | (labels == BRAIN)
    dropped_ml = 0.0
    confused = float(brain_like.sum()) * voxel_ml > cfg.brain_only_max_brain_ml  # more than any brain
    if brain_support is not None and brain_like.any():
        kept = brain_like & brain_support
        if confused or float(kept.sum()) >= cfg.atlas_brain_agreement * float(brain_like.sum()):
            dropped_ml = float((brain_like & ~kept).sum()) * voxel_ml
            brain_like = kept
    protect = grow(brain_like, cfg.brain_margin_mm, spacing)
    found = face_ml >= cfg.min_face_ml
    if brain_only is None:
        brain_only = signal is not None and looks_brain_only(signal, labels == BRAIN, spacing, cfg, face)
    brain_only = found and brain_only
    if not found or brain_only:
        return CanonicalMasks(torch.zeros_like(protect), protect, face_ml, False, brain_only,
                              brain_dropped_ml=dropped_ml, brain=brain_like, brain_confused=confused)
    remove = face
    if cfg.clear_air:
        background = (labels == BACKGROUND).numpy()
        remove = face | anterior_air(face, background, face_direction(face, (labels == BRAIN).numpy()))
    remove_t = torch.from_numpy(remove) & ~protect
    return CanonicalMasks(remove_t, protect, face_ml, True, brain_dropped_ml=dropped_ml, brain=brain_like,
                          brain_confused=confused)


def protect_also(masks: CanonicalMasks, region: torch.Tensor) -> CanonicalMasks:
    """``masks`` with ``region`` protected too (e.g. the registered atlas brain grown by its margins)."""
    return replace(masks, remove=masks.remove & ~region, protect=masks.protect | region)


def restrict_to(masks: CanonicalMasks, allowed: torch.Tensor) -> CanonicalMasks:
    """``masks`` with removal limited to ``allowed`` (e.g. the registered face region)."""
    return replace(masks, remove=masks.remove & allowed)


def remove_also(masks: CanonicalMasks, region: torch.Tensor) -> CanonicalMasks:
    """``masks`` with ``region`` removed as well (e.g. the registered ears), never where protected."""
    return replace(masks, remove=masks.remove | (region & ~masks.protect))


def native_box(mask: torch.Tensor, canonical: Grid, native: Grid, pad: int = 2) -> tuple[slice, slice, slice] | None:
    """The native index box covering the canonical ``mask`` (None when the mask is empty)."""
    idx = torch.nonzero(mask)
    if idx.numel() == 0:
        return None
    lo = idx.min(0).values.numpy() - 1
    hi = idx.max(0).values.numpy() + 1
    corners = np.array(np.meshgrid(*[[lo[i], hi[i]] for i in range(3)], indexing="ij")).reshape(3, -1)
    m = np.linalg.inv(native.affine) @ canonical.affine
    nat = m[:3, :3] @ corners + m[:3, 3:4]
    start = np.maximum(np.floor(nat.min(1)).astype(int) - pad, 0)
    stop = np.minimum(np.ceil(nat.max(1)).astype(int) + pad + 1, native.shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def to_native(masks: CanonicalMasks, canonical: Grid, native: Grid
              ) -> tuple[np.ndarray, tuple[slice, slice, slice] | None, np.ndarray | None]:
    """(remove mask on the native grid, the native box it lies in, protected mask inside the box)."""
    out = np.zeros(native.shape, dtype=bool)
    box = native_box(masks.remove, canonical, native)
    if box is None:
        return out, None, None
    stacked = torch.stack([masks.remove.float(), masks.protect.float()])
    # Native voxel -> canonical index is what resample computes when the roles are swapped:
    sampled = resample(stacked, canonical.affine, native, mode="bilinear", dst_box=box)
    remove = sampled[0] >= 0.5
    protected = sampled[1] > 0  # touches any protected canonical voxel
    out[box] = (remove & ~protected).numpy()
    return out, box, protected.numpy()
