"""Pure decisions, as tables of cases: acceptance, status classes, backoff, negotiation,
when uploads yield to receiving."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import build_context

from gateway.acceptance import (
    AcceptancePolicy,
    AssociationRequest,
    decide,
    too_many_associations,
)
from gateway.backoff import backoff_ceiling, retry_delay
from gateway.config import CallingAEConfig, EventsConfig
from gateway.dicom.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES
from gateway.receiver import negotiable_contexts
from gateway.scu import _read_ahead
from gateway.status import Status, StatusCategory, classify, describe
from gateway.uploader import _parts, upload_hold

POLICY = AcceptancePolicy.build(
    "GATEWAY",
    False,
    [
        CallingAEConfig(ae_title="CT01", hosts=("10.1.2.3", "10.2.0.0/16")),
        CallingAEConfig(ae_title="MR01"),
        CallingAEConfig(ae_title="US01", hosts=("2001:db8::/32",)),
    ],
)


@pytest.mark.parametrize(
    ("calling", "called", "address", "expected"),
    [
        ("CT01", "GATEWAY", "10.1.2.3", None),
        ("CT01", "GATEWAY", "10.2.9.9", None),
        ("CT01", "GATEWAY", "::ffff:10.1.2.3", None),
        ("CT01", "GATEWAY", "10.1.2.4", (1, 1, 3)),
        ("CT01 ", " GATEWAY", "10.1.2.3", None),  # AE titles are space padded on the wire
        ("MR01", "GATEWAY", "192.168.1.1", None),
        ("US01", "GATEWAY", "2001:db8::7", None),
        ("US01", "GATEWAY", "10.1.2.3", (1, 1, 3)),
        ("XA01", "GATEWAY", "10.1.2.3", (1, 1, 3)),
        ("ct01", "GATEWAY", "10.1.2.3", (1, 1, 3)),  # AE titles are case sensitive
        ("CT01", "OTHER", "10.1.2.3", (1, 1, 7)),
        ("XA01", "OTHER", "10.1.2.3", (1, 1, 7)),  # called AE is checked first
        ("CT01", "GATEWAY", "not-an-address", (1, 1, 3)),
        # the node's own AE title is accepted from this host only (bulk import)
        ("GATEWAY", "GATEWAY", "127.0.0.1", None),
        ("GATEWAY", "GATEWAY", "::1", None),
        ("GATEWAY", "GATEWAY", "::ffff:127.0.0.1", None),
        ("GATEWAY", "GATEWAY", "10.1.2.3", (1, 1, 3)),
    ],
)
def test_association_acceptance(
    calling: str, called: str, address: str, expected: tuple[int, int, int] | None
) -> None:
    rejection = decide(AssociationRequest(calling, called, address), POLICY)
    if expected is None:
        assert rejection is None
    else:
        assert rejection is not None
        assert (rejection.result, rejection.source, rejection.diagnostic) == expected
        assert rejection.reason


def test_unknown_calling_ae_accepted_when_allowed_but_host_rules_still_apply() -> None:
    open_policy = AcceptancePolicy(POLICY.ae_title, True, POLICY.calling_aes)
    assert decide(AssociationRequest("ANY", "GATEWAY", "1.1.1.1"), open_policy) is None
    rejection = decide(AssociationRequest("CT01", "GATEWAY", "1.1.1.1"), open_policy)
    assert rejection is not None and rejection.diagnostic == 3


def test_too_many_associations_is_a_transient_presentation_rejection() -> None:
    rejection = too_many_associations(4)
    assert (rejection.result, rejection.source, rejection.diagnostic) == (2, 3, 2)


@pytest.mark.parametrize(
    ("status", "category"),
    [
        (0x0000, StatusCategory.SUCCESS),
        (0xB000, StatusCategory.WARNING),
        (0xB006, StatusCategory.WARNING),
        (0xB007, StatusCategory.WARNING),
        (0x0107, StatusCategory.WARNING),
        (0x0001, StatusCategory.PERMANENT_FAILURE),
        (0xA700, StatusCategory.TRANSIENT_FAILURE),
        (0xA7FF, StatusCategory.TRANSIENT_FAILURE),
        (0x0213, StatusCategory.TRANSIENT_FAILURE),
        (0xA900, StatusCategory.PERMANENT_FAILURE),
        (0xC000, StatusCategory.PERMANENT_FAILURE),
        (0xCFFF, StatusCategory.PERMANENT_FAILURE),
        (0x0122, StatusCategory.PERMANENT_FAILURE),
        (0x0110, StatusCategory.TRANSIENT_FAILURE),
        (0x0111, StatusCategory.WARNING),
        (0xFE00, StatusCategory.TRANSIENT_FAILURE),
        (0xC211, StatusCategory.PERMANENT_FAILURE),
    ],
)
def test_status_classification(status: int, category: StatusCategory) -> None:
    assert classify(status) is category


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (Status.OUT_OF_RESOURCES, "0xA700 (out of resources)"),
        (0xA701, "0xA701 (out of resources)"),
        (0xC123, "0xC123 (cannot understand)"),
        (0xA950, "0xA950 (data set does not match SOP class)"),
        (0x1234, "0x1234 (unknown status)"),
    ],
)
def test_status_descriptions(status: int, text: str) -> None:
    assert describe(status) == text


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.0), (1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (1000, 300.0)],
)
def test_backoff_ceiling_doubles_up_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_ceiling(attempt, 1.0, 300.0) == ceiling


def test_retry_delay_is_jittered_within_half_to_full_ceiling() -> None:
    assert retry_delay(3, 1.0, 300.0, uniform=lambda low, high: low) == 2.0
    assert retry_delay(3, 1.0, 300.0, uniform=lambda low, high: high) == 4.0
    delays = {retry_delay(5, 1.0, 300.0) for _ in range(50)}
    assert all(8.0 <= d <= 16.0 for d in delays) and len(delays) > 1


CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG2000 = "1.2.840.10008.1.2.4.91"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        ([(CT, [JPEG2000, EXPLICIT])], {CT: [JPEG2000, EXPLICIT]}),
        ([(CT, [IMPLICIT, JPEG2000])], {CT: [IMPLICIT, JPEG2000]}),
        ([(CT, [JPEG2000]), (CT, [EXPLICIT])], {CT: [JPEG2000, EXPLICIT]}),
        ([(CT, ["1.2.3.4.5.6"])], {}),  # unknown transfer syntax only
        ([("1.2.3.4.5.6.7", [EXPLICIT])], {}),  # unknown (private) SOP class
        ([("1.2.840.10008.1.1", [IMPLICIT])], {"1.2.840.10008.1.1": [IMPLICIT]}),
    ],
)
def test_negotiation_keeps_the_requestor_order_of_transfer_syntaxes(
    proposed: list[tuple[str, list[str]]], expected: dict[str, list[str]]
) -> None:
    contexts = []
    for index, (abstract, syntaxes) in enumerate(proposed):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * index + 1
        contexts.append(context)
    result = {
        str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
        for cx in negotiable_contexts(contexts)
    }
    assert result == expected


def test_every_storage_sop_class_pynetdicom_knows_is_accepted_with_every_standard_syntax(
) -> None:
    # A modality may propose any storage SOP class (one association carries at most 128
    # contexts, so no network test can show all of them at once).
    contexts = []
    for index, known in enumerate(AllStoragePresentationContexts):
        context = build_context(known.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
        context.context_id = (2 * index + 1) % 256
        contexts.append(context)
    accepted = {
        str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
        for cx in negotiable_contexts(contexts)
    }
    assert len(AllStoragePresentationContexts) > 150
    assert set(accepted) == {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    assert all(syntaxes == list(ACCEPTED_TRANSFER_SYNTAXES) for syntaxes in accepted.values())


def test_a_study_is_stable_after_60_seconds_by_default() -> None:
    assert EventsConfig().stable_seconds == 60


@pytest.mark.parametrize(
    ("now", "last_arrival", "arrivals_since", "yield_seconds", "hold"),
    [
        (100.0, None, None, 30.0, 0.0),  # nothing arrived since the last catch-up
        (100.0, 99.9, 95.0, 30.0, 0.4),  # arriving: wait for a 0.5 s pause
        (100.0, 99.5, 95.0, 30.0, 0.0),  # paused for 0.5 s: upload
        (100.0, 99.0, 95.0, 30.0, 0.0),
        (100.0, 99.9, 70.2, 30.0, 0.2),  # arriving for 29.8 s: 0.2 s more at most
        (100.0, 99.9, 70.0, 30.0, 0.0),  # arriving for 30 s: upload anyway
        (100.0, 99.9, 60.0, 30.0, 0.0),
        (100.0, 99.9, 95.0, 0.0, 0.0),  # not yielding at all
    ],
)
def test_uploads_yield_to_arrivals_until_they_pause_or_for_at_most_the_limit(
    now: float, last_arrival: float | None, arrivals_since: float | None,
    yield_seconds: float, hold: float,
) -> None:
    assert upload_hold(now, last_arrival, arrivals_since, yield_seconds) == pytest.approx(hold)


def _row(size: int, in_index: bool = True) -> SimpleNamespace:
    return SimpleNamespace(size=size, spool_name=None if in_index else "file.dcm")


@pytest.mark.parametrize(("sizes", "limit", "expected"), [
    ([], 100, [[]]),
    ([40, 40, 40], 100, [[40, 40], [40]]),
    ([100, 1, 100], 100, [[100], [1], [100]]),
    ([300], 100, [[300]]),  # one larger than the limit still goes, alone
    ([60, (500, False), 30], 100, [[60, 500, 30]]),  # spool files are not held in memory
])
def test_an_upload_batch_holds_at_most_the_limit_of_bytes_spooled_in_the_index(
    sizes: list[Any], limit: int, expected: list[list[int]]
) -> None:
    rows = [_row(*size) if isinstance(size, tuple) else _row(size) for size in sizes]
    assert [[row.size for row in part] for part in _parts(rows, limit)] == expected


MIB = 1024 * 1024


@pytest.mark.parametrize(("upcoming", "pk", "expected"), [
    ([(1, 10), (2, 10), (3, 10)], 2, [2, 3]),
    ([(1, 10)], 9, [9]),  # not expected: read alone
    ([(n, 10) for n in range(100)], 0, list(range(32))),  # at most 32 ...
    ([(1, 10 * MIB), (2, 10 * MIB), (3, 1)], 1, [1]),  # ... and at most 16 MiB
    ([(1, 20 * MIB), (2, 1)], 1, [1]),  # one larger than that still goes, alone
])
def test_the_forwarder_reads_ahead_a_bounded_number_of_instances(
    upcoming: list[tuple[int, int]], pk: int, expected: list[int]
) -> None:
    assert _read_ahead(upcoming, pk) == expected
