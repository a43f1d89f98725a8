"""Read selected header elements of an encoded dataset without decoding the rest.

The receive path must never decode a whole dataset: a 1 GB multi-frame instance is
walked element by element, values of unwanted elements are skipped by their length
(no copy), and the walk stops at the first tag after the last wanted one, which is
always before Pixel Data. The result is a small pydicom :class:`Dataset` holding only
the wanted elements, still raw until a value is read.

This module is pure: it works on any buffer (``bytes`` or an ``mmap`` of a file).
"""

from __future__ import annotations

import mmap
import struct
import zlib
from collections.abc import Iterable
from typing import Final

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

from gateway.dicom.transfer_syntax import DatasetEncoding

PIXEL_DATA: Final = 0x7FE00010
SPECIFIC_CHARACTER_SET: Final = 0x00080005
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
_UNDEFINED: Final = 0xFFFFFFFF
_MAX_DEPTH: Final = 32
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR encodings.
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_DEFLATE_CHUNK: Final = 256 * 1024
_DEFLATE_LIMIT: Final = 64 * 1024 * 1024
# Wanted elements longer than this are not header attributes anyone can use (a 300 MB
# Patient's Name is an attack or a broken writer): they are skipped, not copied.
MAX_VALUE_LENGTH: Final = 1024 * 1024

# Text VRs decoded as ASCII, those decoded with the dataset's character set, and the
# ones that hold a single value even when it contains a backslash.
_ASCII_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_TEXT_VRS: Final = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_SINGLE_VALUED_TEXT_VRS: Final = frozenset({"LT", "ST", "UR", "UT"})
_BINARY_NUMBER_VRS: Final = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
_DELIMITERS: Final = {0x5C}
_PN_DELIMITERS: Final = {0x5C, 0x3D, 0x5E}

Buffer = bytes | bytearray | memoryview | mmap.mmap


class HeaderError(ValueError):
    """The encoded dataset is truncated or malformed where the header was read."""


class _NeedMoreError(HeaderError):
    """The buffer ended before the wanted elements were all read (deflate streaming)."""


def _is_vr(candidate: Buffer) -> bool:
    return len(candidate) == 2 and 65 <= candidate[0] <= 90 and 65 <= candidate[1] <= 90


class _Walker:
    """Element-by-element walk over one encoding, skipping values by length."""

    def __init__(self, buf: Buffer, encoding: DatasetEncoding) -> None:
        self.buf = buf
        self.size = len(buf)
        self.implicit = encoding.implicit
        self.little = encoding.little_endian
        order = "<" if self.little else ">"
        self._short = struct.Struct(order + "HH2sH")  # tag, VR, 2-byte length
        self._long = struct.Struct(order + "HHL")  # tag, 4-byte length (implicit, items)
        self._length = struct.Struct(order + "L")

    def element_header(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """Return (tag, VR or None, value length, offset of the value) at *pos*."""
        try:
            if implicit:
                group, element, length = self._long.unpack_from(self.buf, pos)
                return (group << 16) | element, None, length, pos + 8
            group, element, vr, length = self._short.unpack_from(self.buf, pos)
            if group == 0xFFFE:  # items and delimiters never carry a VR
                (length,) = self._length.unpack_from(self.buf, pos + 4)
                return (group << 16) | element, None, length, pos + 8
            if vr in _LONG_VRS:
                (length,) = self._length.unpack_from(self.buf, pos + 8)
                return (group << 16) | element, vr, length, pos + 12
        except struct.error:
            raise _NeedMoreError(f"dataset ends inside an element header at byte {pos}") from None
        if not _is_vr(vr):
            raise HeaderError(f"invalid VR {vr!r} for tag ({group:04X},{element:04X})")
        return (group << 16) | element, vr, length, pos + 8

    def skip_undefined(self, pos: int, implicit: bool, depth: int) -> tuple[int, int]:
        """Skip a value of undefined length starting at *pos*.

        Returns (end of the content before the sequence delimiter, position after it).
        """
        if depth > _MAX_DEPTH:
            raise HeaderError("sequences nested too deeply")
        while True:
            tag, _, length, value = self.element_header(pos, True)
            if tag == _SEQUENCE_DELIMITER:
                return pos, value
            if tag != _ITEM:
                raise HeaderError(f"expected an item at byte {pos}, found tag {tag:08X}")
            if length == _UNDEFINED:
                pos = self.skip_item_content(value, implicit, depth + 1)
            else:
                pos = value + length
            if pos > self.size:
                raise _NeedMoreError("dataset ends inside a sequence")

    def skip_item_content(self, pos: int, implicit: bool, depth: int) -> int:
        """Skip the elements of an undefined-length item; return the position after it."""
        while True:
            tag, vr, length, value = self.element_header(pos, implicit)
            if tag == _ITEM_DELIMITER:
                return value
            if length == _UNDEFINED:
                # An undefined-length UN holds implicit VR little endian content.
                _, pos = self.skip_undefined(value, implicit or vr == b"UN", depth)
            else:
                pos = value + length
            if pos > self.size:
                raise _NeedMoreError("dataset ends inside an item")


def read_elements(
    buf: Buffer, start: int, encoding: DatasetEncoding, wanted: frozenset[int]
) -> dict[int, RawDataElement]:
    """Read the top-level elements whose tags are in *wanted* from *buf* at *start*.

    The walk stops after the highest wanted tag and never goes past Pixel Data.
    Missing elements are simply absent from the result.
    """
    walker = _Walker(buf, encoding)
    if not walker.implicit and walker.size >= start + 6 and not _is_vr(buf[start + 4 : start + 6]):
        # Some writers put implicit VR data under an explicit transfer syntax; read it
        # the way it is actually encoded (as pydicom and DCMTK do).
        walker.implicit = True
    stop = min(max(wanted, default=0), PIXEL_DATA - 1)
    found: dict[int, RawDataElement] = {}
    pos = start
    while pos < walker.size:
        tag, vr, length, value = walker.element_header(pos, walker.implicit)
        if tag > stop:
            break
        if length == _UNDEFINED:
            content_end, pos = walker.skip_undefined(
                value, walker.implicit or vr == b"UN", depth=0
            )
            length = content_end - value
        else:
            pos = value + length
            content_end = pos
        if content_end > walker.size:
            raise _NeedMoreError(f"dataset ends inside element {tag:08X}")
        if tag in wanted and content_end - value <= MAX_VALUE_LENGTH:
            found[tag] = RawDataElement(
                BaseTag(tag),
                vr.decode("ascii") if vr is not None else None,
                length,
                bytes(buf[value:content_end]),
                value,
                walker.implicit,
                walker.little,
                True,
                False,
            )
    return found


class Header:
    """The wanted header elements of one instance, decoded only when asked for."""

    def __init__(self, elements: dict[int, RawDataElement], encoding: DatasetEncoding) -> None:
        self.elements = elements
        self.encoding = encoding
        self._encodings: list[str] | None = None

    def __contains__(self, tag: int) -> bool:
        return tag in self.elements

    def _character_sets(self) -> list[str]:
        if self._encodings is None:
            raw = self.elements.get(SPECIFIC_CHARACTER_SET)
            terms = _split(raw.value.decode("ascii", "replace")) if raw and raw.value else []
            try:
                self._encodings = convert_encodings(terms or ["ISO_IR 6"])
            except LookupError:
                self._encodings = ["iso8859"]
        return self._encodings

    def vr(self, tag: int) -> str | None:
        """The element's VR (the dictionary VR for implicit or UN-encoded elements)."""
        raw = self.elements.get(tag)
        if raw is None:
            return None
        if raw.VR is None or raw.VR == "UN":
            try:
                return str(dictionary_VR(tag))
            except KeyError:
                return "UN"
        return str(raw.VR)

    def values(self, tag: int) -> tuple[str, ...]:
        """All values of a text, numeric-string or binary-number element, as strings.

        Absent and empty elements give ``()``. Sequences and bulk data are not values.
        """
        raw = self.elements.get(tag)
        if raw is None or not raw.value:
            return ()
        vr = self.vr(tag)
        value: bytes = raw.value
        if vr in _ASCII_VRS:
            text = value.decode("ascii", "replace")
        elif vr in _TEXT_VRS:
            delimiters = _PN_DELIMITERS if vr == "PN" else _DELIMITERS
            text = decode_bytes(value, self._character_sets(), delimiters)
            if vr in _SINGLE_VALUED_TEXT_VRS:
                stripped = text.replace("\x00", "").rstrip(" ")
                return (stripped,) if stripped else ()
        elif vr in _BINARY_NUMBER_VRS:
            return self._binary_numbers(raw, vr)
        else:
            return ()
        parts = _split(text)
        if vr == "PN":
            # Trailing empty component groups ("Name=") carry nothing.
            parts = [part.rstrip("=") for part in parts]
        return tuple(part for part in parts if part)

    def first(self, tag: int) -> str | None:
        """The first value of an element, or ``None`` when absent or empty."""
        found = self.values(tag)
        return found[0] if found else None

    def _binary_numbers(self, raw: RawDataElement, vr: str) -> tuple[str, ...]:
        order = "<" if self.encoding.little_endian else ">"
        code = _BINARY_NUMBER_VRS[vr]
        value = raw.value or b""
        count = len(value) // struct.calcsize(code)
        numbers = struct.unpack_from(f"{order}{count}{code}", value)
        return tuple(str(number) for number in numbers)

    def dataset(self) -> Dataset:
        """A pydicom :class:`Dataset` of the wanted elements (for sequences and the like)."""
        dataset = Dataset({BaseTag(tag): raw for tag, raw in self.elements.items()})
        dataset.set_original_encoding(self.encoding.implicit, self.encoding.little_endian)
        return dataset


def _split(text: str) -> list[str]:
    # NUL is not valid inside a DICOM text value, and PostgreSQL refuses it in text.
    return [part.replace("\x00", "").strip(" ") for part in text.split("\\")]


def read_header(
    buf: Buffer, start: int, encoding: DatasetEncoding, wanted: Iterable[int]
) -> Header:
    """Read the wanted top-level elements of the dataset at *start* of *buf*."""
    wanted_tags = frozenset(wanted) | {SPECIFIC_CHARACTER_SET}
    if encoding is DatasetEncoding.DEFLATED_EXPLICIT_LITTLE:
        elements = _read_deflated(buf, start, wanted_tags)
        encoding = DatasetEncoding.EXPLICIT_LITTLE
    else:
        elements = read_elements(buf, start, encoding, wanted_tags)
    actual = next(iter(elements.values()), None)
    if actual is not None and actual.is_implicit_VR and not encoding.implicit:
        encoding = DatasetEncoding.IMPLICIT_LITTLE
    return Header(elements, encoding)


def _read_deflated(buf: Buffer, start: int, wanted: frozenset[int]) -> dict[int, RawDataElement]:
    """Inflate just enough of a deflated dataset to read the wanted elements.

    Each retry at least doubles what is inflated, so the re-parsing stays linear.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pos = start
    target = _DEFLATE_CHUNK
    while True:
        while len(inflated) < target and pos < len(buf) and not inflater.eof:
            chunk = bytes(buf[pos : pos + _DEFLATE_CHUNK])
            pos += len(chunk)
            try:
                inflated += inflater.decompress(chunk)
            except zlib.error as exc:
                raise HeaderError(f"deflated dataset is corrupt: {exc}") from None
        at_end = pos >= len(buf) or inflater.eof
        try:
            return read_elements(inflated, 0, DatasetEncoding.EXPLICIT_LITTLE, wanted)
        except _NeedMoreError:
            if at_end or len(inflated) > _DEFLATE_LIMIT:
                raise
        target = 2 * max(target, len(inflated))


def read_file_meta(buf: Buffer) -> tuple[FileMetaDataset, int]:
    """Parse the Part 10 preamble and file meta group; return it and the dataset offset."""
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        raise HeaderError("not a DICOM Part 10 file (no DICM prefix)")
    walker = _Walker(buf, DatasetEncoding.EXPLICIT_LITTLE)
    elements: dict[int, RawDataElement] = {}
    pos = 132
    while pos + 8 <= walker.size:
        if struct.unpack_from("<H", buf, pos)[0] != 0x0002:
            break
        tag, vr, length, value = walker.element_header(pos, False)
        if length == _UNDEFINED or value + length > walker.size:
            raise HeaderError(f"file meta element {tag:08X} has an invalid length")
        elements[tag] = RawDataElement(
            BaseTag(tag),
            vr.decode("ascii") if vr is not None else None,
            length,
            bytes(buf[value : value + length]),
            value,
            False,
            True,
            True,
            False,
        )
        pos = value + length
    meta = FileMetaDataset({BaseTag(tag): raw for tag, raw in elements.items()})
    return meta, pos
