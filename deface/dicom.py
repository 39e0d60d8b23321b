"""DICOM series in and out: read a folder as series, write each defaced series back as DICOM.

Reading uses pydicom and builds the voxel grid from the headers here (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing; for enhanced multi-frame MR the functional groups),
rather than converting with dcm2niix: writing the defaced voxels back needs the exact voxel ->
(file, frame, row, column) map, which a converter's NIfTI only implies. dcm2niix is used by the
tests to check that the written series converts to the same voxels.

Writing changes only the pixels inside the deface mask: the stored bytes of every other pixel
are copied unchanged (uncompressed output). Headers are de-identified by ``deface.deid``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("deface")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Transfer syntaxes whose pixel data are stored uncompressed (explicit/implicit little, explicit big endian).
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
BIG_ENDIAN = "1.2.840.10008.1.2.2"


class DicomError(ValueError):
    """A DICOM file or series that cannot be defaced, with the reason in one line."""


@dataclass
class Frame:
    """One 2D image of a series: where it is stored and where it lies."""

    path: Path
    frame: int  # index inside a multi-frame file, 0 for a classic file
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    slope: float = 1.0
    inter: float = 0.0


@dataclass
class Series:
    """The frames of one series, sorted along the slice normal (frame k = slice k of the volume)."""

    uid: str
    number: int | None
    description: str
    frames: list[Frame]
    rows: int
    columns: int
    orientation: np.ndarray  # (2, 3): row direction (columns increase), column direction (rows increase)
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns
    files: list[Path] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, len(self.frames))

    @property
    def label(self) -> str:
        """A name for messages and output folders that holds no identifying text."""
        return f"series{self.number:03d}" if self.number is not None else "series"

    def affine(self) -> np.ndarray:
        """Voxel (column, row, slice) -> RAS mm."""
        lps = np.eye(4)
        lps[:3, 0] = self.orientation[0] * self.spacing[1]
        lps[:3, 1] = self.orientation[1] * self.spacing[0]
        n = len(self.frames)
        first, last = self.frames[0].position, self.frames[-1].position
        lps[:3, 2] = (last - first) / (n - 1)
        lps[:3, 3] = first
        return LPS_TO_RAS @ lps


def looks_like_dicom(path: Path) -> bool:
    """True for a file with the DICOM preamble ('DICM' at byte 128)."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def holds_dicom(folder: Path) -> bool:
    """True when a folder (searched recursively) holds at least one DICOM file."""
    return folder.is_dir() and any(p.is_file() and looks_like_dicom(p) for p in _files(folder))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def find_series(folder: Path) -> tuple[list[Series], list[tuple[Path, str]]]:
    """(series in the folder, (file, reason) for each file that is not part of one).

    Files are grouped by SeriesInstanceUID; a broken or non-image file gets a reason and the
    rest go on. A series that cannot be put on one grid raises nothing here: it is reported
    as a (first file, reason) pair too.
    """
    import pydicom

    groups: dict[str, list[tuple[Path, object]]] = {}
    skipped: list[tuple[Path, str]] = []
    for path in _files(folder):
        if not looks_like_dicom(path):
            if path.suffix.lower() in (".dcm", ".ima", ""):
                skipped.append((path, "not a DICOM file (no DICM preamble)"))
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except Exception as exc:  # pydicom raises many kinds on a damaged file
            skipped.append((path, f"unreadable DICOM ({' '.join(str(exc).split())[:120]})"))
            continue
        if "Rows" not in ds or "Columns" not in ds:
            skipped.append((path, f"no image (SOP class {getattr(ds, 'SOPClassUID', '?')})"))
            continue
        groups.setdefault(uid, []).append((path, ds))
    series = []
    for uid, members in groups.items():
        try:
            series.append(_assemble(uid, members))
        except DicomError as exc:
            skipped.append((members[0][0], f"series {getattr(members[0][1], 'SeriesNumber', '?')}: {exc}"))
    series.sort(key=lambda s: (s.number if s.number is not None else -1, s.uid))
    return series, skipped


def _float(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _frames_of(path: Path, ds) -> tuple[list[Frame], np.ndarray, tuple[float, float]]:
    """Frames, orientation and pixel spacing of one file (classic or enhanced multi-frame)."""
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if n != 1:
            raise DicomError("a multi-frame file without functional groups is not supported")
        try:
            iop = np.asarray(ds.ImageOrientationPatient, float).reshape(2, 3)
            ipp = np.asarray(ds.ImagePositionPatient, float)
            spacing = tuple(float(v) for v in ds.PixelSpacing)
        except (AttributeError, ValueError, TypeError) as exc:
            raise DicomError(f"no image geometry (ImagePositionPatient/ImageOrientationPatient/PixelSpacing): {exc}")
        frame = Frame(path, 0, ipp, _float(getattr(ds, "RescaleSlope", 1), 1.0),
                      _float(getattr(ds, "RescaleIntercept", 0), 0.0))
        return [frame], iop, spacing  # type: ignore[return-value]
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None

    def group(item, name):
        for source in (item, shared):
            if source is not None and name in source:
                return source[name].value[0]
        raise DicomError(f"enhanced multi-frame file without {name}")

    frames, iop, spacing = [], None, None
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        o = np.asarray(group(item, "PlaneOrientationSequence").ImageOrientationPatient, float).reshape(2, 3)
        s = tuple(float(v) for v in group(item, "PixelMeasuresSequence").PixelSpacing)
        if iop is None:
            iop, spacing = o, s
        elif not np.allclose(o, iop, atol=1e-4) or not np.allclose(s, spacing, atol=1e-4):
            raise DicomError("frames with different orientations or pixel spacings (several stacks?)")
        ipp = np.asarray(group(item, "PlanePositionSequence").ImagePositionPatient, float)
        try:
            trans = group(item, "PixelValueTransformationSequence")
            slope, inter = _float(trans.RescaleSlope, 1.0), _float(trans.RescaleIntercept, 0.0)
        except DicomError:
            slope, inter = 1.0, 0.0
        frames.append(Frame(path, f, ipp, slope, inter))
    return frames, iop, spacing  # type: ignore[return-value]


def _assemble(uid: str, members: list[tuple[Path, object]]) -> Series:
    first = members[0][1]
    rows, columns = int(first.Rows), int(first.Columns)
    if int(getattr(first, "SamplesPerPixel", 1)) != 1:
        raise DicomError("colour images (SamplesPerPixel > 1) are not head MRI magnitude images")
    frames, iop, spacing = [], None, None
    for path, ds in members:
        if int(ds.Rows) != rows or int(ds.Columns) != columns:
            raise DicomError("images of different sizes in one series")
        f, o, s = _frames_of(path, ds)
        if iop is None:
            iop, spacing = o, s
        elif not np.allclose(o, iop, atol=1e-4) or not np.allclose(s, spacing, atol=1e-4):
            raise DicomError("images with different orientations or pixel spacings in one series "
                             "(a localizer?)")
        frames += f
    if len(frames) < 2:
        raise DicomError("a single slice, not a 3D volume")
    normal = np.cross(iop[0], iop[1])
    depth = np.array([fr.position @ normal for fr in frames])
    order = np.argsort(depth, kind="stable")
    frames, depth = [frames[i] for i in order], depth[order]
    steps = np.diff(depth)
    if np.any(steps < 1e-3):
        raise DicomError("several images at one position (echoes, phases or time points): "
                         "split the series first")
    if np.ptp(steps) > max(0.01 * steps.mean(), 1e-3):
        raise DicomError(f"uneven slice spacing ({steps.min():.3f}-{steps.max():.3f} mm): missing slices?")
    number = getattr(first, "SeriesNumber", None)
    return Series(uid, int(number) if number not in (None, "") else None,
                  str(getattr(first, "SeriesDescription", "")), frames, rows, columns, iop, spacing,
                  sorted({p for p, _ in members}))


def _pixels(ds) -> np.ndarray:
    """(frames, rows, columns) stored values as they are in the file (decompressed if needed)."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in NATIVE_SYNTAXES:
        try:
            ds.decompress()
        except Exception as exc:
            raise DicomError(f"compressed pixel data ({syntax}) that cannot be decoded here: "
                             f"{' '.join(str(exc).split())[:120]}") from exc
        syntax = str(ds.file_meta.TransferSyntaxUID)
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32):
        raise DicomError(f"BitsAllocated {bits} is not supported")
    kind = "i" if int(getattr(ds, "PixelRepresentation", 0)) == 1 else "u"
    dtype = np.dtype(f"{'>' if syntax == BIG_ENDIAN else '<'}{kind}{bits // 8}")
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    count = n * int(ds.Rows) * int(ds.Columns)
    data = np.frombuffer(ds.PixelData, dtype=dtype, count=count)
    return data.reshape(n, int(ds.Rows), int(ds.Columns))


def _value_range(ds) -> tuple[int, int]:
    stored = int(getattr(ds, "BitsStored", ds.BitsAllocated))
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return -(2 ** (stored - 1)), 2 ** (stored - 1) - 1
    return 0, 2**stored - 1


def load_series(series: Series):
    """The series as a NIfTI image (nibabel) on its own grid: stored values, and scl_slope/inter
    when every frame has the same rescale; real values in float32 when the frames differ."""
    import nibabel as nib
    import pydicom

    volume = None
    cache: dict[Path, np.ndarray] = {}
    for k, fr in enumerate(series.frames):
        if fr.path not in cache:
            cache = {fr.path: _pixels(pydicom.dcmread(fr.path))}
        plane = cache[fr.path][fr.frame]
        if volume is None:
            volume = np.zeros(series.shape, dtype=plane.dtype.newbyteorder("="))
        volume[:, :, k] = plane.T
    slopes = {(fr.slope, fr.inter) for fr in series.frames}
    if len(slopes) > 1:
        real = volume.astype(np.float32)
        for k, fr in enumerate(series.frames):
            real[:, :, k] = real[:, :, k] * fr.slope + fr.inter
        volume = real
    img = nib.Nifti1Image(volume, series.affine())
    img.set_qform(series.affine(), 1)
    img.set_sform(series.affine(), 1)
    if len(slopes) == 1:
        slope, inter = slopes.pop()
        if (slope, inter) != (1.0, 0.0):
            img.header.set_slope_inter(slope, inter)
    return img


def write_series(series: Series, real: np.ndarray, mask: np.ndarray, out_dir: Path,
                 deidentify=None, force: bool = False) -> list[Path]:
    """Write the series to ``out_dir`` (``IM0001.dcm`` ... in slice order, one file per input file)
    with the pixels inside ``mask`` set to ``real`` (real-world values on the series grid) and
    every other pixel's stored bytes unchanged. ``deidentify(ds)`` edits each header in place.
    Written to a temporary folder and renamed, so a killed run leaves no partial series."""
    import os
    import shutil

    import pydicom

    from deface.io import temporary_path

    if mask.shape != series.shape or real.shape[:3] != series.shape:
        raise ValueError(f"mask {mask.shape} / values {real.shape} do not match the series grid {series.shape}")
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists; use --force to overwrite")
    tmp = temporary_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_file: dict[Path, list[tuple[int, Frame]]] = {}
    for k, fr in enumerate(series.frames):
        by_file.setdefault(fr.path, []).append((k, fr))
    written = []
    try:
        for i, (path, members) in enumerate(sorted(by_file.items(), key=lambda kv: kv[1][0][0]), start=1):
            ds = pydicom.dcmread(path)
            pixels = _pixels(ds).copy()
            lo, hi = _value_range(ds)
            for k, fr in members:
                plane = pixels[fr.frame]
                inside = mask[:, :, k].T
                if inside.any():
                    stored = np.round((real[:, :, k].T[inside].astype(np.float64) - fr.inter) / fr.slope)
                    plane[inside] = np.clip(stored, lo, hi).astype(plane.dtype)
            ds.PixelData = pixels.tobytes()
            if deidentify is not None:
                deidentify(ds)
            dst = tmp / f"IM{i:04d}.dcm"
            ds.save_as(dst, enforce_file_format=True)
            written.append(out_dir / dst.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


# BIDS-style sidecar fields taken from the (de-identified) header: acquisition parameters only.
SIDECAR_FIELDS = {  # BIDS name: (DICOM keyword, scale)
    "Modality": ("Modality", None), "Manufacturer": ("Manufacturer", None),
    "ManufacturersModelName": ("ManufacturerModelName", None),
    "MagneticFieldStrength": ("MagneticFieldStrength", 1.0), "RepetitionTime": ("RepetitionTime", 1e-3),
    "EchoTime": ("EchoTime", 1e-3), "InversionTime": ("InversionTime", 1e-3), "FlipAngle": ("FlipAngle", 1.0),
    "SliceThickness": ("SliceThickness", 1.0), "SeriesNumber": ("SeriesNumber", None),
    "ScanningSequence": ("ScanningSequence", None), "MRAcquisitionType": ("MRAcquisitionType", None),
    "ImageType": ("ImageType", None), "PatientPosition": ("PatientPosition", None),
}


def sidecar(ds, provenance: dict) -> dict:
    """A JSON sidecar for the NIfTI output of a series: acquisition parameters and what was done."""
    out: dict = {}
    for name, (keyword, scale) in SIDECAR_FIELDS.items():
        value = getattr(ds, keyword, None)
        if value in (None, ""):
            continue
        if scale is not None:
            out[name] = round(float(value) * scale, 6)
        elif not isinstance(value, str) and hasattr(value, "__iter__"):
            out[name] = [str(v) for v in value]
        else:
            out[name] = int(value) if keyword == "SeriesNumber" else str(value)
    out["Defaced"] = provenance
    return out


@dataclass
class SeriesJob:
    """One series of a DICOM input folder and where its outputs go."""

    folder: Path  # the input folder it was found in
    series: Series
    label: str  # the series' name in messages and outputs (unique within the folder)
    dicom_dir: Path | None  # output series folder (None: no DICOM output)
    nifti: Path | None  # output NIfTI (None: no NIfTI output)

    @property
    def name(self) -> str:
        return f"{self.folder}/{self.label}"


def plan_folder(folder: Path, out_root: Path, dicom_out: bool, nifti_out: bool, suffix: str
                ) -> tuple[list[SeriesJob], list[tuple[Path, str]]]:
    """Jobs for every series in ``folder`` (outputs under ``out_root``) and the files left out."""
    series, skipped = find_series(folder)
    jobs, used = [], set()
    for s in series:
        label, n = s.label, 2
        while label in used:
            label, n = f"{s.label}_{n}", n + 1
        used.add(label)
        jobs.append(SeriesJob(folder, s, label, out_root / label if dicom_out else None,
                              out_root / f"{label}{suffix}.nii.gz" if nifti_out else None))
    return jobs, skipped


def deface_job(defacer, job: SeriesJob, deidentify, force: bool, save_mask: bool,
               provenance: dict) -> dict:
    """Deface one series and write its outputs; returns the Defacer's stats."""
    import json

    from deface import io

    img = load_series(job.series)
    result = defacer.deface(img)
    stats = result.stats
    face_removed = bool(stats["face_found"] or stats.get("brain_only"))  # face_found: voxels really changed
    if job.dicom_dir is not None:
        real = result.volume.scaled(result.raw)
        write_series(job.series, real, result.mask, job.dicom_dir,
                     lambda ds: deidentify(ds, face_removed=face_removed), force=force)
    if job.nifti is not None:
        import pydicom

        io.save(result.volume, result.raw, job.nifti)
        header = pydicom.dcmread(job.series.frames[0].path, stop_before_pixels=True)
        deidentify(header, face_removed=face_removed)
        meta = sidecar(header, provenance)
        job.nifti.with_name(job.nifti.name.removesuffix(".nii.gz") + ".json").write_text(json.dumps(meta, indent=2))
    if save_mask:
        io.save_mask(result.volume, result.mask, (job.nifti or job.dicom_dir).parent / f"{job.label}_defacemask.nii.gz")
    return stats
