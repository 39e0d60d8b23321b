"""Build the training cache: every subject as labels (+ tissue or image) on a 1 mm RAS grid.

BrainWeb models are labelled from their tissue classes (deface.data.labels); real heads by the
labeller (deface.data.labeller). The cache is a folder of ``.npz`` files read by the DataModule,
so training never touches the original files again and can travel to a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("deface.cache")

# Real heads (../shared/data/heads) and the optional brain mask that replaces the propagated prior.
REAL_HEADS = {
    "colin27_t1": "colin27_t1_brain",
    "elition_mprage_t1": None,
    "decub_hfs_t1": None,
    "ixi012_t1": None,
    "ixi015_t1": None,
    "niivue_otsu_t1": None,
    "clinical_stroke_t2": None,
    "pydeface_mean_head": None,
}
# Heads labelled with the shipped BrainWeb atlas as template: the MNI152 registration put their
# brain label into the orbits (QC PNGs, 2026-11-23). The others keep MNI152, independent of the
# wrapper's atlas guard.
TEMPLATES = {"ixi012_t1": "brainweb", "ixi015_t1": "brainweb"}


def _to_ras_1mm(data: np.ndarray, affine: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample an image (trilinear) and its labels (nearest) to an axis-aligned 1 mm RAS grid."""
    from deface.preprocessing import Grid, canonical_grid, resample

    grid = canonical_grid(Grid(tuple(data.shape[:3]), affine), spacing=1.0, multiple=1, max_size=320)
    img = resample(torch.from_numpy(data.astype(np.float32))[None], affine, grid)[0].numpy()
    lab = resample(torch.from_numpy(labels.astype(np.float32))[None], affine, grid, mode="nearest")[0].numpy()
    return img, lab.astype(np.uint8), grid.affine


def to_unit(image: np.ndarray) -> np.ndarray:
    """Percentile-normalise a real image and quantise to uint8 (1.5 -> 255)."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    x = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1.5)
    return np.round(x / 1.5 * 255).astype(np.uint8)


def build_cache(root: Path, out: Path, heads: list[str] | None = None, brainweb: bool = True) -> None:
    import nibabel as nib

    from deface.data.labeller import label_scan, mni_brain_prior, qc_png
    from deface.data.labels import brainweb_labels

    out.mkdir(parents=True, exist_ok=True)
    (out / "qc").mkdir(exist_ok=True)
    index = {}
    if brainweb:
        for path in sorted((root / "brainweb").glob("subject*_crisp_v.mnc.gz")):
            name = "brainweb_" + path.name.split("_")[0]
            img = nib.as_closest_canonical(nib.load(str(path)))
            tissue = np.asarray(img.dataobj)[::2, ::2, ::2].astype(np.uint8)
            affine = img.affine.copy()
            affine[:3, :3] *= 2
            affine[:3, 3] += img.affine[:3, :3] @ np.zeros(3)
            labels = brainweb_labels(tissue, affine)
            np.savez_compressed(out / f"{name}.npz", tissue=tissue, labels=labels, affine=affine)
            index[name] = {"kind": "brainweb", "source": str(path.relative_to(root))}
            log.info("%s: %s", name, np.bincount(labels.ravel(), minlength=3).tolist())
    prior = mni_brain_prior(root)
    for name in heads if heads is not None else list(REAL_HEADS):
        path = root / "heads" / f"{name}.nii.gz"
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        brain = None
        if REAL_HEADS.get(name):
            brain = np.asanyarray(nib.load(str(root / "heads" / f"{REAL_HEADS[name]}.nii.gz")).dataobj) > 0
        labels, to_mni = label_scan(data, img.affine, root, brain=brain, prior=prior,
                                   template=TEMPLATES.get(name, "mni152"))
        qc_png(data, labels, img.affine, out / "qc" / f"{name}_labels.png", name)
        image, lab, affine = _to_ras_1mm(data, img.affine, labels)
        np.savez_compressed(out / f"real_{name}.npz", image=to_unit(image), labels=lab, affine=affine)
        index[f"real_{name}"] = {"kind": "real", "source": str(path.relative_to(root)), "to_mni": to_mni.tolist()}
        log.info("%s: %s", name, np.bincount(lab.ravel(), minlength=3).tolist())
    index_path = out / "index.json"
    old = json.loads(index_path.read_text()) if index_path.exists() else {}
    old.update(index)
    index_path.write_text(json.dumps(old, indent=1))


def load_subject(path: Path):
    """A synthesis.Subject from one cache file."""
    from deface.data.synthesis import Subject

    path = Path(path)
    z = np.load(path)
    image = None
    if "image" in z:
        image = torch.from_numpy(z["image"].astype(np.float32) * (1.5 / 255))
    tissue = torch.from_numpy(z["tissue"]) if "tissue" in z else None
    return Subject(path.stem, torch.from_numpy(z["labels"]), z["affine"], tissue=tissue, image=image)


def main(argv: list[str] | None = None) -> int:
    from deface.data.labeller import shared_data_root

    p = argparse.ArgumentParser(description="Build the training cache from the shared data folder.")
    p.add_argument("-o", "--out", type=Path, default=Path("data_cache"))
    p.add_argument("--root", type=Path, default=None, help="shared data folder (default $DEFACE_DATA)")
    p.add_argument("--heads", nargs="*", default=None, help="real heads to label (default: all known)")
    p.add_argument("--no-brainweb", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    build_cache(args.root or shared_data_root(), args.out, args.heads, not args.no_brainweb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
