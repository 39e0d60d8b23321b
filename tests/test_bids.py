"""BIDS-App mode: derivatives with the same relative paths, scrubbed sidecars, shifted dates."""

from __future__ import annotations

import csv
import datetime as dt
import json

import nibabel as nib
import numpy as np

from deface import bids, cli
from tests.conftest import make_phantom, oracle_probs

SIDECAR = {"RepetitionTime": 2.3, "PatientName": "Doe^Jane", "PatientBirthDate": "19700101",
           "InstitutionName": "General Hospital", "DeviceSerialNumber": "12345", "ImageComments": "jane",
           "AcquisitionDateTime": "2024-03-05T10:11:12.500000", "EchoTime": 0.003}


def make_dataset(root):
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "toy", "BIDSVersion": "1.9.0"}))
    layout = {("01", "ses-a"): "2024-03-05T10:11:12", ("01", "ses-b"): "2024-09-05T08:00:00", ("02", None): "2023-01-01T09:00:00"}
    for (sub, ses), when in layout.items():
        folder = root / f"sub-{sub}" / (ses or "")
        prefix = f"sub-{sub}" + (f"_{ses}" if ses else "")
        (folder / "anat").mkdir(parents=True)
        (folder / "func").mkdir()
        for suffix in ("T1w", "T2w"):
            img = make_phantom(shape=(30, 36, 34), zooms=(6.5, 6.0, 6.2))
            img.header["descrip"] = b"Doe^Jane"
            nib.save(img, str(folder / "anat" / f"{prefix}_{suffix}.nii.gz"))
            (folder / "anat" / f"{prefix}_{suffix}.json").write_text(json.dumps({**SIDECAR, "AcquisitionDateTime": when}))
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 3), np.int16), np.eye(4)), str(folder / "func" / f"{prefix}_task-rest_bold.nii.gz"))
        with (folder / f"{prefix}_scans.tsv").open("w") as f:
            f.write(f"filename\tacq_time\nanat/{prefix}_T1w.nii.gz\t{when}\n")
    return root


def test_bids_app_writes_scrubbed_derivatives(tmp_path, tiny_weights):
    src = make_dataset(tmp_path / "raw")
    out = tmp_path / "derivatives" / "deface"
    code = cli.main([str(src), str(out), "participant", "--date-shift", "secret", "-q",
                     "--weights", str(tiny_weights), "--device", "cpu"])
    assert code == 0
    images = sorted(p.relative_to(out) for p in out.rglob("*.nii.gz"))
    assert images == sorted(p.relative_to(src) for p in src.rglob("*anat/*.nii.gz"))  # no func, same paths
    assert len(images) == 6
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "deface"
    for image in images:
        assert nib.load(str(out / image)).header["descrip"] == b""
        meta = json.loads((out / image).with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert not set(meta) & bids.IDENTIFYING_FIELDS and meta["RepetitionTime"] == 2.3
        assert meta["Defaced"]["Tool"] == "deface" and meta["Defaced"]["DatesShifted"]
        assert "Doe" not in json.dumps(meta) and "Hospital" not in json.dumps(meta)
    # one offset per subject: the interval between the two sessions survives
    t = {ses: dt.datetime.fromisoformat(json.loads((out / "sub-01" / ses / "anat" / f"sub-01_{ses}_T1w.json")
                                                   .read_text())["AcquisitionDateTime"]) for ses in ("ses-a", "ses-b")}
    assert t["ses-b"] - t["ses-a"] == dt.datetime(2024, 9, 5, 8) - dt.datetime(2024, 3, 5, 10, 11, 12)
    assert t["ses-a"] != dt.datetime(2024, 3, 5, 10, 11, 12)
    with (out / "sub-01" / "ses-a" / "sub-01_ses-a_scans.tsv").open() as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    assert dt.datetime.fromisoformat(row["acq_time"]) == t["ses-a"]


def test_participant_label_and_no_date_shift(tmp_path, tiny_weights):
    src = make_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "participant", "--participant-label", "02", "--suffixes", "T1w", "-q",
                     "--weights", str(tiny_weights), "--device", "cpu"]) == 0
    assert [p.name for p in out.rglob("*.nii.gz")] == ["sub-02_T1w.nii.gz"]
    meta = json.loads((out / "sub-02" / "anat" / "sub-02_T1w.json").read_text())
    assert "AcquisitionDateTime" not in meta and not meta["Defaced"]["DatesShifted"]


def test_refuses_non_bids_input_and_writing_into_the_dataset(tmp_path, tiny_weights):
    src = make_dataset(tmp_path / "raw")
    assert cli.main([str(src), str(src), "participant", "-q", "--weights", str(tiny_weights)]) == 2
    assert cli.main([str(tmp_path), str(tmp_path / "o"), "participant", "-q", "--weights", str(tiny_weights)]) == 2


def test_session_mask_applies_the_t1w_mask_to_the_other_images(tmp_path, tiny_weights, monkeypatch):
    from deface.inference import Defacer

    # An ideal network (the phantom's true anatomy), so that a face is really removed.
    monkeypatch.setattr(Defacer, "predict", lambda self, inputs: [oracle_probs(self, c) for c in inputs])
    src = make_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    assert cli.main([str(src), str(out), "participant", "--session-mask", "--participant-label", "02", "-q",
                     "--weights", str(tiny_weights), "--device", "cpu", "--save-mask"]) == 0
    t1 = nib.load(str(out / "sub-02" / "anat" / "sub-02_T1w.nii.gz"))
    t2 = nib.load(str(out / "sub-02" / "anat" / "sub-02_T2w.nii.gz"))
    raw_t2 = nib.load(str(src / "sub-02" / "anat" / "sub-02_T2w.nii.gz"))
    changed_t1 = np.asanyarray(t1.dataobj) != np.asanyarray(nib.load(str(src / "sub-02" / "anat" / "sub-02_T1w.nii.gz")).dataobj)
    changed_t2 = np.asanyarray(t2.dataobj) != np.asanyarray(raw_t2.dataobj)
    assert changed_t1.sum() > 100 and np.array_equal(changed_t1, changed_t2)  # same grid: the same voxels
    assert t2.header["descrip"] == b""
    meta = json.loads((out / "sub-02" / "anat" / "sub-02_T2w.json").read_text())
    assert meta["Defaced"]["MaskFrom"] == "sub-02_T1w.nii.gz"
