"""Golden tests of the FHIR mapping on real sample objects, through the whole pipeline
(receive, index, stable study, event, file sink), for R4 and R5.

Regenerate after an intended mapping change with GOLDEN_UPDATE=1 and review the diff.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.documentreference import DocumentReference as DocumentReferenceR5
from fhir.resources.imagingstudy import ImagingStudy as ImagingStudyR5
from fhir.resources.R4B.documentreference import DocumentReference as DocumentReferenceR4
from fhir.resources.R4B.imagingstudy import ImagingStudy as ImagingStudyR4

from tests.helpers.data import consistent_copy, write_encapsulated_cda, write_encapsulated_pdf
from tests.helpers.net import wait_until
from tests.helpers.nodes import make_config, running_node, wait_uploaded
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "rtplan.dcm"]
MODELS = {
    ("R4", "ImagingStudy"): ImagingStudyR4, ("R4", "DocumentReference"): DocumentReferenceR4,
    ("R5", "ImagingStudy"): ImagingStudyR5, ("R5", "DocumentReference"): DocumentReferenceR5,
}


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize("version", ["R4", "R5"])
def test_fhir_resources_match_the_golden_files(
    tmp_path: Path, database_url: str, version: str
) -> None:
    pdf, cda = tmp_path / "report.dcm", tmp_path / "report-cda.dcm"
    write_encapsulated_pdf(pdf)
    write_encapsulated_cda(cda)
    files = [consistent_copy(name, tmp_path / "samples") for name in SAMPLES] + [pdf, cda]
    events_file = tmp_path / "events.jsonl"
    config = make_config(
        tmp_path / "gw", database_url,
        events={"stable_seconds": 0.5, "check_seconds": 0.2, "fhir_version": version,
                "timezone": "UTC", "endpoint_url": "https://pacs.example.org/dicomweb",
                "retrieval_url": "https://gateway.example.org/objects",
                "accession_identifier_system": "urn:oid:1.2.3.4.5.6"},
        event_sink=[{"name": "local", "type": "file", "path": str(events_file)}],
    )
    with running_node(config) as node:
        for path in files:  # one association each: pynetdicom sends the files' bytes as is
            report = send_files(node.receiver.port, [path])
            assert report.statuses and report.statuses[0][1] == 0, path
        # an ImagingStudy per file (each its own study) and a DocumentReference each for
        # the SR, the PDF and the CDA
        wait_until(lambda: len(_read_events(events_file)) >= len(files) + 3, 30,
                   message="events for every study and document")
    problems = []
    for event in _read_events(events_file):
        resource = event["resource"]
        MODELS[(version, event["type"])].model_validate(resource)  # validates, or raises
        assert event["fhir_version"] == version and event["version"] == 1
        golden = GOLDEN / f"{event['type']}.{event['resource_key']}.{version}.json"
        if os.environ.get("GOLDEN_UPDATE"):
            golden.parent.mkdir(exist_ok=True)
            golden.write_text(json.dumps(resource, indent=2, sort_keys=True) + "\n")
            continue
        if not golden.exists():
            problems.append(f"no golden file {golden.name}")
        elif json.loads(golden.read_text()) != resource:
            problems.append(f"{golden.name} differs")
    assert not problems, problems
    kinds = sorted(event["type"] for event in _read_events(events_file))
    assert kinds == ["DocumentReference"] * 3 + ["ImagingStudy"] * 6


def test_document_attachment_has_the_size_and_sha1_of_the_stored_object(
    tmp_path: Path, database_url: str
) -> None:
    cda = tmp_path / "report-cda.dcm"
    sop_uid = write_encapsulated_cda(cda)
    events_file = tmp_path / "events.jsonl"
    config = make_config(
        tmp_path / "gw", database_url, events={"stable_seconds": 0.5, "check_seconds": 0.2},
        event_sink=[{"name": "local", "type": "file", "path": str(events_file)}],
    )
    with running_node(config) as node:
        report = send_files(node.receiver.port, [cda])
        assert report.statuses and report.statuses[0][1] == 0
        wait_uploaded(node.engine, 1)
        wait_until(lambda: len(_read_events(events_file)) == 2, 30)
    (document,) = [e for e in _read_events(events_file) if e["type"] == "DocumentReference"]
    attachment = document["resource"]["content"][0]["attachment"]
    (stored,) = (tmp_path / "gw" / "objects").resolve().rglob(f"{sop_uid}/*.dcm")
    content = stored.read_bytes()
    assert attachment["url"] == f"file://{stored}"
    assert attachment["size"] == len(content)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(content).digest()).decode()
