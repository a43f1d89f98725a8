"""The systemd unit, its environment file and the Dockerfile say what they promise.

No container engine runs here, so the image is not built; what can be checked is:
the directives, that the environment examples name real settings, and that the
HEALTHCHECK command itself tells a ready node from one that is not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_config
from tests.helpers.admin_http import TcpProxy
from tests.helpers.nodes import config_data, running_node

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "dicom-gateway.service"
ENV_EXAMPLE = ROOT / "systemd" / "gateway.env.example"
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE_CONFIG = ROOT / "config" / "gateway.toml"


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_unit_has_reload_journald_and_hardening() -> None:
    unit = _directives(UNIT)
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["EnvironmentFile"] == ["-/etc/dicom-gateway/gateway.env"]
    assert unit["StandardOutput"] == ["journal"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["ReadWritePaths"] == ["/var/lib/dicom-gateway"]
    assert unit["PrivateTmp"] == ["yes"]
    assert unit["User"] == ["dicom-gateway"]
    text = UNIT.read_text()
    assert "# AmbientCapabilities=CAP_NET_BIND_SERVICE" in text  # the port 104 note


def test_environment_example_names_real_settings() -> None:
    names = re.findall(r"^#?(DICOM_GATEWAY\w*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    assert ("DICOM_GATEWAY_API_TOKEN", "") in names
    overrides = {name: value.strip('"') for name, value in names if "__" in name}
    assert overrides
    environ = {"DICOM_GATEWAY__STORAGE__DATABASE": "sqlite:///x.db", **overrides}
    config = load_config(EXAMPLE_CONFIG, environ)  # raises, naming the variable, if not
    assert config.node.port == 104
    assert config.http.host == "10.1.2.3"


def test_dockerfile_exposes_the_ports_runs_unprivileged_and_checks_readiness() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 11112 2575 8080$", text, re.MULTILINE)
    assert re.search(r"^USER dicom-gateway$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text
    assert "/readyz" in text
    environ = dict(re.findall(r"(DICOM_GATEWAY__\w+)=(\S+)", text))
    config = load_config(EXAMPLE_CONFIG, environ)
    assert (config.http.host, config.http.port) == ("0.0.0.0", 8080)


def _healthcheck_code() -> str:
    text = DOCKERFILE.read_text()
    match = re.search(r'CMD \["python", "-c", "(.+?)"\]', text)
    assert match, "HEALTHCHECK CMD not found"
    return match.group(1)


@pytest.mark.integration
def test_the_docker_healthcheck_command_follows_readiness(
    tmp_path: Path, proxied_postgres: tuple[str, TcpProxy]
) -> None:
    database, proxy = proxied_postgres
    data = config_data(tmp_path, database, http={"port": 0}, storage={"database_timeout": 2.0})
    with running_node(GatewayConfig.model_validate(data)) as node:
        assert node.admin_server is not None
        probe = _healthcheck_code().replace("8080", str(node.admin_server.port))

        def healthcheck() -> int:
            return subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                  timeout=30, check=False).returncode

        assert healthcheck() == 0
        proxy.stop()
        assert healthcheck() != 0
