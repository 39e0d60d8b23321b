"""``--mode reface``: the removed voxels take a generic face instead of a hole.

The generic head is FSL's MNI152 T1 2 mm average of 152 adults (MNI's permissive notice in
deface/assets/README.md), stored in atlas space with three tissue classes (dark, middle,
bright) besides air (``scripts/build_reface_template.py``). The atlas registration the guard
already computes places it on the scan; each class is painted with the scan's own median
intensity for that class inside the removed region, so the face takes the scan's contrast
(T1, T2, FLAIR, CT alike: only the order of the classes comes from the template). Within
``BLEND_MM`` of the region's edge the fill fades into values extrapolated from outside the
region, so no seam shows. Before the fade, the painted face takes the region's own values, dealt
out in its order (``keep_histogram``): away from the edge the image keeps the values it had, so a
tool that normalises by the whole image's statistics (deepbet) sees nearly the same numbers, and
the face has the scan's own texture, while where each value lands comes from the generic face
alone. Only ``remove`` voxels are written, so the protected brain never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

REFACE_FILE = Path(__file__).parent / "assets" / "reface_head_2mm.npz"
BLEND_MM = 4.0  # width of the fade from the outside into the generic face
MIN_CLASS_VOXELS = 20  # fewer voxels of a class in the region: its level comes from the whole box
DEPTH_SEARCH_MM, DEPTH_STEP_MM = 20.0, 2.0  # see fit_depth


@dataclass(frozen=True)
class GenericHead:
    tissue: np.ndarray  # (X, Y, Z) uint8: 0 air, 1 dark, 2 middle, 3 bright
    affine: np.ndarray  # template voxel -> atlas world

    @property
    def classes(self) -> int:
        return 4


@lru_cache(maxsize=1)
def load_generic_head(path: str | None = None) -> GenericHead:
    z = np.load(Path(path) if path else REFACE_FILE)
    return GenericHead(z["tissue"].astype(np.uint8), z["affine"].astype(np.float64))


def box_of(mask: np.ndarray, margin: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis, clipped to the array."""
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - int(m), 0), min(int(i.max()) + int(m) + 1, n))
                 for i, m, n in zip(idx, margin, mask.shape))


def box_grid(affine: np.ndarray, box: tuple[slice, slice, slice], step: int = 1):
    """The grid of ``box`` (every ``step``-th voxel) of an array with voxel -> world ``affine``."""
    from deface.preprocessing import Grid

    start = np.eye(4)
    start[:3, 3] = [s.start for s in box]
    start[:3, :3] *= step
    return Grid(tuple(-(-(s.stop - s.start) // step) for s in box), affine @ start)


def fit_depth(head: GenericHead, to_atlas: np.ndarray, affine: np.ndarray, box: tuple[slice, slice, slice],
              tissue: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``to_atlas`` with the generic head moved along its own front-back axis (within
    +-``DEPTH_SEARCH_MM``) to where its tissue best overlaps the scan's ``tissue`` inside the
    removal ``region`` (Dice, every 2nd voxel). The whole-head registration leaves the face a
    centimetre or more in front of or behind the person's; in front, a tight field of view cuts
    the generic face flat. One shift says no more about the person than where the face was."""
    from deface.preprocessing import resample

    step = 2
    grid = box_grid(affine, box, step)
    t = tissue[box][::step, ::step, ::step]
    r = region[box][::step, ::step, ::step]
    solid = torch.from_numpy((head.tissue > 0).astype(np.float32))[None]
    front = np.linalg.inv(to_atlas)[:3, :3] @ np.array([0.0, 1.0, 0.0])
    front /= np.linalg.norm(front)
    best, best_shift = -1.0, np.eye(4)
    for mm in np.arange(-DEPTH_SEARCH_MM, DEPTH_SEARCH_MM + 1e-6, DEPTH_STEP_MM):
        shift = np.eye(4)
        shift[:3, 3] = mm * front
        placed = resample(solid, shift @ np.linalg.inv(to_atlas) @ head.affine, grid)[0].numpy() >= 0.5
        a, b = placed & r, t & r
        score = 2.0 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)
        if score > best + 1e-9:
            best, best_shift = score, shift
    return to_atlas @ np.linalg.inv(best_shift)


def class_weights(head: GenericHead, to_atlas: np.ndarray, affine: np.ndarray,
                  box: tuple[slice, slice, slice]) -> np.ndarray:
    """(4, *box shape) soft tissue-class memberships of the generic head on the box of a grid
    with voxel -> world ``affine``; outside the template's field of view: air."""
    from deface.preprocessing import resample

    grid = box_grid(affine, box)
    onehot = torch.from_numpy(np.stack([(head.tissue == c) for c in range(head.classes)]).astype(np.float32))
    w = resample(onehot, np.linalg.inv(to_atlas) @ head.affine, grid).numpy()
    w[0] += np.clip(1.0 - w.sum(0), 0.0, None)
    return w


def class_levels(values: np.ndarray, weights: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The scan's median intensity for each class, over the voxels of the box where the generic
    head has that class and the scan agrees on tissue or air (a registered template is a few
    mm off a person's face: its tissue classes over the person's air would darken every level);
    the region's voxels alone when it holds enough of them. The template's order dark <= middle
    <= bright is not imposed, because a T2 or FLAIR orders its tissues differently."""
    hard = np.argmax(weights, 0)
    finite = np.isfinite(values)
    top = float(np.percentile(values[finite], 99)) if finite.any() else 0.0
    tissue = finite & (values > 0.1 * top)
    levels = np.zeros(weights.shape[0], np.float64)
    for c in range(weights.shape[0]):
        sel = (hard == c) & (tissue if c else finite & ~tissue)
        inside = sel & region
        pick = values[inside] if inside.sum() >= MIN_CLASS_VOXELS else values[sel]
        if pick.size:
            levels[c] = float(np.median(pick))
        else:
            levels[c] = float(np.percentile(values[finite], [2, 20, 50, 85][min(c, 3)])) if finite.any() else 0.0
    return levels


def keep_histogram(fill: np.ndarray, original: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The ``original`` values (1-D) reordered to follow ``fill`` (same length): the k-th smallest
    fill voxel takes the k-th smallest original value, ties (a class painted flat) broken at
    random. The multiset of values is the original's; their places come from ``fill`` and ``rng``
    only, never from where each value was. With non-finite originals the fill is returned as is."""
    if not np.all(np.isfinite(original)):
        return fill
    order = np.lexsort((rng.random(fill.size), fill))
    out = np.empty(fill.size, dtype=np.float64)
    out[order] = np.sort(original)  # cast to float64 on assignment: one copy, not two
    return out


def reface_values(values: np.ndarray, region: np.ndarray, weights: np.ndarray, voxel_mm: np.ndarray,
                  blend_mm: float = BLEND_MM, rng: np.random.Generator | None = None) -> np.ndarray:
    """New values for the ``region`` voxels of ``values`` (a box of one volume, scaled): the
    class levels painted by ``weights``, the region's own values dealt out in that order
    (``keep_histogram``; ``rng``: its ties), faded within ``blend_mm`` of the edge into a
    normalised smoothing of the values outside the region (never of the region's own)."""
    levels = class_levels(values, weights, region)
    fill = np.tensordot(levels, weights, axes=1) / np.maximum(weights.sum(0), 1e-6)
    fill[region] = keep_histogram(fill[region], values[region], np.random.default_rng(0) if rng is None else rng)
    outside = (~region).astype(np.float64)
    sigma = (blend_mm / 2.0) / np.maximum(voxel_mm, 1e-3)
    finite_vals = np.where(np.isfinite(values), values, 0.0)
    den = ndi.gaussian_filter(outside, sigma)
    ext = ndi.gaussian_filter(finite_vals * outside, sigma) / np.maximum(den, 1e-6)
    depth = ndi.distance_transform_edt(region, sampling=voxel_mm)
    alpha = np.clip(depth / blend_mm, 0.0, 1.0)
    alpha = np.where(den > 1e-3, alpha, 1.0)
    out = alpha * fill + (1.0 - alpha) * ext
    return out[region]
