"""What defacing does to the analysis that follows it: brain extraction and tissue classes after
each method, against the same analysis of the original scan.

    python scripts/downstream.py --subjects real_ixi015_t1 real_nichart_demo_s19_flair \
        --contrasts original t2like flairlike --methods zero reface niimath --csv downstream.csv

For every head of the cache (scripts/evaluate.py's heads) and contrast: the original, deface
with ``--mode zero`` and ``--mode reface`` (one network run, two replacements), and niimath
``-deface`` with pydeface's template and face mask (pydeface's method). Each is brain-extracted
with ``deepbet`` (its weights ship in its PyPI wheel), and the brain is split into three tissue
classes by intensity (deface.evaluation.intensity_classes: CSF, grey, white matter, a FAST-like
classifier without bias field or neighbourhood prior; no PyPI package found here ships a tissue
model inside its wheel: deepmriprep 0.1.0-0.3.0 and brainchop 0.2.5 download theirs at first use).
Columns: Dice of the brain mask against the original's, brain volume change (%), per-class Dice
against the original's classes, voxels of the original's brain mask the method changed, and the median
distance (mm) from the voxels whose brain mask changed to the nearest voxel the method changed.
Evaluation only: ``pip install deepbet niimath pydeface``; nothing here runs in deface itself.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

METHODS = ("zero", "reface", "niimath")


def niimath_deface(data: np.ndarray, affine: np.ndarray, tmp: Path) -> np.ndarray:
    """``niimath IN -deface TEMPLATE MASK OUT`` with pydeface's template and face mask."""
    import pydeface

    niimath = shutil.which("niimath")
    if niimath is None:
        raise SystemExit("needs niimath: pip install niimath pydeface (for this comparison only)")
    ref = Path(pydeface.__file__).parent / "data"
    src, dst = tmp / "in.nii.gz", tmp / "out.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(src))
    subprocess.run([niimath, str(src), "-deface", str(ref / "mean_reg2mean.nii.gz"), str(ref / "facemask.nii.gz"),
                    str(dst)], check=True, capture_output=True)
    return np.asarray(nib.load(str(dst)).dataobj, np.float32).reshape(data.shape)


def analyse(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(deepbet brain mask, tissue classes 1-3 inside it) of one image."""
    from deface.evaluation import independent_brain, intensity_classes

    brain = independent_brain(data, affine, "deepbet")
    return brain, intensity_classes(data, brain)


def moved_mm(moved: np.ndarray, changed: np.ndarray, affine: np.ndarray) -> float:
    """Median distance (mm) from the voxels whose brain mask changed to the nearest voxel the
    method changed (nan if either is empty): small when the mask retreats from the hole, large when
    the extractor redraws its brain all round (deepbet's network after --mode zero)."""
    from scipy import ndimage as ndi

    from deface.preprocessing import voxel_sizes

    if not moved.any() or not changed.any():
        return float("nan")
    return float(np.median(ndi.distance_transform_edt(~changed, sampling=voxel_sizes(affine))[moved]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"), help="training cache folder")
    p.add_argument("--subjects", nargs="+", required=True, help="real heads in the cache")
    p.add_argument("--contrasts", nargs="+", default=["original"], help="original t2like pdlike flairlike")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--weights", default=None)
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import cache_head, write_csv

    from deface.evaluation import contrast_variant, dice
    from deface.inference import Defacer

    zero = Defacer(weights=args.weights, device="cpu", mode="zero")
    reface = Defacer(network=zero.network, metadata=zero.metadata, device="cpu", mode="reface")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.subjects:
            data, labels, affine = cache_head(args.cache, name)
            for kind in args.contrasts:
                image = contrast_variant(data, labels, kind).astype(np.float32)
                brain0, tissue0 = analyse(image, affine)
                outputs = {}
                if {"zero", "reface"} & set(args.methods):
                    result = zero.deface(nib.Nifti1Image(image, affine))
                    outputs["zero"] = result.volume.scaled(result.raw)
                    if "reface" in args.methods:
                        raw = reface.replace(result.volume, result.mask, result.to_atlas)
                        outputs["reface"] = result.volume.scaled(raw)
                if "niimath" in args.methods:
                    outputs["niimath"] = niimath_deface(image, affine, Path(tmp))
                for method in args.methods:
                    out = outputs[method]
                    brain, tissue = analyse(out, affine)
                    row = {"name": f"{name}:{kind}", "method": method,
                           "brain_dice": dice(brain, brain0),
                           "brain_volume_pct": 100.0 * (brain.sum() - brain0.sum()) / max(int(brain0.sum()), 1),
                           **{f"tissue{c}_dice": dice(tissue == c, tissue0 == c) for c in (1, 2, 3)},
                           "brain_changed": int(((out != image) & brain0).sum()),
                           "mask_moved_mm": moved_mm(brain ^ brain0, out != image, affine)}
                    rows.append(row)
                    print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()),
                          file=sys.stderr, flush=True)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    print("method | median brain Dice | min brain Dice | median |volume change| % | median tissue Dice "
          "(1, 2, 3) | brain voxels changed")
    for method in args.methods:
        sel = [r for r in rows if r["method"] == method]
        tissue = " ".join(f"{np.median([r[f'tissue{c}_dice'] for r in sel]):.4f}" for c in (1, 2, 3))
        print(f"{method} | {np.median([r['brain_dice'] for r in sel]):.4f} | {min(r['brain_dice'] for r in sel):.4f}"
              f" | {np.median([abs(r['brain_volume_pct']) for r in sel]):.2f} | {tissue} | "
              f"{sum(r['brain_changed'] for r in sel)}")
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
