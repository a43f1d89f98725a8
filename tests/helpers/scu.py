"""A pynetdicom SCU for cases DCMTK cannot make: exact statuses, raw payloads, pacing."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from tests.helpers.net import LOOPBACK


@dataclass
class SendReport:
    """What the SCU saw: one status per file it got a response for."""

    established: bool = False
    rejected: bool = False
    statuses: list[tuple[str, int]] = field(default_factory=list)
    error_comments: list[str | None] = field(default_factory=list)
    """Error Comment of each response, in the order of ``statuses``."""
    error: str | None = None

    def acknowledged(self) -> list[str]:
        return [uid for uid, status in self.statuses if status == 0x0000]


def _file_info(path: Path) -> tuple[str, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deliberately broken files in failure tests
        ds = dcmread(path, stop_before_pixels=True, force=True)
    meta = ds.file_meta
    return (
        str(meta.MediaStorageSOPClassUID),
        str(meta.TransferSyntaxUID),
        str(meta.MediaStorageSOPInstanceUID),
    )


def send_files(
    port: int,
    paths: Sequence[Path],
    *,
    calling: str = "MODALITY",
    called: str = "GATEWAY",
    pause: float = 0.0,
    on_response: Callable[[int, str, int], None] | None = None,
    timeout: float = 30.0,
) -> SendReport:
    """Send files over one association, streaming them from disk as they are encoded.

    *on_response(index, sop_instance_uid, status)* is called after each response.
    """
    _config.STORE_SEND_CHUNKED_DATASET = True
    infos = [_file_info(path) for path in paths]
    contexts: dict[tuple[str, str], None] = {}
    for sop_class, syntax, _ in infos:
        contexts[(sop_class, syntax)] = None
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
    report = SendReport()
    assoc = ae.associate(LOOPBACK, port, ae_title=called)
    report.established = bool(assoc.is_established)
    report.rejected = bool(assoc.is_rejected)
    if not assoc.is_established:
        return report
    try:
        for index, (path, (_, _, sop_uid)) in enumerate(zip(paths, infos, strict=True)):
            status = assoc.send_c_store(path)
            if not status or "Status" not in status:
                report.error = "no response (association lost)"
                break
            code = int(status.Status)
            report.statuses.append((sop_uid, code))
            comment = status.get("ErrorComment")
            report.error_comments.append(str(comment) if comment else None)
            if on_response:
                on_response(index, sop_uid, code)
            if pause:
                time.sleep(pause)
            if not assoc.is_established:
                report.error = "association ended"
                break
    except Exception as exc:  # the peer vanished mid-association (crash tests)
        report.error = f"{type(exc).__name__}: {exc}"
    finally:
        if assoc.is_established:
            assoc.release()
    return report
