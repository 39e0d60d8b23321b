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

Two anchors beside the defacers, for "no more than a rescan would" (no rescan pairs are here): the
same scan moved by one voxel along each axis (``shift``: the identical values, only the field of view
moved, the result moved back; no interpolation) and the same scan with a second noise realisation
(``noise``: Rician, sigma 1 % of the head's 99th percentile, below these scans' own noise). A rescan
does both and more (a new position off the voxel grid, its own noise, bias field and motion), so the
anchors are the least a rescan changes.
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
ANCHORS = ("shift", "noise")
NOISE_FRACTION = 0.01  # the noise anchor's sigma, of the head's 99th percentile


def shifted(data: np.ndarray, back: bool = False) -> np.ndarray:
    """``data`` moved by one voxel along each axis (``back``: the other way), the slab that enters
    the field of view zero: the same values on the same grid, only the head's place in it moved."""
    out = np.zeros_like(data)
    if back:
        out[:-1, :-1, :-1] = data[1:, 1:, 1:]
    else:
        out[1:, 1:, 1:] = data[:-1, :-1, :-1]
    return out


def renoised(data: np.ndarray, seed: int = 0) -> np.ndarray:
    """``data`` with a second magnitude (Rician) noise realisation of sigma ``NOISE_FRACTION`` of the
    99th percentile: the change a new acquisition's noise alone brings, at most these scans' own level."""
    rng = np.random.default_rng(seed)
    sigma = NOISE_FRACTION * float(np.percentile(data, 99))
    real = data + sigma * rng.standard_normal(data.shape)
    return np.sqrt(real**2 + (sigma * rng.standard_normal(data.shape)) ** 2).astype(data.dtype)


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
    p.add_argument("--methods", nargs="+", default=list(METHODS + ANCHORS), choices=METHODS + ANCHORS,
                   help="defacers and the rescan anchors (default: all)")
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
                if "shift" in args.methods:
                    outputs["shift"] = shifted(image)
                if "noise" in args.methods:
                    outputs["noise"] = renoised(image)
                for method in args.methods:
                    out = outputs[method]
                    brain, tissue = analyse(out, affine)
                    ref_brain, ref_tissue = brain0, tissue0
                    if method == "shift":  # compared where the original was: moved back, the last slab lost;
                        # no voxel of the scan was changed, only moved, so it counts none as changed
                        brain, tissue, out = shifted(brain, back=True), shifted(tissue, back=True), image
                        ref_brain, ref_tissue = shifted(shifted(brain0), back=True), shifted(shifted(tissue0), back=True)
                    row = {"name": f"{name}:{kind}", "method": method,
                           "brain_dice": dice(brain, ref_brain),
                           "brain_volume_pct": 100.0 * (brain.sum() - ref_brain.sum()) / max(int(ref_brain.sum()), 1),
                           **{f"tissue{c}_dice": dice(tissue == c, ref_tissue == c) for c in (1, 2, 3)},
                           "brain_changed": int(((out != image) & ref_brain).sum()),
                           "mask_moved_mm": moved_mm(brain ^ ref_brain, out != image, affine)}
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
              f"{'(anchor)' if method in ANCHORS else sum(r['brain_changed'] for r in sel)}")
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
