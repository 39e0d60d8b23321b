"""IO: the output keeps the input's bytes, header, grid and dtype."""

from __future__ import annotations

import gzip
import sys

import nibabel as nib
import numpy as np
import pytest

from deface import io
from tests.conftest import make_phantom


def header_bytes(path) -> bytes:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read(int(nib.load(str(path)).header.get_data_offset()))


@pytest.mark.parametrize("dtype,slope", [(np.uint8, None), (np.int16, 2.0), (np.uint16, None), (np.int32, 0.5),
                                         (np.float32, None), (np.float64, 3.0)])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_roundtrip_keeps_header_and_bytes(tmp_path, dtype, slope, suffix):
    img = make_phantom(dtype=dtype, slope=slope)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment extension"))
    src = tmp_path / f"in{suffix}"
    nib.save(img, str(src))
    vol = io.load(src)
    assert vol.raw.dtype == np.dtype(dtype)
    out = tmp_path / f"out{suffix}"
    io.save(vol, vol.raw, out)
    assert header_bytes(out) == header_bytes(src)
    a, b = nib.load(str(src)), nib.load(str(out))
    assert np.array_equal(np.asanyarray(a.dataobj.get_unscaled()), np.asanyarray(b.dataobj.get_unscaled()))
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape
    assert a.header["sform_code"] == b.header["sform_code"] and a.header["qform_code"] == b.header["qform_code"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_scaled_and_to_raw_invert(tmp_path):
    img = make_phantom(dtype=np.int16, slope=2.0)
    nib.save(img, str(tmp_path / "a.nii.gz"))
    vol = io.load(tmp_path / "a.nii.gz")
    assert np.allclose(vol.scaled(), np.asanyarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj))
    assert np.array_equal(vol.to_raw(vol.scaled()), vol.raw)


@pytest.mark.parametrize("shape", [(10, 12), (4, 4, 4, 2, 3)])
def test_refuses_wrong_dimensionality(tmp_path, shape):
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), str(tmp_path / "x.nii"))
    with pytest.raises(io.InputError):
        io.load(tmp_path / "x.nii")


def test_refuses_singular_affine(tmp_path):
    class ZeroSliceImage:  # nibabel itself refuses to build one, but files in the wild have them
        affine = np.diag([1.0, 1.0, 0.0, 1.0])

        def get_data_dtype(self):
            return np.dtype(np.float32)

    with pytest.raises(io.InputError, match="affine"):
        io.check_volume(ZeroSliceImage(), (8, 8, 8), 10**6)


def test_refuses_garbage_bytes(tmp_path):
    (tmp_path / "r.nii").write_bytes(b"\x00\x01not a nifti" * 10)
    with pytest.raises(io.InputError):
        io.load(tmp_path / "r.nii")


@pytest.mark.parametrize("extension", [False, True])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_scaling_survives_with_and_without_extensions(tmp_path, extension, suffix):
    img = make_phantom(dtype=np.int16, slope=2.0)
    if extension:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment"))
    src = tmp_path / f"in{suffix}"
    nib.save(img, str(src))
    vol = io.load(src)
    io.save(vol, vol.raw, tmp_path / f"out{suffix}")
    assert header_bytes(tmp_path / f"out{suffix}") == header_bytes(src)
    a, b = nib.load(str(src)), nib.load(str(tmp_path / f"out{suffix}"))
    assert a.dataobj.slope == b.dataobj.slope == 2.0 and a.dataobj.inter == b.dataobj.inter == 5.0
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_scrub_clears_text_and_extensions_only(tmp_path):
    img = make_phantom(dtype=np.int16, slope=2.0)
    img.header["descrip"] = b"Jane Doe 1970-01-01"
    img.header["aux_file"] = b"MRN0012345"
    img.header["intent_name"] = b"name"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(2, b"(0010,0010) PN Doe^Jane" + b" " * 9))
    src = tmp_path / "in.nii"
    nib.save(img, str(src))
    vol = io.scrub_header(io.load(src))
    io.save(vol, vol.raw, tmp_path / "out.nii")
    data = (tmp_path / "out.nii").read_bytes()
    assert b"Doe" not in data and b"MRN" not in data
    a, b = nib.load(str(src)), nib.load(str(tmp_path / "out.nii"))
    assert len(b.header.extensions) == 0 and b.header["descrip"] == b""
    assert np.array_equal(a.affine, b.affine) and a.header["qform_code"] == b.header["qform_code"]
    assert a.dataobj.slope == b.dataobj.slope and np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


@pytest.mark.parametrize("fast", [True, False])
def test_gzip_output_is_standard_whichever_compressor(tmp_path, monkeypatch, fast):
    """ISA-L's gzip (if installed) and the standard library's write the same decompressed bytes, a
    gzip stream any reader opens, with no file name (the temporary's) and no time stored."""
    if fast:
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)  # "import isal..." raises ImportError
        monkeypatch.setitem(sys.modules, "isal.igzip", None)
    src = tmp_path / "in.nii"
    nib.save(make_phantom(dtype=np.int16), str(src))
    vol = io.load(src)
    out = tmp_path / "out.nii.gz"
    io.save(vol, vol.raw, out)
    stream = out.read_bytes()
    assert stream[:2] == b"\x1f\x8b" and stream[4:8] == b"\0\0\0\0"  # gzip magic, mtime 0
    assert not stream[3] & 0x08  # FLG.FNAME unset: no temporary's name in the file
    assert gzip.decompress(stream) == src.read_bytes()


def test_fast_and_standard_gzip_reading_agree(tmp_path, monkeypatch):
    """A .nii.gz read through ISA-L (fast extra) is the same volume as through nibabel's gzip:
    stored values, scaling, header bytes; a truncated file still gets the usual one-line error."""
    pytest.importorskip("isal")
    img = make_phantom(dtype=np.int16, slope=2.0)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment extension"))
    src = tmp_path / "in.nii.gz"
    nib.save(img, str(src))
    fast = io.load(src)
    assert not isinstance(fast.img.dataobj.file_like, str)  # read from memory, not reopened from disk
    monkeypatch.setattr(io, "decompressed", lambda img, path, max_voxels: img)
    slow = io.load(src)
    assert np.array_equal(fast.raw, slow.raw) and fast.raw.dtype == slow.raw.dtype
    assert fast.slope_inter == slow.slope_inter and np.array_equal(fast.affine, slow.affine)
    assert fast.header.binaryblock == slow.header.binaryblock
    monkeypatch.undo()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])
    with pytest.raises(io.InputError, match="truncated or corrupt"):
        io.load(cut)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_mask_keeps_the_grid_and_stores_no_name(tmp_path, suffix):
    """The --save-mask file: uint8 0/1 on the input's grid (affine, qform and sform codes), and a
    gzip stream without the temporary's name in it."""
    img = make_phantom(dtype=np.int16)
    img.set_qform(img.affine, 1)
    img.set_sform(img.affine, 2)
    src = tmp_path / "in.nii"
    nib.save(img, str(src))
    vol = io.load(src)
    mask = np.zeros(vol.raw.shape, bool)
    mask[2:5, 3:7, 1:4] = True
    out = tmp_path / f"mask{suffix}"
    io.save_mask(vol, mask, out)
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8 and back.shape == img.shape
    assert np.array_equal(np.asanyarray(back.dataobj), mask.astype(np.uint8))
    assert np.allclose(back.affine, img.affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    if suffix == ".nii.gz":
        assert not out.read_bytes()[3] & 0x08
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
