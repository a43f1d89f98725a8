"""The admin HTTP server: access control, health and readiness, and the JSON API."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from gateway.http.openapi import OPENAPI
from gateway.node import Node
from tests.helpers import dcmtk
from tests.helpers.admin_http import TOKEN, AdminClient
from tests.helpers.data import make_study
from tests.helpers.net import free_port, wait_until
from tests.helpers.nodes import make_config, running_node
from tests.helpers.peers import status_peer
from tests.helpers.s3 import ACCESS_KEY, SECRET_KEY, seaweed

pytestmark = pytest.mark.integration


def http_section(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n")
    return {"port": 0, "token_file": str(token_file), **extra}


def _dest(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": "PEER", "host": "127.0.0.1", "port": port,
            "timeout": 3.0,
            "retry": {"initial_seconds": 0.1, "max_seconds": 0.3, "max_attempts": 100},
            **extra}


def client(node: Node) -> AdminClient:
    assert node.admin_server is not None
    return AdminClient(node.admin_server.port)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'index.db'}"


# --- access control ----------------------------------------------------------------------


def test_api_refuses_a_missing_or_wrong_token_and_accepts_the_right_one(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = make_config(tmp_path, sqlite_url, http=http_section(tmp_path))
    with running_node(config) as node:
        api = client(node)
        for path in ("/api/status", "/api/studies", "/metrics", "/api/queues"):
            assert api.request("GET", path, token=False)[0] == 401, path
            assert api.request("GET", path, token="wrong-token")[0] == 401, path
            assert api.request("GET", path, token=TOKEN + "x")[0] == 401, path
            assert api.request("GET", path)[0] == 200, path
        # a token that is a prefix of the right one is no better than a wrong one
        assert api.request("GET", "/api/status", token=TOKEN[:-1])[0] == 401
        status, body = api.request("POST", "/api/dead-letters/requeue", {"ids": [1]},
                                   token=False)
        assert (status, body) == (401, {"error": "a valid bearer token is required"})
        # open by default: health, readiness, the API description and the (data-free) page
        for path in ("/healthz", "/readyz", "/api/openapi.json", "/"):
            assert api.request("GET", path, token=False)[0] == 200, path


def test_token_can_come_from_the_environment(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_GATEWAY_API_TOKEN", "from-the-environment")
    config = make_config(tmp_path, sqlite_url, http={"port": 0})
    with running_node(config) as node:
        api = client(node)
        assert api.request("GET", "/api/status", token="from-the-environment")[0] == 200
        assert api.request("GET", "/api/status")[0] == 401


def test_without_a_token_the_api_is_closed_but_health_answers(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOM_GATEWAY_API_TOKEN", raising=False)
    config = make_config(tmp_path, sqlite_url, http={"port": 0})
    with running_node(config) as node:
        api = client(node)
        status, body = api.request("GET", "/api/status")
        assert status == 503
        assert "DICOM_GATEWAY_API_TOKEN" in body["error"]
        assert api.request("GET", "/healthz", token=False)[0] == 200


def test_which_endpoints_are_public_is_configurable(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url,
                         http=http_section(tmp_path, public=["metrics"]))
    with running_node(config) as node:
        api = client(node)
        assert api.request("GET", "/metrics", token=False)[0] == 200
        assert api.request("GET", "/healthz", token=False)[0] == 401
        assert api.request("GET", "/readyz", token=False)[0] == 401
        assert api.request("GET", "/", token=False)[0] == 401
        assert api.request("GET", "/healthz")[0] == 200


def test_no_admin_server_unless_configured(tmp_path: Path, sqlite_url: str) -> None:
    with running_node(make_config(tmp_path, sqlite_url)) as node:
        assert node.admin_server is None


def test_bad_requests_get_clear_answers(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url, http=http_section(tmp_path))
    with running_node(config) as node:
        api = client(node)
        cases = [
            ("GET", "/api/nothing-here", None, None, 404, "not found"),
            ("POST", "/api/status", {}, None, 405, "method not allowed"),
            ("GET", "/api/associations?limit=many", None, None, 400, "limit must be"),
            ("GET", "/api/associations?since=yesterday", None, None, 400, "since must be"),
            ("POST", "/api/dead-letters/requeue", {}, None, 400, "give ids"),
            ("POST", "/api/dead-letters/requeue", {"ids": ["1"]}, None, 400, "ids must be"),
            ("POST", "/api/jobs/cancel", None, b"not json", 400, "not JSON"),
            ("POST", "/api/destinations/nowhere/pause", {}, None, 404, "no destination"),
        ]
        for method, path, body, raw, expected, words in cases:
            status, payload = api.request(method, path, body, raw=raw)
            assert status == expected, (path, payload)
            assert words in payload["error"], (path, payload)


def test_openapi_describes_every_route_and_nothing_else(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url, http=http_section(tmp_path))
    with running_node(config) as node:
        assert node.admin_server is not None
        routed = {
            (method.lower(), regex.pattern.strip("^$").replace("(?P<name>[^/]+)", "{name}"))
            for method, regex, _, _ in node.admin_server.router.routes
            if not regex.pattern.startswith(("^/static", "^/$", "^/favicon"))
        }
        served = client(node).get("/api/openapi.json")
    described = {(method, path) for path, item in OPENAPI["paths"].items() for method in item}
    assert routed == described
    assert served["openapi"].startswith("3.")


# --- readiness ---------------------------------------------------------------------------


def test_readyz_turns_503_while_the_database_is_down(
    tmp_path: Path, proxied_postgres: tuple[str, Any]
) -> None:
    url, proxy = proxied_postgres
    config = make_config(tmp_path, url, http=http_section(tmp_path),
                         storage={"database_timeout": 2.0})
    with running_node(config) as node:
        api = client(node)
        assert api.request("GET", "/readyz", token=False) == (200, {"status": "ready"})
        proxy.stop()
        status, body = api.request("GET", "/readyz", token=False)
        assert status == 503
        assert any(p.startswith("index database unavailable") for p in body["problems"])
        assert api.request("GET", "/healthz", token=False)[0] == 200  # alive all the same
        assert api.request("GET", "/api/status")[0] == 503
        proxy.start()
        wait_until(lambda: api.request("GET", "/readyz", token=False)[0] == 200, 30,
                   message="ready again")


def test_readyz_turns_503_while_the_object_store_is_down(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOM_GATEWAY_S3_ACCESS_KEY", ACCESS_KEY)
    monkeypatch.setenv("DICOM_GATEWAY_S3_SECRET_KEY", SECRET_KEY)
    with seaweed(tmp_path / "seaweed") as server:
        storage = {"object_store": "s3://ready/archive",
                   "s3": {"endpoint": server.endpoint, "secure": False, "create_bucket": True}}
        config = make_config(tmp_path, sqlite_url, http=http_section(tmp_path), storage=storage)
        with running_node(config) as node:
            api = client(node)
            assert api.request("GET", "/readyz", token=False)[0] == 200
            server.stop()
            wait_until(lambda: api.request("GET", "/readyz", token=False)[0] == 503, 30,
                       message="not ready")
            body = api.request("GET", "/readyz", token=False)[1]
            assert any(p.startswith("object store unavailable") for p in body["problems"])
            server.start()
            wait_until(lambda: api.request("GET", "/readyz", token=False)[0] == 200, 60,
                       message="ready again")


def test_readyz_turns_503_while_the_spool_disk_is_full(tmp_path: Path, sqlite_url: str) -> None:
    config = make_config(tmp_path, sqlite_url, http=http_section(tmp_path))
    with running_node(config) as node:
        api = client(node)
        assert api.request("GET", "/readyz", token=False)[0] == 200
        node.spool.min_free_bytes = 10**18  # more than any disk has: the spool is "full"
        node.spool._free_checked_at = 0.0  # skip the once-a-second cache
        wait_until(lambda: api.request("GET", "/readyz", token=False)[0] == 503, 15,
                   message="not ready")
        body = api.request("GET", "/readyz", token=False)[1]
        assert "spool disk below its free-space threshold" in body["problems"]


# --- operations --------------------------------------------------------------------------


def _job_states(node: Node, destination: str) -> dict[str, int]:
    with node.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT state, count(*) FROM forward_job WHERE destination = :d "
                 "GROUP BY state"), {"d": destination})
        return {row[0]: row[1] for row in rows}


def test_pausing_a_destination_holds_its_queue_and_resuming_delivers(
    tmp_path: Path, database_url: str
) -> None:
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER") as pacs:
        config = make_config(tmp_path / "gw", database_url, http=http_section(tmp_path),
                             destination=[_dest("pacs", pacs.port)],
                             route=[{"name": "all", "destinations": ["pacs"]}])
        with running_node(config) as node:
            api = client(node)
            assert api.post("/api/destinations/pacs/pause") == {"destination": "pacs",
                                                                 "paused": True}
            assert dcmtk.storescu(node.receiver.port, make_study(tmp_path / "s", 3)).ok
            wait_until(lambda: _job_states(node, "pacs").get("pending") == 3, 10)
            queue = api.get("/api/queues")
            assert queue[0]["destination"] == "pacs"
            assert queue[0]["paused"] is True
            assert queue[0]["pending"] == 3
            assert queue[0]["oldest_pending"] is not None
            # held: nothing leaves while paused
            with pytest.raises(AssertionError):
                wait_until(lambda: len(pacs.files()) > 0, 2.0)
            api.post("/api/destinations/pacs/resume")
            wait_until(lambda: len(pacs.files()) == 3, 30, message="delivery after resume")
            wait_until(lambda: api.get("/api/queues")[0]["done"] == 3, 10)
            assert api.get("/api/queues")[0]["paused"] is False


def test_dead_letters_are_listed_with_the_reason_then_requeued_or_cancelled(
    tmp_path: Path, database_url: str
) -> None:
    with status_peer(tmp_path / "peer", then=0xC123) as peer:
        config = make_config(tmp_path / "gw", database_url, http=http_section(tmp_path),
                             destination=[_dest("vna", peer.port)],
                             route=[{"name": "all", "destinations": ["vna"]}])
        with running_node(config) as node:
            api = client(node)
            paths = make_study(tmp_path / "s", 3)
            assert dcmtk.storescu(node.receiver.port, paths).ok
            wait_until(lambda: len(api.get("/api/dead-letters")) == 3, 30,
                       message="three dead letters")
            letters = api.get("/api/dead-letters?destination=vna")
            assert {letter["destination"] for letter in letters} == {"vna"}
            assert all("0xC123" in letter["reason"] for letter in letters)
            assert api.get("/api/dead-letters?destination=other") == []
            peer.script(then=0)
            first, second = sorted(letter["id"] for letter in letters)[:2]
            assert api.post("/api/dead-letters/requeue", {"ids": [first]}) == {"requeued": 1}
            assert api.post("/api/jobs/cancel", {"ids": [second]}) == {"cancelled": 1}
            wait_until(lambda: _job_states(node, "vna").get("done") == 1, 30)
            assert api.post("/api/dead-letters/requeue", {"destination": "vna"}) == {
                "requeued": 1}
            wait_until(lambda: _job_states(node, "vna") == {"done": 2, "cancelled": 1}, 30)
            assert api.get("/api/dead-letters") == []
            assert len(peer.stored()) == 2


def test_studies_search_by_patient_accession_date_and_modality(
    tmp_path: Path, database_url: str
) -> None:
    with dcmtk.storescp(tmp_path / "pacs", ae_title="PEER") as pacs:
        config = make_config(tmp_path / "gw", database_url, http=http_section(tmp_path),
                             destination=[_dest("pacs", pacs.port)],
                             route=[{"name": "mr", "destinations": ["pacs"],
                                     "match": {"Modality": "MR"}}])
        with running_node(config) as node:
            api = client(node)
            ct = make_study(tmp_path / "ct", 2, patient_id="PAT-A", accession_number="ACC-A")
            mr = make_study(tmp_path / "mr", 1, template="MR_small.dcm", patient_id="PAT-B",
                            accession_number="ACC-B")
            assert dcmtk.storescu(node.receiver.port, ct + mr).ok
            wait_until(lambda: len(pacs.files()) == 1, 30)

            def found(query: str) -> list[str]:
                return [s["accession_number"] for s in api.get(f"/api/studies?{query}")]

            assert sorted(found("")) == ["ACC-A", "ACC-B"]
            assert found("patient_id=PAT-A") == ["ACC-A"]
            assert found("accession_number=ACC-B") == ["ACC-B"]
            assert found("modality=MR") == ["ACC-B"]
            assert found("patient_id=NOBODY") == []
            study_date = api.get("/api/studies?accession_number=ACC-A")[0]["study_date"]
            assert "ACC-A" in found(f"study_date={study_date}")
            assert "ACC-A" in found(f"study_date={study_date}-")
            assert found("study_date=-19000101") == []
            wait_until(lambda: api.get("/api/studies?modality=MR")[0]["deliveries"]
                       == {"pacs": {"done": 1}}, 10)
            ct_view = api.get("/api/studies?patient_id=PAT-A")[0]
            assert ct_view["instances"] == 2
            assert ct_view["modalities"] == ["CT"]
            assert ct_view["deliveries"] == {}


def test_association_log_filters(tmp_path: Path, database_url: str) -> None:
    config = make_config(tmp_path, database_url, http=http_section(tmp_path))
    with running_node(config) as node:
        api = client(node)
        port = node.receiver.port
        assert dcmtk.storescu(port, make_study(tmp_path / "s", 2), calling="CT01").ok
        assert not dcmtk.storescu(port, make_study(tmp_path / "t", 1), calling="INTRUDER").ok
        wait_until(lambda: len(api.get("/api/associations")) == 2, 10)
        ct01 = api.get("/api/associations?calling_ae=CT01")
        assert [(a["calling_ae"], a["outcome"], a["instances_received"]) for a in ct01] == [
            ("CT01", "released", 2)]
        rejected = api.get("/api/associations?outcome=rejected")
        assert [a["calling_ae"] for a in rejected] == ["INTRUDER"]
        assert "not configured" in rejected[0]["reject_reason"]
        future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
        assert api.get(f"/api/associations?since={future.replace('+', '%2B')}") == []
        assert len(api.get(f"/api/associations?until={future.replace('+', '%2B')}")) == 2
        assert len(api.get("/api/associations?limit=1")) == 1
        status = api.get("/api/status")
        assert status["received_last_5_minutes"]["instances"] == 2
        assert status["open_associations"] == 0


def test_recent_events_orders_and_hl7_messages(tmp_path: Path, database_url: str) -> None:
    from tests.helpers import hl7

    out = tmp_path / "events.jsonl"
    hl7_port = free_port()
    config = make_config(
        tmp_path / "gw", database_url, http=http_section(tmp_path),
        events={"stable_seconds": 1.0, "check_seconds": 0.2, "timezone": "UTC"},
        event_sink=[{"name": "local", "type": "file", "path": str(out)}],
        hl7={"listen_port": hl7_port, "host": "127.0.0.1"},
    )
    with running_node(config) as node:
        api = client(node)
        assert hl7.send(hl7_port, hl7.orm_o01("ACC-77"))
        assert dcmtk.storescu(node.receiver.port,
                              make_study(tmp_path / "s", 1, accession_number="ACC-77")).ok
        wait_until(lambda: api.get("/api/events") != [], 30, message="an event")
        wait_until(lambda: api.get("/api/events")[0]["deliveries"] == {"local": "done"}, 30)
        event = api.get("/api/events")[0]
        assert event["version"] == 1
        messages = api.get("/api/hl7/messages")
        assert [(m["message_type"], m["ack_code"]) for m in messages] == [("ORM^O01", "AA")]
        assert [o["accession_number"] for o in api.get("/api/orders")] == ["ACC-77"]
        assert api.post("/api/events/requeue", {"sink": "local"}) == {"requeued": 0}
