"""Configuration: the public TOML contract, validation messages and env overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, parse_config

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.toml"


def test_example_config_is_valid_and_uses_the_embedded_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.node.ae_title == "GATEWAY"
    assert config.node.port == 11112
    assert config.storage.object_store == "file://./var/objects"
    assert config.storage.database == "sqlite:///./var/index.db"
    assert not config.node.accept_unknown_calling_ae


def test_empty_file_gives_documented_defaults() -> None:
    config = parse_config("", environ={})
    assert config == GatewayConfig()
    assert config.logging.log_phi is False


def test_public_contract_from_the_issue_parses() -> None:
    config = parse_config(
        """
        [node]
        ae_title = "GATEWAY"
        host = "0.0.0.0"
        port = 11112
        accept_unknown_calling_ae = false

        [storage]
        spool_dir = "./var/spool"
        object_store = "s3://BUCKET"
        database = "postgresql+psycopg://user@host/db"

        [[calling_ae]]
        ae_title = "CT01"
        hosts = ["10.1.2.3"]
        """,
        environ={},
    )
    assert config.calling_ae[0].hosts == ("10.1.2.3",)
    assert config.storage.object_store == "s3://BUCKET"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[node]\nport = 70000", "node.port: Input should be less than or equal to 65535"),
        ("[node]\nae_title = \"MUCH_TOO_LONG_AE_TITLE\"",
         "node.ae_title: an AE title has at most 16"),
        ("[node]\nae_title = \"  \"", "node.ae_title: an AE title cannot be empty"),
        ("[node]\nae_tilte = \"GW\"", "node.ae_tilte: unknown key"),
        ("[storage]\nobject_store = \"ftp://x\"",
         "storage.object_store: must start with file:// or s3://"),
        ("[storage]\nobject_store = \"s3://\"", "storage.object_store: s3:// needs a bucket name"),
        ("[storage]\ndatabase = \"mysql://x\"",
         "storage.database: must be a sqlite:/// or postgresql"),
        ("[[calling_ae]]\nae_title = \"CT01\"\nhosts = [\"ct.example\"]",
         "calling_ae[0].hosts: 'ct.example' is not an IP address or network"),
        ("[[calling_ae]]\nae_title = \"CT01\"\n[[calling_ae]]\nae_title = \"CT01\"",
         "calling AE title 'CT01' is listed twice"),
        ("[node\nport = 1", "not valid TOML"),
        ("[logging]\nlevel = \"verbose\"", "logging.level: Input should be"),
    ],
)
def test_invalid_values_are_refused_with_the_key_and_the_reason(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(toml, environ={})
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        ("DICOM_GATEWAY__NODE__PORT", "11113", lambda c: c.node.port == 11113),
        ("DICOM_GATEWAY__NODE__AE_TITLE", "EDGE", lambda c: c.node.ae_title == "EDGE"),
        ("dicom_gateway__node__accept_unknown_calling_ae", "true",
         lambda c: c.node.accept_unknown_calling_ae is True),
        ("DICOM_GATEWAY__STORAGE__DATABASE", "postgresql+psycopg://gw@db/gw",
         lambda c: c.storage.database == "postgresql+psycopg://gw@db/gw"),
        ("DICOM_GATEWAY__STORAGE__S3__ENDPOINT", "s3.local:9000",
         lambda c: c.storage.s3.endpoint == "s3.local:9000"),
    ],
)
def test_environment_overrides_config_values(variable: str, value: str, check) -> None:  # type: ignore[no-untyped-def]
    config = parse_config("[node]\nport = 104\n", environ={variable: value})
    assert check(config)


def test_invalid_override_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"node.port \(from DICOM_GATEWAY__NODE__PORT\)"):
        parse_config("", environ={"DICOM_GATEWAY__NODE__PORT": "lots"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, check=False,
        timeout=60,
    )


def test_check_config_cli_accepts_the_example() -> None:
    result = _cli("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    assert "GATEWAY on 0.0.0.0:11112" in result.stdout


def test_check_config_cli_names_the_bad_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = -1\n[[calling_ae]]\nae_title = \"A\\\\B\"\n")
    result = _cli("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "node.port: Input should be greater than or equal to 0" in result.stderr
    assert "calling_ae[0].ae_title" in result.stderr
    assert str(bad) in result.stderr


def test_check_config_cli_reports_a_missing_file(tmp_path: Path) -> None:
    result = _cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
