"""DCMTK storescu as the modality: every transfer syntax is stored exactly as received."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import text

from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.data import dataset_bytes, sample, unique_copy
from tests.helpers.nodes import wait_uploaded

pytestmark = pytest.mark.integration

# (pydicom sample file, its transfer syntax)
CASES = [
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80"),
    ("JPEGLSNearLossless_08.dcm", "1.2.840.10008.1.2.4.81"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]


def _stored(node: Node) -> dict[str, tuple[str, Path]]:
    """SOP Instance UID -> (transfer syntax, path of the stored object)."""
    with node.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT sop_instance_uid, transfer_syntax_uid, object_key FROM instance")
        ).all()
    root = Path(node.config.storage.object_store.removeprefix("file://"))
    return {uid: (ts, root / key) for uid, ts, key in rows}


def test_every_transfer_syntax_is_stored_as_received_byte_for_byte(
    node: Node, tmp_path: Path
) -> None:
    # DCMTK storescp in bit-preserving mode is the oracle for what was on the wire.
    copies = {name: unique_copy(name, tmp_path / "send") for name, _ in CASES}
    with dcmtk.storescp(tmp_path / "oracle") as oracle:
        for name, syntax in CASES:
            option = dcmtk.PROPOSE_OPTION[syntax]
            path, _ = copies[name]
            for port, called in ((node.receiver.port, "GATEWAY"), (oracle.port, oracle.ae_title)):
                result = dcmtk.storescu(port, [path], called=called, options=[option])
                assert result.ok, f"{name} to {called}: {result.output}"
        oracle_files = {p.name.split(".", 1)[1]: p for p in oracle.files()}

    wait_uploaded(node.engine, len(CASES))
    stored = _stored(node)
    problems = []
    for name, syntax in CASES:
        uid = copies[name][1]
        ts, path = stored[uid]
        if ts != syntax:
            problems.append(f"{name}: stored as {ts}, sent as {syntax}")
        if dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID != syntax:
            problems.append(f"{name}: file meta transfer syntax differs")
        if dataset_bytes(path) != dataset_bytes(oracle_files[uid]):
            problems.append(f"{name}: stored dataset differs from what storescp received")
    assert not problems, "\n".join(problems)


def test_stored_object_decodes_to_the_sent_pixels(node: Node) -> None:
    name = "MR_small_RLE.dcm"
    result = dcmtk.storescu(node.receiver.port, [sample(name)], options=["-xr"])
    assert result.ok, result.output
    wait_uploaded(node.engine, 1)
    (_, path), = _stored(node).values()
    original = dcmread(sample(name))
    copy = dcmread(path)
    assert copy.PixelData == original.PixelData
    assert (copy.pixel_array == original.pixel_array).all()


def test_index_row_has_the_searchable_attributes(node: Node) -> None:
    result = dcmtk.storescu(node.receiver.port, [sample("CT_small.dcm")], options=["-xe"])
    assert result.ok, result.output
    wait_uploaded(node.engine, 1)
    with node.engine.connect() as connection:
        row = connection.execute(
            text(
                "SELECT p.patient_id, p.patient_name, st.study_date, st.accession_number,"
                " se.modality, i.sop_class_uid, i.transfer_syntax_uid, i.size, i.sha256,"
                " i.calling_ae, i.received_at, i.object_key"
                " FROM instance i JOIN series se ON se.id = i.series_pk"
                " JOIN study st ON st.id = se.study_pk JOIN patient p ON p.id = st.patient_pk"
            )
        ).one()
    assert row.patient_id == "1CT1"
    assert row.patient_name == "CompressedSamples^CT1"
    assert row.study_date == "20040119"
    assert row.modality == "CT"
    assert row.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert row.size > 39000
    assert len(row.sha256) == 64
    assert row.calling_ae == "STORESCU"
    assert row.received_at is not None
    assert "CompressedSamples" not in row.object_key
    assert "1CT1" not in row.object_key


def test_c_echo_succeeds(node: Node) -> None:
    result = dcmtk.echoscu(node.receiver.port)
    assert result.ok, result.output
