"""Where the brain voxels a defaced image lost lie, and which region removed them:

    python scripts/lost_brain.py real_nichart_demo_s18_flair:crop_mouth:t2like [--independent deepbet] [--post KEY=VALUE ...]

Each image is NAME[:ACQUISITION[:CONTRAST]] of the evaluation cache, built as scripts/evaluate.py
builds it. Per image: the labelled (and independent) brain voxels whose value changed, their
distance to the independent brain, and on the canonical grid which of the wrapper's regions hold
them (the network's removal, the face completion, the ears), how far they lie from the registered
atlas brain, and their MNI coordinates through the registration (where it is off, they say so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="NAME[:ACQUISITION[:CONTRAST]]")
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--independent", nargs="*", default=[], help="brain extractors for the independent mask")
    p.add_argument("--post", nargs="*", default=[], metavar="KEY=VALUE", help="postprocessing settings")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import variant

    from deface import BRAIN, Defacer
    from deface.atlas import atlas_points, brain_on_grid
    from deface.inference import changed_voxels
    from deface.postprocessing import grow
    from deface.preprocessing import resample, voxel_sizes

    import yaml

    d = Defacer(post={k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.post)})
    for spec in args.images:
        image, labels_v, affine_v, indep = variant(args.cache, spec, args.independent)
        result = d.deface(nib.Nifti1Image(image, affine_v))
        changed = changed_voxels(result.raw, result.volume.raw)
        lost = changed & (labels_v == BRAIN)
        line = f"{spec}: {int(lost.sum())} labelled brain voxels changed"
        spacing = voxel_sizes(affine_v)
        if indep is not None:
            line += f", {int((changed & indep).sum())} independent"
            if lost.any():
                mm = ndi.distance_transform_edt(~indep, sampling=spacing)[lost]
                line += f"; the labelled ones {mm.min():.1f}-{mm.max():.1f} mm outside the independent brain"
        stats = result.stats
        print(line + f" (registration {stats['atlas_registration']}, symmetry {stats['atlas_symmetry']}, "
              f"front margin {stats['atlas_margin_front_mm']} mm)")
        if not lost.any() or result.regions is None:
            continue
        canon = resample(torch.from_numpy(lost.astype(np.float32))[None], affine_v, result.grid, mode="nearest")[0] > 0.5
        regions = result.regions
        held = {"network removal": regions.network.remove, "face completion": regions.complete, "ears": regions.ears}
        print("  on the canonical grid: " + str(int(canon.sum())) + " voxels; in "
              + ", ".join(f"{k} {int((canon & v).sum())}" for k, v in held.items() if v is not None))
        if result.to_atlas is not None:
            atlas = brain_on_grid(d.atlas, result.to_atlas, result.grid, d.post.atlas_threshold)
            within = [f"{mm} mm {int((canon & grow(atlas, float(mm), d.spacing)).sum())}" for mm in (6, 8, 10, 14)]
            print("  within the registered atlas brain + " + ", ".join(within))
            mni = atlas_points(result.to_atlas, result.grid)[canon.numpy()]
            print(f"  MNI through the registration: {np.round(mni.min(0), 1)} to {np.round(mni.max(0), 1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
