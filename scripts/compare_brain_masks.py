"""Where two independent brain extractors disagree about a defaced head, which one is right?

    python scripts/compare_brain_masks.py --subjects real_ixi257_t1 real_clinical_stroke_t2 \
        --png docs/robex_vs_deepbet.png

For each cached head (the extractors' masks as ``scripts/evaluate.py --independent deepbet robex``
computes and caches them in ``<cache>/independent``): the volumes of ROBEX's, deepbet's and the
labelled brain, how much of ROBEX's lies on labelled face, and the ROBEX voxels the default
Defacer changes: how far outside the labelled and the deepbet brain they lie, their labels, and
where in MNI space. ``--png``: one sagittal slice per head through the median changed ROBEX voxel,
with the removed region and the three brains' outlines, to look at. Evaluation only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"), help="training cache folder")
    p.add_argument("--subjects", nargs="+", required=True, help="real heads in the cache")
    p.add_argument("--png", type=Path, default=None, help="write the sagittal slices here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import cache_head, independent_mask

    from deface.inference import Defacer
    from deface.preprocessing import voxel_sizes

    defacer = Defacer(device="cpu")
    panels = []
    for name in args.subjects:
        data, labels, affine = cache_head(args.cache, name)
        image = data.astype(np.float32)
        voxel = voxel_sizes(affine)
        ml = float(np.prod(voxel)) / 1000
        robex, deepbet = (independent_mask(args.cache, name, data, affine, [tool]) for tool in ("robex", "deepbet"))
        brain = labels == 2
        result = defacer.deface(nib.Nifti1Image(image, affine))
        changed = result.volume.scaled(result.raw) != image
        hit = changed & robex
        print(f"{name}: ROBEX {robex.sum() * ml:.0f} mL, deepbet {deepbet.sum() * ml:.0f} mL, labels "
              f"{brain.sum() * ml:.0f} mL; ROBEX outside deepbet {(robex & ~deepbet).sum() * ml:.0f} mL, "
              f"on labelled face {(robex & (labels == 1)).sum() * ml:.1f} mL; ROBEX voxels changed {int(hit.sum())}")
        if hit.any():
            out_labels = ndi.distance_transform_edt(~brain, sampling=voxel)[hit]
            out_deepbet = ndi.distance_transform_edt(~deepbet, sampling=voxel)[hit]
            counts = np.bincount(labels[hit].astype(int), minlength=4)
            idx = np.argwhere(hit)
            mni = (result.to_atlas @ affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
            print(f"  changed ROBEX voxels: mm outside the labelled brain min {out_labels.min():.1f}, median "
                  f"{np.median(out_labels):.1f}; outside deepbet's min {out_deepbet.min():.1f}, median "
                  f"{np.median(out_deepbet):.1f}; labels (background, face, brain, ears) {counts.tolist()}; "
                  f"MNI median {np.median(mni, 0).round(0).tolist()}, z {mni[:, 2].min():.0f}..{mni[:, 2].max():.0f}")
        x = int(np.median(np.argwhere(hit)[:, 0])) if hit.any() else data.shape[0] // 2
        panels.append((name, x, image, changed, robex, deepbet, brain))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
        for ax, (name, x, image, changed, robex, deepbet, brain) in zip(axes[0], panels):
            def cut(a: np.ndarray) -> np.ndarray:
                return np.rot90(a[x])

            ax.imshow(cut(image), cmap="gray")
            ax.imshow(np.ma.masked_where(~cut(changed), cut(changed)), cmap="autumn", alpha=0.35)
            for mask, colour in ((robex, "cyan"), (deepbet, "lime"), (brain, "magenta")):
                ax.contour(cut(mask), [0.5], colors=colour, linewidths=0.8)
            ax.set_title(f"{name} x={x}: removed (orange), ROBEX (cyan), deepbet (green), labels (magenta)", fontsize=7)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(args.png, dpi=70)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
