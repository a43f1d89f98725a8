"""What a configuration reload may change while the node runs, and what needs a restart.

Pure: it compares two validated configurations. The node applies the result.

Live (for new work): calling AE titles and ``accept_unknown_calling_ae``, destinations,
routes and their morphing, ``[events]``, event sinks, HL7 destinations and the identity
used in outbound HL7 messages. Everything else (the node's AE title, address and port,
storage, the MLLP listener, the admin server, logging) keeps its running value until
restart, and the reload says which settings are waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from gateway.config import GatewayConfig

LIVE_SECTIONS = frozenset({"calling_ae", "destination", "route", "events", "event_sink",
                           "hl7_destination"})
LIVE_KEYS = {
    "node": frozenset({"accept_unknown_calling_ae"}),
    "hl7": frozenset({"sending_application", "sending_facility", "version"}),
}


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did."""

    applied: bool
    problems: list[str] = field(default_factory=list)
    """Why the new configuration was refused (the running one stays in force)."""
    restart_required: list[str] = field(default_factory=list)
    """Changed settings that wait for a restart."""


@dataclass(frozen=True)
class ReloadPlan:
    effective: GatewayConfig
    """The configuration to run with: the new live settings, the running rest."""
    restart_required: tuple[str, ...]
    """Changed settings that take effect only after a restart, e.g. ``node.port``."""


def plan_reload(running: GatewayConfig, new: GatewayConfig) -> ReloadPlan:
    """Split *new* into what applies now and what waits for a restart."""
    update: dict[str, object] = {}
    waiting: list[str] = []
    for section in GatewayConfig.model_fields:
        if section in LIVE_SECTIONS:
            continue
        old_value, new_value = getattr(running, section), getattr(new, section)
        if old_value == new_value:
            continue
        if not isinstance(old_value, BaseModel):
            update[section] = old_value
            waiting.append(section)
            continue
        live = LIVE_KEYS.get(section, frozenset())
        kept = old_value.model_copy(update={key: getattr(new_value, key) for key in live})
        update[section] = kept
        waiting.extend(
            f"{section}.{key}" for key in type(old_value).model_fields
            if key not in live and getattr(old_value, key) != getattr(new_value, key)
        )
    return ReloadPlan(new.model_copy(update=update), tuple(waiting))
