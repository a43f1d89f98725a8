"""Orthanc as a real PACS destination: started per test with its own temporary config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.loopback import loopback_preload
from tests.helpers.net import LOOPBACK, free_port, wait_for_port, wait_until

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@dataclass
class Orthanc:
    ae_title: str
    dicom_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=30) as r:
            return bytes(r.read())

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            uids.add(tags["SOPInstanceUID"])
        return uids

    def files_by_sop_instance_uid(self) -> dict[str, bytes]:
        files = {}
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            files[tags["SOPInstanceUID"]] = self.get_bytes(f"/instances/{orthanc_id}/file")
        return files


@contextmanager
def orthanc(
    directory: Path, *, ae_title: str = "ORTHANC", extra: dict[str, Any] | None = None
) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports, SQLite index, no auth; stopped at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "gateway-test",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "TcpNoDelay": True,
        "Plugins": [],
        "ConcurrentJobs": 2,
        **(extra or {}),
    }
    config_path = directory / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (directory / "orthanc.log").open("wb")
    env = {**os.environ, "TCP_NODELAY": "1", **loopback_preload()}
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    try:
        wait_for_port(http_port, timeout=60)
        wait_for_port(dicom_port, timeout=60)
        server = Orthanc(ae_title, dicom_port, http_port, directory, process)
        wait_until(lambda: _answers(server), 30, message="Orthanc's REST API")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _answers(server: Orthanc) -> bool:
    try:
        server.get("/system")
    except OSError:
        return False
    return True
