"""Synthetic test data built from pydicom's bundled sample files (never patient data)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.dicom.header import read_file_meta

# Our own test root so generated UIDs are recognisably synthetic.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def sample(name: str) -> Path:
    """Path of one of pydicom's bundled test files."""
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(name)
    return Path(str(path))


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file (everything after the file meta)."""
    data = path.read_bytes()
    _, offset = read_file_meta(data)
    return data[offset:]


def new_uid() -> str:
    return str(generate_uid(prefix=UID_PREFIX))


def make_study(
    directory: Path,
    count: int,
    *,
    template: str = "CT_small.dcm",
    series: int = 1,
    study_uid: str | None = None,
    patient_id: str = "PAT-0001",
    accession_number: str = "ACC0001",
    modality: str | None = None,
) -> list[Path]:
    """Write *count* instances of one study (spread over *series* series) to *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    base = dcmread(sample(template))
    study_uid = study_uid or new_uid()
    series_uids = [new_uid() for _ in range(series)]
    paths = []
    for index in range(count):
        base.StudyInstanceUID = study_uid
        base.SeriesInstanceUID = series_uids[index % series]
        base.SeriesNumber = index % series + 1
        base.SOPInstanceUID = new_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.InstanceNumber = index + 1
        base.PatientID = patient_id
        base.PatientName = "Synthetic^Test"
        base.AccessionNumber = accession_number
        if modality:
            base.Modality = modality
        path = directory / f"{index:05d}.dcm"
        base.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_large_instance(path: Path, size_bytes: int) -> str:
    """Write a multi-frame secondary capture of about *size_bytes*, streaming the pixels.

    Returns its SOP Instance UID. Only the header is built in memory.
    """
    frame = 1024 * 1024  # 1024x1024 8-bit
    frames = max(1, size_bytes // frame)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.SOPInstanceUID = new_uid()
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.PatientID = "PAT-BIG"
    ds.PatientName = "Synthetic^Large"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 1024
    ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    pixel_length = frames * frame
    chunk = os.urandom(frame)
    with path.open("ab") as stream:
        # (7FE0,0010) OB, explicit VR little endian, 4-byte length
        stream.write(b"\xe0\x7f\x10\x00OB\x00\x00" + pixel_length.to_bytes(4, "little"))
        for _ in range(frames):
            stream.write(chunk)
    return str(ds.SOPInstanceUID)


def iter_samples(names: list[str]) -> Iterator[Path]:
    for name in names:
        yield sample(name)


def unique_copy(name: str, directory: Path) -> tuple[Path, str]:
    """A copy of sample *name* with fresh UIDs, its encoding (and pixel data) unchanged.

    Several samples share SOP Instance UIDs or lack study/series UIDs; tests that send
    many of them need each to be its own instance. Returns (path, SOP Instance UID).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(sample(name))
    ds.SOPInstanceUID = new_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or new_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or new_uid()
    path = directory / name
    ds.save_as(path)
    return path, str(ds.SOPInstanceUID)


# A minimal, valid one-page PDF (synthetic; no patient data).
MINIMAL_PDF = (
    b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n"
)


def _write_encapsulated_document(
    path: Path, *, sop_class_uid: str, uids: tuple[str, str, str], document: bytes,
    mime_type: str, title: str, accession_number: str, patient_id: str, description: str,
    extra: dict[str, str] | None = None,
) -> str:
    """An Encapsulated Document instance with fixed UIDs and dates (for golden tests)."""
    study_uid, series_uid, sop_uid = uids
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240315"
    ds.StudyTime = "093000"
    ds.ContentDate = "20240315"
    ds.ContentTime = "101500"
    ds.AccessionNumber = accession_number
    ds.Modality = "DOC"
    ds.ConversionType = "WSD"
    ds.StudyDescription = description
    ds.PatientName = "Synthetic^Report"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19650101"
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.MIMETypeOfEncapsulatedDocument = mime_type
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.EncapsulatedDocument = document + (b"\x00" if len(document) % 2 else b"")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID_PREFIX + "1"
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return sop_uid


def write_encapsulated_pdf(path: Path, *, study_uid: str = UID_PREFIX + "9001",
                           series_uid: str = UID_PREFIX + "9001.1",
                           sop_uid: str = UID_PREFIX + "9001.1.1") -> str:
    """An Encapsulated PDF Storage instance with fixed UIDs (for golden tests)."""
    return _write_encapsulated_document(
        path, sop_class_uid="1.2.840.10008.5.1.4.1.1.104.1",
        uids=(study_uid, series_uid, sop_uid), document=MINIMAL_PDF,
        mime_type="application/pdf", title="CT head report", accession_number="ACC-PDF-1",
        patient_id="PAT-PDF", description="Radiology report",
    )


# A minimal CDA R2 document (synthetic; no patient data).
MINIMAL_CDA = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<ClinicalDocument xmlns="urn:hl7-org:v3">'
    b'<typeId root="2.16.840.1.113883.1.3" extension="POCD_HD000040"/>'
    b'<id root="1.2.826.0.1.3680043.8.498.9002.9"/>'
    b'<code code="18748-4" codeSystem="2.16.840.1.113883.6.1"/>'
    b"<title>MR knee report</title>"
    b'<effectiveTime value="20240315101500"/>'
    b"</ClinicalDocument>\n"
)


def write_encapsulated_cda(path: Path, *, study_uid: str = UID_PREFIX + "9002",
                           series_uid: str = UID_PREFIX + "9002.1",
                           sop_uid: str = UID_PREFIX + "9002.1.1") -> str:
    """An Encapsulated CDA Storage instance with fixed UIDs (for golden tests)."""
    return _write_encapsulated_document(
        path, sop_class_uid="1.2.840.10008.5.1.4.1.1.104.2",
        uids=(study_uid, series_uid, sop_uid), document=MINIMAL_CDA, mime_type="text/xml",
        title="MR knee report", accession_number="ACC-CDA-1", patient_id="PAT-CDA",
        description="Radiology report (CDA)",
        # Type 1 in the Encapsulated CDA IOD: the CDA document's ClinicalDocument/id.
        extra={"HL7InstanceIdentifier": "1.2.826.0.1.3680043.8.498.9002.9"},
    )


def consistent_copy(name: str, directory: Path) -> Path:
    """A copy of sample *name* whose file meta agrees with its dataset (some of pydicom's
    samples disagree, which the gateway rightly refuses); UIDs are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    ds = dcmread(sample(name))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    path = directory / name
    ds.save_as(path)
    return path
