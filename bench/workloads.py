"""The benchmark's workloads: synthetic DICOM files generated once and cached.

Every file is explicit VR little endian with random pixel data (nothing compresses away),
synthetic patient data only (PatientID ``BENCH001``), and valid generated UIDs. A workload
directory is reused while its ``params.json`` marker matches the parameters below; the
marker is written last, so an interrupted generation is redone.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MARKER = "params.json"
GENERATOR_VERSION = 1
_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Workload:
    """What one workload contains; ``studies`` > 1 puts each study in its own directory."""

    name: str
    description: str
    studies: int
    instances_per_study: int
    rows: int
    columns: int
    frames: int
    sop_class_uid: str
    modality: str

    @property
    def instances(self) -> int:
        return self.studies * self.instances_per_study

    @property
    def pixel_bytes(self) -> int:
        return self.rows * self.columns * 2 * self.frames

    @property
    def total_bytes(self) -> int:
        return self.instances * self.pixel_bytes


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload("ct300", "300 CT 512x512 16-bit, one series, one association",
                 1, 300, 512, 512, 1, CT_IMAGE_STORAGE, "CT"),
        Workload("small2000", "2000 MR 64x64 16-bit, one study, one association",
                 1, 2000, 64, 64, 1, MR_IMAGE_STORAGE, "MR"),
        Workload("par8", "8 studies x 250 MR 64x64 16-bit, 8 associations at once",
                 8, 250, 64, 64, 1, MR_IMAGE_STORAGE, "MR"),
        Workload("big1", "one multi-frame CT, 512x512 16-bit x 2000 frames (1000 MiB)",
                 1, 1, 512, 512, 2000, ENHANCED_CT_IMAGE_STORAGE, "CT"),
    )
}


def study_dirs(root: Path, workload: Workload) -> list[Path]:
    """The directories storescu sends: one per study (one storescu process each)."""
    base = root / workload.name
    if workload.studies == 1:
        return [base]
    return [base / f"study{index:02d}" for index in range(workload.studies)]


def ensure(root: Path, workload: Workload, seed: int = 20240601) -> Path:
    """Generate *workload* under *root* unless an identical generation is cached."""
    target = root / workload.name
    params = {**asdict(workload), "generator": GENERATOR_VERSION, "seed": seed}
    marker = target / MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == params:
                return target
        except json.JSONDecodeError:
            pass
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    if workload.frames > 1:
        _write_multiframe(target / "instance.dcm", workload, rng)
    else:
        for index, directory in enumerate(study_dirs(root, workload)):
            directory.mkdir(parents=True, exist_ok=True)
            _write_study(directory, workload, rng, index)
    marker.write_text(json.dumps(params, indent=1))
    return target


def _base_dataset(workload: Workload, study_uid: str, series_uid: str, study_index: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = workload.sop_class_uid
    ds.StudyDate = dt.date(2024, 6, 1).strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"BENCH{study_index:05d}"
    ds.Modality = workload.modality
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"BENCH {workload.name}"
    ds.SeriesDescription = f"BENCH {workload.name} series"
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = str(study_index + 1)
    ds.SeriesNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = workload.rows
    ds.Columns = workload.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if workload.modality == "CT":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    return ds


def _file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _write_study(
    directory: Path, workload: Workload, rng: np.random.Generator, study_index: int
) -> None:
    ds = _base_dataset(workload, generate_uid(), generate_uid(), study_index)
    for number in range(1, workload.instances_per_study + 1):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [0, 0, number]
        ds.PixelData = rng.bytes(workload.pixel_bytes)
        ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
        ds.save_as(directory / f"{number:05d}.dcm", enforce_file_format=True)


def _write_multiframe(path: Path, workload: Workload, rng: np.random.Generator) -> None:
    """Write the header with pydicom, then stream Pixel Data: never 1 GB in memory."""
    ds = _base_dataset(workload, generate_uid(), generate_uid(), 0)
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = workload.frames
    ds.file_meta = _file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    ds.save_as(path, enforce_file_format=True)
    length = workload.pixel_bytes
    with path.open("ab") as stream:
        # (7FE0,0010) OW in explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length
        stream.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        remaining = length
        while remaining:
            chunk = min(_CHUNK, remaining)
            stream.write(rng.bytes(chunk))
            remaining -= chunk
    check = dcmread(path, stop_before_pixels=True)
    with path.open("rb") as stream:
        stream.seek(-(length + 12), 2)
        header = struct.unpack("<HH2sHI", stream.read(12))
    if int(check.NumberOfFrames) != workload.frames or header != (0x7FE0, 0x0010, b"OW", 0, length):
        raise RuntimeError(f"{path}: the generated multi-frame file does not read back")
