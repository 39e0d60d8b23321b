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
# ../shared/data/heads_extra (159 IXI T1, 22 NiChart T1 + FLAIR pairs): every file labelled on its
# own with the BrainWeb atlas as template (it fits IXI heads where MNI152 put the brain into the
# orbits), on the coarse registration pyramid (labeller.FAST_SHRINK: 2.4x faster, label Dice 0.985
# against the full pyramid on an IXI T1, a NiChart T1 and its FLAIR). Stored as ``real_<file stem>``.
EXTRA_DIR = "heads_extra"
# A cached real image's uint8 value times this is its normalised intensity (to_unit: 1.5 -> 255).
UNIT_SCALE = 1.5 / 255


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
    return np.round(x / UNIT_SCALE).astype(np.uint8)


def store_real(data: np.ndarray, affine: np.ndarray, labels: np.ndarray, to_mni: np.ndarray, name: str,
               source: str, out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """A labelled real scan into the cache as ``real_<name>.npz`` (1 mm RAS, uint8 image) with
    its QC picture: (labels and affine on the cache grid, index entry)."""
    from deface.data.labeller import qc_png

    qc_png(data, labels, affine, out / "qc" / f"{name}_labels.png", name)
    image, lab, grid_affine = _to_ras_1mm(data, affine, labels)
    np.savez_compressed(out / f"real_{name}.npz", image=to_unit(image), labels=lab, affine=grid_affine)
    return lab, grid_affine, {"kind": "real", "source": source, "to_mni": to_mni.tolist()}


def label_extra_head(args: tuple[Path, Path, Path]) -> tuple[str, dict]:
    """Label one heads_extra file into the cache (a worker process): (cache name, index entry).
    ``args``: (file, shared data folder, cache folder, where the brain class comes from: "atlas"
    (the registered atlas brain) or a brain extractor of ``deface.evaluation.BRAIN_EXTRACTORS``)."""
    import nibabel as nib

    from deface.data.label_check import check_labels
    from deface.data.labeller import FAST_SHRINK, label_scan

    path, root, out, brain_from = args
    name = path.name.split(".")[0]
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    brain = None
    if brain_from != "atlas":  # an extractor that ships its model (evaluation extra), at labelling time only
        from deface.data.labeller import head_mask
        from deface.evaluation import independent_brain
        from deface.preprocessing import voxel_sizes

        spacing = voxel_sizes(img.affine)
        brain = independent_brain(data, img.affine, brain_from) & head_mask(data, spacing)
    labels, to_mni = label_scan(data, img.affine, root, brain=brain, template="brainweb", shrink=FAST_SHRINK,
                                second_opinion=True)
    lab, affine, entry = store_real(data, img.affine, labels, to_mni, name, str(path.relative_to(root)), out)
    entry["brain_label"] = brain_from
    counts = np.bincount(lab.ravel(), minlength=3)
    entry.update(face_ml=round(float(counts[1]) / 1000, 1), brain_ml=round(float(counts[2]) / 1000, 1),
                 flags=check_labels(lab, affine))
    return f"real_{name}", entry


def build_extra(root: Path, out: Path, workers: int = 2, only_missing: bool = True,
                first: tuple[str, ...] = (), only: tuple[str, ...] = (), brain_from: str = "atlas") -> dict:
    """Label every head of ``root/heads_extra`` into ``out`` with ``workers`` processes (files whose
    name starts with one of ``first`` first; with ``only``, just the files whose stem is listed, again
    if already there); index entries, written to the index as they come."""
    import multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    (out / "qc").mkdir(exist_ok=True)
    paths = sorted((root / EXTRA_DIR).glob("*.nii.gz"), key=lambda p: (not p.name.startswith(first), p.name))
    if only:
        paths = [p for p in paths if p.name.split(".")[0] in only]
    elif only_missing:
        paths = [p for p in paths if not (out / f"real_{p.name.split('.')[0]}.npz").exists()]
    index = {}
    with mp.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
        for name, entry in pool.imap_unordered(label_extra_head, [(p, root, out, brain_from) for p in paths]):
            index[name] = entry
            _update_index(out, {name: entry})
            log.info("%s: face %.0f mL, brain %.0f mL %s", name, entry["face_ml"], entry["brain_ml"],
                     "; ".join(entry["flags"]))
    return index


def _one_thread() -> None:
    import SimpleITK as sitk

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _update_index(out: Path, index: dict) -> None:
    index_path = out / "index.json"
    old = json.loads(index_path.read_text()) if index_path.exists() else {}
    old.update(index)
    index_path.write_text(json.dumps(old, indent=1))


def build_cache(root: Path, out: Path, heads: list[str] | None = None, brainweb: bool = True) -> None:
    import nibabel as nib

    from deface.data.labeller import label_scan, mni_brain_prior
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
        lab, _, index[f"real_{name}"] = store_real(data, img.affine, labels, to_mni, name,
                                                   str(path.relative_to(root)), out)
        log.info("%s: %s", name, np.bincount(lab.ravel(), minlength=3).tolist())
    _update_index(out, index)


def check_cache(out: Path, sheet: Path | None = None, columns: int = 12, sheet_only: str = "real_*"
                ) -> dict[str, list[str]]:
    """Re-run the label check (deface.data.label_check) on every real head of the cache (and against
    the independent brain masks that ``scripts/evaluate.py --independent`` cached there), store
    the flags in its index, and optionally draw a contact sheet of the heads matching
    ``sheet_only`` (a glob: pictures of research-use-only scans must not go into docs/): one
    sagittal slice through the face of each, face red and brain cyan, flagged heads titled in red."""
    import fnmatch

    import nibabel as nib

    from deface.data.label_check import check_against, check_labels
    from deface.evaluation import BRAIN_EXTRACTORS

    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    files = sorted(out.glob("real_*.npz"))
    flags, tiles = {}, []
    for f in files:
        z = np.load(f)
        labels, affine = z["labels"], z["affine"]
        flags[f.stem] = check_labels(labels, affine)
        for tool in BRAIN_EXTRACTORS:  # masks cached by scripts/evaluate.py --independent
            mask = out / "independent" / f"{f.stem}_{tool}.nii.gz"
            if mask.exists():
                flags[f.stem] += check_against(labels, np.asarray(nib.load(str(mask)).dataobj) > 0, tool)
        index.setdefault(f.stem, {"kind": "real"})["flags"] = flags[f.stem]
        if sheet is not None and fnmatch.fnmatch(f.stem, sheet_only):
            face = np.argwhere(labels == 1)
            x = int(np.median(face[:, 0])) if len(face) else labels.shape[0] // 2
            tiles.append((f.stem[5:], z["image"][x], labels[x]))
    index_path.write_text(json.dumps(index, indent=1))
    if sheet is not None and tiles:
        from deface.qc import pyplot

        plt = pyplot()
        rows = -(-len(tiles) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.75))
        for ax in np.ravel(axes):
            ax.axis("off")
        for ax, (name, img, lab) in zip(np.ravel(axes), tiles):
            ax.imshow(img.T, origin="lower", cmap="gray")
            ax.contour((lab == 1).T.astype(float), [0.5], colors="red", linewidths=0.6)
            ax.contour((lab == 2).T.astype(float), [0.5], colors="cyan", linewidths=0.6)
            ax.set_title(name.replace("nichart_demo_", "nc_"), fontsize=6,
                         color="red" if flags["real_" + name] else "black")
        fig.suptitle("real heads: sagittal slice through the face (red face, cyan brain; red title: flagged)",
                     fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / rows))
        fig.savefig(sheet, dpi=60)
        plt.close(fig)
    return flags


def load_subject(path: Path):
    """A synthesis.Subject from one cache file."""
    from deface.data.synthesis import Subject

    path = Path(path)
    z = np.load(path)
    image = torch.from_numpy(z["image"]) if "image" in z else None  # uint8, see to_unit
    tissue = torch.from_numpy(z["tissue"]) if "tissue" in z else None
    return Subject(path.stem, torch.from_numpy(z["labels"]), z["affine"], tissue=tissue, image=image,
                   image_scale=UNIT_SCALE)


def main(argv: list[str] | None = None) -> int:
    from deface.data.labeller import shared_data_root
    from deface.evaluation import BRAIN_EXTRACTORS

    p = argparse.ArgumentParser(description="Build the training cache from the shared data folder.")
    p.add_argument("-o", "--out", type=Path, default=Path("data_cache"))
    p.add_argument("--root", type=Path, default=None, help="shared data folder (default $DEFACE_DATA)")
    p.add_argument("--heads", nargs="*", default=None, help="real heads to label (default: all known)")
    p.add_argument("--no-brainweb", action="store_true")
    p.add_argument("--extra", action="store_true",
                   help=f"label the {EXTRA_DIR}/ heads only (those not yet in the cache), in --workers processes")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--first", nargs="*", default=[], help="with --extra: label files starting with these first")
    p.add_argument("--relabel", nargs="*", default=[], metavar="STEM",
                   help=f"label these {EXTRA_DIR}/ files again (e.g. ixi212_t1), replacing their cache entries")
    p.add_argument("--brain-from", default="atlas", choices=["atlas", *BRAIN_EXTRACTORS],
                   help="with --extra/--relabel: the brain class from the registered atlas (default) or from a "
                        "brain extractor installed for evaluation (pip install deepbet), at labelling time only")
    p.add_argument("--check", action="store_true", help="re-run the label check on the cache's real heads")
    p.add_argument("--sheet", type=Path, default=None, help="with --check: write a contact sheet PNG here")
    p.add_argument("--sheet-only", default="real_*", help="heads on the sheet (glob), e.g. 'real_ixi*' for docs/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    root = args.root or shared_data_root()
    if args.check:
        flags = check_cache(args.out, args.sheet, sheet_only=args.sheet_only)
        bad = {k: v for k, v in flags.items() if v}
        for name, reasons in sorted(bad.items()):
            print(f"{name}: {'; '.join(reasons)}")
        print(f"{len(flags)} real heads checked, {len(bad)} flagged (left out of training)")
        return 0
    if args.extra or args.relabel:
        build_extra(root, args.out, args.workers, first=tuple(args.first), only=tuple(args.relabel),
                    brain_from=args.brain_from)
        return 0
    build_cache(root, args.out, args.heads, not args.no_brainweb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
