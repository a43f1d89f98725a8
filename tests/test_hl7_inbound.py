"""HL7 v2 in: orders and patient updates over real MLLP sockets, ACKs, bad input."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import text
from structlog.testing import capture_logs

from gateway.hl7 import messages
from gateway.node import Node
from tests.helpers import dcmtk, hl7
from tests.helpers.admin_http import AdminClient, metric
from tests.helpers.data import make_study
from tests.helpers.net import LOOPBACK, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.helpers.peers import status_peer
from tests.test_admin_api import http_section

pytestmark = pytest.mark.integration


@pytest.fixture
def hl7_node(tmp_path: Path, database_url: str) -> Iterator[Node]:
    config = make_config(tmp_path, database_url, hl7={"listen_port": 0, "host": "127.0.0.1",
                                                       "max_message_bytes": 65536,
                                                       "timeout": 5.0},
                         events={"stable_seconds": 0.5, "check_seconds": 0.2},
                         event_sink=[{"name": "local", "type": "file",
                                      "path": str(_events_file(tmp_path))}],
                         http=http_section(tmp_path))
    with running_node(config) as node:
        yield node


def _events_file(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


def _imaging_studies(tmp_path: Path) -> list[dict[str, Any]]:
    path = _events_file(tmp_path)
    events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [event["resource"] for event in events if event["type"] == "ImagingStudy"]


def _mismatches_counted(node: Node) -> float:
    assert node.admin_server is not None
    samples = AdminClient(node.admin_server.port).metrics()
    return metric(samples, "dicom_gateway_order_demographics_mismatches_total")


def _port(node: Node) -> int:
    assert node.hl7_listener is not None
    return node.hl7_listener.port


def _one(node: Node, sql: str, **params: Any) -> Any:
    with node.engine.connect() as connection:
        return connection.execute(text(sql), params).first()


def _msa(ack: str) -> list[str]:
    return hl7.segment(ack, "MSA")


def test_orm_order_is_acknowledged_and_recorded(hl7_node: Node) -> None:
    message = hl7.orm_o01("ACC100", patient_id="PAT9", name="Roe^Richard")
    (ack,) = hl7.send(_port(hl7_node), message)
    msa = _msa(ack)
    assert msa[1] == "AA"
    assert msa[2] == hl7.segment(message, "MSH")[9], "MSA-2 echoes the control id"
    order = _one(hl7_node, "SELECT accession_number, patient_id, patient_name, procedure_code,"
                           " modality, order_control FROM hl7_order")
    assert tuple(order) == ("ACC100", "PAT9", "Roe^Richard", "CTHEAD", "CT", "NW")


def test_omi_order_takes_accession_and_station_from_ipc(hl7_node: Node) -> None:
    (ack,) = hl7.send(_port(hl7_node), hl7.omi_o23("ACC200", station_ae="MR07"))
    assert _msa(ack)[1] == "AA"
    order = _one(hl7_node, "SELECT accession_number, scheduled_station_ae, modality,"
                           " requested_procedure_id FROM hl7_order")
    assert tuple(order) == ("ACC200", "MR07", "MR", "RP1")


def test_order_updates_replace_the_same_order(hl7_node: Node) -> None:
    hl7.send(_port(hl7_node), hl7.orm_o01("ACC300"), hl7.orm_o01("ACC300", control="XO",
                                                                   modality="MR"))
    rows = _one(hl7_node, "SELECT count(*), max(order_control), max(modality) FROM hl7_order")
    assert tuple(rows) == (1, "XO", "MR")


def test_adt_a08_updates_the_patient_of_stored_studies(hl7_node: Node, tmp_path: Path) -> None:
    assert dcmtk.storescu(hl7_node.receiver.port, make_study(tmp_path, 1, patient_id="PAT5")).ok
    (ack,) = hl7.send(_port(hl7_node), hl7.adt_a08("PAT5", "Newname^Nina", "19800101", "F"))
    assert _msa(ack)[1] == "AA"
    patient = _one(hl7_node, "SELECT patient_name, patient_birth_date, patient_sex FROM patient"
                             " WHERE patient_id = 'PAT5'")
    assert tuple(patient) == ("Newname^Nina", "19800101", "F")


def test_adt_a40_merges_the_prior_patient_into_the_surviving_one(
    hl7_node: Node, tmp_path: Path
) -> None:
    assert dcmtk.storescu(hl7_node.receiver.port, make_study(tmp_path / "a", 1,
                                                              patient_id="OLD1")).ok
    assert dcmtk.storescu(hl7_node.receiver.port, make_study(tmp_path / "b", 1,
                                                              patient_id="NEW1")).ok
    (ack,) = hl7.send(_port(hl7_node), hl7.adt_a40("NEW1", "OLD1"))
    assert _msa(ack)[1] == "AA"
    owners = _one(hl7_node, "SELECT count(DISTINCT p.patient_id) FROM study s"
                            " JOIN patient p ON p.id = s.patient_pk")
    assert owners[0] == 1
    merged = _one(hl7_node, "SELECT merged_into_pk IS NOT NULL FROM patient"
                            " WHERE patient_id = 'OLD1'")
    assert merged[0]


@pytest.mark.parametrize(
    ("message", "code", "error_code"),
    [
        (hl7.adt_a01("PAT1"), "AR", "200"),  # unsupported type
        ("MSH|^~\\&|RIS|H|GW|H|20240101||ORM^O01|X1|P|2.5\rORC|NW|PL1", "AE", "100"),  # no PID
        ("MSH|^~\\&|RIS|H|GW|H|20240101||ORM^O01|X2|P|2.5\rPID|1||^^^H\rORC|NW|PL1", "AE",
         "101"),  # empty patient id
        ("MSH|^~\\&|RIS|H|GW|H|20240101||ADT^A08|X3|P|9.9\rPID|1||P1", "AR", "203"),
        ("MSH|~~~~|garbage", "AR", "102"),  # wrong encoding characters
        ("this is not HL7 at all", "AR", "100"),
    ],
    ids=["unsupported", "no-pid", "empty-id", "bad-version", "encoding-chars", "garbage"],
)
def test_messages_that_cannot_be_applied_get_a_clear_nack(
    hl7_node: Node, message: str, code: str, error_code: str
) -> None:
    with capture_logs() as logs:
        (ack,) = hl7.send(_port(hl7_node), message)
    assert _msa(ack)[1] == code
    assert hl7.segment(ack, "ERR")[3].startswith(error_code)
    assert any(e["event"] == "hl7_message" and e["ack"] == code for e in logs)
    assert hl7.send(_port(hl7_node), hl7.orm_o01("ACC-AFTER"))[0].startswith("MSH")
    logged = _one(hl7_node, "SELECT count(*) FROM hl7_message WHERE ack_code = :code", code=code)
    assert logged[0] == 1


@pytest.mark.parametrize(
    "payload",
    [b"GET / HTTP/1.1\r\n\r\n", b"\x0b" + b"M" * 70000, b"\x0bMSH|^~\\&|unterminated"],
    ids=["no-framing", "too-large", "cut-off"],
)
def test_bad_framing_closes_that_connection_and_the_listener_keeps_serving(
    hl7_node: Node, payload: bytes
) -> None:
    with socket.create_connection((LOOPBACK, _port(hl7_node)), timeout=10) as sock:
        sock.sendall(payload)
        if payload.endswith(b"unterminated"):
            sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b"", "the listener closes the connection"
    (ack,) = hl7.send(_port(hl7_node), hl7.orm_o01("ACC-STILL-OK"))
    assert _msa(ack)[1] == "AA"


def test_order_before_images_links_the_study_and_flags_mismatched_demographics(
    hl7_node: Node, tmp_path: Path
) -> None:
    hl7.send(_port(hl7_node), hl7.orm_o01("ACC777", patient_id="PAT7", name="Doe^Jane",
                                          birth_date="19700131", sex="F"))
    files = make_study(tmp_path, 2, patient_id="PAT7", accession_number="ACC777")
    for path in files:  # the modality got the birth date wrong
        ds = dcmread(path)
        ds.PatientName = "Doe^Jane"
        ds.PatientBirthDate = "19700113"
        ds.PatientSex = "F"
        ds.save_as(path)
    assert _mismatches_counted(hl7_node) == 0
    with capture_logs() as logs:
        assert dcmtk.storescu(hl7_node.receiver.port, files).ok
        wait_until(lambda: len(_imaging_studies(tmp_path)) == 1, 15)
    study = _one(hl7_node, "SELECT order_pk, demographics_mismatch FROM study")
    assert study.demographics_mismatch == "PatientBirthDate"
    flagged = [e for e in logs if e["event"] == "order_demographics_mismatch"]
    assert flagged and flagged[0]["attributes"] == ["PatientBirthDate"]
    assert "19700113" not in repr(logs) and "19700131" not in repr(logs)
    wait_until(lambda: _mismatches_counted(hl7_node) == 1, 5)
    (imaging_study,) = _imaging_studies(tmp_path)
    assert imaging_study["basedOn"] == [{"type": "ServiceRequest", "identifier": {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                             "code": "ACSN"}]},
        "value": "ACC777"}}]


def test_a_mismatched_study_is_counted_once_across_its_revisions(
    hl7_node: Node, tmp_path: Path
) -> None:
    hl7.send(_port(hl7_node), hl7.orm_o01("ACC666", patient_id="PAT6", name="Ordered^Name"))
    files = make_study(tmp_path / "s", 2, patient_id="PAT6", accession_number="ACC666")
    assert dcmtk.storescu(hl7_node.receiver.port, files[:1]).ok  # named Synthetic^Test
    wait_until(lambda: len(_imaging_studies(tmp_path)) == 1, 15)
    assert dcmtk.storescu(hl7_node.receiver.port, files[1:]).ok  # a revision, reconciled again
    wait_until(lambda: len(_imaging_studies(tmp_path)) == 2, 15)
    assert _mismatches_counted(hl7_node) == 1


def test_order_after_images_links_the_existing_study(hl7_node: Node, tmp_path: Path) -> None:
    assert dcmtk.storescu(hl7_node.receiver.port,
                          make_study(tmp_path, 1, patient_id="PAT8", accession_number="ACC888")).ok
    hl7.send(_port(hl7_node), hl7.orm_o01("ACC888", patient_id="PAT8", name="Synthetic^Test",
                                          sex="O"))
    study = _one(hl7_node, "SELECT order_pk, demographics_mismatch FROM study")
    assert study.order_pk is not None
    assert study.demographics_mismatch is None


def test_destination_can_coerce_demographics_from_the_order(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "peer") as peer:
        destination = {"name": "pacs", "ae_title": "PEER", "host": "127.0.0.1",
                       "port": peer.port, "coerce_from_order": True,
                       "retry": {"initial_seconds": 0.2, "max_seconds": 1.0}}
        config = make_config(tmp_path, database_url, hl7={"listen_port": 0, "host": "127.0.0.1"},
                             destination=[destination],
                             route=[{"name": "all", "destinations": ["pacs"]}])
        with running_node(config) as node:
            hl7.send(_port(node), hl7.orm_o01("ACC999", patient_id="RIS-ID",
                                              name="Ordered^Name"))
            files = make_study(tmp_path / "s", 1, patient_id="MOD-ID", accession_number="ACC999")
            assert dcmtk.storescu(node.receiver.port, files).ok
            wait_until(lambda: len(peer.files()) == 1, 20)
        (received,) = peer.files().values()
    forwarded = dcmread(received)
    assert forwarded.PatientID == "RIS-ID"
    assert str(forwarded.PatientName) == "Ordered^Name"
    assert forwarded.PatientBirthDate == "19700131"


def test_ack_built_for_unreadable_input_is_itself_valid_hl7() -> None:
    ack = messages.ack(None, "AR", "bad", application="GW", facility="H", error_code="102")
    parsed = messages.parse(ack)
    assert parsed.message_type == "ACK"
    assert messages.ack_code(ack) == "AR"


@pytest.mark.parametrize(
    ("xpn", "dicom"),
    [
        ("Doe^Jane", "Doe^Jane"),
        ("Doe^Jane^Q^Jr^Dr", "Doe^Jane^Q^Dr^Jr"),  # HL7 suffix^prefix, DICOM prefix^suffix
        ("Doe&vd^Jane", "Doe^Jane"),  # subcomponents: the surname itself
        ("O\\S\\Neil^Sean", "O^Neil^Sean"),  # an escaped ^ stays part of the surname
        ("Doe^Jane~Smith^Jane", "Doe^Jane"),  # first repetition
    ],
)
def test_hl7_names_become_dicom_names(xpn: str, dicom: str) -> None:
    assert messages.xpn_to_dicom(xpn) == dicom


@pytest.mark.parametrize(
    ("dicom", "xpn"),
    [
        ("Doe^Jane", "Doe^Jane"),
        ("Doe^Jane^Q^Dr^Jr", "Doe^Jane^Q^Jr^Dr"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou"),  # alphabetic group only
        ("A&B^C|D", "A\\T\\B^C\\F\\D"),  # delimiters escaped
    ],
)
def test_dicom_names_become_escaped_hl7_names(dicom: str, xpn: str) -> None:
    assert messages.dicom_to_xpn(dicom) == xpn


def test_refused_message_ack_still_echoes_its_control_id(hl7_node: Node) -> None:
    message = "MSH|^~\\&|RIS|H|GW|H|20240101||ADT^A08|CTRL-42|T|9.9\rPID|1||P1"
    (ack,) = hl7.send(_port(hl7_node), message)
    assert _msa(ack)[1:3] == ["AR", "CTRL-42"]
    assert hl7.segment(ack, "MSH")[10] == "T", "MSH-11 echoes the processing id"
    assert hl7.segment(ack, "MSH")[4] == "RIS"


def test_encoding_characters_in_the_wrong_order_are_rejected(hl7_node: Node) -> None:
    (ack,) = hl7.send(_port(hl7_node), "MSH|^~&\\|RIS|H|GW|H|20240101||ADT^A08|C1|P|2.5\rPID|1||P1")
    assert _msa(ack)[1] == "AR"


def test_a40_with_a_subcomponent_assigning_authority_merges(
    hl7_node: Node, tmp_path: Path
) -> None:
    assert dcmtk.storescu(hl7_node.receiver.port, make_study(tmp_path, 1, patient_id="OLD9")).ok
    message = hl7.adt_a40("NEW9", "OLD9").replace("OLD9^^^HOSP^MR", "OLD9^^^HOSP&1.2.3&ISO^MR")
    (ack,) = hl7.send(_port(hl7_node), message)
    assert "1 study(ies) moved" in _msa(ack)[3]
