"""The header reader agrees with pydicom, stops before pixel data and rejects bad input."""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from gateway.dicom.attributes import InvalidInstanceError, extract_attributes
from gateway.dicom.header import HeaderError, read_file_meta, read_header
from gateway.dicom.transfer_syntax import DatasetEncoding, dataset_encoding
from tests.helpers.data import sample

# The tests build deliberately invalid values; pydicom warns about them when writing.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Invalid value for VR:UserWarning",
    "ignore:The value length:UserWarning",
    "ignore:The PN component length:UserWarning",
)

KEYWORDS = [
    "SpecificCharacterSet", "ImageType", "SOPClassUID", "SOPInstanceUID", "StudyDate",
    "StudyTime", "AccessionNumber", "Modality", "StudyDescription", "SeriesDescription",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "NumberOfFrames", "Rows",
    "DocumentTitle", "MIMETypeOfEncapsulatedDocument", "PixelSpacing", "ImagePositionPatient",
]
TAGS = [tag_for_keyword(k) for k in KEYWORDS]
TEST_FILES = sorted(str(p) for p in sample("CT_small.dcm").parent.glob("*.dcm"))
CHARSET_FILES = sorted(
    str(p) for p in (Path(pydicom.__file__).parent / "data" / "charset_files").glob("*.dcm")
)


def _pydicom_values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    value = ds.get(keyword)
    if value is None or value == "":
        return ()
    if isinstance(value, (list, MultiValue)):
        return tuple(str(v).rstrip() for v in value if str(v) != "")
    return (str(value).rstrip(),)


def _read(path: str) -> tuple[object, Dataset] | None:
    data = Path(path).read_bytes()
    try:
        meta, offset = read_file_meta(data)
    except HeaderError:
        return None  # files without Part 10 meta cannot arrive over the network this way
    syntax = str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dcmread(path, stop_before_pixels=True)
    return read_header(data, offset, dataset_encoding(syntax), TAGS), reference


@pytest.mark.parametrize("path", TEST_FILES, ids=os.path.basename)
def test_values_match_pydicom_for_every_bundled_sample(path: str) -> None:
    read = _read(path)
    if read is None:
        pytest.skip("no file meta")
    header, reference = read
    for keyword, tag in zip(KEYWORDS, TAGS, strict=True):
        ours = tuple(v.rstrip() for v in header.values(tag))  # type: ignore[attr-defined]
        assert ours == _pydicom_values(reference, keyword), keyword


@pytest.mark.parametrize("path", CHARSET_FILES, ids=os.path.basename)
def test_person_names_decode_with_the_specific_character_set(path: str) -> None:
    read = _read(path)
    assert read is not None
    header, reference = read
    name = tag_for_keyword("PatientName")
    expected = str(reference.get("PatientName", ""))
    assert "\\".join(header.values(name)) == expected  # type: ignore[attr-defined]


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _minimal() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.PatientID = "P1"
    ds.Modality = "OT"
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_reading_stops_before_pixel_data_that_is_not_even_there(syntax: str) -> None:
    data = _part10(_minimal(), syntax)
    # A Pixel Data header claiming 1 GiB, followed by only 16 bytes: a truncated
    # transfer would look like this, and the header must still be readable without it.
    if syntax == ExplicitVRLittleEndian:
        pixel_header = b"\xe0\x7f\x10\x00OW\x00\x00" + (1 << 30).to_bytes(4, "little")
    else:
        pixel_header = b"\xe0\x7f\x10\x00" + (1 << 30).to_bytes(4, "little")
    data += pixel_header + b"\x00" * 16
    _, offset = read_file_meta(data)
    header = read_header(data, offset, dataset_encoding(syntax), TAGS)
    assert header.first(tag_for_keyword("PatientID")) == "P1"


def test_undefined_length_sequences_before_wanted_elements_are_skipped() -> None:
    ds = _minimal()
    item = Dataset()
    item.CodeValue = "121"
    item.CodingSchemeDesignator = "DCM"
    nested = Dataset()
    nested.CodeMeaning = "deep"
    item.ConceptNameCodeSequence = Sequence([nested])
    ds.ProcedureCodeSequence = Sequence([item, item])  # (0008,1032), before PatientID
    ds.ProcedureCodeSequence.is_undefined_length = True
    ds.ProcedureCodeSequence[0].is_undefined_length_sequence_item = True
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = _part10(ds, syntax)
        _, offset = read_file_meta(data)
        wanted = [*TAGS, tag_for_keyword("ProcedureCodeSequence")]
        header = read_header(data, offset, dataset_encoding(syntax), wanted)
        assert header.first(tag_for_keyword("PatientID")) == "P1"
        sequence = header.dataset().ProcedureCodeSequence
        assert [entry.CodeValue for entry in sequence] == ["121", "121"]


@pytest.mark.parametrize("cut", [10, 40, 75])
def test_truncated_header_is_an_error(cut: int) -> None:
    data = _part10(_minimal())
    _, offset = read_file_meta(data)
    with pytest.raises(HeaderError):
        read_header(data[: offset + cut], offset, DatasetEncoding.EXPLICIT_LITTLE, TAGS)


@pytest.mark.parametrize(
    "garbage",
    [b"\x08\x00\x16\x00\x01\x02" + bytes(range(200)), bytes(range(255, 0, -1)) * 4],
    ids=["plausible-tag", "noise"],
)
def test_garbage_dataset_is_refused(garbage: bytes) -> None:
    data = _part10(_minimal())
    _, offset = read_file_meta(data)
    with pytest.raises((HeaderError, InvalidInstanceError)):
        header = read_header(data[:offset] + garbage, offset, DatasetEncoding.EXPLICIT_LITTLE,
                             TAGS)
        extract_attributes(header)


def test_file_without_dicm_prefix_is_an_error() -> None:
    with pytest.raises(HeaderError, match="DICM"):
        read_file_meta(b"\x00" * 200)


def test_deflated_dataset_is_inflated_only_as_far_as_needed() -> None:
    data = sample("image_dfl.dcm").read_bytes()
    meta, offset = read_file_meta(data)
    header = read_header(data, offset, dataset_encoding(str(meta.TransferSyntaxUID)), TAGS)
    reference = dcmread(sample("image_dfl.dcm"))
    assert header.first(tag_for_keyword("SOPInstanceUID")) == reference.SOPInstanceUID
    assert header.values(tag_for_keyword("Rows")) == (str(reference.Rows),)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), "StudyInstanceUID is missing"),
        (lambda ds: delattr(ds, "SOPInstanceUID"), "SOPInstanceUID is missing"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "../../etc"), "not a valid UID"),
        (lambda ds: setattr(ds, "SOPInstanceUID", "1." + "2" * 70), "not a valid UID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "a/b"), "not a valid UID"),
    ],
)
def test_instances_that_cannot_be_indexed_are_refused(change, message: str) -> None:  # type: ignore[no-untyped-def]
    ds = _minimal()
    data = _part10(ds)
    change(ds)
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    raw = buffer.getvalue()
    _, offset = read_file_meta(data)
    body = raw[raw.find(b"\x08\x00\x16\x00"):] if b"\x08\x00\x16\x00" in raw else raw
    header = read_header(data[:offset] + body, offset, DatasetEncoding.EXPLICIT_LITTLE, TAGS)
    with pytest.raises(InvalidInstanceError, match=message):
        extract_attributes(header)


def test_attributes_tolerate_out_of_range_numbers() -> None:
    ds = _minimal()
    ds.SeriesNumber = "99999999999"
    ds.InstanceNumber = "12"
    data = _part10(ds)
    _, offset = read_file_meta(data)
    attributes = extract_attributes(
        read_header(data, offset, DatasetEncoding.EXPLICIT_LITTLE, [*TAGS, 0x00200011])
    )
    assert attributes.series_number is None
    assert attributes.instance_number == 12


def test_absurdly_long_wanted_values_are_skipped_not_copied() -> None:
    ds = _minimal()
    ds.PatientName = "A" * (2 * 1024 * 1024)
    data = _part10(ds, ImplicitVRLittleEndian)
    _, offset = read_file_meta(data)
    header = read_header(data, offset, DatasetEncoding.IMPLICIT_LITTLE, TAGS)
    assert header.values(tag_for_keyword("PatientName")) == ()
    assert header.first(tag_for_keyword("PatientID")) == "P1"


def test_large_deflated_dataset_is_read_in_linear_time() -> None:
    ds = _minimal()
    ds.add_new(0x00091010, "LO", "x")
    ds.add_new(0x00091011, "OB", bytes(32 * 1024 * 1024))  # before PatientID, compresses well
    data = _part10(ds, "1.2.840.10008.1.2.1.99")
    _, offset = read_file_meta(data)
    started = time.perf_counter()
    header = read_header(data, offset, DatasetEncoding.DEFLATED_EXPLICIT_LITTLE, TAGS)
    assert header.first(tag_for_keyword("PatientID")) == "P1"
    assert time.perf_counter() - started < 5, "re-parsing must not be quadratic"


def test_nul_bytes_inside_text_values_are_dropped() -> None:
    ds = _minimal()
    ds.PatientName = "DOE\x00JANE"
    data = _part10(ds)
    _, offset = read_file_meta(data)
    header = read_header(data, offset, DatasetEncoding.EXPLICIT_LITTLE, TAGS)
    assert header.values(tag_for_keyword("PatientName")) == ("DOEJANE",)
