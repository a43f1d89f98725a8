"""Order reconciliation: do the images and the order describe the same patient?

Pure: two sets of demographics in, the names of the attributes that disagree out
(never the values, which are PHI and may end up in logs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Demographics:
    patient_id: str | None
    name: str | None
    birth_date: str | None
    sex: str | None


def _name_key(name: str) -> tuple[str, str]:
    """Family and given name, case and spacing insensitive (prefixes/suffixes ignored)."""
    parts = [part.strip().upper() for part in name.split("=", 1)[0].split("^")]
    family = parts[0] if parts else ""
    given = parts[1] if len(parts) > 1 else ""
    return " ".join(family.split()), " ".join(given.split())


def mismatches(images: Demographics, order: Demographics) -> list[str]:
    """Attributes present on both sides that differ, in a stable order."""
    different = []
    if images.patient_id and order.patient_id and images.patient_id != order.patient_id:
        different.append("PatientID")
    if images.name and order.name and _name_key(images.name) != _name_key(order.name):
        different.append("PatientName")
    if images.birth_date and order.birth_date and images.birth_date[:8] != order.birth_date[:8]:
        different.append("PatientBirthDate")
    if images.sex and order.sex and images.sex.upper()[:1] != order.sex.upper()[:1]:
        different.append("PatientSex")
    return different
