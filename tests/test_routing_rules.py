"""Routing, morphing and transfer-syntax planning: pure functions, tables of cases."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.config import ConfigError, MorphConfig, RouteConfig, parse_config
from gateway.morph import MorphError, apply_morph, parse_tag_selector
from gateway.routing import compile_rules, decide
from gateway.transfer import (
    EXPLICIT_VR_LITTLE_ENDIAN as EXPLICIT,
)
from gateway.transfer import (
    IMPLICIT_VR_LITTLE_ENDIAN as IMPLICIT,
)
from gateway.transfer import (
    Mode,
    contexts_for,
    plan,
)

ROUTES = [
    {"name": "ct-from-ct01", "destinations": ["main-pacs", "vna"],
     "match": {"calling_ae": "CT01", "Modality": ["CT", "PT"]}},
    {"name": "head", "destinations": ["neuro"], "match": {"StudyDescription": "*HEAD*"}},
    {"name": "regex", "destinations": ["research"],
     "match": {"SeriesDescription": {"regex": "^AX_"}}},
    {"name": "remote-site", "destinations": ["vna"], "match": {"source_address": "10.2.0.0/16"}},
    {"name": "mammo-only", "destinations": ["mammo"], "match": {"Modality": "MG"}, "final": True},
    {"name": "everything-else", "destinations": ["vna"], "match": {}},
    {"name": "no-accession", "destinations": ["fixme"], "match": {"AccessionNumber": ""}},
    {"name": "derived", "destinations": ["derived"], "match": {"ImageType": "DERIVED"}},
    {"name": "station", "destinations": ["station"], "match": {"StationName": "CT?1"}},
    {"name": "second-ae", "destinations": ["second"], "match": {"called_ae": "GW2"}},
]
RULES = compile_rules(RouteConfig.model_validate(route) for route in ROUTES)


def facts(**values: Any) -> dict[str, tuple[str, ...]]:
    base: dict[str, tuple[str, ...]] = {
        "calling_ae": ("XX",), "called_ae": ("GATEWAY",), "source_address": ("192.168.1.5",),
        "AccessionNumber": ("A1",),
    }
    for key, value in values.items():
        base[key] = value if isinstance(value, tuple) else (value,)
    return base


@pytest.mark.parametrize(
    ("instance", "destinations", "routes"),
    [
        (facts(calling_ae="CT01", Modality="CT"), {"main-pacs", "vna"},
         ["ct-from-ct01", "everything-else"]),
        # ? matches exactly one character
        (facts(StationName="CTA1"), {"station", "vna"}, ["everything-else", "station"]),
        (facts(StationName="CTAB1"), {"vna"}, ["everything-else"]),
        # the called AE title the modality used
        (facts(called_ae="GW2"), {"second", "vna"}, ["everything-else", "second-ae"]),
        (facts(calling_ae="CT01", Modality="PT"), {"main-pacs", "vna"},
         ["ct-from-ct01", "everything-else"]),
        (facts(calling_ae="CT02", Modality="CT"), {"vna"}, ["everything-else"]),
        (facts(Modality="MR", StudyDescription="MRI HEAD W/O"), {"neuro", "vna"},
         ["head", "everything-else"]),
        (facts(Modality="MR", StudyDescription="head"), {"vna"}, ["everything-else"]),  # case
        (facts(SeriesDescription="AX_T1"), {"research", "vna"}, ["regex", "everything-else"]),
        (facts(source_address="10.2.3.4"), {"vna"}, ["remote-site", "everything-else"]),
        (facts(source_address="::ffff:10.2.3.4"), {"vna"}, ["remote-site", "everything-else"]),
        (facts(Modality="MG", StudyDescription="HEAD"), {"neuro", "mammo"}, ["head", "mammo-only"]),
        (facts(AccessionNumber=()), {"vna", "fixme"}, ["everything-else", "no-accession"]),
        (facts(ImageType=("ORIGINAL", "PRIMARY")), {"vna"}, ["everything-else"]),
        (facts(ImageType=("DERIVED", "SECONDARY")), {"vna", "derived"},
         ["everything-else", "derived"]),
    ],
)
def test_routing_decisions(
    instance: dict[str, tuple[str, ...]], destinations: set[str], routes: list[str]
) -> None:
    decision = decide(instance, RULES)
    assert set(decision.destinations) == destinations
    assert list(decision.matched_routes) == routes


def test_first_matching_route_is_recorded_for_each_destination() -> None:
    decision = decide(facts(calling_ae="CT01", Modality="CT"), RULES)
    assert decision.destinations["vna"] == "ct-from-ct01"


def test_no_matching_route_is_unrouted_not_dropped() -> None:
    rules = compile_rules([RouteConfig(name="mr", destinations=["pacs"], match={"Modality": "MR"})])
    decision = decide(facts(Modality="CT"), rules)
    assert decision.unrouted
    assert decision.destinations == {}


def _config(routes: str, destinations: str = "") -> str:
    return destinations + routes


DEST = """
[[destination]]
name = "pacs"
ae_title = "PACS"
host = "10.0.0.1"
port = 104
"""


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[route]]\nname = "r"\ndestinations = ["nowhere"]', "unknown destination 'nowhere'"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[route.match]\nModalty = "CT"',
         "'Modalty' is neither a DICOM keyword"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[route.match]\n'
         'StudyDescription = { regex = "(" }', "invalid regex"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[route.match]\n'
         'source_address = "not-a-net"', "is not an address or network"),
        ('[[route]]\nname = "r"\ndestinations = []', "route[0].destinations: List should have"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[[route]]\nname = "r"\n'
         'destinations = ["pacs"]', "route 'r' is listed twice"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[route.morph]\nset = { Nonsense = "x" }',
         "'Nonsense' is not a DICOM keyword"),
        ('[[route]]\nname = "r"\ndestinations = ["pacs"]\n[route.morph]\n'
         'prefix = { Rows = "x" }', "is not a text attribute"),
    ],
)
def test_invalid_routes_are_refused_with_the_reason(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(DEST + toml, environ={})


def _dataset() -> Dataset:
    ds = Dataset()
    ds.PatientID = "12345"
    ds.AccessionNumber = "A77"
    ds.InstitutionName = "Old Hospital"
    ds.PatientComments = "free text"
    ds.OtherPatientIDs = ["X1", "X2"]
    ds.add_new(0x00090010, "LO", "VENDOR")
    ds.add_new(0x00091001, "LO", "private value")
    ds.add_new(0x00111001, "LO", "more private")
    return ds


@pytest.mark.parametrize(
    ("morph", "check"),
    [
        ({"set": {"InstitutionName": "New"}}, lambda ds: ds.InstitutionName == "New"),
        ({"set": {"StationName": "GW"}}, lambda ds: ds.StationName == "GW"),  # added
        ({"set": {"OtherPatientIDs": "A\\B"}}, lambda ds: list(ds.OtherPatientIDs) == ["A", "B"]),
        ({"remove": ["PatientComments"]}, lambda ds: "PatientComments" not in ds),
        ({"remove": ["0009,xxxx"]}, lambda ds: 0x00090010 not in ds and 0x00091001 not in ds
         and 0x00111001 in ds),
        ({"remove": ["(0010,4000)"]}, lambda ds: "PatientComments" not in ds),
        ({"remove_private": True}, lambda ds: 0x00090010 not in ds and 0x00111001 not in ds),
        ({"prefix": {"PatientID": "SITEA-"}}, lambda ds: ds.PatientID == "SITEA-12345"),
        ({"suffix": {"AccessionNumber": "-B"}}, lambda ds: ds.AccessionNumber == "A77-B"),
        ({"prefix": {"OtherPatientIDs": "S-"}},
         lambda ds: list(ds.OtherPatientIDs) == ["S-X1", "S-X2"]),
        ({"prefix": {"StudyDescription": "X"}}, lambda ds: "StudyDescription" not in ds),
    ],
)
def test_morphing_changes_only_the_copy(morph: dict[str, Any], check: Any) -> None:
    original = _dataset()
    copy = _dataset()
    changes = apply_morph(copy, MorphConfig.model_validate(morph))
    assert check(copy)
    assert original == _dataset(), "the input to compare against stays untouched"
    assert all(change.action in ("set", "remove", "prefix", "suffix") for change in changes)


def test_morph_reports_what_changed() -> None:
    ds = _dataset()
    changes = apply_morph(ds, MorphConfig(prefix={"PatientID": "S-"}, remove=["PatientComments"]))
    assert [(c.attribute, c.action, c.before, c.after) for c in changes] == [
        ("PatientComments", "remove", "free text", None),
        ("PatientID", "prefix", "12345", "S-12345"),
    ]


@pytest.mark.parametrize("text", ["NotAKeyword", "00GG,0010", "0010"])
def test_bad_tag_selectors_are_refused(text: str) -> None:
    with pytest.raises(MorphError):
        parse_tag_selector(text)


CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
J2K = "1.2.840.10008.1.2.4.91"
JPEG = "1.2.840.10008.1.2.4.50"
BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.mark.parametrize(
    ("stored", "accepted", "decompress", "mode", "syntax"),
    [
        (J2K, {(CT, J2K)}, True, Mode.AS_STORED, J2K),
        (J2K, {(CT, EXPLICIT)}, True, Mode.CONVERT, EXPLICIT),
        (J2K, {(CT, IMPLICIT)}, True, Mode.CONVERT, IMPLICIT),
        (J2K, {(CT, EXPLICIT), (CT, J2K)}, True, Mode.AS_STORED, J2K),
        (J2K, {(CT, EXPLICIT)}, False, Mode.IMPOSSIBLE, None),
        (J2K, {(CT, JPEG)}, True, Mode.IMPOSSIBLE, None),  # never to another (lossy) syntax
        (BIG, {(CT, EXPLICIT)}, True, Mode.IMPOSSIBLE, None),  # bytes would need swapping
        (BIG, {(CT, BIG)}, False, Mode.AS_STORED, BIG),
        (DEFLATED, {(CT, EXPLICIT)}, False, Mode.CONVERT, EXPLICIT),  # re-encoding only
        (EXPLICIT, {(CT, IMPLICIT)}, False, Mode.CONVERT, IMPLICIT),
        (EXPLICIT, {(MR, EXPLICIT)}, True, Mode.IMPOSSIBLE, None),  # SOP class refused
    ],
)
def test_send_plans(
    stored: str, accepted: set[tuple[str, str]], decompress: bool, mode: Mode, syntax: str | None
) -> None:
    decision = plan(CT, stored, accepted, decompress=decompress)
    assert decision.mode is mode
    assert decision.transfer_syntax == syntax
    if mode is Mode.IMPOSSIBLE:
        assert decision.reason


def test_contexts_propose_the_stored_syntax_alone_plus_an_uncompressed_fallback() -> None:
    contexts = contexts_for([(CT, J2K), (CT, J2K), (MR, EXPLICIT), (CT, JPEG)], decompress=True)
    proposed = [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts]
    assert proposed == [
        (CT, (J2K,)), (CT, (EXPLICIT, IMPLICIT)), (MR, (EXPLICIT,)), (MR, (EXPLICIT, IMPLICIT)),
        (CT, (JPEG,)),
    ]
    without = contexts_for([(CT, J2K)], decompress=False)
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in without] == [(CT, (J2K,))]
