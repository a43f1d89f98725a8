"""DIMSE status codes used by the gateway and their classification.

Every status the gateway sends or interprets goes through this module, so a status is
never a bare integer somewhere else (PS3.4 Annex B.2.3 and PS3.7 Annex C).
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """DIMSE status values the gateway sends or reacts to."""

    SUCCESS = 0x0000
    # Warnings (PS3.4 B.2.3; PS3.7 C.4 for the general ones)
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    ATTRIBUTE_LIST_ERROR = 0x0107
    ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116
    # Failures
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    CANCEL = 0xFE00


class StatusCategory(enum.Enum):
    """What a received status means for the operation that got it."""

    SUCCESS = "success"
    WARNING = "warning"
    # The peer could not take it now (resources, congestion): try again later.
    TRANSIENT_FAILURE = "transient"
    # The peer will never take this object as it is: do not retry.
    PERMANENT_FAILURE = "permanent"


_WARNINGS = frozenset(
    {Status.ATTRIBUTE_LIST_ERROR, Status.ATTRIBUTE_VALUE_OUT_OF_RANGE,
     # The destination already has this instance: for a gateway that re-sends after a
     # crash, that is the outcome it wanted.
     Status.DUPLICATE_SOP_INSTANCE}
)
_TRANSIENT = frozenset(
    {Status.RESOURCE_LIMITATION, Status.CANCEL,
     # A "processing failure" is usually the peer's passing trouble, not the object's.
     Status.PROCESSING_FAILURE}
)


def classify(status: int) -> StatusCategory:
    """Classify a C-STORE response status by what the sender should do next."""
    if status == Status.SUCCESS:
        return StatusCategory.SUCCESS
    if status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return StatusCategory.WARNING
    if status in _TRANSIENT or 0xA700 <= status <= 0xA7FF:
        return StatusCategory.TRANSIENT_FAILURE
    return StatusCategory.PERMANENT_FAILURE


def describe(status: int) -> str:
    """A short human-readable name for a status, for logs and dead-letter reasons."""
    try:
        name = Status(status).name.replace("_", " ").lower()
    except ValueError:
        if 0xA700 <= status <= 0xA7FF:
            name = "out of resources"
        elif 0xA900 <= status <= 0xA9FF:
            name = "data set does not match SOP class"
        elif 0xC000 <= status <= 0xCFFF:
            name = "cannot understand"
        elif 0xB000 <= status <= 0xBFFF:
            name = "warning"
        else:
            name = "unknown status"
    return f"0x{status:04X} ({name})"
