"""Why labelled face surface survives defacing: per head, the share of the face surface (face
label within 10 mm of the skin, on the network's canonical grid) that the wrapper removes, and
of the rest, what kept it, first reason first:

    python scripts/kept_face.py --subjects real_ixi015_t1 real_nichart_demo_s19_flair [--acquisition crop_mouth]

- not predicted: the network did not call it face (not even inside a protected zone);
- network brain: inside the network's brain + brain margin;
- atlas brain: inside the registered atlas brain + atlas margin;
- outside region: outside the registered face region + its margin.
With ``atlas_complete`` (the default) the face region's tissue counts as predicted: "not
predicted" is then what neither the network nor the completion reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects", nargs="+", required=True)
    p.add_argument("--acquisition", default="original", help="as scripts/evaluate.py --acquisitions (one)")
    p.add_argument("--contrast", default="original", help="as scripts/evaluate.py --contrasts (one)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import variant

    from deface import FACE, Defacer
    from deface.evaluation import near_skin
    from deface.preprocessing import resample, voxel_sizes

    d = Defacer()
    total = np.zeros(5)
    print("head | face surface voxels | removed | not predicted | network brain | atlas brain | outside region")
    for name in args.subjects:
        data, labels, affine, _ = variant(args.cache, f"{name}:{args.acquisition}:{args.contrast}")
        volume, canon, registration = d.prepare(nib.Nifti1Image(data, affine))
        result = d.apply(volume, canon, d.predict([canon])[0], registration)
        regions, grid = result.regions, result.grid  # as Defacer.apply removed and protected
        shape = grid.shape
        tissue = data > 0.05 * np.percentile(data, 99.5)
        surface = (labels == FACE) & tissue & near_skin(tissue, voxel_sizes(affine), 10.0)
        surface = resample(torch.from_numpy(surface.astype(np.float32))[None], affine, grid)[0].numpy() >= 0.5
        network = regions.network.protect.numpy()
        atlas = regions.atlas.numpy() if regions.atlas is not None else np.zeros(shape, bool)
        zone = regions.allowed.numpy() if regions.allowed is not None else np.ones(shape, bool)
        wanted = regions.network.remove.numpy() | (network & (result.probs.argmax(0).numpy() == FACE))
        if regions.complete is not None:
            wanted = wanted | regions.complete.numpy()
        removed = regions.removal().remove.numpy()
        kept = surface & ~removed
        shares = [surface & removed, kept & ~wanted, kept & wanted & network, kept & wanted & ~network & atlas,
                  kept & wanted & ~network & ~atlas & ~zone]
        counts = np.array([float(s.sum()) for s in shares])
        total += counts
        print(f"{name} | {int(surface.sum())} | " + " | ".join(f"{c / max(surface.sum(), 1):.3f}" for c in counts),
              flush=True)
    print("all | " + str(int(total.sum())) + " | " + " | ".join(f"{c / max(total.sum(), 1):.3f}" for c in total))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
