"""DICOM encoding knowledge the gateway applies itself: header reading, attributes,
transfer syntaxes."""

from __future__ import annotations

from pydicom import config as _pydicom_config


def skip_value_validation_on_read() -> None:
    """Stop pydicom checking every value it reads against its VR (process-wide).

    pynetdicom builds each UID of every DIMSE message through pydicom's ``UID``, which
    matches it against the UI regular expression each time: the request's UIDs when it
    is decoded, and again when they are copied into the response. That was about a
    seventh of the listener's interpreter time per small instance. The check could only
    ever warn (pydicom's default mode); its warnings quote the values (possibly patient
    data) and go to stderr, which the gateway does not want either. What the gateway
    refuses, it checks itself: the header reader and pynetdicom's own length checks on
    UIDs, which stay. Writing (``writing_validation_mode``) is unchanged.
    """
    _pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
