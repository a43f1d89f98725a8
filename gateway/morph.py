"""Tag morphing: changes made to the forwarded copy of an instance.

Pure: a pydicom :class:`Dataset` (the copy being sent) and the morph rules in, the same
dataset changed and a list of what changed out. The stored original is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

if TYPE_CHECKING:
    from gateway.config import MorphConfig

_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_GROUP = re.compile(r"^\(?([0-9A-Fa-f]{4}),?[xX]{4}\)?$")
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
     "UR", "UT"}
)


class MorphError(ValueError):
    """A morph rule names something that cannot be morphed."""


@dataclass(frozen=True, slots=True)
class Selector:
    """One attribute (``tag``) or a whole group (``group``)."""

    text: str
    tag: int | None = None
    group: int | None = None

    def covers(self, tag: int) -> bool:
        if self.tag is not None:
            return tag == self.tag
        return tag >> 16 == self.group


@dataclass(frozen=True, slots=True)
class Change:
    """What a morph did to one attribute (values are shown by ``route-test`` only)."""

    attribute: str
    action: str
    before: str | None
    after: str | None


def parse_tag_selector(text: str) -> Selector:
    """``PatientID``, ``0010,0020``, ``(0010,0020)``, ``00100020`` or a group ``0009,xxxx``."""
    group = _GROUP.match(text)
    if group:
        return Selector(text, group=int(group[1], 16))
    tag = _TAG.match(text)
    if tag:
        return Selector(text, tag=(int(tag[1], 16) << 16) | int(tag[2], 16))
    found = tag_for_keyword(text)
    if found is None:
        raise MorphError(f"{text!r} is not a DICOM keyword, tag (gggg,eeee) or group (gggg,xxxx)")
    return Selector(text, tag=int(found))


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _shown(dataset: Dataset, tag: int) -> str | None:
    element = dataset.get(Tag(tag))
    return None if element is None else str(element.value)


def _text_tag(selector: Selector, action: str) -> int:
    if selector.tag is None:
        raise MorphError(f"{action} needs a single attribute, not the group {selector.text!r}")
    try:
        vr = dictionary_VR(selector.tag)
    except KeyError:
        raise MorphError(f"{action}: {selector.text!r} is not in the DICOM dictionary") from None
    if vr not in _TEXT_VRS:
        raise MorphError(f"{action}: {selector.text!r} is not a text attribute (VR {vr})")
    return selector.tag


def validate_morph(config: MorphConfig) -> None:
    """Raise :class:`MorphError` for rules that could never be applied."""
    for key in config.remove:
        parse_tag_selector(key)
    tables = (("set", config.set), ("prefix", config.prefix), ("suffix", config.suffix))
    for action, table in tables:
        for key in table:
            _text_tag(parse_tag_selector(key), action)


def _remove(dataset: Dataset, selectors: Iterable[Selector], changes: list[Change]) -> None:
    for selector in selectors:
        doomed = [int(element.tag) for element in dataset if selector.covers(int(element.tag))]
        for tag in doomed:
            changes.append(Change(_name(tag), "remove", _shown(dataset, tag), None))
            del dataset[Tag(tag)]


def _affix(
    dataset: Dataset, table: dict[str, str], action: str, changes: list[Change]
) -> None:
    for key, text in table.items():
        tag = _text_tag(parse_tag_selector(key), action)
        element = dataset.get(Tag(tag))
        if element is None or element.value in (None, ""):
            continue
        before = str(element.value)
        values = [str(v) for v in element.value] if element.VM > 1 else [str(element.value)]
        changed = [text + v if action == "prefix" else v + text for v in values]
        element.value = changed if len(changed) > 1 else changed[0]
        changes.append(Change(_name(tag), action, before, str(element.value)))


def apply_morph(dataset: Dataset, config: MorphConfig) -> list[Change]:
    """Apply *config* to *dataset* in place; return what changed, in order."""
    changes: list[Change] = []
    _remove(dataset, [parse_tag_selector(key) for key in config.remove], changes)
    if config.remove_private:
        private = [int(element.tag) for element in dataset if element.tag.is_private]
        for tag in private:
            changes.append(Change(_name(tag), "remove", _shown(dataset, tag), None))
        dataset.remove_private_tags()
    for key, value in config.set.items():
        tag = _text_tag(parse_tag_selector(key), "set")
        before = _shown(dataset, tag)
        values = value.split("\\")
        new_value: str | list[str] = values if len(values) > 1 else value
        if Tag(tag) in dataset:
            dataset[Tag(tag)].value = new_value
        else:
            dataset.add_new(Tag(tag), dictionary_VR(tag), new_value)
        changes.append(Change(_name(tag), "set", before, str(dataset[Tag(tag)].value)))
    _affix(dataset, config.prefix, "prefix", changes)
    _affix(dataset, config.suffix, "suffix", changes)
    return changes

