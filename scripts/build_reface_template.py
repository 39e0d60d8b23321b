"""Build the generic head that ``--mode reface`` puts in place of a face (deface/assets/reface_head_2mm.npz).

    python scripts/build_reface_template.py --root ../shared/data

From FSL's MNI152 T1 2 mm head (the ICBM152 6th-generation nonlinear average, MNI permissive
notice: deface/assets/README.md), the only average head here whose face has eyes, nose and lips
in its field of view (voxface's Conte template is cut flat at the nose, avg152 is a blur, the
pydeface mean head carries a box around the eyes). Its field of view stops at the lips, so the
lowest slice is repeated ``CHIN_SLICES`` times downwards with its front trimmed: the first
``CHIN_UPRIGHT`` copies as they are (the chin), then each one voxel shorter at the front than
the one above (the underside of the jaw, sloping back at 45 degrees to the neck), not a cut.
It is registered once to the atlas the wrapper already registers to every image
(deface.atlas), so at run time one registration places both. Stored:

- ``image`` (uint8): the template, 0-255 (its 99.5th head percentile is 230);
- ``tissue`` (uint8): 0 air, then 1 dark, 2 middle, 3 bright head tissue (three intensity
  clusters of the template: bone and cavities, muscle and skin, fat). ``--mode reface`` paints
  each class with the scan's own intensity for it, so the face takes any contrast. Hollows a
  ball of radius ``CLOSE_RADIUS_MM`` cannot enter are filled with middle tissue
  (``closed_hollows``: 1,289 voxels, 145 of them in the face, from the nostrils down to the lips
  and chin); with them the refaced renders held fewer faces a detector finds and none ranked
  first (docs/evaluation.md, 2026-12-07 (h));
- ``affine``: template voxel -> atlas (MNI) world.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

SOURCE = "templates/fsl_MNI152_T1_2mm.nii.gz"
CHIN_SLICES, CHIN_UPRIGHT = 30, 5  # 60 mm, the first 10 mm upright
CLOSE_RADIUS_MM = 6.0  # see closed_hollows
OUT = Path(__file__).resolve().parents[1] / "deface" / "assets" / "reface_head_2mm.npz"


def closed_hollows(tissue: np.ndarray, voxel_mm: float) -> np.ndarray:
    """``tissue`` (classes as stored) closed by a ball of radius ``CLOSE_RADIUS_MM``, its enclosed
    holes filled; the voxels added are middle tissue (skin)."""
    from scipy import ndimage as ndi

    from deface.anatomy import ball

    out = tissue.copy()
    r = int(round(CLOSE_RADIUS_MM / voxel_mm))
    solid = np.pad(tissue > 0, r + 1)
    closed = ndi.binary_fill_holes(ndi.binary_closing(solid, ball(np.full(3, r))))[(slice(r + 1, -r - 1),) * 3]
    out[closed & (tissue == 0)] = 2
    return out


def main(argv: list[str] | None = None) -> int:
    from deface.atlas import Atlas, head_silhouette, register_atlas
    from deface.data.labeller import shared_data_root
    from deface.evaluation import intensity_classes
    from deface.preprocessing import to_canonical

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="shared data folder (default $DEFACE_DATA)")
    p.add_argument("-o", "--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    img = nib.as_closest_canonical(nib.load(str((args.root or shared_data_root()) / SOURCE)))
    data = np.asarray(img.dataobj, np.float32)
    bottom = data[:, :, 0]
    solid = bottom > 0.1 * float(np.percentile(data, 99.5))
    front = np.where(solid.any(1), solid.shape[1] - 1 - np.argmax(solid[:, ::-1], 1), -1)  # per x: last tissue y
    y = np.arange(bottom.shape[1])[None]
    chin = [np.where(y <= front[:, None] - max(k - CHIN_UPRIGHT, 0), bottom, 0.0) for k in range(CHIN_SLICES, 0, -1)]
    data = np.concatenate([np.stack(chin, 2), data], 2)
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * CHIN_SLICES
    canon = to_canonical(data, affine, 2.0, 16)
    reg = register_atlas(Atlas.load(), canon.image[0].numpy(), canon.grid.affine)
    if reg.to_atlas is None:
        raise SystemExit(f"registration of the template to the atlas: {reg.status}")
    scaled = data / max(float(np.percentile(data, 99.5)), 1e-6)
    head = head_silhouette(scaled)
    tissue = closed_hollows(intensity_classes(scaled, head & (scaled > 0.05)), 2.0)
    image = np.round(np.clip(scaled * 230, 0, 255)).astype(np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, image=image, tissue=tissue, affine=reg.to_atlas @ affine,
                        source=np.array("FSL MNI152_T1_2mm (ICBM152 nonlinear 6th generation), chin extended"))
    counts = np.bincount(tissue.ravel(), minlength=4)
    print(f"{args.out}: {image.shape}, tissue voxels {counts.tolist()}, "
          f"{args.out.stat().st_size / 1e6:.2f} MB; to atlas:\n{np.round(reg.to_atlas, 3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
