"""BIDS in, BIDS derivatives out: find anatomical images, scrub sidecars, shift dates.

    deface-infer BIDS_DIR OUT_DIR participant [--participant-label 01 02] [--suffixes T1w T2w]
                 [--date-shift KEY]

Anatomical images (``sub-<label>[/ses-<label>]/anat/*_<suffix>.nii[.gz]``) are defaced into
OUT_DIR under the same relative paths and names, so the derivative dataset replaces the raw
one for sharing. Their JSON sidecars are copied without the fields that can identify a person;
dates are removed, or shifted by one offset per subject (``--date-shift KEY``: the offset is
derived from KEY and the subject label, so longitudinal intervals survive and the same key
gives the same shift next time). ``scans.tsv`` acquisition times are shifted the same way.
The layout is BIDS's fixed one, matched here directly rather than through pybids, whose
database and dependencies a defacing container does not need.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any

ANAT_SUFFIXES = ("T1w", "T2w", "FLAIR", "PDw", "T2starw", "PD", "T1map", "T2map", "inplaneT1", "inplaneT2", "angio")

# Sidecar fields that can identify a person or a site (anonymisation guide: metadata removal).
IDENTIFYING_FIELDS = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionalDepartmentAddress",
    "DeviceSerialNumber", "StationName", "OperatorsName", "OperatorName", "ReferringPhysicianName",
    "PerformingPhysicianName", "RequestingPhysician", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID", "ImageComments", "StudyComments", "PatientComments", "AdditionalPatientHistory",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "ProcedureStepDescription",
}
DATE_FIELD = re.compile(r".*(Date|DateTime)$")


def is_bids_dataset(path: Path) -> bool:
    return (path / "dataset_description.json").is_file()


def subject_of(path: Path) -> str:
    """'01' for any path inside sub-01/."""
    for part in path.parts:
        if part.startswith("sub-"):
            return part[4:]
    raise ValueError(f"{path} is not inside a sub-<label> folder")


def find_anatomical(bids_dir: Path, participants: list[str] | None = None,
                    suffixes: tuple[str, ...] | list[str] = ANAT_SUFFIXES) -> list[Path]:
    """Anatomical NIfTI files of the dataset, sorted, optionally for some participants only."""
    wanted = {p.removeprefix("sub-") for p in participants} if participants else None
    found = []
    for pattern in ("sub-*/anat/*.nii*", "sub-*/ses-*/anat/*.nii*"):
        for path in bids_dir.glob(pattern):
            name = path.name.split(".")[0]
            if name.split("_")[-1] not in suffixes:
                continue
            if wanted is not None and subject_of(path.relative_to(bids_dir)) not in wanted:
                continue
            found.append(path)
    return sorted(found)


def day_offset(key: str, subject: str) -> int:
    """Days to add to every date of ``subject``: between -5 and -1 years, fixed by ``key``."""
    digest = hashlib.sha256(f"{key}\0{subject}".encode()).digest()
    return -(365 + int.from_bytes(digest[:4], "big") % (4 * 365))


def shift_date(value: str, days: int) -> str | None:
    """An ISO date or date-time moved by ``days`` (same format); None when it cannot be parsed."""
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", "%Y%m%d"):
        try:
            parsed = dt.datetime.strptime(value, fmt)
        except (TypeError, ValueError):
            continue
        return (parsed + dt.timedelta(days=days)).strftime(fmt)
    return None


def scrub_sidecar(meta: dict[str, Any], days: int | None) -> tuple[dict[str, Any], list[str]]:
    """(scrubbed copy, names of the fields removed or shifted)."""
    out, touched = {}, []
    for key, value in meta.items():
        if key in IDENTIFYING_FIELDS:
            touched.append(key)
            continue
        if DATE_FIELD.match(key):
            shifted = shift_date(value, days) if days is not None and isinstance(value, str) else None
            touched.append(key)
            if shifted is not None:
                out[key] = shifted
            continue
        out[key] = value
    return out, touched


def write_sidecar(src_image: Path, dst_image: Path, days: int | None, provenance: dict[str, Any]) -> None:
    """The image's JSON sidecar, scrubbed, with a record of what was done."""
    stem = src_image.name.split(".")[0]
    src = src_image.with_name(stem + ".json")
    meta = json.loads(src.read_text()) if src.exists() else {}
    meta, touched = scrub_sidecar(meta, days)
    meta["Defaced"] = {**provenance, "SidecarFieldsRemovedOrShifted": sorted(touched),
                       "DatesShifted": days is not None}
    dst_image.with_name(stem + ".json").write_text(json.dumps(meta, indent=2))


def write_scans_tsv(bids_dir: Path, out_dir: Path, days: dict[str, int | None]) -> None:
    """Copy every scans.tsv with its acq_time shifted (or emptied without --date-shift)."""
    for src in sorted(bids_dir.glob("sub-*/**/*_scans.tsv")):
        subject = subject_of(src.relative_to(bids_dir))
        if subject not in days:
            continue
        with src.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            fields = list(rows[0]) if rows else []
        for row in rows:
            if "acq_time" in row and row["acq_time"] not in ("", "n/a"):
                shifted = shift_date(row["acq_time"], days[subject]) if days[subject] is not None else None
                row["acq_time"] = shifted or "n/a"
        dst = out_dir / src.relative_to(bids_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with dst.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)


def write_dataset_description(bids_dir: Path, out_dir: Path, version: str, model: str) -> None:
    source = json.loads((bids_dir / "dataset_description.json").read_text())
    description = {
        "Name": f"{source.get('Name', 'dataset')} (defaced)",
        "BIDSVersion": source.get("BIDSVersion", "1.9.0"),
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "deface", "Version": version, "Description": f"face removed with {model}"}],
    }
    if "License" in source:
        description["License"] = source["License"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset_description.json").write_text(json.dumps(description, indent=2))
