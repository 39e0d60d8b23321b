"""How close the upper face (eyes, lids, brows) lies to the brain on labelled heads, in mm.

    python scripts/face_brain_distance.py --cache data_cache --subjects-file configs/holdout/v2.yaml

For each head: the labelled face voxels at or above the eyes (MNI z >= -30 mm, from the cache's
registration) within 5 mm of the skin (what a surface render shows: brows, lids, the bridge of
the nose), their distance to the brain label, and the fraction of them within 3, 6, 9 and 12 mm
of it: what a brain margin of that size would keep if the network's brain were exactly the label's.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage as ndi

from deface import BRAIN, FACE
from deface.anatomy import voxel_world
from deface.evaluation import near_skin
from deface.preprocessing import voxel_sizes

MARGINS_MM = (3.0, 6.0, 9.0, 12.0)
UPPER_FACE_Z = -30.0  # MNI mm: the lower edge of the orbits; above it are the eyes, lids and brows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects-file", type=Path, required=True)
    args = p.parse_args()
    index = json.loads((args.cache / "index.json").read_text())
    stems = sorted(f.stem for f in args.cache.glob("real_*.npz"))
    names = [n for pat in yaml.safe_load(args.subjects_file.read_text())["exclude"] for n in stems
             if fnmatch.fnmatch(n, pat)]
    print("head | upper-face mL | min mm | median mm | " + " | ".join(f"<= {m:.0f} mm" for m in MARGINS_MM))
    rows = []
    for name in names:
        z = np.load(args.cache / f"{name}.npz")
        labels, affine = z["labels"], z["affine"]
        if "to_mni" not in index.get(name, {}):
            print(f"{name}: no registration in the index (labelled before it was kept); skipped")
            continue
        to_mni = np.array(index[name]["to_mni"])  # scan world -> MNI world (the labeller's registration)
        mni = voxel_world(labels.shape, to_mni @ affine)
        spacing = voxel_sizes(affine)
        image = z["image"].astype(np.float32)
        skin = near_skin(image > 0.05 * np.percentile(image, 99.5), spacing, 5.0)
        upper = (labels == FACE) & (mni[..., 2] >= UPPER_FACE_Z) & skin
        if not upper.any():
            continue
        dist = ndi.distance_transform_edt(labels != BRAIN, sampling=spacing)[upper]
        fractions = [float((dist <= m).mean()) for m in MARGINS_MM]
        rows.append(fractions)
        print(f"{name} | {upper.sum() * np.prod(spacing) / 1000:.0f} | {dist.min():.1f} | {np.median(dist):.1f} | "
              + " | ".join(f"{f:.3f}" for f in fractions), flush=True)
    if rows:
        print("mean | | | | " + " | ".join(f"{v:.3f}" for v in np.mean(rows, 0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
