"""Build the brain atlas the wrapper registers to every image (deface/assets/brainweb_atlas_2mm.npz).

    python scripts/build_atlas.py --root ../shared/data

From the 20 BrainWeb anatomical models (0.5 mm crisp tissue classes, sampled every 4th voxel
to 2 mm): the mean of a T1-like rendering (one intensity per tissue class) and the number of
models with brain (CSF, grey and white matter, vessels, dura) at each voxel. Both are stored
as uint8, so the file is small enough to ship inside the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from deface.atlas import ATLAS_FILE
from deface.data.labeller import shared_data_root
from deface.data.labels import brainweb_brain
from deface.data.synthesis import PRESETS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="shared data folder (default $DEFACE_DATA)")
    p.add_argument("-o", "--out", type=Path, default=ATLAS_FILE)
    args = p.parse_args(argv)
    files = sorted(((args.root or shared_data_root()) / "brainweb").glob("subject*_crisp_v.mnc.gz"))
    if not files:
        raise SystemExit("no BrainWeb models found")
    t1 = np.array(PRESETS["t1"], np.float32)
    image, brain, affine = None, None, None
    for path in files:
        img = nib.as_closest_canonical(nib.load(str(path)))
        tissue = np.asarray(img.dataobj)[::4, ::4, ::4].astype(np.int64)
        image = t1[tissue] if image is None else image + t1[tissue]
        b = brainweb_brain(tissue).astype(np.int32)
        brain = b if brain is None else brain + b
        affine = img.affine.copy()
        affine[:3, :3] *= 4  # voxel 0 keeps its position, only the step grows
    n = len(files)
    image = np.round(image / image.max() * 255).clip(0, 255).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, image=image, brain=brain.astype(np.uint8), subjects=np.int64(n), affine=affine,
                        sources=np.array([f.name for f in files]))
    print(f"{args.out}: {image.shape}, {n} models, {args.out.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
