"""The gateway's configuration: one TOML file, validated into frozen models.

Every option is documented where it is defined. Values can be overridden from the
environment with ``DICOM_GATEWAY__<SECTION>__<KEY>`` (double underscores between the
levels, case-insensitive), for example ``DICOM_GATEWAY__NODE__PORT=11113`` or
``DICOM_GATEWAY__STORAGE__DATABASE=postgresql+psycopg://gw@db/gw``. The value is read
as a TOML value when it parses as one (``11113``, ``true``, ``["a", "b"]``) and as a
plain string otherwise. Secrets never live in the file: S3 credentials come from
``DICOM_GATEWAY_S3_ACCESS_KEY`` / ``DICOM_GATEWAY_S3_SECRET_KEY``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "DICOM_GATEWAY__"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the reason."""


def _validate_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title cannot be empty")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {stripped!r} has {len(stripped)}")
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in stripped):
        raise ValueError(f"{stripped!r}: AE titles use printable ASCII without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_validate_ae_title)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeConfig(_Model):
    """``[node]``: the DICOM listener.

    Changing ``ae_title``, ``host`` or ``port`` takes a restart.
    """

    ae_title: AETitle = "GATEWAY"
    """The called AE title the node answers to; other called AE titles are rejected."""
    host: str = "0.0.0.0"  # noqa: S104 - a DICOM node listens on the network by default
    """Address to listen on."""
    port: int = Field(default=11112, ge=0, le=65535)
    """TCP port for DICOM associations (104 needs CAP_NET_BIND_SERVICE; 0 = any free port)."""
    accept_unknown_calling_ae: bool = False
    """Accept associations from calling AE titles not listed in ``[[calling_ae]]``."""
    max_associations: int = Field(default=32, ge=1, le=1000)
    """Concurrent inbound associations; more are rejected as transient (local limit)."""
    max_pdu_length: int = Field(default=262144, ge=4096, le=16 * 1024 * 1024)
    """Largest PDU we accept, in bytes. Each PDU is held in memory while it is read, so
    this bounds memory per association; PDUs announced larger than this are refused."""
    acse_timeout: float = Field(default=30.0, gt=0)
    """Seconds to wait for association negotiation messages."""
    dimse_timeout: float = Field(default=60.0, gt=0)
    """Seconds to wait for a DIMSE message once one has started."""
    network_timeout: float = Field(default=120.0, gt=0)
    """Seconds an association may stay idle before it is aborted."""
    stop_timeout: float = Field(default=30.0, gt=0)
    """On SIGTERM, seconds to let in-flight associations finish before aborting them."""
    worker_process: bool = True
    """Run uploads, forwarding and study events in a second process, so they use another
    CPU core instead of slowing receiving down; ``false`` runs them as threads of the
    listener's process. Changing it takes a restart."""


class S3Config(_Model):
    """``[storage.s3]``: connection to an S3-compatible object store.

    Credentials come from the environment (``DICOM_GATEWAY_S3_ACCESS_KEY`` and
    ``DICOM_GATEWAY_S3_SECRET_KEY``), never from this file.
    """

    endpoint: str = "127.0.0.1:9000"
    """host:port of the S3 API."""
    secure: bool = True
    """Use HTTPS."""
    region: str | None = None
    """Region name, when the store needs one."""
    create_bucket: bool = False
    """Create the bucket at start-up if it does not exist."""


class RetryConfig(_Model):
    """Exponential backoff with jitter: retry n waits between half and all of
    ``min(max_seconds, initial_seconds * 2^(n-1))``."""

    initial_seconds: float = Field(default=1.0, gt=0)
    max_seconds: float = Field(default=300.0, gt=0)


class StorageConfig(_Model):
    """``[storage]``: where instances are made durable, stored and indexed."""

    spool_dir: Path = Path("./var/spool")
    """Local durable staging area; instances wait here until the object store has them."""
    object_store: str = "file://./var/objects"
    """``file://PATH`` or ``s3://BUCKET[/PREFIX]``."""
    database: str = "sqlite:///./var/index.db"
    """SQLAlchemy URL: ``sqlite:///PATH`` (embedded) or ``postgresql+psycopg://user@host/db``."""
    database_timeout: float = Field(default=10.0, gt=0, le=300)
    """Seconds to wait for the database (connection, locks) before answering 0xA700."""
    s3: S3Config = S3Config()
    upload_workers: int = Field(default=2, ge=1, le=64)
    """Parallel uploads from the spool to the object store."""
    upload_retry: RetryConfig = RetryConfig()
    """Backoff while the object store is unavailable."""
    upload_yield_seconds: float = Field(default=30.0, ge=0, le=3600)
    """While instances keep arriving, uploads wait for a pause in arrivals (0.5 s), at
    most this long, so that receiving and forwarding have the disk and the CPU; the
    instances are durable in the spool meanwhile. 0: upload as soon as they arrive."""
    min_free_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    """Refuse new instances (0xA700) when the spool file system has less free space."""
    spool_in_index_max_bytes: int = Field(default=128 * 1024, ge=0, le=4 * 1024 * 1024)
    """Instances up to this size (the Part 10 object) are spooled inside the index: their
    bytes are committed in the same transaction as their index row, one flush of the
    database per instance instead of a file's, its directory's and the database's, and
    they are held in memory while they arrive. Larger ones are spooled as files in
    ``spool_dir``. 0: every instance as a file."""

    @field_validator("object_store")
    @classmethod
    def _object_store_url(cls, value: str) -> str:
        if value.startswith("file://"):
            if not value[len("file://") :]:
                raise ValueError("file:// needs a directory, e.g. file://./var/objects")
            return value
        if value.startswith("s3://"):
            bucket = value[len("s3://") :].split("/", 1)[0]
            if not bucket:
                raise ValueError("s3:// needs a bucket name, e.g. s3://dicom")
            return value
        raise ValueError("must start with file:// or s3://")

    @field_validator("database")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if not (value.startswith("sqlite") or value.startswith("postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return value


class CallingAEConfig(_Model):
    """``[[calling_ae]]``: a modality (or other SCU) allowed to send to the node."""

    ae_title: AETitle
    hosts: tuple[str, ...] | None = None
    """Addresses or networks (``10.1.2.3``, ``10.1.0.0/16``) it may connect from; absent = any."""
    description: str = ""

    @field_validator("hosts")
    @classmethod
    def _hosts_are_addresses(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or network") from None
        return value


MatchValue = str | list[str] | dict[str, str]
"""A route condition: exact or wildcard (``*``, ``?``) text, a list of those (any may
match), or ``{ regex = "..." }``. ``source_address`` takes addresses or networks."""

ASSOCIATION_MATCH_KEYS = ("calling_ae", "called_ae", "source_address")


def _check_match(match: dict[str, MatchValue]) -> dict[str, MatchValue]:
    from pydicom.datadict import keyword_dict

    for key, value in match.items():
        if key not in ASSOCIATION_MATCH_KEYS and key not in keyword_dict:
            raise ValueError(
                f"{key!r} is neither a DICOM keyword nor one of {', '.join(ASSOCIATION_MATCH_KEYS)}"
            )
        if isinstance(value, dict):
            if set(value) != {"regex"}:
                raise ValueError(f"{key}: a table condition takes exactly one key, regex")
            try:
                re.compile(value["regex"])
            except re.error as exc:
                raise ValueError(f"{key}: invalid regex: {exc}") from None
        if key == "source_address":
            for pattern in [value] if isinstance(value, str) else value:
                if not isinstance(pattern, str):
                    # pydantic reports ValueError (not TypeError) as a validation error
                    raise ValueError("source_address takes addresses or networks")  # noqa: TRY004
                try:
                    ipaddress.ip_network(pattern, strict=False)
                except ValueError:
                    message = f"source_address: {pattern!r} is not an address or network"
                    raise ValueError(message) from None
    return match


class MorphConfig(_Model):
    """Changes made to the forwarded copy only (the stored original never changes).

    Applied in this order: ``remove``, ``remove_private``, ``set``, ``prefix``, ``suffix``.
    Attributes are named by keyword (``PatientID``) or tag (``0010,0020``); ``remove``
    also takes whole groups (``0009,xxxx``).
    """

    set: dict[str, str] = {}
    """Replace or add values, e.g. ``{ InstitutionName = "General Hospital" }``."""
    remove: list[str] = []
    """Delete attributes or groups."""
    remove_private: bool = False
    """Delete all private attributes (odd groups)."""
    prefix: dict[str, str] = {}
    """Prepend text to existing values, e.g. ``{ PatientID = "SITEA-" }``."""
    suffix: dict[str, str] = {}
    """Append text to existing values."""

    @model_validator(mode="after")
    def _selectors_are_valid(self) -> MorphConfig:
        from gateway.morph import validate_morph

        validate_morph(self)
        return self

    def is_empty(self) -> bool:
        return not (self.set or self.remove or self.remove_private or self.prefix or self.suffix)


class ForwardRetryConfig(_Model):
    """Retry policy of a destination: exponential backoff with jitter, then a dead letter."""

    initial_seconds: float = Field(default=5.0, gt=0)
    max_seconds: float = Field(default=600.0, gt=0)
    max_attempts: int = Field(default=100, ge=1)
    """Attempts (C-STORE tries of one instance) before it becomes a dead letter."""


class DestinationConfig(_Model):
    """``[[destination]]``: a PACS/VNA the gateway forwards to (C-STORE SCU)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Identifier used by routes, the queue and the CLI."""
    ae_title: AETitle
    """The destination's called AE title."""
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    """Our AE title towards it (default: ``[node] ae_title``)."""
    max_associations: int = Field(default=2, ge=1, le=32)
    """Parallel associations to this destination."""
    batch_size: int = Field(default=100, ge=1, le=10000)
    """Instances (of one study) sent over one association before it is released."""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds for connecting, association negotiation and each response."""
    max_pdu_length: int = Field(default=262144, ge=4096, le=16 * 1024 * 1024)
    """Largest PDU we accept from it, in bytes."""
    decompress: bool = True
    """When it accepts none of an instance's stored transfer syntax, decompress to explicit
    VR little endian (never to a lossy syntax). Off: such instances become dead letters."""
    coerce_from_order: bool = False
    """Replace the patient demographics (ID, issuer, name, birth date, sex) of the copy
    sent here with those of the HL7 order matched to the study by accession number."""
    retry: ForwardRetryConfig = ForwardRetryConfig()
    morph: MorphConfig = MorphConfig()


class RouteConfig(_Model):
    """``[[route]]``: which received instances go to which destinations.

    Routes are evaluated in file order; every matching route adds its destinations,
    and a matching route with ``final = true`` stops the evaluation.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    destinations: list[str] = Field(min_length=1)
    match: dict[str, MatchValue] = {}
    """All conditions must hold; absent = match everything."""
    final: bool = False
    morph: MorphConfig = MorphConfig()
    """Applied to what this route sends, before the destination's own morph."""

    @field_validator("match")
    @classmethod
    def _valid_match(cls, value: dict[str, MatchValue]) -> dict[str, MatchValue]:
        return _check_match(value)


class EventsConfig(_Model):
    """``[events]``: study-level events raised when a study is complete (stable)."""

    stable_seconds: float = Field(default=60.0, gt=0)
    """A study is stable after this long without a new instance."""
    fhir_version: Literal["R4", "R5"] = "R4"
    """R4 (as R4B, what most EHRs speak) or R5."""
    endpoint_url: str | None = None
    """DICOMweb base URL of the archive, given as ImagingStudy.endpoint (WADO-RS)."""
    retrieval_url: str | None = None
    """Base URL where documents can be fetched by object key, used in attachments
    (default: the object store location)."""
    patient_identifier_system: str | None = None
    """FHIR identifier system for Patient IDs without an Issuer of Patient ID."""
    accession_identifier_system: str | None = None
    """FHIR identifier system of accession numbers (the RIS that assigns them)."""
    timezone: str | None = None
    """IANA zone of DICOM dates and times without an offset (default: the host's)."""
    check_seconds: float = Field(default=2.0, gt=0)
    """How often studies are checked for stability."""

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not an IANA time zone") from None
        return value


SinkType = Literal["file", "fhir", "webhook", "nats"]


class EventSinkConfig(_Model):
    """``[[event_sink]]``: where study events (FHIR resources) are delivered."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    type: SinkType
    path: Path | None = None
    """file: the JSON-lines file events are appended to."""
    url: str | None = None
    """fhir: the FHIR server base URL; webhook: the URL events are POSTed to."""
    token_env: str | None = None
    """fhir: environment variable holding a bearer token (optional)."""
    secret_env: str | None = None
    """webhook: environment variable holding the HMAC-SHA256 signing secret."""
    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    """nats: server URLs."""
    subject: str | None = None
    """nats: the subject events are published to."""
    stream: str | None = None
    """nats: the JetStream stream (created for the subject if it does not exist)."""
    timeout: float = Field(default=15.0, gt=0)
    retry: ForwardRetryConfig = ForwardRetryConfig()

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _required_for_type(self) -> EventSinkConfig:
        needed = {
            "file": ("path",),
            "fhir": ("url",),
            "webhook": ("url", "secret_env"),
            "nats": ("subject", "stream"),
        }[self.type]
        missing = [key for key in needed if getattr(self, key) in (None, "")]
        if missing:
            raise ValueError(f"a {self.type} sink needs {', '.join(missing)}")
        return self


class Hl7Config(_Model):
    """``[hl7]``: the MLLP listener for orders and patient updates, and our identity."""

    listen_port: int | None = Field(default=None, ge=0, le=65535)
    """MLLP port; absent = no listener (0 = any free port)."""
    host: str = "0.0.0.0"  # noqa: S104 - RIS/HIS integration engines connect over the network
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Longer messages are refused and the connection closed."""
    sending_application: str = "DICOMGW"
    sending_facility: str = ""
    version: str = "2.5"
    """HL7 version of the messages the gateway sends."""

    @field_validator("version")
    @classmethod
    def _supported_version(cls, value: str) -> str:
        from hl7apy import SUPPORTED_LIBRARIES

        if value not in SUPPORTED_LIBRARIES:
            raise ValueError(f"supported HL7 versions: {', '.join(sorted(SUPPORTED_LIBRARIES))}")
        return value
    timeout: float = Field(default=60.0, gt=0)
    """Seconds a connection may stay silent mid-message."""


class Hl7DestinationConfig(_Model):
    """``[[hl7_destination]]``: an MLLP receiver told when a study is available."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    host: str
    port: int = Field(ge=1, le=65535)
    message: Literal["ORU^R01", "ORM^O01"] = "ORU^R01"
    """ORU^R01 (result: study available) or ORM^O01 (order status: completed)."""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout: float = Field(default=30.0, gt=0)
    """Seconds to connect and to wait for the ACK."""
    retry: ForwardRetryConfig = ForwardRetryConfig()


HttpEndpoint = Literal["healthz", "readyz", "metrics", "dashboard"]


class HttpConfig(_Model):
    """``[http]``: the admin server: metrics, health checks, the JSON API, the dashboard.

    The API and the dashboard's data carry PHI: they need the bearer token from
    ``DICOM_GATEWAY_API_TOKEN`` (or the file ``token_file``).
    """

    port: int | None = Field(default=None, ge=0, le=65535)
    """Absent: no admin server (0 = any free port)."""
    host: str = "127.0.0.1"
    """Loopback by default; set an address (behind TLS termination) to open it up."""
    token_file: Path | None = None
    """A file holding the API token (instead of the environment variable)."""
    public: tuple[HttpEndpoint, ...] = ("healthz", "readyz", "dashboard")
    """Endpoints served without the token. The dashboard page itself holds no data."""


class LoggingConfig(_Model):
    """``[logging]``."""

    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: console on a terminal, JSON otherwise (journald, files, containers)."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    log_phi: bool = False
    """Log patient names, IDs and birth dates. Off by default: logs leave the PHI boundary."""


class GatewayConfig(_Model):
    """The whole configuration file."""

    node: NodeConfig = NodeConfig()
    storage: StorageConfig = StorageConfig()
    calling_ae: tuple[CallingAEConfig, ...] = ()
    destination: tuple[DestinationConfig, ...] = ()
    route: tuple[RouteConfig, ...] = ()
    events: EventsConfig = EventsConfig()
    event_sink: tuple[EventSinkConfig, ...] = ()
    hl7: Hl7Config = Hl7Config()
    hl7_destination: tuple[Hl7DestinationConfig, ...] = ()
    http: HttpConfig = HttpConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> GatewayConfig:
        for kind, names in (
            ("calling AE title", [entry.ae_title for entry in self.calling_ae]),
            ("destination", [entry.name for entry in self.destination]),
            ("route", [entry.name for entry in self.route]),
            ("event sink or HL7 destination",
             [sink.name for sink in self.event_sink]
             + [target.name for target in self.hl7_destination]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"{kind} {name!r} is listed twice")
                seen.add(name)
        known = {entry.name for entry in self.destination}
        for route in self.route:
            for name in route.destinations:
                if name not in known:
                    raise ValueError(f"route {route.name!r} names unknown destination {name!r}")
        return self

    def destination_named(self, name: str) -> DestinationConfig | None:
        return next((entry for entry in self.destination if entry.name == name), None)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Apply ``DICOM_GATEWAY__SECTION__KEY`` variables to the raw config in place.

    Returns a map from dotted config key to the variable that set it, so validation
    errors can name the variable.
    """
    sources: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a table")
            node = child
        node[path[-1]] = _parse_env_value(raw)
        sources[".".join(path)] = name
    return sources


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def format_validation_error(error: ValidationError, sources: Mapping[str, str]) -> str:
    """One line per problem: the dotted key, where the value came from, and why."""
    lines = []
    for problem in error.errors():
        key = _format_location(problem["loc"])
        origin = sources.get(key)
        where = f" (from {origin})" if origin else ""
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{key}{where}: {message}")
    return "\n".join(lines)


def parse_config(text: str, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate TOML text (plus environment overrides) into a :class:`GatewayConfig`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    sources = apply_env_overrides(data, os.environ if environ is None else environ)
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, sources)) from None


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate the configuration file at *path*."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        return parse_config(text, environ)
    except ConfigError as exc:
        raise ConfigError(f"{path}:\n{exc}") from None
