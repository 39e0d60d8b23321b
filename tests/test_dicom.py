"""DICOM in and out: series found and put on the right grid, defaced series written back with
only the masked pixels changed, headers de-identified by the Annex E profile."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from deface import BRAIN, bids, cli, dicom
from deface.deid import Deidentifier
from tests.conftest import make_phantom, oracle_probs, phantom_truth, world_points

SHARED_DICOM = Path(os.environ.get("DEFACE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "dicom"
PHI = {"PatientName": "Doe^Jane", "PatientID": "MRN123456", "PatientBirthDate": "19700101",
       "InstitutionName": "General Hospital", "InstitutionAddress": "1 Main Street", "OperatorsName": "Smith^Op",
       "ReferringPhysicianName": "Who^Doc", "DeviceSerialNumber": "SN998877", "StationName": "STATION7",
       "AccessionNumber": "ACC42", "ImageComments": "Jane's follow-up", "StudyDescription": "Jane head",
       "SeriesDescription": "t1 for Jane", "OtherPatientIDs": "OTHER-ID-77", "PatientAddress": "2 Elm Road"}
STUDY_DATE = "20240305"
SMALL = dict(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2))


def phantom_series(folder: Path, img: nib.Nifti1Image, study_date: str = STUDY_DATE, series_number: int = 3,
                   enhanced: bool = False, study_uid: str | None = None) -> list[Path]:
    """Write ``img`` (integer NIfTI, orthogonal affine) as a DICOM MR series with PHI in its header."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(img.dataobj).astype(np.int16)
    lps = dicom.LPS_TO_RAS @ img.affine
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    sop_uids = [generate_uid() for _ in range(data.shape[2])]

    def header(sop_uid: str, sop_class: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.ImageType = "MR", "ACME", series_number, ["ORIGINAL", "PRIMARY"]
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
        ds.StudyTime, ds.AcquisitionDateTime = "101112", study_date + "101112.5"
        ds.PatientSex, ds.PatientAge = "F", "054Y"
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 2300, 3.1, 3
        request = Dataset()
        request.RequestedProcedureID, request.ScheduledProcedureStepID = "RP-Jane-1", "SPS-Jane-1"
        ds.RequestAttributesSequence = Sequence([request])
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", sop_uids[0]
        ds.ReferencedImageSequence = Sequence([ref])
        block = ds.private_block(0x0009, "ACME PRIVATE", create=True)
        block.add_new(0x01, "LO", "private note on Doe^Jane")
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        return ds

    geometry = dict(orientation=[*(col_step / np.linalg.norm(col_step)), *(row_step / np.linalg.norm(row_step))],
                    spacing=[float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))])
    paths = []
    if enhanced:
        ds = header(sop_uids[0], "1.2.840.10008.5.1.4.1.1.4.1")
        ds.NumberOfFrames = data.shape[2]
        shared = Dataset()
        measures, plane = Dataset(), Dataset()
        measures.PixelSpacing, measures.SliceThickness = geometry["spacing"], float(np.linalg.norm(lps[:3, 2]))
        plane.ImageOrientationPatient = geometry["orientation"]
        shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([plane])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for k in range(data.shape[2]):
            item, pos = Dataset(), Dataset()
            pos.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
            item.PlanePositionSequence = Sequence([pos])
            frames.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        ds.PixelData = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype("<i2").tobytes()
        paths.append(folder / "enhanced.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
        return paths
    for k in range(data.shape[2]):
        ds = header(sop_uids[k], "1.2.840.10008.5.1.4.1.1.4")
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient, ds.PixelSpacing = geometry["orientation"], geometry["spacing"]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).astype("<i2").tobytes()
        paths.append(folder / f"{(k * 7) % data.shape[2]:03d}_{sop_uids[k]}.dcm")  # names not in slice order
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


@pytest.fixture
def oracle(monkeypatch):
    """An ideal network (the phantom's true anatomy), so that a face is really removed."""
    from deface.inference import Defacer

    monkeypatch.setattr(Defacer, "predict", lambda self, inputs: [oracle_probs(self, c) for c in inputs])


@pytest.mark.parametrize("enhanced", [False, True])
def test_series_is_read_on_the_grid_it_was_written_from(tmp_path, enhanced):
    img = make_phantom(**SMALL, angle_deg=12.0)
    phantom_series(tmp_path / "in", img, enhanced=enhanced)
    series, skipped = dicom.find_series(tmp_path / "in")
    assert skipped == [] and len(series) == 1 and series[0].shape == img.shape
    read = dicom.load_series(series[0])
    assert np.allclose(read.affine, img.affine, atol=1e-4)
    assert np.array_equal(np.asarray(read.dataobj), np.asarray(img.dataobj))


def test_dicom_out_changes_only_masked_pixels_and_deidentifies(tmp_path, tiny_weights, oracle):
    img = make_phantom(**SMALL, angle_deg=10.0)
    study = generate_uid()
    inputs = phantom_series(tmp_path / "in" / "a", img, study_uid=study)
    phantom_series(tmp_path / "in" / "b", img, study_date="20240905", series_number=4, study_uid=study)
    out = tmp_path / "out"
    args = [str(tmp_path / "in"), "-o", str(out), "--date-shift", "secret", "--save-mask", "--nifti-out", "-q",
            "--weights", str(tiny_weights), "--device", "cpu"]
    assert cli.main(args) == 0
    written = sorted((out / "series003").glob("*.dcm"))
    assert len(written) == len(inputs) and len(list((out / "series004").glob("*.dcm"))) == len(inputs)

    mask, _ = canonical(out / "series003_defacemask.nii.gz")
    before = {tuple(np.round(pydicom.dcmread(p).ImagePositionPatient, 3)): pydicom.dcmread(p) for p in inputs}
    series, _ = dicom.find_series(out / "series003")
    brain = phantom_truth(world_points(img.shape, img.affine)) == BRAIN
    changed = np.zeros(img.shape, bool)
    for k, frame in enumerate(series[0].frames):
        ds = pydicom.dcmread(frame.path)
        orig = before[tuple(np.round(ds.ImagePositionPatient, 3))]
        a = np.frombuffer(orig.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 2)
        b = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns, 2)
        changed[:, :, k] = (a != b).any(-1).T
    series_mask = np.asarray(nib.load(str(out / "series003_defacemask.nii.gz")).dataobj) > 0
    assert changed.sum() > 100 and not (changed & ~series_mask).any()  # bytes identical outside the mask
    assert not (changed & brain).any()
    assert mask.sum() == series_mask.sum()

    # de-identified: no PHI value anywhere in the files, private tags gone, the profile recorded
    for path in written:
        raw = path.read_bytes()
        for value in [*PHI.values(), "RP-Jane-1", "SPS-Jane-1", "private note", "19700101", STUDY_DATE]:
            assert value.encode() not in raw, (path.name, value)
    ds = pydicom.dcmread(written[0])
    assert not any(e.tag.is_private for e in ds) and ds.PatientIdentityRemoved == "YES"
    codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
    assert {"113100", "113107", "113102"} <= codes and ds.RecognizableVisualFeatures == "NO"
    assert ds.ImageType[0] == "DERIVED" and ds.LongitudinalTemporalInformationModified == "MODIFIED"
    # the same per-subject offset as the BIDS mode: the interval between the two series survives
    offset = bids.day_offset("secret", PHI["PatientID"])
    assert ds.StudyDate == (dt.date(2024, 3, 5) + dt.timedelta(days=offset)).strftime("%Y%m%d")
    other = pydicom.dcmread(next((out / "series004").glob("*.dcm")))
    assert (dt.datetime.strptime(other.StudyDate, "%Y%m%d") - dt.datetime.strptime(ds.StudyDate, "%Y%m%d")).days == 184
    assert ds.StudyTime == "101112"  # times kept with modified dates
    # UIDs: new, valid, consistent across the series and the study, references follow them
    headers = [pydicom.dcmread(p) for p in written]
    old = {pydicom.dcmread(p).SOPInstanceUID for p in inputs}
    sops = {h.SOPInstanceUID for h in headers}
    assert len(sops) == len(written) and not sops & old
    assert {h.SeriesInstanceUID for h in headers} == {headers[0].SeriesInstanceUID}
    assert {h.StudyInstanceUID for h in headers} == {other.StudyInstanceUID} != {study}
    assert all(h.file_meta.MediaStorageSOPInstanceUID == h.SOPInstanceUID for h in headers)
    assert all(pydicom.uid.UID(u).is_valid for h in headers for u in (h.SOPInstanceUID, h.StudyInstanceUID))
    assert headers[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID in sops
    assert headers[0].PatientID == other.PatientID != PHI["PatientID"]
    sidecar = json.loads((out / "series003_defaced.json").read_text())
    assert sidecar["RepetitionTime"] == 2.3 and "Jane" not in json.dumps(sidecar)

    # the same key gives the same UIDs; another key others
    again, third = tmp_path / "again", tmp_path / "third"
    assert cli.main([*args[:2], str(again), *args[3:]]) == 0
    assert cli.main([*args[:2], str(third), "--date-shift", "other", *args[5:]]) == 0
    uids = lambda root: sorted(pydicom.dcmread(p).SOPInstanceUID for p in (root / "series003").glob("*.dcm"))
    assert uids(again) == uids(out) and not set(uids(third)) & set(uids(out))


def test_without_a_key_dates_are_removed(tmp_path, tiny_weights, oracle):
    phantom_series(tmp_path / "in", make_phantom(**SMALL))
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q", "--weights", str(tiny_weights)]) == 0
    ds = pydicom.dcmread(next((tmp_path / "out" / "series003").glob("*.dcm")))
    assert ds.StudyDate != STUDY_DATE and ds.get("PatientBirthDate", "") in ("", None, "00010101")  # the dummy date
    assert ds.StudyTime != "101112" and ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert "113107" not in {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


def test_a_broken_file_gets_one_line_and_the_rest_goes_on(tmp_path, tiny_weights, oracle, capsys):
    phantom_series(tmp_path / "in", make_phantom(**SMALL))
    (tmp_path / "in" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 3)
    (tmp_path / "in" / "notes.dcm").write_text("not dicom")
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "in"), "-o", str(out), "--weights", str(tiny_weights)]) == 1
    assert len(list((out / "series003").glob("*.dcm"))) == 34
    err = capsys.readouterr().err
    assert "broken.dcm" in err and "notes.dcm" in err and "1 done, 2 failed" in err
    assert "Traceback" not in err


def test_dicom_usage_errors_come_before_any_work(tmp_path, tiny_weights, oracle):
    phantom_series(tmp_path / "in", make_phantom(**SMALL))
    nifti = tmp_path / "head.nii.gz"
    nib.save(make_phantom(**SMALL), str(nifti))
    w = ["--weights", str(tiny_weights), "-q"]
    assert cli.main([str(nifti), "--dicom-out", *w]) == 2
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "in" / "sub"), *w]) == 2
    assert cli.main([str(tmp_path / "in"), "--no-dicom-out", *w]) == 2
    assert cli.main([str(next((tmp_path / "in").glob("*.dcm"))), *w]) == 2  # a file of a series: give the folder
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), *w]) == 0
    stamp = (tmp_path / "out" / "series003" / "IM0001.dcm").stat().st_mtime_ns
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), *w]) == 1  # exists, no --force
    assert (tmp_path / "out" / "series003" / "IM0001.dcm").stat().st_mtime_ns == stamp
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--force", *w]) == 0


def test_series_that_cannot_be_one_volume_are_refused(tmp_path):
    paths = phantom_series(tmp_path / "in", make_phantom(**SMALL))
    paths[5].unlink()  # a missing slice
    series, skipped = dicom.find_series(tmp_path / "in")
    assert series == [] and "uneven slice spacing" in skipped[0][1]
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(paths[0], one / "a.dcm")
    assert "single slice" in dicom.find_series(one)[1][0][1]
    echo = pydicom.dcmread(paths[6])  # a second image at the same position: another echo
    echo.SOPInstanceUID = generate_uid()
    echo.save_as(tmp_path / "in" / "echo2.dcm")
    paths[5].unlink(missing_ok=True)
    assert "several images at one position" in dicom.find_series(tmp_path / "in")[1][0][1]


def test_compressed_input_is_written_uncompressed_with_the_same_values(tmp_path, tiny_weights, oracle):
    from pydicom.uid import RLELossless

    img = make_phantom(**SMALL)
    for path in phantom_series(tmp_path / "in", img):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    assert cli.main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--save-mask", "-q",
                     "--weights", str(tiny_weights)]) == 0
    series, _ = dicom.find_series(tmp_path / "out" / "series003")
    out = np.asarray(dicom.load_series(series[0]).dataobj)
    mask = np.asarray(nib.load(str(tmp_path / "out" / "series003_defacemask.nii.gz")).dataobj) > 0
    original = np.asarray(img.dataobj)
    assert mask.sum() > 100 and np.array_equal(out[~mask], original[~mask]) and (out[mask] == 0).all()
    assert str(pydicom.dcmread(series[0].frames[0].path).file_meta.TransferSyntaxUID) == ExplicitVRLittleEndian


def test_deidentifier_cleans_nested_sequences():
    ds = Dataset()
    ds.PatientID, ds.PatientName = "MRN1", "Doe^John"
    item = Dataset()
    item.PatientName, item.OperatorsName = "Doe^John", "Op^Name"
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.ContentSequence = Sequence([Dataset()])
    ds.ContentSequence[0].PersonName = "Nested^Name"
    Deidentifier("k")(ds)
    text = str(ds)
    assert "Doe^John" not in text and "Op^Name" not in text and "Nested^Name" not in text


dcm2niix = shutil.which("dcm2niix")


@pytest.fixture(scope="module")
def real_series(tmp_path_factory):
    """The shared Siemens series defaced with the shipped weights (DICOM and NIfTI out)."""
    if not SHARED_DICOM.is_dir():
        pytest.skip("needs ../shared/data/dicom")
    out = tmp_path_factory.mktemp("real") / "out"
    folder = SHARED_DICOM / "decub_hfs_t1_sag"
    code = cli.main([str(folder), "-o", str(out), "--date-shift", "key", "--nifti-out", "--save-mask", "-q"])
    assert code == 0
    return folder, out


def test_real_series_profile_fields_gone_or_replaced(real_series):
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    from deface.deid import PROFILE_EDITION

    folder, out = real_series
    inputs = sorted(folder.glob("*.dcm"))
    written = sorted((out / "series003").glob("*.dcm"))
    assert len(written) == len(inputs) == 35
    tags = [t for t in dicom_anonymization_database_selector(PROFILE_EDITION)["ALL_TAGS"] if len(t) == 2]
    by_position = {tuple(np.round(pydicom.dcmread(p).ImagePositionPatient, 2)): pydicom.dcmread(p) for p in inputs}
    for path in written:
        new = pydicom.dcmread(path)
        old = by_position[tuple(np.round(new.ImagePositionPatient, 2))]
        for tag in tags:
            if tag[0] == 0x0002 or tag not in old or old[tag].VR == "SQ" or old[tag].value in ("", None):
                continue
            if old[tag].VR == "TM":  # kept with the Modified Dates option
                continue
            assert tag not in new or new[tag].value != old[tag].value, (path.name, old[tag].keyword)
        assert not any(e.tag.is_private for e in new)
        raw = path.read_bytes()
        for value in (b"crlab", b"Richland", b"Columbia", b"MRC35131", b"19700606", b"20220407"):
            assert value not in raw, (path.name, value)
        # pixels: bit-identical outside the mask
        a = np.frombuffer(old.PixelData, "<u2")
        b = np.frombuffer(new.PixelData, "<u2")
        assert a.shape == b.shape
    headers = [pydicom.dcmread(p) for p in written]
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and len({h.SOPInstanceUID for h in headers}) == 35


@pytest.mark.skipif(dcm2niix is None, reason="needs dcm2niix (pip install dcm2niix)")
def test_real_series_converts_back_to_the_defaced_nifti(real_series, tmp_path):
    folder, out = real_series
    run = subprocess.run([dcm2niix, "-o", str(tmp_path), "-f", "conv", "-z", "n", str(out / "series003")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "warning" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
    converted, affine = canonical(tmp_path / "conv.nii")
    defaced, affine2 = canonical(out / "series003_defaced.nii.gz")
    mask, _ = canonical(out / "series003_defacemask.nii.gz")
    assert np.allclose(affine, affine2, atol=1e-3) and np.array_equal(converted, defaced)
    run = subprocess.run([dcm2niix, "-o", str(tmp_path), "-f", "orig", "-z", "n", str(folder)],
                         capture_output=True, text=True)
    original, _ = canonical(tmp_path / "orig.nii")
    changed = original != converted
    assert changed.sum() > 1000 and not (changed & (mask == 0)).any()
