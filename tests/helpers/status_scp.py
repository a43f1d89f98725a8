"""A scriptable Storage SCP peer (pynetdicom, its own process) for forwarding tests.

It answers each C-STORE with the status its control file says, optionally slowly, and
records what it received. The control file is re-read on every request, so a test can
change the peer's behaviour while the gateway is retrying:

    {"statuses": [42752, 42752], "then": 0, "delay": 0.0}

``statuses`` are used in order, one per request, then ``then`` for the rest.

Run: python -m tests.helpers.status_scp PORT AE_TITLE DIRECTORY [--uncompressed-only]
     [--reject]
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
from pynetdicom.sop_class import Verification

from gateway.dicom.transfer_syntax import ACCEPTED_TRANSFER_SYNTAXES

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("ae_title")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--uncompressed-only", action="store_true")
    parser.add_argument("--reject", action="store_true", help="reject every association")
    args = parser.parse_args()
    _config.LOG_HANDLER_LEVEL = "none"
    directory: Path = args.directory
    directory.mkdir(parents=True, exist_ok=True)
    control = directory / "control.json"
    log = directory / "received.log"
    used = {"count": 0}
    lock = threading.Lock()

    def on_store(event: Any) -> Dataset | int:
        settings = json.loads(control.read_text()) if control.exists() else {}
        with lock:
            index = used["count"]
            used["count"] += 1
        statuses = settings.get("statuses", [])
        status = statuses[index] if index < len(statuses) else settings.get("then", 0)
        time.sleep(float(settings.get("delay", 0.0)))
        uid = str(event.request.AffectedSOPInstanceUID)
        if status in (0x0000, 0xB000, 0xB006, 0xB007):
            (directory / f"{uid}.{index}.dcm").write_bytes(event.encoded_dataset())
        with lock, log.open("a") as out:
            out.write(f"{uid} {status} {event.context.transfer_syntax}\n")
        return int(status)

    ae = AE(ae_title=args.ae_title)
    syntaxes = UNCOMPRESSED if args.uncompressed_only else list(ACCEPTED_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    if args.reject:
        ae.require_calling_aet = ["NOBODY"]
    ae.maximum_pdu_size = 262144
    ae.start_server(
        ("127.0.0.1", args.port), block=True,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )


if __name__ == "__main__":
    main()
