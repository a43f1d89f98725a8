"""Who may open an association, and the A-ASSOCIATE-RJ to send to everyone else.

Pure decisions (PS3.8 Section 9.3.4): no sockets, no pynetdicom objects.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.addresses import Network, in_networks, is_loopback
from gateway.config import CallingAEConfig

# A-ASSOCIATE-RJ fields (PS3.8 Table 9-21)
RESULT_PERMANENT = 0x01
RESULT_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
DIAG_CALLING_AE_NOT_RECOGNIZED = 0x03
DIAG_CALLED_AE_NOT_RECOGNIZED = 0x07
DIAG_LOCAL_LIMIT_EXCEEDED = 0x02
DIAG_TEMPORARY_CONGESTION = 0x01


@dataclass(frozen=True, slots=True)
class AssociationRequest:
    calling_ae: str
    called_ae: str
    peer_address: str


@dataclass(frozen=True, slots=True)
class Rejection:
    """An A-ASSOCIATE-RJ: result, source, diagnostic, and the reason for the log."""

    result: int
    source: int
    diagnostic: int
    reason: str


@dataclass(frozen=True)
class AcceptancePolicy:
    """The node's AE title and the calling AE titles (and hosts) it accepts."""

    ae_title: str
    accept_unknown_calling_ae: bool
    calling_aes: dict[str, tuple[Network, ...] | None]

    @classmethod
    def build(
        cls, ae_title: str, accept_unknown: bool, calling_aes: Iterable[CallingAEConfig]
    ) -> AcceptancePolicy:
        table: dict[str, tuple[Network, ...] | None] = {}
        for entry in calling_aes:
            networks = (
                None
                if entry.hosts is None
                else tuple(ipaddress.ip_network(host, strict=False) for host in entry.hosts)
            )
            table[entry.ae_title] = networks
        return cls(ae_title, accept_unknown, table)


def decide(request: AssociationRequest, policy: AcceptancePolicy) -> Rejection | None:
    """``None`` to accept the association, otherwise the rejection to send."""
    called = request.called_ae.strip()
    calling = request.calling_ae.strip()
    if called != policy.ae_title:
        return Rejection(
            RESULT_PERMANENT,
            SOURCE_SERVICE_USER,
            DIAG_CALLED_AE_NOT_RECOGNIZED,
            f"called AE title {called!r} is not this node's ({policy.ae_title!r})",
        )
    if calling == policy.ae_title and is_loopback(request.peer_address):
        return None  # this host's own tools: ``dicom-gateway import``
    if calling not in policy.calling_aes:
        if policy.accept_unknown_calling_ae:
            return None
        return Rejection(
            RESULT_PERMANENT,
            SOURCE_SERVICE_USER,
            DIAG_CALLING_AE_NOT_RECOGNIZED,
            f"calling AE title {calling!r} is not configured",
        )
    networks = policy.calling_aes[calling]
    if networks is not None and not in_networks(request.peer_address, networks):
        return Rejection(
            RESULT_PERMANENT,
            SOURCE_SERVICE_USER,
            DIAG_CALLING_AE_NOT_RECOGNIZED,
            f"calling AE title {calling!r} is not allowed from {request.peer_address}",
        )
    return None


_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def describe_rejection(result: int, source: int, diagnostic: int) -> str:
    """An A-ASSOCIATE-RJ in words, e.g. ``permanent, calling AE title not recognised``."""
    kind = "permanent" if result == RESULT_PERMANENT else "transient"
    words = _REJECT_REASONS.get((source, diagnostic), f"source {source}, reason {diagnostic}")
    return f"{kind}, {words}"


def spool_full() -> Rejection:
    """The rejection while the spool has less free space than configured."""
    return Rejection(
        RESULT_TRANSIENT,
        SOURCE_SERVICE_PROVIDER_PRESENTATION,
        DIAG_TEMPORARY_CONGESTION,
        "spool disk below its free-space threshold",
    )


def too_many_associations(limit: int) -> Rejection:
    """The rejection for an association beyond ``[node] max_associations``."""
    return Rejection(
        RESULT_TRANSIENT,
        SOURCE_SERVICE_PROVIDER_PRESENTATION,
        DIAG_LOCAL_LIMIT_EXCEEDED,
        f"more than {limit} concurrent associations",
    )
