"""A catalogue of bad and unusual inputs: each gets one clear line and the right exit status,
and never stops the rest of the batch (a good head is processed beside every case)."""

from __future__ import annotations

import errno
import gzip
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deface import cli, io
from tests.conftest import make_phantom


def _save(img, tmp: Path, name: str) -> Path:
    path = tmp / name
    nib.save(img, str(path))
    return path


def _phantom(dtype=np.int16, **kw) -> nib.Nifti1Image:
    return make_phantom(dtype=dtype, **kw)


def _with_data(data: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, make_phantom().affine if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    return img


def _phantom_float() -> np.ndarray:
    return np.asanyarray(make_phantom().dataobj).astype(np.float32)


# -- builders: each writes one input into ``tmp`` and returns its path ------------------------
def truncated_gz(tmp):
    path = _save(_phantom(), tmp, "x.nii.gz")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def truncated_nii(tmp):
    path = _save(_phantom(), tmp, "x.nii")
    path.write_bytes(path.read_bytes()[:5000])
    return path


def random_bytes(name):
    def build(tmp):
        path = tmp / name
        path.write_bytes(np.random.default_rng(0).bytes(4000))
        return path
    return build


def empty(name):
    def build(tmp):
        path = tmp / name
        path.write_bytes(b"")
        return path
    return build


def gz_of_garbage(tmp):
    path = tmp / "x.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header" * 30))
    return path


def uncompressed_named_gz(tmp):
    raw = _save(_phantom(), tmp, "plain.nii")
    path = tmp / "x.nii.gz"
    path.write_bytes(raw.read_bytes())
    raw.unlink()
    return path


def image_2d(tmp):
    return _save(nib.Nifti1Image(np.ones((40, 40), np.int16), np.eye(4)), tmp, "x.nii.gz")


def image_5d(tmp):
    return _save(nib.Nifti1Image(np.ones((10, 10, 10, 2, 3), np.int16), np.eye(4)), tmp, "x.nii.gz")


def single_slice(tmp):
    return _save(nib.Nifti1Image(np.ones((40, 40, 1), np.int16), np.eye(4)), tmp, "x.nii.gz")


def tiny_volume(tmp):
    return _save(nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4)), tmp, "x.nii.gz")


def some_nan(tmp):
    data = _phantom_float()
    data[:5] = np.nan
    return _save(_with_data(data), tmp, "x.nii.gz")


def all_nan(tmp):
    return _save(_with_data(np.full((20, 20, 20), np.nan, np.float32)), tmp, "x.nii.gz")


def some_inf(tmp):
    data = _phantom_float()
    data[0, 0, :3] = np.inf
    data[1, 0, :3] = -np.inf
    return _save(_with_data(data), tmp, "x.nii.gz")


def all_zero(tmp):
    return _save(_with_data(np.zeros((30, 30, 30), np.int16)), tmp, "x.nii.gz")


def constant(tmp):
    return _save(_with_data(np.full((30, 30, 30), 7, np.int16)), tmp, "x.nii.gz")


def singular_affine(tmp):
    img = _phantom()
    aff = img.affine.copy()
    aff[:3, 0] = 0
    img.set_sform(aff, 2)
    img.set_qform(None, 0)
    return _save(img, tmp, "x.nii.gz")


def nan_affine(tmp):
    path = _save(_phantom(), tmp, "x.nii")
    hdr = bytearray(path.read_bytes())
    srow = np.frombuffer(bytes(hdr[280:328]), np.float32).copy()
    srow[0] = np.nan
    hdr[280:328] = srow.tobytes()
    path.write_bytes(bytes(hdr))
    return path


def patched_pixdim(values):
    def build(tmp):
        img = _phantom()
        img.set_sform(None, 0)
        path = _save(img, tmp, "x.nii")
        hdr = bytearray(path.read_bytes())
        hdr[80:92] = np.asarray(values, np.float32).tobytes()  # pixdim[1:4]
        path.write_bytes(bytes(hdr))
        return path
    return build


def too_large(tmp):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2048, 2048, 2048))
    hdr.set_data_dtype(np.int16)
    path = tmp / "x.nii"
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * 4096)
    return path


def dtype_case(dtype):
    def build(tmp):
        data = _phantom_float()
        if np.dtype(dtype).kind == "u":
            data = np.clip(data / 3, 0, np.iinfo(dtype).max)
        elif dtype == np.int8:
            data = data / 6
        return _save(_with_data(data.astype(dtype)), tmp, "x.nii.gz")
    return build


def complex_data(tmp):
    return _save(_with_data(_phantom_float().astype(np.complex64)), tmp, "x.nii.gz")


def rgb_data(tmp):
    data = _phantom_float()
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(data / 3, 0, 255)
    return _save(nib.Nifti1Image(rgb, make_phantom().affine), tmp, "x.nii.gz")


def bad_slope(value):
    def build(tmp):
        path = _save(_phantom(), tmp, "x.nii")
        hdr = bytearray(path.read_bytes())
        hdr[112:116] = np.float32(value).tobytes()  # scl_slope
        path.write_bytes(bytes(hdr))
        return path
    return build


def nifti2(tmp):
    img = _phantom()
    return _save(nib.Nifti2Image(np.asanyarray(img.dataobj), img.affine), tmp, "x.nii.gz")


def mgh(tmp):
    img = _phantom()
    return _save(nib.MGHImage(np.asanyarray(img.dataobj).astype(np.float32), img.affine), tmp, "x.mgz")


def analyze_pair(tmp):
    img = _phantom()
    path = tmp / "x.hdr"
    nib.save(nib.AnalyzeImage(np.asanyarray(img.dataobj), img.affine), str(path))
    return path


def four_d(tmp):
    data = np.asanyarray(_phantom().dataobj)
    return _save(_with_data(np.stack([data, data // 2, data], -1)), tmp, "x.nii.gz")


def trailing_singleton(tmp):
    data = np.asanyarray(_phantom().dataobj)
    return _save(_with_data(data[..., None]), tmp, "x.nii.gz")


def oblique_thick(tmp):
    return _save(make_phantom(shape=(60, 70, 12), zooms=(3.0, 3.0, 15.0), angle_deg=35), tmp, "x.nii.gz")


def qform_sform_disagree(tmp):
    img = _phantom()
    q = img.affine.copy()
    q[:3, 3] += 30
    img.set_qform(q, 1)
    return _save(img, tmp, "x.nii.gz")


def no_codes(tmp):
    img = _phantom()
    img.set_sform(None, 0)
    img.set_qform(None, 0)
    return _save(img, tmp, "x.nii.gz")


def huge_voxels(tmp):
    return _save(make_phantom(shape=(6, 7, 6), zooms=(35.0, 35.0, 35.0)), tmp, "x.nii.gz")


def negative_values(tmp):
    data = np.asanyarray(_phantom().dataobj).astype(np.int16) - 500
    return _save(_with_data(data), tmp, "x.nii.gz")


def binary_mask(tmp):
    data = np.asanyarray(_phantom().dataobj) > 0
    return _save(_with_data(data.astype(np.uint8)), tmp, "x.nii.gz")


def dangling_symlink(tmp):
    path = tmp / "x.nii.gz"
    path.symlink_to(tmp / "missing.nii.gz")
    return path


def few_voxels(tmp):
    """A few voxels across: smaller than the network's deepest level (its instance norm once
    raised "Expected more than 1 spatial element")."""
    data = np.random.default_rng(0).random((5, 6, 4)).astype(np.float32)
    return _save(_with_data(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp, "x.nii.gz")


def symlinked_input(tmp):
    real = _save(_phantom(), tmp, "real.nii.gz")
    link = tmp / "x.nii.gz"
    link.symlink_to(real)
    return link


def directory_named_nifti(tmp):
    path = tmp / "x.nii.gz"
    path.mkdir()
    return path


def header_only_vox_offset(tmp):
    path = _save(_phantom(), tmp, "x.nii")
    hdr = bytearray(path.read_bytes())
    hdr[108:112] = np.float32(10_000_000).tobytes()  # vox_offset far beyond the end
    path.write_bytes(bytes(hdr))
    return path


OK = "ok"


def fail(message: str) -> str:
    """A case that must fail with one error line holding ``message`` (not just any exception)."""
    return "fail: " + message


CASES = {
    "truncated .nii.gz": (truncated_gz, fail('truncated or corrupt')),
    "truncated .nii": (truncated_nii, fail('truncated or corrupt')),
    "random bytes .nii": (random_bytes("x.nii"), fail('not a readable NIfTI/MGH image')),
    "random bytes .nii.gz": (random_bytes("x.nii.gz"), fail('not a readable NIfTI/MGH image')),
    "empty .nii": (empty("x.nii"), fail('not a readable NIfTI/MGH image')),
    "empty .nii.gz": (empty("x.nii.gz"), fail('not a readable NIfTI/MGH image')),
    "gzip of garbage": (gz_of_garbage, fail('not a readable NIfTI/MGH image')),
    "uncompressed file named .nii.gz": (uncompressed_named_gz, fail('not a gzip file')),
    "2D image": (image_2d, fail('image is 2D')),
    "5D image": (image_5d, fail('image has 5 dimensions')),
    "single slice": (single_slice, fail('a single slice')),
    "2x2x2 volume": (tiny_volume, OK),  # no face in it: written unchanged
    "some NaN voxels": (some_nan, OK),
    "all NaN": (all_nan, fail('no finite values')),
    "Inf voxels": (some_inf, OK),
    "all zeros": (all_zero, fail('the image is constant')),
    "constant image": (constant, fail('the image is constant')),
    "singular affine": (singular_affine, fail('the affine (voxel to world) is singular')),
    "NaN in affine": (nan_affine, fail('the affine (voxel to world) is singular')),
    "zero pixdims": (patched_pixdim([0, 0, 0]), fail('voxel sizes (pixdim) are zero')),
    "negative pixdims": (patched_pixdim([-4.0, -3.5, -3.8]), OK),
    "too large for memory": (too_large, fail('raise --max-voxels')),
    "uint8": (dtype_case(np.uint8), OK),
    "int8": (dtype_case(np.int8), OK),
    "uint16": (dtype_case(np.uint16), OK),
    "int32": (dtype_case(np.int32), OK),
    "float64": (dtype_case(np.float64), OK),
    "complex": (complex_data, fail('is not a magnitude image')),
    "RGB": (rgb_data, fail('is not a magnitude image')),
    "scl_slope 0": (bad_slope(0.0), OK),
    "scl_slope NaN": (bad_slope(np.nan), OK),
    "NIfTI-2": (nifti2, OK),
    "MGH .mgz": (mgh, OK),
    "Analyze .hdr/.img": (analyze_pair, OK),
    "4D series": (four_d, OK),
    "trailing singleton dimension": (trailing_singleton, OK),
    "oblique thick slices": (oblique_thick, OK),
    "qform and sform disagree": (qform_sform_disagree, OK),
    "no qform or sform": (no_codes, OK),
    "35 mm voxels": (huge_voxels, OK),
    "negative intensities": (negative_values, OK),
    "binary mask, not an MRI": (binary_mask, OK),
    "dangling symlink": (dangling_symlink, fail('No such file')),
    "symlinked input": (symlinked_input, OK),
    "a few voxels across": (few_voxels, OK),
    "directory named .nii.gz": (directory_named_nifti, fail('no NIfTI/MGH files in it')),
    "vox_offset beyond the end": (header_only_vox_offset, fail('truncated or corrupt')),
}


@pytest.fixture
def batch(tmp_path, tiny_weights):
    """(input folder, output folder, good input, run) for one case beside one good head."""
    src = tmp_path / "in"
    src.mkdir()
    out = tmp_path / "out"
    good = _save(_phantom(), src, "good.nii.gz")

    def run(paths, *extra):
        return cli.main([str(good), *map(str, paths), "-o", str(out), "--weights", str(tiny_weights),
                         "--device", "cpu", "-q", *extra])
    return src, out, good, run


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_reported_and_batch_goes_on(case, batch, caplog):
    src, out, good, run = batch
    build, expected = CASES[case]
    path = build(src)
    with caplog.at_level(logging.WARNING, logger="deface"):
        code = run([path])
    assert (out / "good_defaced.nii.gz").exists(), "the rest of the batch must still be done"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary file may be left"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if expected != OK:
        assert code == 1
        assert len(errors) == 1 and path.name in errors[0] and "\n" not in errors[0], errors
        assert expected.removeprefix("fail: ") in errors[0], errors
        assert "please report" not in errors[0], errors  # an unexpected exception is no expected failure
        assert not (out / "x_defaced.nii.gz").exists()
    else:
        assert code == 0, errors
        stem, ext = io.split_suffix(path)
        written = out / f"{stem}_defaced{'.mgz' if ext == '.mgz' else '.nii.gz'}"
        before, after = nib.load(str(path)), nib.load(str(written))
        assert after.shape == before.shape and after.get_data_dtype() == before.get_data_dtype()
        assert np.allclose(after.affine, before.affine)


def test_catalogue_is_large_enough():
    assert len(CASES) + 5 >= 40  # plus the scenario tests below


def test_output_equal_to_input_is_a_usage_error(batch):
    src, out, good, run = batch
    code = cli.main([str(good), "--outfile", str(good), "--force", "-q"])
    assert code == 2


def test_symlink_to_input_as_output_is_refused(tmp_path, tiny_weights):
    good = _save(_phantom(), tmp_path, "a.nii.gz")
    link = tmp_path / "b_defaced.nii.gz"
    link.symlink_to(good)
    before = good.read_bytes()
    code = cli.main([str(tmp_path / "a.nii.gz"), "--suffix", "_x", "--outfile", str(link), "--force", "-q",
                     "--weights", str(tiny_weights)])
    assert code == 2 and good.read_bytes() == before


def test_same_name_from_two_folders_is_refused(tmp_path, tiny_weights):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        _save(_phantom(), tmp_path / d, "sub-01_T1w.nii.gz")
    code = cli.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "out"), "-q",
                     "--weights", str(tiny_weights)])
    assert code == 2 and not (tmp_path / "out" / "sub-01_T1w_defaced.nii.gz").exists()


def test_full_disk_leaves_no_partial_file(batch, monkeypatch, caplog):
    src, out, good, run = batch
    other = _save(_phantom(), src, "other.nii.gz")
    real_replace = os.replace

    def replace(a, b):
        if "other" in str(b):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(a, b)

    monkeypatch.setattr(io.os, "replace", replace)
    with caplog.at_level(logging.ERROR, logger="deface"):
        assert run([other]) == 1
    assert (out / "good_defaced.nii.gz").exists()
    assert sorted(p.name for p in out.iterdir()) == ["good_defaced.nii.gz"]
    assert any("No space left" in r.getMessage() for r in caplog.records)


def test_read_only_output_folder(batch, monkeypatch, caplog):
    src, out, good, run = batch
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o500)
    else:  # root ignores permissions: simulate what the kernel would say
        monkeypatch.setattr(io.os, "replace", lambda a, b: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(b))))
    try:
        with caplog.at_level(logging.ERROR, logger="deface"):
            assert run([]) == 1
        assert any("good.nii.gz" in r.getMessage() and "ermission" in r.getMessage() for r in caplog.records)
    finally:
        out.chmod(0o700)


def test_unreadable_input(batch, monkeypatch, caplog):
    src, out, good, run = batch
    bad = _save(_phantom(), src, "locked.nii.gz")
    if os.geteuid() != 0:
        bad.chmod(0)
    else:
        real_load = nib.load
        monkeypatch.setattr(io.nib, "load", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p)) if "locked" in str(p) else real_load(p, *a, **k))
    with caplog.at_level(logging.ERROR, logger="deface"):
        assert run([bad]) == 1
    assert (out / "good_defaced.nii.gz").exists()
    assert any("locked.nii.gz" in r.getMessage() for r in caplog.records)
