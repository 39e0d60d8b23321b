"""Face-detector hit rate on surface renders of original versus defaced heads (needs the [qc] extra).

    python scripts/reidentification.py ../shared/data/heads/*.nii.gz [--weights DIR] [--csv out.csv]

For each head: deface it, render the original and the output (front, +-45 degrees, profile),
run dlib's detectors (HOG + CNN) on every view, and, when both front views hold a face, the
recogniser's embedding distance. Prints one row per head and the hit rates.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--weights", default=None)
    p.add_argument("--resolution", type=float, default=1.0, help="render pixel size in mm")
    p.add_argument("--csv", type=Path, default=None)
    args = p.parse_args()

    from deface import facecheck
    from deface.inference import Defacer

    if not facecheck.available():
        print("the face detector is not installed: pip install 'deface-mri[qc]'", file=sys.stderr)
        return 3
    defacer = Defacer(weights=args.weights, device="auto")
    rows = []
    print("head | views with a face: original | defaced | front distance | removed mL")
    for path in args.images:
        result = defacer.deface(path)
        before = result.volume.reference()
        after = result.volume.scaled(result.raw.reshape(result.raw.shape[:3] + (-1,))[..., 0])
        check, _, _ = facecheck.check_images(before, result.volume.affine, after, result.volume.affine,
                                             spacing=args.resolution)
        orig = [v for v, n in check.original_views.items() if n]
        row = {"head": path.name, "original_views": " ".join(orig), "defaced_views": " ".join(check.face_found_after),
               "distance": check.distance, "removed_ml": result.stats["removed_ml"]}
        rows.append(row)
        dist = f"{check.distance:.3f}" if check.distance is not None else "-"
        print(f"{path.name} | {row['original_views'] or '-'} | {row['defaced_views'] or '-'} | {dist} | "
              f"{row['removed_ml']}", flush=True)
    n = len(rows)
    hit_o = sum(bool(r["original_views"]) for r in rows)
    hit_d = sum(bool(r["defaced_views"]) for r in rows)
    print(f"face detected in any view: originals {hit_o}/{n}, defaced {hit_d}/{n}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
