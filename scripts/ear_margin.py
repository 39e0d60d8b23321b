"""What --ears removes and how close it comes to the brain, on labelled heads of the cache.

    python scripts/ear_margin.py --subjects real_ixi296_t1 real_ixi052_t1 --png docs/ears_profile.png

One network run per head, applied with and without ``--ears``: the volume the ears add to the
removal (air included), the smallest distance from it to the brain label and to deepbet's brain
mask (``scripts/evaluate.py --independent deepbet`` caches it; computed here when missing), and
the brain voxels changed. ``--png``: left-profile renders (input, defaced, defaced --ears) of the
heads named in ``--picture`` (only heads whose licence allows pictures: IXI, not NiChart).
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
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects", nargs="+", required=True)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--picture", nargs="*", default=["real_ixi296_t1", "real_ixi052_t1", "real_ixi162_t1"])
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import cache_head, independent_mask

    from deface import BRAIN, Defacer
    from deface.inference import changed_voxels
    from deface.preprocessing import voxel_sizes
    from deface.render import render_views

    plain = Defacer()
    ears = Defacer(network=plain.network, metadata=plain.metadata, ears=True)
    pictures = []
    print("head | ear region removed (mL, with air) | nearest brain label (mm) | nearest deepbet brain (mm) | "
          "brain voxels changed (labels, deepbet)")
    for name in args.subjects:
        data, labels, affine = cache_head(args.cache, name)
        volume, canon, registration = plain.prepare(nib.Nifti1Image(data, affine))
        probs = plain.predict([canon])[0]
        without, with_ears = (plain.apply(volume, canon, probs, registration),
                              ears.apply(volume, canon, probs, registration))
        added = with_ears.mask & ~without.mask
        spacing = voxel_sizes(affine)
        brain, indep = labels == BRAIN, independent_mask(args.cache, name, data, affine, ["deepbet"])
        nearest = [float(ndi.distance_transform_edt(~m, sampling=spacing)[added].min()) if added.any() else float("nan")
                   for m in (brain, indep)]
        changed = changed_voxels(with_ears.raw, volume.raw)
        print(f"{name.removeprefix('real_')} | {added.sum() * np.prod(spacing) / 1000:.1f} | {nearest[0]:.1f} | "
              f"{nearest[1]:.1f} | {int((changed & brain).sum())}, {int((changed & indep).sum())}", flush=True)
        if args.png and name in args.picture:
            views = {"left90": 90.0}
            before, threshold = render_views(data, affine, views)
            after = [render_views(volume.scaled(r.raw), affine, views, threshold=threshold)[0]["left90"]
                     for r in (without, with_ears)]
            pictures.append((name.removeprefix("real_"), before["left90"], *after))
    if args.png and pictures:
        from deface.qc import pyplot

        plt = pyplot()
        fig, axes = plt.subplots(len(pictures), 3, figsize=(9, 3.2 * len(pictures)), squeeze=False)
        for row, (name, *pics) in enumerate(pictures):
            for col, (pic, title) in enumerate(zip(pics, ("input", "defaced", "defaced --ears"))):
                axes[row, col].imshow(pic, cmap="gray")
                axes[row, col].set_title(f"{name}: {title}", fontsize=8)
                axes[row, col].axis("off")
        fig.tight_layout()
        fig.savefig(args.png, dpi=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
