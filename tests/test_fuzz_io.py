"""Fuzzing the IO layer with hypothesis: any header, affine, shape and dtype is either refused
with InputError or written back on exactly the same grid, header and stored values."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from deface import io
from deface.preprocessing import to_canonical

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64]
finite = st.floats(-50, 50, allow_nan=False, width=32)
special = st.sampled_from([0.0, 1.0, -1.0, 1e-8, 1e8, np.nan, np.inf])


@st.composite
def nifti(draw):
    shape = tuple(draw(st.one_of(st.lists(st.integers(2, 9), min_size=3, max_size=4),
                                 st.lists(st.integers(1, 9), min_size=1, max_size=6))))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    data = rng.uniform(-100, 300, shape)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        data = np.clip(data, info.min, info.max)
    affine = np.eye(4)
    if draw(st.booleans()):  # a proper rotation and zoom, any axis order
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        affine[:3, :3] = q @ np.diag(draw(st.lists(st.floats(0.1, 10), min_size=3, max_size=3)))
    else:
        affine[:3, :3] = np.array(draw(st.lists(st.one_of(finite, special), min_size=9, max_size=9))).reshape(3, 3)
    affine[:3, 3] = draw(st.lists(finite, min_size=3, max_size=3))
    img = nib.Nifti1Image(data.astype(dtype), None)
    sform_code, qform_code = draw(st.sampled_from([0, 1, 2, 4])), draw(st.sampled_from([0, 1]))
    img.set_sform(affine, sform_code)
    try:
        img.set_qform(affine if qform_code else None, qform_code)
    except Exception:  # not a rotation+zoom: nibabel cannot store it as a qform
        img.set_qform(None, 0)
    slope = draw(st.one_of(st.just(None), special, finite))
    if slope is not None:  # written as is, even the values nibabel would refuse (0, inf)
        img.header["scl_slope"], img.header["scl_inter"] = slope, draw(st.one_of(finite, special))
    img.header["descrip"] = draw(st.binary(max_size=79))
    return img


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(img=nifti(), gz=st.booleans())
def test_io_never_crashes_and_never_changes_the_grid(img, gz):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / ("in.nii.gz" if gz else "in.nii")
        try:
            nib.save(img, str(src))
        except Exception:
            assume(False)  # nibabel itself cannot write this header
        try:
            volume = io.load(src)
        except io.InputError:
            event("refused with InputError")
            return
        event("written back")
        out = Path(tmp) / "out.nii.gz"
        io.save(volume, volume.raw, out)
        before, after = nib.load(str(src)), nib.load(str(out))
        assert after.header.binaryblock == before.header.binaryblock
        assert after.shape == before.shape and after.get_data_dtype() == before.get_data_dtype()
        assert np.array_equal(np.asanyarray(after.dataobj.get_unscaled()), np.asanyarray(before.dataobj.get_unscaled()),
                              equal_nan=np.dtype(before.get_data_dtype()).kind == "f")
        ref = volume.reference()
        if np.isfinite(ref).any() and np.nanmax(ref) > np.nanmin(ref):
            canon = to_canonical(ref, volume.affine, spacing=8.0, multiple=4)
            assert np.isfinite(canon.image.numpy()).all()
