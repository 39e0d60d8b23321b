"""How well the atlas registration places the atlas brain on labelled heads, and how long it takes:

    python scripts/registration_accuracy.py --subjects real_ixi015_t1 real_clinical_stroke_t2 \
        --acquisitions original tilted --independent deepbet

Per head and acquisition (deface.evaluation.acquisition_variant), on the network's canonical grid
as ``Defacer.prepare`` leaves it: the seconds ``prepare`` took (registration, pose search and
retries included), and against the labelled brain and (with ``--independent``) an independent
extractor's brain mask: Dice of the registered atlas brain, the share of that brain lying more
than 2 mm outside the atlas brain and the farthest it lies outside (what the atlas margin must
cover), and the mean distance of the atlas brain beyond it. Use it before changing anything in
deface.atlas: the atlas guard is only as safe as these figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi


def agreement(reference: np.ndarray, atlas_brain: np.ndarray, spacing: float) -> tuple[float, float, float, float]:
    """(Dice, share of ``reference`` > 2 mm outside ``atlas_brain``, farthest outside in mm,
    mean mm of ``atlas_brain`` beyond ``reference``)."""
    from deface.evaluation import dice

    outside = ndi.distance_transform_edt(~atlas_brain)[reference] * spacing
    beyond = ndi.distance_transform_edt(~reference)[atlas_brain] * spacing
    return dice(reference, atlas_brain), float(np.mean(outside > 2.0)), float(outside.max(initial=0.0)), float(beyond.mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects", nargs="+", required=True)
    p.add_argument("--acquisitions", nargs="+", default=["original"])
    p.add_argument("--independent", nargs="*", default=[], help="brain extractors, as in scripts/evaluate.py")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import cache_head, independent_mask

    from deface import BRAIN, Defacer
    from deface.inference import DEFERRED
    from deface.atlas import brain_on_grid
    from deface.evaluation import acquisition_variant
    from deface.preprocessing import resample

    defacer = Defacer(device="cpu")
    refs = ["labels"] + (["+".join(args.independent)] if args.independent else [])
    print("head | acquisition | prepare s | " + " | ".join(
        f"{r}: Dice, >2 mm outside, max outside mm, mean beyond mm" for r in refs))
    rows = []
    for name in args.subjects:
        data, labels, affine = cache_head(args.cache, name)
        indep = independent_mask(args.cache, name, data, affine, args.independent) if args.independent else None
        for kind in args.acquisitions:
            image, lab, aff = acquisition_variant(data, labels, affine, kind)
            indep_k = None if indep is None else acquisition_variant(indep.astype(np.float32), labels, affine, kind)[0] >= 0.5
            t0 = time.perf_counter()
            volume, canon, registration = defacer.prepare(nib.Nifti1Image(image, aff))
            if registration.status == DEFERRED:  # a small image: the wrapper registers it once it is a head
                canon, registration = defacer.register(volume, canon)
            seconds = time.perf_counter() - t0
            if registration.to_atlas is None:
                print(f"{name} | {kind} | {seconds:.1f} | registration {registration.status}", flush=True)
                continue
            atlas_brain = brain_on_grid(defacer.atlas, registration.to_atlas, canon.grid,
                                        defacer.post.atlas_threshold).numpy()
            masks = [lab == BRAIN] + ([indep_k] if indep_k is not None else [])
            figures = []
            for mask in masks:
                on_grid = resample(torch.from_numpy(mask.astype(np.float32))[None], aff, canon.grid)[0].numpy() >= 0.5
                figures.append(agreement(on_grid, atlas_brain, defacer.spacing))
            rows.append((seconds, figures))
            print(f"{name} | {kind} | {seconds:.1f} | " + " | ".join(
                f"{d:.3f}, {o:.4f}, {m:.1f}, {b:.2f}" for d, o, m, b in figures), flush=True)
    if rows:
        seconds = np.array([r[0] for r in rows])
        print(f"rows: {len(rows)}; prepare seconds median {np.median(seconds):.1f}, max {seconds.max():.1f}")
        for i, ref in enumerate(refs):
            f = np.array([r[1][i] for r in rows])
            print(f"{ref}: Dice mean {f[:, 0].mean():.3f} (min {f[:, 0].min():.3f}); >2 mm outside mean "
                  f"{f[:, 1].mean():.4f} (max {f[:, 1].max():.4f}); farthest outside {f[:, 2].max():.1f} mm; "
                  f"beyond mean {f[:, 3].mean():.2f} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
