"""DICOM header de-identification: PS3.15 Annex E, Basic Application Level Confidentiality Profile.

The per-attribute actions (D replace, Z empty, X remove, U new UID, and their combinations)
come from the Annex E table as the ``dicom-anonymizer`` package ships it (Kitware; the 2026c
edition of the standard), applied at every level of nesting; private tags are removed. This
module only decides what the profile leaves to the implementation:

* UIDs (U): ``2.25.<n>`` derived from a key and the old UID, so the Study, Series, SOP Instance
  and Frame of Reference UIDs stay consistent across every file and series of a run, and are
  the same again for the same key. Without a key the UIDs are new and unlinkable each run.
* Dates: removed (the profile's dummy value) or, with a key (``--date-shift KEY``), moved by
  the same per-subject offset as the BIDS mode (Retain Longitudinal Temporal Information with
  Modified Dates Option); times are then kept. The subject is the original PatientID.
* With a key, PatientID and PatientName become the same pseudonym for the same person.

Why this library: ``deid`` is a recipe engine whose shipped recipe targets burned-in pixel
regions, so the header profile would be a hand-written tag list; ``dicognito`` pseudonymises
consistently but does not follow the Annex E table element by element (it keeps free text and
private tags) and draws its own date offset; pydicom has the building blocks (private-tag
removal, ``generate_uid``) but no profile.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

PROFILE_EDITION = "dicomfields_2026c"
METHOD = "deface: PS3.15 Annex E Basic Profile (dicom-anonymizer 2026c)"  # LO: at most 64 characters
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
BIRTH = ((0x0010, 0x0030), (0x0010, 0x0032))
CLEAN_RECOGNIZABLE = ("113102", "Clean Recognizable Visual Features Option")


class Deidentifier:
    """Call on each pydicom Dataset of a run (in place). ``key``: see the module docstring."""

    def __init__(self, key: str | None = None) -> None:
        from dicomanonymizer import simpledicomanonymizer as sda

        self.key = key
        self._secret = key if key is not None else secrets.token_hex(16)
        self._sda = sda
        tags = sda.dicom_anonymization_database_selector(PROFILE_EDITION)
        self._base = sda.initialize_actions(PROFILE_EDITION)
        rules: dict[Any, Any] = {tag: self._replace_uid for tag in tags["U_TAGS"]}
        rules.update({tag: self._uid_or_keep_sequence for tag in tags["X_Z_U_STAR_TAGS"]})
        self._rules = rules
        # Birth date and time are emptied (Z) even when dates are shifted: an age is not longitudinal.
        self._date_tags = [tag for tag in tags["ALL_TAGS"] if len(tag) == 2 and _vr(tag) in ("DA", "DT", "TM")
                           and tag not in BIRTH]

    # -- the implementation's choices ---------------------------------------------------------
    def uid(self, old: str) -> str:
        """``2.25.<128-bit integer>`` (a UUID-derived UID, PS3.5 B.2) hashed from the secret and ``old``."""
        digest = hashlib.sha256(f"{self._secret}\0{old}".encode()).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"

    def day_offset(self, subject: str) -> int | None:
        from deface.bids import day_offset

        return day_offset(self.key, subject) if self.key is not None else None

    def pseudonym(self, subject: str) -> str:
        return "deface-" + hashlib.sha256(f"{self._secret}\0{subject}".encode()).hexdigest()[:12]

    def _replace_uid(self, dataset, tag) -> None:
        element = dataset.get(tag)
        if element is None or element.VR != "UI" or not element.value:
            return
        if element.VM > 1:
            element.value = [self.uid(v) for v in element.value]
        else:
            element.value = self.uid(element.value)

    def _uid_or_keep_sequence(self, dataset, tag) -> None:
        """X/Z/U*: sequences are cleaned item by item (their references stay consistent)."""
        element = dataset.get(tag)
        if element is None:
            return
        if element.VR == "UI":
            self._replace_uid(dataset, tag)
        elif element.VR != "SQ":
            self._sda.empty(dataset, tag)

    def _rules_for(self, days: int | None) -> dict[Any, Any]:
        if days is None:
            return self._rules
        shift = {tag: _shift_action(days) for tag in self._date_tags}
        return {**self._rules, **shift}

    # -- applying it --------------------------------------------------------------------------
    def __call__(self, ds, face_removed: bool = True) -> None:
        """De-identify ``ds`` in place; ``face_removed``: the pixels no longer show a face."""
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        subject = str(getattr(ds, "PatientID", "") or getattr(ds, "PatientName", "") or "unknown")
        days = self.day_offset(subject)
        rules = self._rules_for(days)
        burned_in = getattr(ds, "BurnedInAnnotation", None)
        self._clean(ds, rules)
        if self.key is not None:
            ds.PatientID = self.pseudonym(subject)
            ds.PatientName = self.pseudonym(subject)
        if hasattr(ds, "file_meta"):  # a new file meta header: the old one names the sending station
            from pydicom.dataset import FileMetaDataset

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID"))
            meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", ds.file_meta.get("MediaStorageSOPInstanceUID"))
            meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
            ds.file_meta = meta
        ds.PatientIdentityRemoved = "YES"
        codes = [BASIC_PROFILE] + ([MODIFIED_DATES] if days is not None else [])
        codes += [CLEAN_RECOGNIZABLE] if face_removed else []
        ds.DeidentificationMethod = METHOD
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if face_removed:
            ds.RecognizableVisualFeatures = "NO"
        if burned_in is not None:  # the profile does not clean burned-in text: say what the file said
            ds.BurnedInAnnotation = burned_in
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if days is not None else "REMOVED"
        image_type = list(getattr(ds, "ImageType", []) or [])
        if image_type:
            ds.ImageType = ["DERIVED"] + image_type[1:]
        ds.DerivationDescription = "defaced: face voxels replaced (deface)"

    def _clean(self, ds, rules) -> None:
        for element in list(ds):
            if element.VR == "SQ" and element.value is not None:
                for item in element.value:
                    self._clean(item, rules)
        self._sda.anonymize_dataset(ds, rules, delete_private_tags=True,
                                    base_rules_gen=lambda: dict(self._base))


def _vr(tag) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag[0] << 16 | tag[1])
    except KeyError:
        return ""


def _shift_action(days: int):
    """Move the date of a DA/DT value by ``days`` (as the BIDS mode does); TM kept; an unparsable date removed."""
    from deface.bids import shift_date

    def action(dataset, tag) -> None:
        element = dataset.get(tag)
        if element is None or not element.value or element.VR not in ("DA", "DT"):
            return
        text = str(element.value)
        day = shift_date(text[:8], days)
        if day is None:
            del dataset[element.tag]
            return
        element.value = day + text[8:]

    return action
