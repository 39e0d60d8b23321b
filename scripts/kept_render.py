"""Where the render keeps the face, and why: for each pixel of the front render where the labelled
face surface is still within 2 mm of where it was (the attack's ``surface_kept``), what protects
the tissue 3 mm under it, first reason first, with a picture per head:

    python scripts/kept_render.py --subjects real_ixi052_t1 real_nichart_demo_s18_t1:tilted --png-dir /tmp/kept

- atlas brain: inside the registered atlas brain + its margins;
- network brain: inside the network's brain + the brain margin;
- outside region: outside the registered face region + its margin;
- not wanted: neither the network's face nor the face region's tissue to complete;
- other: wanted and allowed, yet not removed (e.g. a component the face rules dropped, or only a
  thin layer removed above tissue that is not).
A subject is read as ``scripts/evaluate.py`` reads it: ``NAME:KIND`` is the cached head as
``deface.evaluation.acquisition_variant`` KIND makes it (e.g. ``tilted``, ``crop_mouth``; a bare
NAME: ``original``), in its ``original`` contrast (rescaled, clipped at the 99.5th percentile);
``NAME:KIND:CONTRAST`` in ``deface.evaluation.contrast_variant``'s CONTRAST instead (e.g.
``real_ixi162_t1:original:flairlike``; ``stored``: the cache's values as they are).
``scripts/kept_face.py`` asks the same of the labelled face voxels instead of the rendered surface.

The last columns say how much of the kept face could go at all without touching the brain: the
share of face pixels kept whose tissue 3 mm under the surface lies more than 6 / 8 mm from both
the labelled brain and deepbet's (``scripts/evaluate.py --independent deepbet`` caches it;
computed here when missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REASONS = ("atlas brain", "network brain", "outside region", "not wanted", "other")
COLOURS = ((255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 160, 255), (255, 255, 255))
DEPTH_MM = 3.0


def front_depth(mask: np.ndarray) -> np.ndarray:
    """(X, Z) index of the most anterior voxel of ``mask`` (X, Y, Z) along y; -1 where none."""
    ys = np.arange(mask.shape[1])[None, :, None]
    return np.where(mask.any(1), np.where(mask, ys, -1).max(1), -1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects", nargs="+", required=True)
    p.add_argument("--png-dir", type=Path, default=None, help="write one picture per subject here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import variant

    from scipy import ndimage as ndi

    from deface import BRAIN, FACE, Defacer
    from deface.attack import KEPT_MM
    from deface.preprocessing import resample, voxel_sizes
    from deface.render import head_surface_volume, render_grid

    d = Defacer()
    print("subject | face pixels | kept | " + " | ".join(REASONS) + " | registration | front margin mm"
          + " | kept > 6 mm from the brain | kept > 8 mm | median mm to the labelled / independent brain")
    for subject in args.subjects:
        data, labels, affine, indep = variant(args.cache, subject, ["deepbet"])  # as scripts/evaluate.py makes it
        brains = [labels == BRAIN, indep]
        volume, canon, registration = d.prepare(nib.Nifti1Image(data, affine))
        probs = d.predict([canon])[0]
        result = d.apply(volume, canon, probs, registration)
        canon_grid, probs = result.grid, result.probs  # a deferred registration may turn the grid
        regions = result.regions  # as Defacer.apply protected and bounded it
        shape = canon_grid.shape
        network = regions.network.protect.numpy()
        atlas = regions.atlas.numpy() if regions.atlas is not None else np.zeros(shape, bool)
        zone = regions.allowed.numpy() if regions.allowed is not None else np.ones(shape, bool)
        wanted_region = regions.complete.numpy() if regions.complete is not None else np.zeros(shape, bool)
        wanted = (probs.argmax(0).numpy() == FACE) | wanted_region
        masks_by_reason = (atlas, network, ~zone, ~wanted)

        defaced = np.asarray(result.raw, np.float32)
        head_o, threshold = head_surface_volume(data, affine)
        head_d, _ = head_surface_volume(defaced, affine, threshold=threshold)
        grid = render_grid(data.shape, affine)
        face = resample(torch.from_numpy((labels == FACE).astype(np.float32))[None], affine, grid, mode="nearest")[0]
        y_o, y_d = front_depth(head_o.numpy() > 0.5), front_depth(head_d.numpy() > 0.5)
        x_i, z_i = np.indices(y_o.shape)
        on_face = (y_o >= 0) & (face.numpy()[x_i, np.clip(y_o, 0, None), z_i] > 0.5)
        kept = on_face & (y_d >= 0) & (np.abs(y_o - y_d) <= KEPT_MM)  # the render grid is 1 mm
        to_canon = np.linalg.inv(canon_grid.affine) @ grid.affine
        to_image = np.linalg.inv(affine) @ grid.affine
        distances = [ndi.distance_transform_edt(~b, sampling=voxel_sizes(affine)) for b in brains]
        counts = np.zeros(len(REASONS))
        near = []  # per kept pixel: mm from its tissue to each brain
        picture = np.zeros((*y_o.shape[::-1], 3), np.uint8)
        picture[on_face.T] = 60
        for x, z in zip(*np.nonzero(kept)):
            under = np.array([x, y_o[x, z] - DEPTH_MM, z, 1.0])
            i = tuple(np.clip(np.round((to_canon @ under)[:3]).astype(int), 0, np.array(shape) - 1))
            reason = next((k for k, m in enumerate(masks_by_reason) if m[i]), len(REASONS) - 1)
            counts[reason] += 1
            picture[z, x] = COLOURS[reason]
            j = tuple(np.clip(np.round((to_image @ under)[:3]).astype(int), 0, np.array(data.shape) - 1))
            near.append([dist[j] for dist in distances])
        n = max(int(on_face.sum()), 1)
        near = np.array(near).reshape(-1, 2)
        closest = near.min(1)
        medians = " / ".join(f"{np.median(near[:, k]):.1f}" if len(near) else "-" for k in range(2))
        print(f"{subject} | {int(on_face.sum())} | {kept.sum() / n:.3f} | " + " | ".join(f"{c / n:.3f}" for c in counts)
              + f" | {result.stats['atlas_registration']} | {result.stats['atlas_margin_front_mm']}"
              + f" | {(closest > 6).sum() / n:.3f} | {(closest > 8).sum() / n:.3f} | {medians}", flush=True)
        if args.png_dir is not None:
            from PIL import Image

            args.png_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(picture[::-1])).save(args.png_dir / f"{subject.replace(':', '_')}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
