"""Configuration reload without a restart: SIGHUP and the API."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from gateway.config import GatewayConfig
from gateway.reload import plan_reload
from tests.helpers import dcmtk
from tests.helpers.admin_http import AdminClient
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import NodeProcess, config_data, running_node, to_toml
from tests.test_admin_api import http_section

BASE: dict[str, Any] = {
    "node": {"ae_title": "GATEWAY", "port": 11112},
    "calling_ae": [{"ae_title": "CT01"}],
    "destination": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.1", "port": 104}],
    "route": [{"name": "all", "destinations": ["pacs"]}],
}


def _config(**changes: Any) -> GatewayConfig:
    data = {**BASE}
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return GatewayConfig.model_validate(data)


@pytest.mark.parametrize(
    ("changes", "restart_required"),
    [
        ({}, ()),
        ({"calling_ae": [{"ae_title": "MR01"}]}, ()),
        ({"node": {"accept_unknown_calling_ae": True}}, ()),
        ({"destination": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.2",
                           "port": 104}]}, ()),
        ({"route": []}, ()),
        ({"events": {"stable_seconds": 5.0}}, ()),
        ({"event_sink": [{"name": "f", "type": "file", "path": "/tmp/e.jsonl"}]}, ()),
        ({"hl7": {"sending_facility": "RAD"}}, ()),
        ({"node": {"port": 104}}, ("node.port",)),
        ({"node": {"ae_title": "OTHER", "accept_unknown_calling_ae": True}},
         ("node.ae_title",)),
        ({"storage": {"spool_dir": "/srv/spool"}}, ("storage.spool_dir",)),
        ({"hl7": {"listen_port": 2575, "sending_facility": "RAD"}}, ("hl7.listen_port",)),
        ({"http": {"port": 8080}}, ("http.port",)),
        ({"logging": {"level": "debug"}}, ("logging.level",)),
    ],
)
def test_reload_plan_applies_live_settings_and_lists_the_rest(
    changes: dict[str, Any], restart_required: tuple[str, ...]
) -> None:
    running, new = _config(), _config(**changes)
    plan = plan_reload(running, new)
    assert plan.restart_required == restart_required
    effective = plan.effective
    # live settings are the new ones
    assert effective.calling_ae == new.calling_ae
    assert effective.destination == new.destination
    assert effective.route == new.route
    assert effective.events == new.events
    assert effective.event_sink == new.event_sink
    assert effective.node.accept_unknown_calling_ae == new.node.accept_unknown_calling_ae
    assert effective.hl7.sending_facility == new.hl7.sending_facility
    # the rest keeps running as it is
    assert effective.node.port == running.node.port
    assert effective.node.ae_title == running.node.ae_title
    assert effective.storage == running.storage
    assert effective.http == running.http
    assert effective.logging == running.logging
    assert effective.hl7.listen_port == running.hl7.listen_port
    # waiting changes are reported again on the next reload
    assert plan_reload(effective, new).restart_required == restart_required


# --- SIGHUP on a running node (a real process, as systemd would signal it) --------------


def _dest(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "ae_title": "PEER", "host": "127.0.0.1", "port": port,
            "timeout": 3.0, "retry": {"initial_seconds": 0.1, "max_seconds": 0.3}}


def _events(node: NodeProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in node.log_events() if event.get("event") == name]


@pytest.mark.integration
def test_sighup_adds_a_destination_and_route_and_refuses_an_invalid_edit(
    tmp_path: Path, database_url: str
) -> None:
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER") as pacs, \
            dcmtk.storescp(tmp_path / "vna", ae_title="PEER") as vna:
        port = free_port()
        data = config_data(tmp_path / "gw", database_url, port=port,
                           destination=[_dest("pacs", pacs.port)],
                           route=[{"name": "all", "destinations": ["pacs"]}])
        path = tmp_path / "gateway.toml"
        path.write_text(to_toml(data))
        node = NodeProcess(path, port, tmp_path / "node.log")
        node.start()
        try:
            assert dcmtk.storescu(port, make_study(tmp_path / "a", 1)).ok
            wait_until(lambda: len(pacs.files()) == 1, 30)

            # add a destination and a route to it, then SIGHUP
            data["destination"].append(_dest("vna", vna.port))
            data["route"].append({"name": "archive", "destinations": ["vna"]})
            path.write_text(to_toml(data))
            node.signal(signal.SIGHUP)
            wait_until(lambda: _events(node, "config_reloaded"), 15, message="reload")
            assert dcmtk.storescu(port, make_study(tmp_path / "b", 2)).ok
            wait_until(lambda: len(vna.files()) == 2, 30, message="delivery to vna")
            wait_until(lambda: len(pacs.files()) == 3, 30)

            # an invalid edit: a route to a destination that does not exist
            data["route"].append({"name": "typo", "destinations": ["nowhere"]})
            path.write_text(to_toml(data))
            node.signal(signal.SIGHUP)
            wait_until(lambda: _events(node, "config_reload_refused"), 15)
            refused = _events(node, "config_reload_refused")[0]
            assert "nowhere" in refused["reason"]
            # the running configuration is still in force: both destinations get the next
            assert dcmtk.storescu(port, make_study(tmp_path / "c", 1)).ok
            wait_until(lambda: len(vna.files()) == 3 and len(pacs.files()) == 4, 30)
            assert node.process is not None and node.process.poll() is None
            assert len(_events(node, "config_reloaded")) == 1
        finally:
            node.stop()


# --- the API call, on an in-process node ------------------------------------------------


@pytest.mark.integration
def test_api_reload_changes_accepted_calling_aes_and_names_settings_needing_restart(
    tmp_path: Path, database_url: str
) -> None:
    data = config_data(tmp_path / "gw", database_url, http=http_section(tmp_path))
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(data))
    config = GatewayConfig.model_validate(data)
    with running_node(config, path) as node:
        assert node.admin_server is not None
        api = AdminClient(node.admin_server.port)
        port = node.receiver.port
        study = make_study(tmp_path / "s", 1)
        assert not dcmtk.storescu(port, study, calling="NEWCT").ok

        data["calling_ae"] = [{"ae_title": "NEWCT"}]
        data["node"]["port"] = free_port()
        path.write_text(to_toml(data))
        assert api.post("/api/reload") == {"reloaded": True,
                                           "restart_required": ["node.port"]}
        assert dcmtk.storescu(port, study, calling="NEWCT").ok  # still on the old port
        assert not dcmtk.storescu(port, study, calling="CT01").ok

        path.write_text("[node\nbroken = ")
        status, body = api.request("POST", "/api/reload")
        assert status == 400
        assert body["reloaded"] is False
        assert body["problems"]
        assert dcmtk.storescu(port, study, calling="NEWCT").ok


@pytest.mark.integration
def test_removing_a_destination_turns_its_waiting_jobs_into_dead_letters(
    tmp_path: Path, down_port: int, database_url: str
) -> None:
    down = down_port
    data = config_data(tmp_path / "gw", database_url, http=http_section(tmp_path),
                       destination=[_dest("old", down)],
                       route=[{"name": "all", "destinations": ["old"]}])
    path = tmp_path / "gateway.toml"
    path.write_text(to_toml(data))
    with running_node(GatewayConfig.model_validate(data), path) as node:
        assert node.admin_server is not None
        api = AdminClient(node.admin_server.port)
        assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2)).ok
        wait_until(lambda: api.get("/api/queues")[0]["pending"]
                   + api.get("/api/queues")[0]["retrying"] == 2, 20)
        data["destination"] = []
        data["route"] = []
        path.write_text(to_toml(data))
        assert api.post("/api/reload")["reloaded"] is True
        letters = api.get("/api/dead-letters")
        assert [letter["destination"] for letter in letters] == ["old", "old"]
        assert all("no longer in the configuration" in letter["reason"] for letter in letters)
        assert api.get("/api/queues") == []


@pytest.mark.integration
def test_reload_changes_morphing_and_event_sinks_for_new_work(
    tmp_path: Path, database_url: str
) -> None:
    events_file = tmp_path / "events.jsonl"
    with dcmtk.storescp(tmp_path / "pacs") as pacs:
        data = config_data(
            tmp_path / "gw", database_url, http=http_section(tmp_path),
            destination=[_dest("pacs", pacs.port) | {"ae_title": pacs.ae_title}],
            route=[{"name": "all", "destinations": ["pacs"]}],
            events={"stable_seconds": 1.0, "check_seconds": 0.2, "timezone": "UTC"},
        )
        data.pop("event_sink", None)
        path = tmp_path / "gateway.toml"
        path.write_text(to_toml(data))
        with running_node(GatewayConfig.model_validate(data), path) as node:
            assert node.admin_server is not None
            api = AdminClient(node.admin_server.port)
            data["destination"][0]["morph"] = {"set": {"InstitutionName": "RELOADED SITE"}}
            data["event_sink"] = [{"name": "added", "type": "file", "path": str(events_file)}]
            path.write_text(to_toml(data))
            assert api.post("/api/reload")["reloaded"] is True

            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 2)).ok
            wait_until(lambda: len(pacs.files()) == 2, 30, message="forwarded copies")
            institutions = {str(dcmread(f).InstitutionName) for f in pacs.files()}
            assert institutions == {"RELOADED SITE"}
            wait_until(lambda: events_file.exists() and events_file.read_text().strip(), 30,
                       message="an event in the sink added by the reload")
            event = json.loads(events_file.read_text().splitlines()[0])
            assert event["resource"]["resourceType"] == "ImagingStudy"
