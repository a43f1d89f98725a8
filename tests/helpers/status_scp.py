"""A scriptable Storage SCP peer (pynetdicom, its own process) for forwarding tests.

It answers each C-STORE with the status its control file says, optionally slowly, and
records what it received. The control file is re-read on every request, so a test can
change the peer's behaviour while the gateway is retrying:

    {"statuses": [42752, "abort"], "then": 0, "delay": 0.0, "delays": [5.0]}

``statuses`` are used in order, one per request, then ``then`` for the rest; the word
``"abort"`` aborts the association instead of answering. ``delays`` likewise give the
seconds to wait before answering each request, then ``delay`` for the rest.

Each request is logged with the number of the association it came on (counted from 1
as associations are established), how many associations were open and how many
C-STOREs were being handled (this one included) when it arrived. An association stops
counting as open when its A-RELEASE-RQ or A-ABORT arrives (before the peer answers, so
a sender's next association never overlaps it in the count) or its connection closes.

Run: python -m tests.helpers.status_scp PORT AE_TITLE DIRECTORY [--uncompressed-only]
     [--reject] [--sop-classes UID,UID...]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RQ
from pynetdicom.sop_class import Verification

from gateway.dicom.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
ABORTED = -1  # logged as the status of a request answered with an A-ABORT


class _Associations:
    """Numbers the associations and counts those open and the C-STOREs in progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.numbers: dict[int, int] = {}
        self.open: set[int] = set()
        self.established = 0
        self.in_progress = 0

    def on_established(self, event: Any) -> None:
        with self.lock:
            self.established += 1
            self.numbers[id(event.assoc)] = self.established
            self.open.add(self.established)

    def on_pdu(self, event: Any) -> None:
        if isinstance(event.pdu, (A_RELEASE_RQ, A_ABORT_RQ)):
            self.on_closed(event)

    def on_closed(self, event: Any) -> None:
        with self.lock:
            self.open.discard(self.numbers.get(id(event.assoc), 0))

    def begin(self, event: Any) -> tuple[int, int, int]:
        """(association number, open associations, C-STOREs in progress) for a request."""
        with self.lock:
            self.in_progress += 1
            return self.numbers.get(id(event.assoc), 0), len(self.open), self.in_progress

    def end(self) -> None:
        with self.lock:
            self.in_progress -= 1


def _scripted(settings: dict[str, Any], index: int, key: str, default: str) -> Any:
    values = settings.get(key, [])
    return values[index] if index < len(values) else settings.get(default, 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("ae_title")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--uncompressed-only", action="store_true")
    parser.add_argument("--reject", action="store_true", help="reject every association")
    parser.add_argument("--sop-classes", default="",
                        help="comma-separated storage SOP classes to accept (default: all)")
    args = parser.parse_args()
    _config.LOG_HANDLER_LEVEL = "none"
    directory: Path = args.directory
    directory.mkdir(parents=True, exist_ok=True)
    control = directory / "control.json"
    log = directory / "received.log"
    used = {"count": 0}
    lock = threading.Lock()
    associations = _Associations()

    def on_store(event: Any) -> Dataset | int:
        settings = json.loads(control.read_text()) if control.exists() else {}
        with lock:
            index = used["count"]
            used["count"] += 1
        number, open_count, in_progress = associations.begin(event)
        try:
            status = _scripted(settings, index, "statuses", "then")
            time.sleep(float(_scripted(settings, index, "delays", "delay")))
            uid = str(event.request.AffectedSOPInstanceUID)
            if status == "abort":
                status = ABORTED
                event.assoc.abort()
            elif status in (0x0000, 0xB000, 0xB006, 0xB007):
                (directory / f"{uid}.{index}.dcm").write_bytes(event.encoded_dataset())
            with lock, log.open("a") as out:
                out.write(f"{uid} {status} {event.context.transfer_syntax}"
                          f" {number} {open_count} {in_progress}\n")
            # After an abort nothing may reach the gateway; were a response to slip out,
            # a permanent failure makes the test fail rather than pass by accident.
            return int(status) if status != ABORTED else 0xC000
        finally:
            associations.end()

    ae = AE(ae_title=args.ae_title)
    syntaxes = UNCOMPRESSED if args.uncompressed_only else list(ACCEPTED_TRANSFER_SYNTAXES)
    wanted = set(filter(None, args.sop_classes.split(",")))
    for context in AllStoragePresentationContexts:
        if not wanted or context.abstract_syntax in wanted:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    if args.reject:
        ae.require_calling_aet = ["NOBODY"]
    ae.maximum_pdu_size = 262144
    ae.start_server(
        ("127.0.0.1", args.port), block=True,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_ESTABLISHED, associations.on_established),
            (evt.EVT_PDU_RECV, associations.on_pdu),
            (evt.EVT_ABORTED, associations.on_closed),
            (evt.EVT_CONN_CLOSE, associations.on_closed),
        ],
    )


if __name__ == "__main__":
    main()
