"""What the face detector sees: the five views the attack renders (front, 45 degrees and profile
each side) of cached heads before (top row) and after defacing (bottom row), dlib's face boxes
drawn in red, one picture per head (needs the [qc] extra):

    python scripts/attack_views.py --subjects real_ixi572_t1 real_ixi448_t1:tilted --png-dir /tmp/views [--keep-ears] [--mode reface]

A subject ``NAME:KIND`` is the cached head as ``deface.evaluation.acquisition_variant`` KIND makes
it, in its original contrast (as ``scripts/evaluate.py`` does). Prints the views with a face in
the defaced render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("data_cache"))
    p.add_argument("--subjects", nargs="+", required=True)
    p.add_argument("--png-dir", type=Path, required=True)
    p.add_argument("--keep-ears", action="store_true", help="as deface-infer --keep-ears")
    p.add_argument("--mode", default="zero", help="as deface-infer --mode (zero, noise, reface, ...)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from evaluate import variant
    from PIL import Image, ImageDraw

    from deface import Defacer, facecheck
    from deface.attack import VIEWS
    from deface.render import render_views

    if not facecheck.available():
        print("the face detector is not installed: pip install 'deface-mri[qc]'", file=sys.stderr)
        return 3
    args.png_dir.mkdir(parents=True, exist_ok=True)
    d = Defacer(ears=False if args.keep_ears else None, mode=args.mode)
    print("subject | views with a face, original | defaced | removed mL")
    for subject in args.subjects:
        name, _, kind = subject.partition(":")
        data, labels, affine, _ = variant(args.cache, f"{name}:{kind}:original")
        result = d.deface(nib.Nifti1Image(data, affine))
        before, threshold = render_views(data, affine, VIEWS)  # the attack's views and render threshold
        after, _ = render_views(np.asarray(result.raw, np.float32), affine, VIEWS, threshold)
        tiles, found = [], {0: [], 1: []}
        for view in VIEWS:
            for row, picture in enumerate((before[view], after[view])):
                boxes = facecheck.detect_faces(picture)
                found[row] += [view] if boxes else []
                tile = Image.fromarray(picture).convert("RGB")
                for box in boxes:
                    ImageDraw.Draw(tile).rectangle(box, outline=(255, 0, 0))
                tiles.append((row, tile))
        w, h = tiles[0][1].size
        sheet = Image.new("RGB", (w * len(VIEWS), h * 2))
        for i, (row, tile) in enumerate(tiles):
            sheet.paste(tile, ((i // 2) * w, row * h))
        sheet.save(args.png_dir / f"{subject.replace(':', '_')}.png")
        print(f"{subject} | {' '.join(found[0]) or '-'} | {' '.join(found[1]) or '-'} | {result.stats['removed_ml']}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
