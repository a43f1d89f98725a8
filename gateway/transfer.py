"""Presentation contexts to propose to a destination, and how to send each instance.

Pure decisions: the stored transfer syntax is proposed first; when the destination
accepts none of an instance's stored syntax, it may be decompressed to an uncompressed
syntax it does accept (never to a lossy one), or it cannot be sent and says why.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.uid import UID

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
# Syntaxes that convert to UNCOMPRESSED by re-encoding alone (pixels untouched).
# Explicit VR big endian is not one: its pixel and other binary values would need their
# bytes swapped, which re-encoding does not do; it goes only where it is accepted as is.
REENCODABLE = frozenset({*UNCOMPRESSED, "1.2.840.10008.1.2.1.99"})  # deflated
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1-255


def convertible(stored: str, *, decompress: bool) -> bool:
    """Whether an instance stored as *stored* may be sent as an uncompressed syntax."""
    if stored in REENCODABLE:
        return True
    return decompress and UID(stored).is_compressed


def syntax_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


@dataclass(frozen=True, slots=True)
class ProposedContext:
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


def contexts_for(items: Iterable[tuple[str, str]], *, decompress: bool) -> list[ProposedContext]:
    """Contexts for (SOP class, stored transfer syntax) pairs: each stored syntax in its
    own context (so the destination answers for it alone), plus one uncompressed context
    per SOP class as the fallback when conversion is allowed."""
    contexts: list[ProposedContext] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for sop_class, syntax in items:
        candidates: list[tuple[str, tuple[str, ...]]] = [(sop_class, (syntax,))]
        if convertible(syntax, decompress=decompress):
            candidates.append((sop_class, UNCOMPRESSED))
        for key in candidates:
            if key not in seen:
                seen.add(key)
                contexts.append(ProposedContext(key[0], key[1]))
    return contexts


def fits(items: Iterable[tuple[str, str]], *, decompress: bool) -> bool:
    return len(contexts_for(items, decompress=decompress)) <= MAX_CONTEXTS


def _why_not_converted(stored: str) -> str:
    if UID(stored).is_compressed:
        return "decompression is disabled for it"
    return "the gateway does not convert its byte order"


class Mode(enum.Enum):
    AS_STORED = "as stored"
    CONVERT = "convert"
    IMPOSSIBLE = "impossible"


@dataclass(frozen=True, slots=True)
class SendPlan:
    mode: Mode
    transfer_syntax: str | None = None
    reason: str = ""


def plan(
    sop_class: str, stored: str, accepted: set[tuple[str, str]], *, decompress: bool
) -> SendPlan:
    """How to send one instance over an association with these accepted contexts."""
    if (sop_class, stored) in accepted:
        return SendPlan(Mode.AS_STORED, stored)
    offered = sorted(ts for sop, ts in accepted if sop == sop_class)
    if not offered:
        reason = (
            f"destination accepted no presentation context for {syntax_name(sop_class)} "
            f"(proposed as {syntax_name(stored)}"
        )
        if convertible(stored, decompress=decompress):
            reason += " and uncompressed)"
        else:
            reason += f"; {_why_not_converted(stored)})"
        return SendPlan(Mode.IMPOSSIBLE, reason=reason)
    uncompressed = [ts for ts in UNCOMPRESSED if ts in offered]
    if uncompressed and convertible(stored, decompress=decompress):
        return SendPlan(Mode.CONVERT, uncompressed[0])
    names = ", ".join(syntax_name(ts) for ts in offered)
    why = _why_not_converted(stored) if uncompressed else "no conversion is possible"
    return SendPlan(
        Mode.IMPOSSIBLE,
        reason=(
            f"destination accepts {syntax_name(sop_class)} only as {names}; the instance is "
            f"stored as {syntax_name(stored)} and {why}"
        ),
    )
