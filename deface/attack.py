"""The re-identification attack, as a score: what a surface render of a defaced head still gives away.

For one head (original and defaced image on the same grid, and its face label):
- ``surface_kept``: of the frontal depth map's face pixels (where the original's skin is labelled
  face), the fraction whose depth in the defaced render is within ``KEPT_MM`` of the original's:
  the face surface left in place;
- ``views_with_face``: the views of the defaced render in which dlib's detectors find a face;
- ``distance``: per view in which the defaced render holds a detected face, dlib's recogniser
  distance to the original render of that view (< 0.6 is a match by dlib's convention): the attack
  as a judge runs it, detector first;
- ``forced_distance``: the same for every view in which the original holds a face, the original's
  face box used where the detector finds none in the defaced render (a stricter attacker who knows
  where the face was). Plaster renders of *different* people are often closer than 0.6 too
  (IXI 013/014/033 originals: 0.46-0.55), so this column means something only beside the
  gallery's own spread (``gallery_spread``).
The gallery attack (``gallery_rank1``) asks, for each defaced view, whether the person's own
original is the nearest of all originals. Needs the ``qc`` extra (dlib, face-recognition-models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deface import FACE

VIEWS = {"front": 0.0, "left45": 45.0, "right45": -45.0, "left90": 90.0, "right90": -90.0}
KEPT_MM = 2.0


@dataclass
class AttackResult:
    surface_kept: float
    views_with_face: list[str] = field(default_factory=list)
    distance: dict[str, float] = field(default_factory=dict)  # detected views -> distance to the original
    forced_distance: dict[str, float] = field(default_factory=dict)  # views with an original face
    original_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    defaced_embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # forced where none detected

    @property
    def min_distance(self) -> float:
        return min(self.distance.values()) if self.distance else float("nan")

    @property
    def min_forced_distance(self) -> float:
        return min(self.forced_distance.values()) if self.forced_distance else float("nan")


def face_surface_kept(original: np.ndarray, defaced: np.ndarray, affine: np.ndarray, labels: np.ndarray,
                      spacing: float = 1.0, kept_mm: float = KEPT_MM) -> tuple[float, float]:
    """(fraction of the frontal face surface within ``kept_mm`` of where it was, the render threshold)."""
    kept, threshold, _ = _surface_kept(original, defaced, affine, labels, spacing, kept_mm)
    return kept, threshold


def _surface_kept(original: np.ndarray, defaced: np.ndarray, affine: np.ndarray, labels: np.ndarray,
                  spacing: float, kept_mm: float) -> tuple[float, float, tuple[torch.Tensor, torch.Tensor]]:
    """``face_surface_kept`` and the two head masks it rendered (original, defaced), so the views
    are drawn from the same masks instead of computing them again."""
    from deface.preprocessing import resample
    from deface.render import depth_map, head_surface_volume, render_grid

    mask_o, threshold = head_surface_volume(original, affine, spacing=spacing)
    mask_d, _ = head_surface_volume(defaced, affine, spacing=spacing, threshold=threshold)
    grid = render_grid(original.shape, affine, spacing)
    face = resample(torch.from_numpy((labels == FACE).astype(np.float32))[None], affine, grid, mode="nearest")[0]
    d_o, d_d = depth_map(mask_o, 0.0), depth_map(mask_d, 0.0)
    d_f = depth_map(face * mask_o, 0.0)
    tol = kept_mm / spacing
    on_face = np.isfinite(d_o) & np.isfinite(d_f) & (np.abs(np.nan_to_num(d_f) - np.nan_to_num(d_o)) <= tol)
    if not on_face.any():
        return float("nan"), threshold, (mask_o, mask_d)
    kept = on_face & np.isfinite(d_d) & (np.abs(np.nan_to_num(d_d) - np.nan_to_num(d_o)) <= tol)
    return float(kept.sum() / on_face.sum()), threshold, (mask_o, mask_d)


def attack(original: np.ndarray, defaced: np.ndarray, affine: np.ndarray, labels: np.ndarray,
           spacing: float = 1.0) -> AttackResult:
    """Render both heads from every view in ``VIEWS`` and attack the defaced one."""
    from deface.facecheck import detect_faces, embedding
    from deface.render import depth_map, shade

    kept, _, (mask_o, mask_d) = _surface_kept(original, defaced, affine, labels, spacing, KEPT_MM)
    views_o = {name: shade(depth_map(mask_o, yaw)) for name, yaw in VIEWS.items()}
    views_d = {name: shade(depth_map(mask_d, yaw)) for name, yaw in VIEWS.items()}
    result = AttackResult(kept)
    for view in VIEWS:
        boxes_o, boxes_d = detect_faces(views_o[view]), detect_faces(views_d[view])
        if boxes_d:
            result.views_with_face.append(view)
        if not boxes_o:
            continue
        box_o = max(boxes_o, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        box_d = max(boxes_d, key=lambda b: (b[2] - b[0]) * (b[3] - b[1])) if boxes_d else box_o
        result.original_embeddings[view] = embedding(views_o[view], box_o)
        result.defaced_embeddings[view] = embedding(views_d[view], box_d)
        d = float(np.linalg.norm(result.original_embeddings[view] - result.defaced_embeddings[view]))
        result.forced_distance[view] = d
        if boxes_d:
            result.distance[view] = d
    return result


def gallery_rank1(results: dict[str, AttackResult], forced: bool = False) -> dict[str, list[str]]:
    """For each person, the views in which their defaced render's nearest original (among all
    persons' originals in that view) is their own: a rank-1 hit of the gallery attack. Only
    views with a detected face count unless ``forced``."""
    hits: dict[str, list[str]] = {name: [] for name in results}
    for view in VIEWS:
        gallery = {n: r.original_embeddings[view] for n, r in results.items() if view in r.original_embeddings}
        if len(gallery) < 2:
            continue
        names = list(gallery)
        stack = np.stack([gallery[n] for n in names])
        for name, r in results.items():
            if view not in r.defaced_embeddings or not (forced or view in r.distance):
                continue
            nearest = names[int(np.argmin(np.linalg.norm(stack - r.defaced_embeddings[view], axis=1)))]
            if nearest == name:
                hits[name].append(view)
    return hits


def gallery_spread(results: dict[str, AttackResult]) -> float:
    """Median recogniser distance between the originals of different people (same view): what
    "close" means for these renders."""
    dists = []
    for view in VIEWS:
        embs = [r.original_embeddings[view] for r in results.values() if view in r.original_embeddings]
        dists += [float(np.linalg.norm(a - b)) for i, a in enumerate(embs) for b in embs[i + 1:]]
    return float(np.median(dists)) if dists else float("nan")
