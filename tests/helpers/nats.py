"""NATS JetStream in tests: the machine's server on 127.0.0.1:4222, or one started by
the test (for outages), and a consumer that reads what a stream holds."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats

from tests.helpers.net import LOOPBACK, free_port, wait_for_port

SYSTEM_NATS = "nats://127.0.0.1:4222"


def read_stream(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    """Every message in *stream*, as (headers, JSON body)."""

    async def fetch() -> list[dict[str, Any]]:
        client = await nats.connect(url, connect_timeout=5)
        try:
            jetstream = client.jetstream()
            info = await jetstream.stream_info(stream)
            count = info.state.messages
            if not count:
                return []
            subscription = await jetstream.pull_subscribe(subject, stream=stream)
            messages = await subscription.fetch(count, timeout=5)
            for message in messages:
                await message.ack()
            return [{"headers": m.headers or {}, "body": json.loads(m.data)} for m in messages]
        finally:
            await client.close()

    return asyncio.run(fetch())


def delete_stream(url: str, stream: str) -> None:
    async def delete() -> None:
        client = await nats.connect(url, connect_timeout=5)
        try:
            await client.jetstream().delete_stream(stream)
        except Exception:
            pass
        finally:
            await client.close()

    asyncio.run(delete())


@dataclass
class NatsServer:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.process = subprocess.Popen(
            [binary, "-a", LOOPBACK, "-p", str(self.port), "-js", "-sd", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@contextmanager
def nats_server(directory: Path) -> Iterator[NatsServer]:
    server = NatsServer(free_port(), directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
