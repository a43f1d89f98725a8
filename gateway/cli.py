"""The ``dicom-gateway`` command line."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.admin_cli import add_commands
from gateway.config import ConfigError, GatewayConfig, LoggingConfig, load_config

CONFIG_ENV = "DICOM_GATEWAY_CONFIG"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    raise ConfigError(f"no configuration: pass --config FILE or set {CONFIG_ENV}")


def _load(args: argparse.Namespace) -> GatewayConfig:
    return load_config(_config_path(args))


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.logs import configure_logging, get_logger
    from gateway.node import Node, StartupError

    path = _config_path(args)
    config = load_config(path)
    configure_logging(config.logging)
    try:
        Node(config, path).run()
    except StartupError as exc:
        get_logger("gateway").critical("startup_failed", error=str(exc))
        print(f"dicom-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config = load_config(path)
    print(f"{path}: OK")
    print(f"  node      {config.node.ae_title} on {config.node.host}:{config.node.port}")
    print(f"  spool     {config.storage.spool_dir}")
    print(f"  objects   {config.storage.object_store}")
    print(f"  database  {_hide_password(config.storage.database)}")
    calling = ", ".join(entry.ae_title for entry in config.calling_ae) or "(none)"
    unknown = "accepted" if config.node.accept_unknown_calling_ae else "rejected"
    print(f"  calling   {calling}; unknown calling AE titles are {unknown}")
    destinations = ", ".join(
        f"{d.name} ({d.ae_title}@{d.host}:{d.port})" for d in config.destination
    ) or "(none)"
    print(f"  forward   {destinations}; {len(config.route)} route(s)")
    sinks = ", ".join(f"{s.name} ({s.type})" for s in config.event_sink) or "(none)"
    print(f"  events    {sinks}; stable after {config.events.stable_seconds:g} s")
    listener = (f"MLLP on port {config.hl7.listen_port}" if config.hl7.listen_port is not None
                else "no MLLP listener")
    print(f"  hl7       {listener}; {len(config.hl7_destination)} HL7 destination(s)")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway.index.database import make_engine, migrate

    config = _load(args)
    engine = make_engine(config.storage.database)
    migrate(engine)
    engine.dispose()
    print("database schema is up to date")
    return EXIT_OK


def parse_peer(text: str) -> tuple[str, str, int]:
    """Parse ``AE@HOST:PORT`` (IPv6 hosts in brackets)."""
    match = _PEER.match(text)
    if not match:
        raise ValueError(f"{text!r} is not AE@HOST:PORT")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return match["ae"], match["host"].strip("[]"), port


def cmd_echo(args: argparse.Namespace) -> int:
    import logging

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from gateway.acceptance import describe_rejection
    from gateway.logs import configure_logging

    configure_logging(LoggingConfig(format="console", level="error"))
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    try:
        ae_title, host, port = parse_peer(args.peer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ae = AE(ae_title=args.calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        reason = "no association (nobody listening, or the connection was dropped)"
        if assoc.is_rejected and assoc.acceptor.primitive is not None:
            rj = assoc.acceptor.primitive
            words = describe_rejection(int(rj.result), int(rj.result_source), int(rj.diagnostic))
            reason = f"association rejected: {words}"
        print(f"C-ECHO {args.peer}: FAILED, {reason}", file=sys.stderr)
        return EXIT_FAILURE
    status = assoc.send_c_echo()
    assoc.release()
    if status and int(status.Status) == 0:
        print(f"C-ECHO {args.peer}: success")
        return EXIT_OK
    shown = f"0x{int(status.Status):04X}" if status else "no response"
    print(f"C-ECHO {args.peer}: FAILED, status {shown}", file=sys.stderr)
    return EXIT_FAILURE


EXIT_PARTIAL = 3


def _node_host(host: str) -> str:
    """Where this host reaches the node: loopback when it listens on every address."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104


def cmd_import(args: argparse.Namespace) -> int:
    import logging

    from gateway.importer import (
        NodeAddress,
        NodeUnreachableError,
        Progress,
        count_files,
        run_import,
    )
    from gateway.index.database import make_engine

    config = _load(args)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    paths = [Path(path) for path in args.paths]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    node = NodeAddress(
        host=args.host or _node_host(config.node.host), port=config.node.port,
        ae_title=config.node.ae_title, calling_ae_title=args.calling_ae or config.node.ae_title,
    )
    engine = make_engine(config.storage.database, timeout=config.storage.database_timeout)
    progress = Progress(count_files(paths))
    try:
        summary = run_import(paths, node, engine, progress,
                             warn=lambda text: print(f"warning: {text}", file=sys.stderr),
                             send_changed=args.changed)
    except NodeUnreachableError as exc:
        progress.finish()
        print(f"import stopped: {exc}; run it again when the node is up "
              "(files already imported are skipped)", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        engine.dispose()
    progress.finish()
    print(f"imported     {summary.imported} ({summary.bytes_sent / 1e6:.1f} MB)")
    changed = (f"; {summary.changed} with other content, --changed sends them as new "
               "versions" if summary.changed else "")
    print(f"duplicates   {summary.duplicates} (already stored, skipped{changed})")
    print(f"failed       {len(summary.failed)}")
    for path, reason in summary.failed:
        print(f"  {path}: {reason}")
    for path, reason in summary.warnings:
        print(f"  warning {path}: {reason}")
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def _hide_password(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]+@", r"://\1:***@", url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-gateway",
        description="A durable DICOM Storage SCP that indexes, stores and routes instances.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", "-c", help=f"TOML configuration file (or ${CONFIG_ENV})")
        return sub

    run = with_config(commands.add_parser("run", help="run the node in the foreground"))
    run.set_defaults(handler=cmd_run)
    check = with_config(commands.add_parser("check-config", help="validate a configuration"))
    check.set_defaults(handler=cmd_check_config)
    mig = with_config(commands.add_parser("migrate", help="bring the database schema up to date"))
    mig.set_defaults(handler=cmd_migrate)
    echo = commands.add_parser("echo", help="send a C-ECHO to AE@HOST:PORT")
    echo.add_argument("peer", help="AE@HOST:PORT, e.g. PACS@10.1.9.9:104")
    echo.add_argument("--calling-ae", default="ECHOSCU", help="our AE title (default ECHOSCU)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    echo.set_defaults(handler=cmd_echo)

    imp = with_config(commands.add_parser(
        "import", help="send files and folders through the running node",
        description="Send DICOM files (Part 10) through the running node's pipeline: "
        "storage, index, routing and events, as if a modality sent them. Files already "
        "stored with the same content are skipped, so an interrupted import can be run "
        "again. Exit status: 0 all imported or already stored, 1 the node could not be "
        "reached, 3 some files were unreadable or refused (listed with the reason).",
    ))
    imp.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    imp.add_argument("--calling-ae", help="calling AE title to import as (routing rules "
                     "see it; default the node's own AE title, accepted from this host)")
    imp.add_argument("--changed", action="store_true", help="send files whose SOP Instance "
                     "UID is stored but whose content differs (they become new versions)")
    imp.add_argument("--host", help="address of the node (default: loopback when it "
                     "listens on every address, else [node] host)")
    imp.set_defaults(handler=cmd_import)

    def with_loaded_config(command: Callable[[GatewayConfig, argparse.Namespace], int]) -> Any:
        return lambda args: command(_load(args), args)

    add_commands(commands, with_config, with_loaded_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-gateway`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
