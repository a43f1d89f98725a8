"""The standard transfer syntaxes the node accepts, and how each one encodes a dataset.

The node stores every instance exactly as received, so it accepts every standard
transfer syntax (PS3.6 Table A-1, including the retired JPEG processes that older
modalities still use); it only needs to know the dataset encoding to read headers.
"""

from __future__ import annotations

import enum

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ENCAPSULATED_UNCOMPRESSED = "1.2.840.10008.1.2.1.98"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
JPIP_HTJ2K_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.205"


class DatasetEncoding(enum.Enum):
    """How the data elements of a dataset are laid out on the wire."""

    IMPLICIT_LITTLE = "implicit VR little endian"
    EXPLICIT_LITTLE = "explicit VR little endian"
    EXPLICIT_BIG = "explicit VR big endian"
    DEFLATED_EXPLICIT_LITTLE = "deflated explicit VR little endian"

    @property
    def implicit(self) -> bool:
        return self is DatasetEncoding.IMPLICIT_LITTLE

    @property
    def little_endian(self) -> bool:
        return self is not DatasetEncoding.EXPLICIT_BIG


_UNCOMPRESSED = (
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    ENCAPSULATED_UNCOMPRESSED,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
)
_JPEG = tuple(f"1.2.840.10008.1.2.4.{n}" for n in (*range(50, 67), 70))  # incl. retired
_JPEG_LS_J2K_JPIP = tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(80, 82)) + tuple(
    f"1.2.840.10008.1.2.4.{n}" for n in range(90, 96)
)
_VIDEO = tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(100, 107)) + tuple(
    f"1.2.840.10008.1.2.4.{n}.1" for n in range(100, 107)
) + ("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108")
_JPEG_XL = ("1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111", "1.2.840.10008.1.2.4.112")
_HTJ2K = tuple(f"1.2.840.10008.1.2.4.{n}" for n in range(201, 206))
_OTHER = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 progressive
    "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 interlaced
    "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 audio
    "1.2.840.10008.1.2.8.1",  # Deflated image frame compression
)

# Every standard transfer syntax the node accepts, in its own order of preference
# (used only when a requestor proposes several in one presentation context and
# expresses no preference of its own: compressed-as-sent first, never a conversion).
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    _UNCOMPRESSED + _JPEG + _JPEG_LS_J2K_JPIP + _VIDEO + _JPEG_XL + _HTJ2K + _OTHER
)

UNCOMPRESSED_TRANSFER_SYNTAXES = frozenset(
    {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN,
     DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN}
)


def dataset_encoding(transfer_syntax_uid: str) -> DatasetEncoding:
    """The dataset encoding a transfer syntax implies (all compressed ones are explicit LE)."""
    if transfer_syntax_uid == IMPLICIT_VR_LITTLE_ENDIAN:
        return DatasetEncoding.IMPLICIT_LITTLE
    if transfer_syntax_uid == EXPLICIT_VR_BIG_ENDIAN:
        return DatasetEncoding.EXPLICIT_BIG
    if transfer_syntax_uid in (
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        JPIP_REFERENCED_DEFLATE,
        JPIP_HTJ2K_REFERENCED_DEFLATE,
    ):
        return DatasetEncoding.DEFLATED_EXPLICIT_LITTLE
    return DatasetEncoding.EXPLICIT_LITTLE
