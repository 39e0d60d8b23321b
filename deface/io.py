"""Load head MRI and write results with the input's exact header, grid and dtype.

The network never sees the native array directly: preprocessing maps it to the canonical
RAS grid. Output is written from the *stored* (unscaled) values, so voxels outside the mask
keep their bytes, and the NIfTI header (qform/sform and codes, scl_slope/scl_inter,
descrip, extensions, vox_offset) is written back byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.volumeutils import array_to_file

SUFFIXES = (".nii.gz", ".nii", ".mgz")
# A temporary output of another host or PID namespace is only taken for stale after this long:
# its pid means nothing here (a cluster job on another node may still be writing it).
STALE_AFTER_S = 24 * 3600
TEMP_NAME = re.compile(r"\..+\.(?:(?P<tag>[0-9a-f]{8})-)?(?P<pid>\d+)\.tmp(\.nii\.gz|\.nii|\.mgz)?")


class InputError(ValueError):
    """The file cannot be defaced (unreadable, wrong dimensionality, bad affine ...)."""


def one_line(exc: BaseException) -> str:
    """An exception as a single line: what went wrong, with a hint for unexpected errors."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    if isinstance(exc, (InputError, OSError)):
        return text
    return f"{text} ({exc.__class__.__name__}; unexpected: please report it with the file's header)"


def split_suffix(path: Path) -> tuple[str, str]:
    """('name', '.nii.gz') for 'name.nii.gz'; the suffix is one of SUFFIXES or ''."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return path.stem, path.suffix


def is_image_file(path: Path) -> bool:
    return split_suffix(path)[1].lower() in SUFFIXES


def writer_tag() -> str:
    """8 hex digits naming this host and PID namespace: where a writer's pid can be checked."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha1(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.<tag>-<pid>.tmp<ext>``."""
    _, suffix = split_suffix(path)
    return path.with_name(f".{path.name}.{writer_tag()}-{os.getpid()}.tmp{suffix}")


def remove_stale_temporaries(folders) -> list[Path]:
    """Delete temporaries that killed writers left in ``folders`` and return them. Only provably
    stale ones go: this host and PID namespace with a pid that no longer runs, or any older than
    STALE_AFTER_S (other nodes', and the untagged names of older versions)."""
    removed, tag, now = [], writer_tag(), time.time()
    for folder in {Path(f) for f in folders}:
        for tmp in folder.glob(".*.tmp*") if folder.is_dir() else []:
            match = TEMP_NAME.fullmatch(tmp.name)
            if not match:
                continue
            try:
                old = now - tmp.stat().st_mtime > STALE_AFTER_S
            except OSError:
                continue
            dead = match["tag"] == tag and not _running(int(match["pid"]))
            if old or dead:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Volume:
    """An image as stored: ``raw`` (stored dtype, unscaled) plus its nibabel image for the header."""

    img: nib.spatialimages.SpatialImage
    raw: np.ndarray
    path: Path | None = None
    header: Any = None  # NIfTI header exactly as stored in the file (nibabel's in-memory copy drops scl_*)

    @property
    def affine(self) -> np.ndarray:
        return np.asarray(self.img.affine, dtype=float)

    @property
    def slope_inter(self) -> tuple[float, float]:
        slope, inter = getattr(self.img.dataobj, "slope", 1.0), getattr(self.img.dataobj, "inter", 0.0)
        slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
        inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        return slope, inter

    def scaled(self, raw: np.ndarray | None = None) -> np.ndarray:
        """Real-world values (float32) of ``raw`` (default: the whole stored array)."""
        slope, inter = self.slope_inter
        x = (self.raw if raw is None else raw).astype(np.float32)
        return x * np.float32(slope) + np.float32(inter) if (slope, inter) != (1.0, 0.0) else x

    def to_raw(self, values: np.ndarray) -> np.ndarray:
        """Stored values for real-world ``values``: unscale, round and clip for integer dtypes."""
        slope, inter = self.slope_inter
        x = (np.asarray(values, dtype=np.float64) - inter) / slope
        dtype = self.raw.dtype
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = np.clip(np.round(x), info.min, info.max)
        return x.astype(dtype)

    def reference(self, mode: str = "first") -> np.ndarray:
        """The 3D volume the mask is computed from: the first volume of a 4D image, or the mean."""
        if self.raw.ndim == 3:
            return self.scaled()
        if mode == "mean":
            return self.scaled().reshape(self.raw.shape[:3] + (-1,)).mean(axis=3)
        return self.scaled(self.raw.reshape(self.raw.shape[:3] + (-1,))[..., 0])


def check_volume(img: nib.spatialimages.SpatialImage, shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse what cannot be a head volume, before reading any voxel."""
    if len(shape) >= 3 and sorted(shape[:3])[0] == 1 and sorted(shape[:3])[1] >= 2:
        raise InputError(f"image is a single slice (shape {shape}): a 3D or 4D head volume is needed")
    if len(shape) < 3 or any(s < 2 for s in shape[:3]):
        raise InputError(f"image is {len(shape)}D with shape {shape}: a 3D or 4D head volume is needed")
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise InputError(f"image has {len(shape)} dimensions {shape}: only 3D and 4D are supported")
    if int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise InputError(f"image has {int(np.prod(shape, dtype=np.int64))} voxels, over the limit of {max_voxels}; "
                         "raise --max-voxels if the machine has the memory")
    affine = np.asarray(img.affine, dtype=float)
    with np.errstate(invalid="ignore", over="ignore"):
        singular = not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6
    if singular:
        raise InputError("the affine (voxel to world) is singular or not finite: fix the header (sform/qform)")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or np.issubdtype(dtype, np.complexfloating):
        raise InputError(f"data type {dtype} (complex or RGB) is not a magnitude image")


def load(path: str | Path, max_voxels: int = 512**3) -> Volume:
    """Read an image file without changing anything; raise InputError with a clear reason."""
    path = Path(path)
    try:
        img = nib.load(str(path))
    except OSError:
        raise
    except Exception as exc:
        raise InputError(f"not a readable NIfTI/MGH image ({' '.join(str(exc).split())}); "
                         "check that the file is complete, or re-convert it") from exc
    stored = None
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        stored = _stored_header(img, path)
        # nibabel silently turns zero voxel sizes into 1 mm; without an sform that makes the geometry up
        if int(stored["sform_code"]) == 0 and np.any(np.asarray(stored["pixdim"][1:4]) == 0):
            raise InputError("the voxel sizes (pixdim) are zero and there is no sform: the geometry is unknown; "
                             "fix the header (e.g. re-convert from DICOM)")
        img = decompressed(img, path, max_voxels)
    volume = from_image(img, path, max_voxels)
    volume.header = stored
    return volume


def fast_gzip():
    """ISA-L's gzip module (``isal.igzip``, the ``fast`` extra) when it is installed, else None:
    the same format as the standard library's ``gzip``, read 3x and written 6x faster."""
    try:
        from isal import igzip
    except ImportError:
        return None
    return igzip


def decompressed(img: nib.Nifti1Image, path: Path, max_voxels: int) -> nib.Nifti1Image:
    """A ".nii.gz" image read whole through ISA-L's gzip when the ``fast`` extra is installed
    (3x faster than zlib); otherwise, or for anything ISA-L cannot read (a truncated file: the
    usual path then says what is wrong; one too large, which ``from_image`` refuses), ``img`` as
    nibabel opened it."""
    igzip = fast_gzip()
    if igzip is None or not str(path).endswith(".gz") or int(np.prod(img.shape, dtype=np.int64)) > max_voxels:
        return img
    try:
        return img.__class__.from_bytes(igzip.decompress(path.read_bytes()))
    except Exception:
        return img


def _stored_header(img: nib.Nifti1Image, path: Path):
    """The header and extensions as the file holds them, byte for byte."""
    from nibabel.openers import Opener

    try:
        with Opener(str(path), "rb") as f:
            return img.header.__class__.from_fileobj(f, check=False)
    except Exception as exc:
        raise InputError(f"cannot read the NIfTI header ({' '.join(str(exc).split())}); re-convert the file") from exc


def from_image(img: nib.spatialimages.SpatialImage, path: Path | None = None, max_voxels: int = 512**3) -> Volume:
    shape = tuple(int(s) for s in img.shape)
    check_volume(img, shape, max_voxels)
    try:
        raw = np.asarray(img.dataobj.get_unscaled()) if hasattr(img.dataobj, "get_unscaled") else np.asarray(img.dataobj)
    except Exception as exc:
        reason = " ".join(str(exc).split()).replace(f" from {path}", "") if path else " ".join(str(exc).split())
        raise InputError(f"the voxel data is truncated or corrupt ({reason}); re-copy or re-convert the file") from exc
    if raw.ndim > 4:
        raw = raw.reshape(raw.shape[:4])
    return Volume(img, raw, path)


def output_image(volume: Volume, raw: np.ndarray) -> nib.spatialimages.SpatialImage:
    """A nibabel image holding ``raw`` with the input's header (for the Python API)."""
    img = volume.img
    if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        out = img.__class__(raw.reshape(img.shape), img.affine, img.header.copy())
        slope, inter = volume.slope_inter
        out.header.set_slope_inter(slope, inter)
        return out
    return img.__class__(raw.reshape(img.shape), img.affine, img.header.copy())


TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")


def scrub_header(volume: Volume) -> Volume:
    """The same volume with the NIfTI header's free-text fields emptied and its extensions
    removed (DICOM-derived extensions can hold names, IDs and dates). Grid, codes, scaling and
    every other field stay as they were."""
    img = volume.img
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return volume
    header = output_header(volume)
    for name in TEXT_FIELDS:
        if name in header:
            header[name] = b""
    header.extensions.clear()
    header["vox_offset"] = header.single_vox_offset  # data right after the header, no extensions
    return Volume(img, volume.raw, volume.path, header)


def output_header(volume: Volume):
    """A copy of the NIfTI header to write: the stored one, or the image's with its scaling."""
    if volume.header is not None:
        return volume.header.copy()
    header = volume.img.header.copy()
    slope, inter = getattr(volume.img.dataobj, "slope", None), getattr(volume.img.dataobj, "inter", None)
    if slope is not None and (slope, inter) != (1.0, 0.0):
        header["scl_slope"], header["scl_inter"] = slope, inter
    return header


@contextmanager
def open_for_writing(path: Path, suffix: str):
    """A binary file to write a NIfTI into: gzip-compressed (level 1, no name, mtime 0) for
    ".nii.gz". ISA-L's gzip (the ``fast`` extra, ``pip install isal``) when it is installed: the
    same format, written 6x faster (0.03 s instead of 0.18 s for a 23 MB head)."""
    if suffix != ".nii.gz":
        with open(path, "wb") as f:
            yield f
        return
    module = fast_gzip() or gzip
    with open(path, "wb") as raw, module.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as f:
        yield f


def save(volume: Volume, raw: np.ndarray, path: str | Path) -> None:
    """Write ``raw`` (stored dtype, native shape) to ``path`` with the input's header, atomically.

    NIfTI: the original header and extensions are written byte for byte, then the stored
    values; other formats go through nibabel. A temporary file in the same folder is renamed
    over ``path`` at the end, so a killed run never leaves a partial file.
    """
    path = Path(path)
    _, suffix = split_suffix(path)
    tmp = temporary_path(path)
    try:
        img = volume.img
        if isinstance(img, nib.Nifti1Image | nib.Nifti2Image) and suffix in (".nii", ".nii.gz"):
            header = output_header(volume)
            with open_for_writing(tmp, suffix) as f:
                header.write_to(f)
                array_to_file(raw.reshape(img.shape), f, header.get_data_dtype(), offset=header.get_data_offset(),
                              order="F")
        else:
            nib.save(output_image(volume, raw), str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_mask(volume: Volume, mask: np.ndarray, path: str | Path) -> None:
    """Write a uint8 mask on the input's grid (same affine, qform/sform codes), atomically."""
    img = volume.img
    path = Path(path)
    _, suffix = split_suffix(path)
    if suffix == ".mgz":
        out = nib.MGHImage(mask.astype(np.uint8), img.affine)
    else:
        out = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
        if isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            out.set_sform(img.get_sform(), int(img.header["sform_code"]))
            out.set_qform(img.get_qform(), int(img.header["qform_code"]))
    tmp = temporary_path(path)
    try:
        if suffix in (".nii", ".nii.gz"):
            with open_for_writing(tmp, suffix) as f:
                f.write(out.to_bytes())
        else:
            nib.save(out, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
