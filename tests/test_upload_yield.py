"""Uploads yield to receiving: a burst is received first and uploaded right after it;
arrivals that go on get their uploads anyway, at most upload_yield_seconds behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.helpers.data import make_study
from tests.helpers.nodes import make_config, running_node, wait_uploaded
from tests.helpers.scu import send_files

pytestmark = pytest.mark.integration


def _uploaded(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(
            text("SELECT count(*) FROM instance WHERE state = 'stored'")).scalar_one())


def test_a_burst_is_uploaded_once_it_has_arrived(tmp_path: Path, database_url: str) -> None:
    config = make_config(tmp_path, database_url, storage={"upload_yield_seconds": 60})
    files = make_study(tmp_path / "study", 40)
    with running_node(config) as node:
        seen: list[int] = []
        # An instance every 30 ms for about 1.5 s.
        report = send_files(node.receiver.port, files, pause=0.03,
                            on_response=lambda *_: seen.append(_uploaded(node.engine)))
        assert [status for _, status in report.statuses] == [0] * 40
        assert max(seen) == 0, "no upload while the burst arrives"
        wait_uploaded(node.engine, 40, timeout=15)


def test_arrivals_that_go_on_are_uploaded_at_most_the_limit_behind(
    tmp_path: Path, database_url: str
) -> None:
    config = make_config(tmp_path, database_url, storage={"upload_yield_seconds": 1.0})
    files = make_study(tmp_path / "study", 60)
    with running_node(config) as node:
        seen: list[int] = []
        # An instance every 50 ms for 3 s: arrivals never pause for the 0.5 s that
        # would let uploads start early.
        report = send_files(node.receiver.port, files, pause=0.05,
                            on_response=lambda *_: seen.append(_uploaded(node.engine)))
        assert [status for _, status in report.statuses] == [0] * 60
        assert seen[-1] > 0, "uploads started while instances were still arriving"
        wait_uploaded(node.engine, 60, timeout=15)
