"""deface-infer: remove the face from head MRI, leaving every brain voxel untouched.

Only the standard library is imported until the arguments are parsed, so --help is instant.
"""

from __future__ import annotations

import argparse
import glob
import logging
import sys
import time
from pathlib import Path

from deface import MODES, __version__

log = logging.getLogger("deface")
EXAMPLE_HEAD = Path(__file__).resolve().parent / "examples" / "colin27_t1_2mm.nii.gz"

EPILOG = """examples:
  deface-infer sub-01_T1w.nii.gz                    writes sub-01_T1w_defaced.nii.gz beside it
  deface-infer scans/ -o defaced/ --save-mask       every NIfTI/MGH file in scans/
  deface-infer t1.nii.gz --applyto t2.nii.gz flair.nii.gz   same mask on co-registered images
  deface-infer --example -o out/ --qc               the shipped example head, with a QC picture
  deface-infer bids/ out/ participant --date-shift KEY   a BIDS dataset -> BIDS derivatives
  deface-infer dicom_folder/ -o out/ --date-shift KEY    each DICOM series -> a defaced,
                                                    de-identified DICOM series in out/
exit status: 0 all done, 1 some files failed (the rest were done), 2 usage error"""


USAGE = """deface-infer [options] INPUT [INPUT ...]
       deface-infer BIDS_DIR OUT_DIR participant [options]"""

SHORT_HELP = f"""usage: {USAGE}

Remove the face from head MRI, leaving every brain voxel untouched.
INPUT: NIfTI (.nii, .nii.gz) or MGH (.mgz) files, folders or globs, or folders
of DICOM files (each series defaced and de-identified).

common options:
  -o, --outdir DIR      output folder (default: beside each input)
  --outfile FILE        output file, for a single input
  --force               overwrite existing outputs (never an input)
  --skip-existing       skip inputs whose output exists (resume a batch)
  --save-mask           also write <name>_defacemask.nii.gz
  --applyto IMAGE ...   co-registered images to deface with the input's mask
  --mode MODE           zero (default) | noise | blur | fill | reface
  --keep-ears           leave the ears (removed by default)
  --device DEVICE       auto (default) | cpu | cuda
  --qc                  renders before/after, face-detector check, HTML report
  --scrub               clear NIfTI free-text fields and extensions
  --date-shift KEY      BIDS/DICOM: shift dates per subject (default: remove)
  --nifti-out           DICOM input: also write NIfTI + JSON sidecar
  --no-dicom-out        DICOM input: no DICOM series out (with --nifti-out)
  -q, --quiet / -v, --verbose   errors only / per-stage timings
  --version, --help-all         version / every option

examples:
  deface-infer sub-01_T1w.nii.gz          -> sub-01_T1w_defaced.nii.gz beside it
  deface-infer scans/ -o defaced/ --save-mask
  deface-infer t1.nii.gz --applyto t2.nii.gz -o out/
  deface-infer bids/ bids/derivatives/deface participant --date-shift KEY
  deface-infer dicom_folder/ -o out/ --date-shift KEY
  deface-infer --example -o out/ --qc     the shipped example head

exit status: 0 all done, 1 some files failed (the rest done), 2 usage error"""


class _ShortHelp(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(SHORT_HELP)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deface-infer", usage=USAGE, description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("-h", "--help", action=_ShortHelp, nargs=0, help="the common options, on one screen")
    p.add_argument("--help-all", action="help", help="every option (this text)")
    p.add_argument("inputs", nargs="*", help="NIfTI (.nii, .nii.gz) or MGH (.mgz) files, folders or globs; "
                   "folders of DICOM files (one or more series, searched recursively)")
    p.add_argument("--example", action="store_true", help="deface the example head shipped with the package")
    p.add_argument("-o", "--outdir", type=Path, help="output folder (default: beside each input)")
    p.add_argument("--outfile", type=Path, help="output file, for a single input")
    p.add_argument("--suffix", default="_defaced", help="added to output names (default: _defaced)")
    p.add_argument("--mode", choices=MODES, default=MODES[0],
                   help="how face voxels are replaced: zero, noise (the image's own background), blur, fill "
                   "(--fill-value) or reface (a generic face in the scan's contrast; default: zero)")
    p.add_argument("--fill-value", type=float, default=0.0, help="value for --mode fill")
    p.add_argument("--save-mask", action="store_true", help="also write <name>_defacemask.nii.gz")
    p.add_argument("--keep-ears", dest="ears", action="store_const", const=False, default=None,
                   help="leave the ears as they are (default: removed with the face; a profile render with an "
                   "unchanged ear can be recognised)")
    p.add_argument("--ears", dest="ears", action="store_const", const=True,
                   help="remove the ears even with --no-atlas-guard (the ear region is placed by the registration)")
    p.add_argument("--qc", action="store_true", help="also write <name>_defaced.png (renders, slices, face-detector "
                   "check when installed) and deface_report.html (needs matplotlib)")
    p.add_argument("--qc-resolution", type=float, default=1.0, metavar="MM", help="render pixel size for --qc (default 1)")
    p.add_argument("--applyto", nargs="+", type=Path, default=[], metavar="IMAGE",
                   help="co-registered images to deface with the mask of the (single) input")
    p.add_argument("--scrub", action="store_true", help="also clear NIfTI free-text fields (descrip, aux_file, "
                   "db_name, intent_name) and header extensions, which can hold names and dates")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.add_argument("--skip-existing", action="store_true", help="skip inputs whose output exists")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=1, help="images per network call (default 1)")
    p.add_argument("--workers", type=int, default=2, help="background threads reading and writing (default 2)")
    p.add_argument("--brain-margin", type=float, default=None, metavar="MM",
                   help="protected margin around the predicted brain (default from the weights: 6 mm)")
    p.add_argument("--no-atlas-guard", action="store_true",
                   help="no registered atlas: its brain is not protected and removal is not kept to its face "
                        "region (faster, relies on the network alone; the ears are kept unless --ears)")
    p.add_argument("--mask-from", choices=["first", "mean"], default="first", help="4D: mask from the first volume or the mean")
    p.add_argument("--weights", type=Path, help="weights folder, .json or .pt (default: the shipped weights)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --mode noise")
    p.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL", help="BIDS: these subjects only")
    p.add_argument("--suffixes", nargs="+", default=None, metavar="SUFFIX",
                   help="BIDS: anatomical suffixes to deface (default T1w T2w FLAIR PDw T2starw PD ...)")
    p.add_argument("--session-mask", action="store_true",
                   help="BIDS: compute the mask on each session's T1w and apply it to the session's other "
                        "anatomical images (resampled; they must be co-registered)")
    p.add_argument("--date-shift", metavar="KEY", default=None,
                   help="BIDS and DICOM: shift dates by one offset per subject derived from KEY (default: remove "
                        "dates); DICOM: KEY also makes the new UIDs and patient pseudonyms the same every run")
    p.add_argument("--dicom-out", action=argparse.BooleanOptionalAction, default=None,
                   help="DICOM input: write a defaced, de-identified DICOM series (default on; --no-dicom-out off)")
    p.add_argument("--nifti-out", action="store_true",
                   help="DICOM input: also write <series>_defaced.nii.gz with a JSON sidecar")
    p.add_argument("--version", action="version", version=f"deface {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="per-stage timings")
    return p


class UsageError(Exception):
    pass


def expand_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """(files, items that matched nothing): files, folders (their NIfTI/MGH files, not recursive)
    and globs, in order, without repeats."""
    from deface.dicom import looks_like_dicom
    from deface.io import is_image_file

    out: list[Path] = []
    missing: list[str] = []
    seen: dict[Path, Path] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item) if is_image_file(Path(p)))
        else:
            found = [path] if path.exists() or path.is_symlink() else []
            if found and path.is_file() and not is_image_file(path) and looks_like_dicom(path):
                raise UsageError(f"{item} is a DICOM file: give the folder that holds its series")
        if not found:
            missing.append(item)
        for p in found:
            key = p.resolve()
            if key in seen:
                raise UsageError(f"{p} is given twice (also as {seen[key]}): each input once")
            seen[key] = p
            out.append(p)
    return out, missing


def output_path(src: Path, args: argparse.Namespace, suffix: str) -> Path:
    from deface.io import split_suffix

    stem, ext = split_suffix(src)
    ext = ".mgz" if ext.lower() == ".mgz" else ".nii.gz"
    folder = args.outdir if args.outdir is not None else src.parent
    return folder / f"{stem}{suffix}{ext}"


def applyto_targets(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(--applyto image, its output): ``<name><suffix>`` in the output folder, or beside it."""
    return [(other, output_path(other, args, args.suffix)) for other in args.applyto]


def plan_outputs(inputs: list[Path], args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(input, output) pairs; refuses outputs that equal an input or collide with each other."""
    from deface.io import is_image_file

    if args.outfile and len(inputs) != 1:
        raise UsageError("--outfile needs exactly one input")
    if args.outfile and not is_image_file(args.outfile):
        raise UsageError(f"--outfile {args.outfile}: the name must end in .nii.gz, .nii or .mgz")
    pairs = []
    for src in inputs:
        dst = args.outfile if args.outfile else output_path(src, args, args.suffix)
        pairs.append((src, dst))
    resolved_inputs = {p.resolve() for p in inputs} | {p.resolve() for p in args.applyto}
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        r = dst.resolve()
        if r in resolved_inputs:
            raise UsageError(f"{dst}: the output would overwrite an input; choose another --outdir or --suffix")
        if r in seen:
            raise UsageError(f"{src} and {seen[r]} would both write {dst}; use separate --outdir runs")
        seen[r] = src
    for other, dst in applyto_targets(args):
        r = dst.resolve()
        if r in resolved_inputs or r in seen:
            raise UsageError(f"{dst}: the --applyto output of {other} would overwrite an input or another output")
        seen[r] = other
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # deface's own messages at the level asked for; other packages' only when they warn
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.INFO))
    try:
        if args.example:
            args.inputs.append(str(EXAMPLE_HEAD))
        if not args.inputs:
            raise UsageError("no input given (files, folders or globs; or --example)")
        args.bids = bids_app_form(args.inputs)
        if args.batch_size < 1 or args.workers < 0:
            raise UsageError("--batch-size must be >= 1 and --workers >= 0")
        dicom_folders = [] if args.bids else [Path(i) for i in args.inputs if dicom_folder(Path(i))]
        args.inputs = [i for i in args.inputs if Path(i) not in dicom_folders]
        if args.dicom_out and not dicom_folders:
            raise UsageError("--dicom-out needs a DICOM input folder (a NIfTI file has no DICOM header to write)")
        if dicom_folders and (args.outfile or args.applyto):
            raise UsageError("--outfile and --applyto are for NIfTI inputs, not DICOM folders")
        if dicom_folders and args.dicom_out is False and not args.nifti_out:
            raise UsageError("--no-dicom-out without --nifti-out leaves nothing to write")
        dicom_jobs = plan_dicom(dicom_folders, args)
        if args.bids:
            pairs, missing = plan_bids(args), []
        elif not args.inputs:
            pairs, missing = [], []
        else:
            inputs, missing = expand_inputs(args.inputs)
            if not inputs:
                raise UsageError(f"{missing[0]}: no such file, or no NIfTI/MGH files in it")
            if args.applyto and len(inputs) != 1:
                raise UsageError("--applyto needs exactly one input image")
            pairs = plan_outputs(inputs, args)
        if args.outdir is not None:
            args.outdir.mkdir(parents=True, exist_ok=True)
        check_before_work(pairs, dicom_jobs, args)
    except (UsageError, OSError) as exc:
        parser.print_usage(sys.stderr)
        print(f"deface-infer: error: {exc}", file=sys.stderr)
        return 2

    from deface.io import remove_stale_temporaries

    folders = {dst.parent for _, dst in pairs} | {out.parent for job in dicom_jobs.jobs
                                                   for out in (job.dicom_dir, job.nifti) if out is not None}
    for tmp in remove_stale_temporaries(folders):
        log.info("removed %s left by an interrupted run", tmp)
    todo, results = [], list(dicom_jobs.skipped)
    for item in missing:
        log.error("%s: no such file, or no NIfTI/MGH files in it; check the path", item)
        results.append((Path(item), "failed", "no such file, or no NIfTI/MGH files in it"))
    for src, dst in pairs:
        if dst.exists() and args.skip_existing:
            log.info("%s: output exists, skipped", src)
            results.append((src, "skipped", ""))
        elif dst.exists() and not args.force:
            log.error("%s: %s exists; use --force to overwrite or --skip-existing", src, dst)
            results.append((src, "failed", "output exists"))
        else:
            todo.append((src, dst))

    from deface.inference import Defacer

    try:
        defacer = Defacer(weights=args.weights, device=args.device, mode=args.mode, fill_value=args.fill_value,
                          brain_margin_mm=args.brain_margin, mask_from=args.mask_from, seed=args.seed,
                          atlas_guard=False if args.no_atlas_guard else None, ears=args.ears)
    except Exception as exc:
        log.error("cannot load the model: %s", exc)
        return 1
    log.info("deface %s on %s, %d file(s), %d DICOM series", __version__, defacer.device, len(todo), len(dicom_jobs.jobs))
    results += run_files(defacer, todo, args)
    results += run_dicom(defacer, dicom_jobs, args)
    if args.bids:
        finish_bids(results, pairs, args, defacer)
    if args.qc:
        write_report(results, args)
    return summarize(results)


def check_before_work(pairs: list[tuple[Path, Path]], dicom_jobs, args: argparse.Namespace) -> None:
    """What would fail later, found now: output folders that cannot be written, an existing QC report."""
    import tempfile

    folders = {dst.parent for _, dst in pairs}
    folders |= {out.parent for job in dicom_jobs.jobs for out in (job.dicom_dir, job.nifti) if out is not None}
    for folder in sorted(folders):
        if not folder.exists():
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".deface-probe-"):
                pass
        except OSError as exc:
            raise UsageError(f"{folder}: cannot write output there ({exc.strerror or exc})") from exc
    if args.outdir is not None:
        folder = args.outdir
    elif pairs:
        folder = pairs[0][1].parent
    elif dicom_jobs.jobs:
        folder = (dicom_jobs.jobs[0].dicom_dir or dicom_jobs.jobs[0].nifti).parent
    else:
        folder = Path.cwd()
    existing = [dst for _, dst in applyto_targets(args) if dst.exists()]
    if existing and not args.force:
        raise UsageError(f"{existing[0]} exists (an --applyto output); use --force to overwrite it")
    args.report_path = folder / "deface_report.html"
    if args.qc and args.report_path.exists() and not args.force:
        raise UsageError(f"{args.report_path} exists; use --force to overwrite it")


def dicom_folder(path: Path) -> bool:
    """A folder given as input that holds DICOM files and no NIfTI/MGH image."""
    from deface import dicom
    from deface.io import is_image_file

    if not path.is_dir() or any(is_image_file(p) for p in path.iterdir() if p.is_file()):
        return False
    return dicom.holds_dicom(path)


class DicomPlan:
    """The series to deface (``jobs``) and result rows for the files left out (``skipped``)."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.skipped: list[tuple[Path, str, str]] = []


def plan_dicom(folders: list[Path], args: argparse.Namespace) -> DicomPlan:
    """Series of every DICOM folder and their outputs (``<folder><suffix>/`` beside it, or in -o),
    checked before any work: outputs never inside an input folder, existing ones need --force."""
    from deface import dicom

    plan = DicomPlan()
    roots: dict[Path, Path] = {}
    for folder in folders:
        if args.outdir is None:
            root = folder.parent / f"{folder.resolve().name}{args.suffix}"
        else:  # several folders: one subfolder each
            root = args.outdir / folder.resolve().name if len(folders) > 1 else args.outdir
        r, f = root.resolve(), folder.resolve()
        if r == f or f in r.parents or r in f.parents:
            raise UsageError(f"{root}: the output folder must not be, hold or lie inside the DICOM input {folder}")
        if r in roots:
            raise UsageError(f"{folder} and {roots[r]} would both write into {root}; use separate -o runs")
        roots[r] = folder
        jobs, skipped = dicom.plan_folder(folder, root, args.dicom_out is not False, args.nifti_out, args.suffix)
        if not jobs and not skipped:
            raise UsageError(f"{folder}: no DICOM image series found")
        for path, reason in skipped:
            log.error("%s: %s", path, reason)
            plan.skipped.append((path, "failed", reason))
        for job in jobs:
            existing = [p for p in (job.dicom_dir, job.nifti) if p is not None and p.exists()]
            if existing and args.skip_existing:
                plan.skipped.append((Path(job.name), "skipped", ""))
            elif existing and not args.force:
                log.error("%s: %s exists; use --force to overwrite or --skip-existing", job.name, existing[0])
                plan.skipped.append((Path(job.name), "failed", "output exists"))
            else:
                plan.jobs.append(job)
    return plan


def run_dicom(defacer, plan: DicomPlan, args: argparse.Namespace) -> list[tuple[Path, str, str]]:
    """Deface every planned DICOM series; one result row per series."""
    if not plan.jobs:
        return []
    from deface import io
    from deface.deid import Deidentifier
    from deface.dicom import deface_job
    from deface.inference import outcome_of

    deidentify = Deidentifier(args.date_shift)
    provenance = {**provenance_of(defacer, args), "DatesShifted": args.date_shift is not None}
    results = []
    for job in plan.jobs:
        t0 = time.perf_counter()
        try:
            for out in (job.dicom_dir, job.nifti):
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
            s = deface_job(defacer, job, deidentify, args.force, args.save_mask, provenance)
        except Exception as exc:
            log.error("%s: %s", job.name, io.one_line(exc))
            results.append((Path(job.name), "failed", io.one_line(exc)))
            continue
        status, msg = outcome_of(job.name, s)
        msg = f"{len(job.series.files)} files, {msg}"
        log.info("%s -> %s: %s (%.2f s)", job.name, job.dicom_dir or job.nifti, msg, time.perf_counter() - t0)
        results.append((Path(job.name), status, msg))
    return results


def bids_app_form(items: list[str]) -> bool:
    """True for the BIDS-App call ``BIDS_DIR OUT_DIR participant``."""
    from deface.bids import is_bids_dataset

    if len(items) == 3 and items[2] == "participant":
        if not is_bids_dataset(Path(items[0])):
            raise UsageError(f"{items[0]}: not a BIDS dataset (no dataset_description.json)")
        return True
    return False


def plan_bids(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(image, output) pairs: same relative path under OUT_DIR; headers scrubbed."""
    from deface.bids import ANAT_SUFFIXES, find_anatomical

    bids_dir, out_dir = Path(args.inputs[0]), Path(args.inputs[1])
    if out_dir.resolve() == bids_dir.resolve():
        raise UsageError("OUT_DIR must not be the BIDS dataset itself")
    images = find_anatomical(bids_dir, args.participant_label, tuple(args.suffixes or ANAT_SUFFIXES))
    if not images:
        raise UsageError(f"{bids_dir}: no anatomical images found for these participants and suffixes")
    args.scrub, args.outdir, args.bids_dirs = True, out_dir, (bids_dir, out_dir)
    pairs = [(src, out_dir / src.relative_to(bids_dir)) for src in images]
    for _, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
    args.session_targets = {}
    if args.session_mask:  # one T1w per session predicts; the session's other images take its mask
        by_session: dict[Path, list[tuple[Path, Path]]] = {}
        for src, dst in pairs:
            by_session.setdefault(src.parent, []).append((src, dst))
        pairs = []
        for members in by_session.values():
            t1 = [m for m in members if m[0].name.split(".")[0].endswith("_T1w")]
            if not t1:
                pairs += members
                continue
            pairs.append(t1[0])
            args.session_targets[t1[0][0]] = [m for m in members if m is not t1[0]]
    return pairs


def finish_bids(results, pairs, args: argparse.Namespace, defacer) -> None:
    """Sidecars (scrubbed, dates shifted), scans.tsv and dataset_description.json."""
    from deface import bids

    bids_dir, out_dir = args.bids_dirs
    provenance = {**provenance_of(defacer, args), "NiftiHeaderScrubbed": True}
    model = provenance["Model"]
    ok = {str(src) for src, status, _ in results if status != "failed"}
    days: dict[str, int | None] = {}
    for src, dst in pairs:
        subject = bids.subject_of(src.relative_to(bids_dir))
        days[subject] = bids.day_offset(args.date_shift, subject) if args.date_shift else None
        if str(src) in ok:
            bids.write_sidecar(src, dst, days[subject], provenance)
            for other, other_dst in args.session_targets.get(src, []):
                if other_dst.exists():
                    bids.write_sidecar(other, other_dst, days[subject], {**provenance, "MaskFrom": src.name})
    bids.write_scans_tsv(bids_dir, out_dir, days)
    bids.write_dataset_description(bids_dir, out_dir, __version__, model)


def run_files(defacer, todo: list[tuple[Path, Path]], args: argparse.Namespace) -> list[tuple[Path, str, str]]:
    """The planned files through ``Defacer.predict_from_files``; one result row each (QC rows kept
    in ``args.report_rows`` for the report)."""
    from deface.inference import Job
    from deface.io import split_suffix

    targets = getattr(args, "session_targets", {})
    jobs = []
    for src, dst in todo:
        mask = None
        if args.save_mask:
            stem, _ = split_suffix(dst)
            mask = dst.with_name(f"{stem.removesuffix(args.suffix)}_defacemask.nii.gz")
        jobs.append(Job(src, dst, mask, targets.get(src, applyto_targets(args)), str(src)))
    shown = sys.stderr.isatty() and not args.quiet
    done = defacer.predict_from_files(jobs, batch_size=args.batch_size, workers=max(args.workers, 1),
                                      scrub=args.scrub, force=args.force,
                                      qc=args.qc_resolution if args.qc else None, show_progress=shown)
    args.report_rows = [o.report_row for o in done if o.report_row is not None]
    return [(job.source, o.status, o.details) for job, o in zip(jobs, done)]


def write_report(results: list[tuple[Path, str, str]], args: argparse.Namespace) -> None:
    """deface_report.html in the output folder (or beside the first output): every file, flagged first."""
    from deface.qc import html_report

    rows = {r["file"]: r for r in args.report_rows}
    merged = []
    for src, status, detail in results:
        row = rows.get(str(src), {"file": str(src)})
        row.update(status=status, details=detail)
        merged.append(row)
    path = args.report_path
    try:
        html_report(merged, path)
    except OSError as exc:
        log.error("cannot write the QC report %s: %s", path, exc.strerror or exc)
        return
    log.info("QC report: %s", path)


def provenance_of(defacer, args: argparse.Namespace) -> dict:
    """What was done, for sidecars: tool, version, model, weights hash and mode."""
    meta = defacer.metadata
    return {"Tool": "deface", "Version": __version__,
            "Model": f"{meta.get('name', 'weights')} {meta.get('version', '')}".strip(),
            "WeightsSHA256": meta.get("sha256"), "Mode": args.mode, "Ears": bool(defacer.ears)}


def summarize(results: list[tuple[Path, str, str]]) -> int:
    failed = [r for r in results if r[1] == "failed"]
    if len(results) > 1 or failed:
        width = max(len(str(r[0])) for r in results)
        print(f"\n{'file':<{width}}  status    details", file=sys.stderr)
        for src, status, detail in results:
            print(f"{str(src):<{width}}  {status:<8}  {detail}", file=sys.stderr)
        print(f"{len(results) - len(failed)} done, {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
