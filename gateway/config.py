"""Node configuration: TOML (``tomllib``), validated at start.

Errors name the file, the key and what was expected. Secrets never sit in the TOML: a key
ending in ``_env`` names an environment variable, one ending in ``_file`` a file.

With no file at all the node runs on its *embedded default*: SQLite in ``./var/``, the
simulated legacy systems, and routes to them (see :func:`embedded_default`).
"""
from __future__ import annotations

import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from gateway.units import uscc_problem


class ConfigError(Exception):
    """Raised with a message fit for an operator: file, key, what was expected."""


#: ``[worker] keep_ingested_days`` and ``keep_peer_items_days``, when not 0, are at least this
MIN_KEEP_INGESTED_DAYS = 7
#: ``[node] id`` and every ``[peers.NODE_ID]``: node ids become folder and file names
NODE_ID = re.compile(r"[a-z][a-z0-9-]{1,31}")
NODE_ID_EXPECTED = "expected 2-32 lowercase letters, digits or '-', starting with a letter, e.g. county-a"
#: ``[adapters.NAME]``: names go into /api/v1/callbacks/NAME, metric labels and the outbox
ADAPTER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ADAPTER_NAME_EXPECTED = "expected 1-64 lowercase letters, digits, '_' or '-', starting with a letter, e.g. docexchange"
#: the intranet subsystems (slugs) a ``[[routes]] subsystem`` may name; ``*`` is every one
SUBSYSTEMS = ("documents", "approvals", "mail", "meetings", "duty", "supervision", "info-reports", "emergency",
              "mobile")
#: a configuration file larger than this is refused (it is not a configuration file)
MAX_CONFIG_BYTES = 1024 * 1024
#: fields of :class:`Config` the gateway sets itself; a file that names them is refused
_INTERNAL = ("simulators", "source", "base_dir")
_DAY = 86_400
_MAX_BYTES = 2**63 - 1  # sizes are stored in signed 64-bit columns
URL_EXPECTED = "expected an absolute http:// or https:// URL with a host, e.g. https://gw.example.internal:8443"


def url_problem(url: object) -> str | None:
    """What keeps ``url`` from being an absolute http(s) URL with a host (and, if it has one,
    a port from 1 to 65535), e.g. ``"has no host"``; None if nothing does. The one check for
    every URL setting: callers add the key, the value and :data:`URL_EXPECTED`."""
    if not isinstance(url, str):
        return "is not a string"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "contains a space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range or not a number, a broken [IPv6] host
        return f"is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return "is not an http:// or https:// URL"
    host = parts.hostname
    if not host:
        return "has no host"
    if not re.fullmatch(r"[\w.-]+|[0-9a-f:.]+", host):
        return f"has no valid host ({host!r})"
    if port == 0:
        return "has port 0; expected a port from 1 to 65535"
    return None


#: China Standard Time (UTC+8 all year): where the offices are
DEFAULT_TIMEZONE = "Asia/Shanghai"
TIMEZONE_EXPECTED = "expected an IANA time zone name, e.g. Asia/Shanghai or UTC"


def timezone_problem(name: object) -> str | None:
    """Why ``name`` is no IANA time zone this machine (or the tzdata package) knows; None if it is one."""
    if not isinstance(name, str):
        return f"{name!r} is not a string; {TIMEZONE_EXPECTED}"
    try:
        ZoneInfo(name)
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError; "../x" a ValueError
        return f"{name!r} is not a time zone; {TIMEZONE_EXPECTED}"
    return None


def zone(name: str | None) -> ZoneInfo:
    """The zone ``name`` (validated before), or the default one."""
    return ZoneInfo(name or DEFAULT_TIMEZONE)


def _name(key: str) -> str:
    """A table name as it appears in a dotted key: bare, or quoted as TOML quotes it."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _data_dir_problem(path: Path) -> str | None:
    """Why the node cannot create or write its data folder ``path``; None if it can. Nothing
    is created here: the nearest folder that exists must be one this user may write in."""
    path = Path(os.path.abspath(path))
    try:
        for p in (path, *path.parents):
            if p.exists():
                if not p.is_dir():
                    return (f"{path} is a file, not a folder" if p == path
                            else f"{path} cannot be created: {p} is a file, not a folder")
                if not os.access(p, os.W_OK | os.X_OK):
                    return (f"{path} is not writable by this user (uid {os.geteuid()})" if p == path
                            else f"{path} cannot be created: {p} is not writable by this user (uid {os.geteuid()})")
                return None
            if p.is_symlink():
                return f"{path} cannot be created: {p} is a symbolic link to nothing"
    except OSError as exc:
        return f"{path} cannot be checked: {exc.strerror or exc}"
    return f"{path} cannot be created"


def read_secret(settings: Mapping[str, Any], key: str, base_dir: Path,
                lookup: Callable[[str], str | None] | None = None) -> str | None:
    """The secret ``key`` of ``settings``: from the environment variable named by ``KEY_env``
    (looked up with ``lookup``, default ``os.environ.get``) or the file named by ``KEY_file``
    (relative to ``base_dir``; stripped); None if neither is set. A secret's value never sits
    in the TOML itself. Raises ValueError naming ``KEY_env``/``KEY_file`` and what is wrong."""
    if settings.get(f"{key}_env") is not None and settings.get(f"{key}_file") is not None:
        raise ValueError(f"{key}_file: {key}_env is set too; expected one of {key}_env or {key}_file")
    if f"{key}_env" in settings and settings[f"{key}_env"] is not None:
        name = str(settings[f"{key}_env"])
        val = (lookup or os.environ.get)(name)
        if val is None:
            raise ValueError(f"{key}_env: environment variable {name} is not set")
        return val
    if f"{key}_file" in settings and settings[f"{key}_file"] is not None:
        p = Path(str(settings[f"{key}_file"]))
        p = p if p.is_absolute() else base_dir / p
        try:
            return p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{key}_file: cannot read {p}: {getattr(exc, 'strerror', None) or exc}") from None
    return None


class _Strict(BaseModel):
    #: unknown keys are refused, and so are inf and nan (TOML has them; 1e400 is inf too)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NodeConfig(_Strict):
    id: str = "local"
    name: str = "本节点"
    #: units served by this node (统一社会信用代码): the senders it accepts from its callers
    units: list[str] = Field(default_factory=list)
    data_dir: str = "var"
    #: the offices' time zone (IANA name): the legacy systems' times written without an offset
    #: (unless ``[adapters.NAME] timezone`` says otherwise), the days of reports and the cron
    #: expressions of ``[schedules]`` (unless a schedule names its own)
    timezone: str = DEFAULT_TIMEZONE

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not NODE_ID.fullmatch(v):
            raise ValueError(f"{v!r} is not a node id; {NODE_ID_EXPECTED}")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        problem = timezone_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[str]) -> list[str]:
        for code in v:
            problem = uscc_problem(code)
            if problem:
                raise ValueError(f"{code!r} is not a unified social credit code: {problem}")
        return v

    @field_validator("units")
    @classmethod
    def _units_once(cls, v: list[str]) -> list[str]:
        twice = sorted({code for code in v if v.count(code) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed more than once; expected each unit once")
        return v


class DatabaseConfig(_Strict):
    #: SQLAlchemy URL; empty means SQLite at <data_dir>/gateway.db
    url: str = ""
    url_env: str | None = None
    pool_size: int = Field(default=10, ge=1, le=1000)


class ApiConfig(_Strict):
    max_json_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=_MAX_BYTES)
    max_blob_bytes: int = Field(default=4 * 1024**3, ge=1024, le=_MAX_BYTES)
    #: uploads never leave less than this free on the blob store's file system (the database
    #: and the delivery queue usually share it); 0: only a full disk stops an upload
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0, le=_MAX_BYTES)
    #: /readyz says not ready once the data folder's file system (and a SQLite database's, where
    #: it is elsewhere) has less than this free: a document accepted then would fail 507
    #: storage-full soon. Below min_free_bytes, so that uploads are refused first; 0: not checked
    ready_min_free_bytes: int = Field(default=64 * 1024**2, ge=0, le=_MAX_BYTES)
    #: new content one API key may upload in any 24 hours (content already stored costs
    #: nothing); past it an upload is refused 429 ``upload-quota``, so that no single caller
    #: can use up the disk every caller's uploads share. 0: no limit
    upload_quota_bytes_per_day: int = Field(default=0, ge=0, le=_MAX_BYTES)
    #: content (uploads above all) that no stored message names and that was not written or
    #: used for this many days is removed by the ``blobs`` job ([schedules.blobs]); 0: kept
    #: forever. Content a message names is never removed.
    unclaimed_upload_days: int = Field(default=0, ge=0, le=3650)
    #: an Idempotency-Key is honoured for this many days after its first request; the
    #: ``prune`` job ([schedules.prune]) forgets older ones (a message id is honoured for good)
    idempotency_days: int = Field(default=30, ge=1, le=3650)

    @property
    def in_use_seconds(self) -> int:
        """How recently content named by a new document must have been used (else it is
        marked in use now; see BlobStore.in_use): half the retention, so that what a document
        being stored names is never old enough for the ``blobs`` job. 0: no retention."""
        return self.unclaimed_upload_days * 43_200
    #: /metrics answers only a request with ``Authorization: Bearer <token>`` when a token is
    #: set, in an environment variable or a file (never in this file); without: open to all
    metrics_token_env: str | None = None
    metrics_token_file: str | None = None


class RetryPolicy(_Strict):
    max_attempts: int = Field(default=10, ge=1, le=1000)
    base_delay: float = Field(default=1.0, gt=0, le=_DAY)
    max_delay: float = Field(default=600.0, gt=0, le=7 * _DAY)


class WorkerConfig(_Strict):
    enabled: bool = True
    threads: int = Field(default=4, ge=1, le=256)
    idle_sleep: float = Field(default=0.2, gt=0, le=3600)
    lease_seconds: float = Field(default=120.0, gt=0, le=_DAY)
    poll_interval: float = Field(default=5.0, gt=0, le=_DAY)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    #: outbox rows done (delivered, sent, given up as recalled) this many days ago are removed
    #: by the ``prune`` job ([schedules.prune]); dead and waiting rows are kept
    keep_done_days: int = Field(default=30, ge=1, le=3650)
    #: the keys of items taken from legacy systems (gateway.inbound) are forgotten by the
    #: ``prune`` job once their item has not been seen at its source for this many days: it was
    #: archived or moved there, or passed by a receipt cursor; 0 keeps them for ever
    keep_ingested_days: int = Field(default=90, ge=0, le=3650)
    #: the records of the items batch and ferry peers sent (gateway.federation.batch, ferry)
    #: are forgotten by the ``prune`` job once the peer has not sent the item again for this
    #: many days; one refused is kept; 0 keeps them all for ever
    keep_peer_items_days: int = Field(default=90, ge=0, le=3650)
    #: runs of scheduled jobs (job_runs) started this many days ago are removed by the
    #: ``prune`` job, all but each job's newest and newest successful; the audit log keeps them
    keep_job_runs_days: int = Field(default=90, ge=1, le=3650)

    @field_validator("keep_ingested_days", "keep_peer_items_days")
    @classmethod
    def _keep_taken(cls, v: int, info: ValidationInfo) -> int:
        if 0 < v < MIN_KEEP_INGESTED_DAYS:
            what = ("what was taken from a legacy system (a source out of reach for a few days may still hold it)"
                    if info.field_name == "keep_ingested_days" else
                    "what a peer sent (a link down for a few days brings its unanswered items again)")
            raise ValueError(f"{v} days is too short a time to forget {what}; expected 0 (kept for ever) or "
                             f"{MIN_KEEP_INGESTED_DAYS} to 3650")
        return v


class WebhookConfig(_Strict):
    timeout: float = Field(default=10.0, gt=0, le=3600)
    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(max_attempts=12))


class RouteConfig(_Strict):
    """A row of the route table (content-based router): which adapter or node a recipient
    unit's messages go to. ``units`` empty means every unit (a default route)."""

    subsystem: str = "*"
    type: str = "*"
    units: list[str] = Field(default_factory=list)
    adapter: str | None = None
    node: str | None = None

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[str]) -> list[str]:
        return NodeConfig._units(v)  # type: ignore[arg-type]

    @field_validator("subsystem")
    @classmethod
    def _subsystem(cls, v: str) -> str:
        if v != "*" and v not in SUBSYSTEMS:
            raise ValueError(f"{v!r} is not a subsystem; expected * or one of {', '.join(SUBSYSTEMS)}")
        return v


class ScheduleConfig(_Strict):
    """``[schedules.JOB]``: when a scheduled job runs. ``cron`` has five fields (minute hour
    day month weekday) or six (with seconds first), read in ``timezone`` (by default the
    node's, ``[node] timezone``), never in the server's own (its TZ)."""

    cron: str
    enabled: bool = True
    #: the time zone the cron expression is read in; None: ``[node] timezone``
    timezone: str | None = None


class FerrySftpConfig(_Strict):
    """``[peers.NODE_ID.ferry_out]`` / ``ferry_in`` as a table: a folder on an SFTP server
    (the isolation device's, or a drop it reads). Key authentication only, the server's host
    key pinned; the key's passphrase comes from ``passphrase_env`` or ``passphrase_file``."""

    host: str
    port: int = Field(default=22, gt=0, lt=65536)
    username: str
    private_key_file: str
    passphrase_env: str | None = None
    passphrase_file: str | None = None
    #: the server's host key, "ssh-ed25519 AAAA…" (or a list), or known_hosts_file
    host_key: str | list[str] | None = None
    known_hosts_file: str | None = None
    #: the remote folder the batch files are written to or taken from
    path: str = "."
    connect_timeout: float = Field(default=10.0, gt=0, le=3600)
    so_timeout: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v or "\x00" in v or ".." in v.split("/"):
            raise ValueError(f"{v!r}: expected a folder without '..'")
        return v


class PeerConfig(_Strict):
    """``[peers.NODE_ID]``: another node this node exchanges with directly, its pinned key."""

    #: base URL of the peer's API (its /federation/v1/... lives under it); empty = no HTTP link
    url: str = ""
    #: the peer's pinned public key: "ed25519:<base64 of 32 bytes>", "sm2:<base64 of the
    #: 65-byte uncompressed point>", or PEM text (`gateway federation key` prints a node's own)
    public_key: str = ""
    public_key_file: str | None = None
    #: units (统一社会信用代码) the peer serves, known before any directory arrives
    units: list[str] = Field(default_factory=list)
    #: "http": forwarded as soon as accepted; "batch": carried by the push/pull sync jobs
    #: (links that are up only part of the time); "ferry": signed batch files (网闸)
    link: str = "http"
    timeout: float = Field(default=30.0, gt=0, le=3600)
    #: the highest 密级 this link may carry, either way (绝密 never travels between nodes by default)
    clearance: str = "机密"
    retry: RetryPolicy | None = None
    #: ferry links (网闸): where the signed batch files for the peer are written, and where
    #: its files arrive: a local folder (a path), or a folder on an SFTP server (a table)
    ferry_out: str | FerrySftpConfig | None = None
    ferry_in: str | FerrySftpConfig | None = None
    #: a ferry file is closed after the item that takes it past this many bytes
    ferry_max_bytes: int = Field(default=1024**3, ge=1024, le=_MAX_BYTES)
    #: seconds an incoming ferry file must have been left alone before it is judged: a file
    #: that is wrong and younger than this may still be arriving, and waits for a later run
    ferry_settle: float = Field(default=60.0, ge=0, le=_DAY)
    #: days the sender keeps a copy of each file it wrote, so that a file the device lost can
    #: be sent again (``gateway ferry resend``); 0 keeps none
    ferry_keep_days: float = Field(default=14.0, ge=0, le=3650)

    @field_validator("units")
    @classmethod
    def _units(cls, v: list[str]) -> list[str]:
        return NodeConfig._units(v)  # type: ignore[arg-type]

    @field_validator("clearance")
    @classmethod
    def _clearance(cls, v: str) -> str:
        if v not in ("非密", "秘密", "机密", "绝密"):
            raise ValueError(f"{v!r} is not a 密级; expected 非密, 秘密, 机密 or 绝密")
        return v

    @field_validator("link")
    @classmethod
    def _link(cls, v: str) -> str:
        if v not in ("http", "batch", "ferry"):
            raise ValueError(f"{v!r} is not a link kind; expected http, batch or ferry")
        return v


class FederationConfig(_Strict):
    """``[federation]``: this node's place among the nodes."""

    #: signature algorithm of this node's key: ed25519, or sm2 (国密) where required
    algorithm: str = "ed25519"
    #: the node that relays for this one when no direct link to a destination exists
    #: (a county's prefecture); it must be one of [peers]
    parent: str | None = None
    #: seconds a signed request's created time may differ from this node's clock
    max_skew: float = Field(default=300.0, gt=0, le=_DAY)
    #: publish the signed directory (the prefecture node does)
    publish_directory: bool = False
    #: hours a published directory stays valid
    directory_ttl_hours: float = Field(default=72.0, gt=0, le=366 * 24)
    #: the peer to fetch the directory from (default: parent)
    directory_from: str | None = None
    #: accept signed requests that name no target node (no Gateway-To header): only while
    #: peers running a version from before 2026-11 are being upgraded. Such a request could
    #: be replayed to any other node that pins the same sender key.
    accept_untargeted: bool = False

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        if v not in ("ed25519", "sm2"):
            raise ValueError(f"{v!r} is not a supported algorithm; expected ed25519 or sm2")
        return v


class Config(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    webhooks: WebhookConfig = Field(default_factory=WebhookConfig)
    adapters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    peers: dict[str, PeerConfig] = Field(default_factory=dict)
    schedules: dict[str, ScheduleConfig] = Field(default_factory=dict)
    # set by the gateway, never by a file (from_mapping refuses them as unknown keys):
    #: the embedded default: start the simulated legacy systems
    simulators: bool = False
    #: the file the configuration came from (named in every error)
    source: str = "<embedded default>"
    #: that file's folder: relative paths are read from it
    base_dir: str = "."

    @property
    def data_dir(self) -> Path:
        p = Path(self.node.data_dir)
        return p if p.is_absolute() else Path(self.base_dir) / p

    def metrics_token(self) -> str | None:
        """The token /metrics asks for (``[api] metrics_token_env`` or ``_file``), or None."""
        api = self.api
        if api.metrics_token_env and api.metrics_token_file:
            raise ConfigError(f"{self.source}: api: metrics_token_env and metrics_token_file are both set; "
                              f"expected one of them")
        try:
            token = read_secret(api.model_dump(), "metrics_token", Path(self.base_dir))
        except ValueError as exc:
            raise ConfigError(f"{self.source}: api.{exc}") from None
        if token is None:
            return None
        if api.metrics_token_env:
            key, where = "api.metrics_token_env", f"environment variable {api.metrics_token_env}"
            token = token.strip()
            if not token:
                raise ConfigError(f"{self.source}: {key}: {where} is not set")
        else:
            key = "api.metrics_token_file"
            where = str(Path(self.base_dir) / str(api.metrics_token_file))
            if not token:
                raise ConfigError(f"{self.source}: {key}: {where} is empty; expected the token")
        if not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(f"{self.source}: {key}: the token in {where} must be printable ASCII without "
                              f"spaces (it travels in an HTTP header), e.g. from: openssl rand -hex 32")
        return token

    def database_url(self) -> str:
        if self.database.url_env:
            url = os.environ.get(self.database.url_env)
            if not url:
                raise ConfigError(
                    f"{self.source}: database.url_env: environment variable "
                    f"{self.database.url_env} is not set"
                )
            return self._with_driver(url, f"database.url_env ({self.database.url_env})")
        if self.database.url:
            scheme, sep, rest = self.database.url.partition("://")
            if sep and ":" in rest.partition("/")[0].rpartition("@")[0]:  # user:password@host
                raise ConfigError(f"{self.source}: database.url: holds a password; secrets are not allowed in the "
                                  f"file: put the whole URL in an environment variable named by database.url_env, "
                                  f"or use a password file (~/.pgpass) or peer authentication")
            return self._in_base_dir(self._with_driver(self.database.url, "database.url"))
        return f"sqlite:///{self.data_dir / 'gateway.db'}"

    def _in_base_dir(self, url: str) -> str:
        """A SQLite URL with a relative path (``sqlite:///rel.db``) made absolute against the
        configuration file's folder, as every relative path in the file is; else ``url``."""
        scheme, _, rest = url.partition("://")
        if not scheme.startswith("sqlite") or not rest.startswith("/"):
            return url
        path, q, query = rest[1:].partition("?")
        if not path or path.startswith("/") or path == ":memory:" or path.startswith("file:"):
            return url
        return f"{scheme}:///{Path(self.base_dir) / path}{q}{query}"

    def _with_driver(self, url: str, key: str) -> str:
        """PostgreSQL through psycopg 3, the driver the gateway ships with and whose pipeline
        the accept path uses: ``postgresql://`` and ``postgres://`` mean it (SQLAlchemy alone
        would pick psycopg2); another driver is refused here, not at the first accept."""
        scheme, sep, rest = url.partition("://")
        base, _, driver = scheme.partition("+")
        if not sep or base not in ("postgresql", "postgres", "sqlite"):
            raise ConfigError(f"{self.source}: {key}: {scheme + sep if sep else url!r} is not a supported database; "
                              f"expected postgresql://user@host/db or sqlite:///path/to/gateway.db")
        if base == "sqlite":
            return url
        if driver in ("", "psycopg"):
            return f"postgresql+psycopg://{rest}"
        raise ConfigError(f"{self.source}: {key}: the PostgreSQL driver {driver!r} is not supported; expected "
                          f"postgresql+psycopg://user@host/db (or postgresql://user@host/db)")

    def retry_for(self, kind: str, target: str) -> RetryPolicy:
        """The retry policy of an outbox row: ``[adapters.NAME.retry]`` or ``[peers.X.retry]``
        over ``[worker.retry]`` (a key either leaves out is ``[worker.retry]``'s), or
        ``[webhooks.retry]`` for webhooks."""
        if kind == "webhook":
            return self.webhooks.retry
        base = self.worker.retry
        if target in self.peers and kind in ("forward", "status", "recall"):
            own = self.peers[target].retry
            return base if own is None else base.model_copy(update=own.model_dump(include=own.model_fields_set))
        raw = self.adapters.get(target, {}).get("retry")
        return base if not raw else RetryPolicy.model_validate({**base.model_dump(), **raw})

    def check_references(self) -> None:
        """What the models alone cannot check: names, references between sections, URLs,
        pinned keys, the data folder. Raises ConfigError naming the file and the key."""
        src = self.source
        problem = _data_dir_problem(self.data_dir)
        if problem:
            raise ConfigError(f"{src}: node.data_dir: {problem}; expected a folder this user can create "
                              f"and write (the node's database, blobs and key live there)")
        if self.database.url and self.database.url_env:
            raise ConfigError(f"{src}: database: url and url_env are both set; expected one of them")
        if self.database.url:  # the URL in the file is checked now (a url_env may be set only for the service)
            self.database_url()
        for name in self.adapters:
            if not ADAPTER_NAME.fullmatch(name):
                raise ConfigError(f"{src}: adapters.{_name(name)}: {name!r} is not an adapter name; "
                                  f"{ADAPTER_NAME_EXPECTED}")
        for name in self.peers:
            if not NODE_ID.fullmatch(name):
                raise ConfigError(f"{src}: peers.{_name(name)}: {name!r} is not a node id; {NODE_ID_EXPECTED}")
            if name in self.adapters:
                raise ConfigError(f"{src}: peers.{name}: also the name of [adapters.{name}]; expected a name "
                                  f"each (routes, the outbox and metrics tell adapters and peers apart by it)")
        for i, r in enumerate(self.routes):
            where = f"{self.source}: routes[{i}]"
            if (r.adapter is None) == (r.node is None):
                raise ConfigError(f"{where}: expected exactly one of adapter = \"…\" or node = \"…\"")
            if r.node and r.node not in self.peers and not self.federation.parent:
                raise ConfigError(f"{where}.node: {r.node!r} is not one of [peers] "
                                  f"({', '.join(sorted(self.peers)) or 'none configured'}) and there is no "
                                  f"[federation] parent to relay through")
            if r.node and r.node == self.node.id:
                raise ConfigError(f"{where}.node: {r.node!r} is this node itself; route its units to an adapter")
            if r.adapter and r.adapter not in self.adapters:
                raise ConfigError(
                    f"{where}.adapter: {r.adapter!r} is not defined; expected one of "
                    f"{', '.join(sorted(self.adapters)) or '(no adapters configured)'}"
                )
        fed = self.federation
        for key, peer in (("federation.parent", fed.parent), ("federation.directory_from", fed.directory_from)):
            if peer is not None and peer not in self.peers:
                raise ConfigError(f"{self.source}: {key}: {peer!r} is not one of [peers] "
                                  f"({', '.join(sorted(self.peers)) or 'none configured'})")
        for name, p in self.peers.items():
            if name == self.node.id:
                raise ConfigError(f"{self.source}: peers.{name}: a node cannot be its own peer")
            if not p.public_key and not p.public_key_file:
                raise ConfigError(f"{self.source}: peers.{name}.public_key: missing; expected the peer's "
                                  f"pinned public key (ed25519:<base64>, sm2:<base64> or PEM) or public_key_file")
            if p.link in ("http", "batch") and not p.url:
                raise ConfigError(f"{self.source}: peers.{name}.url: missing; a {p.link} link needs the "
                                  f"peer's base URL, e.g. http://10.1.2.3:8080")
            if p.link == "ferry" and not (p.ferry_out or p.ferry_in):
                raise ConfigError(f"{self.source}: peers.{name}: a ferry link needs ferry_out and/or ferry_in "
                                  f"(a folder, or an SFTP table with host, username, private_key_file, "
                                  f"host_key and path)")
            if p.public_key and p.public_key_file:
                raise ConfigError(f"{self.source}: peers.{name}: public_key and public_key_file are both set; "
                                  f"expected one of them")
            if p.ferry_out is not None and p.ferry_out == p.ferry_in:
                raise ConfigError(f"{self.source}: peers.{name}.ferry_in: the same folder as ferry_out; files "
                                  f"going out and coming in need a folder each")
            for key, loc in (("ferry_out", p.ferry_out), ("ferry_in", p.ferry_in)):
                if isinstance(loc, FerrySftpConfig) and not (loc.host_key or loc.known_hosts_file):
                    raise ConfigError(f"{self.source}: peers.{name}.{key}.host_key: missing; the SFTP server's "
                                      f"host key must be pinned with host_key = \"ssh-ed25519 AAAA...\" or "
                                      f"known_hosts_file")
                if isinstance(loc, str) and not loc.strip():
                    raise ConfigError(f"{self.source}: peers.{name}.{key}: empty; expected a folder")
                if isinstance(loc, FerrySftpConfig) and loc.passphrase_env and loc.passphrase_file:
                    raise ConfigError(f"{self.source}: peers.{name}.{key}: passphrase_env and passphrase_file are "
                                      f"both set; expected one of them")
        urls = [(f"adapters.{n}.{k}", a.get(k)) for n, a in self.adapters.items() for k in ("address", "wsdl")]
        urls += [(f"peers.{n}.url", p.url) for n, p in self.peers.items()]
        for key, url in urls:
            if isinstance(url, str) and "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
                raise ConfigError(f"{self.source}: {key}: holds a user name or password (user:password@host); "
                                  f"secrets are not allowed in the file, and a URL is written into logs and "
                                  f"errors: give credentials through the adapter's username and password_env")
            if not isinstance(url, str) or not url:
                continue
            scheme = url.partition("://")[0].lower() if "://" in url else ""
            if key.endswith(".url") or scheme in ("http", "https"):  # a peer's, or an adapter's http(s) address or WSDL
                problem = url_problem(url)
                if problem:
                    raise ConfigError(f"{self.source}: {key}: {url!r} {problem}; {URL_EXPECTED}")
            elif key.endswith(".wsdl") and scheme and scheme != "file":
                raise ConfigError(f"{self.source}: {key}: {url!r} is not a URL the gateway can fetch; expected "
                                  f"an http://, https:// or file:// URL or the path of a local file")
        from gateway.federation import keys  # it imports this module

        for name, p in self.peers.items():
            keys.peer_key(self, name, p)  # the pinned key parses, from the file too
        for name, a in self.adapters.items():
            if "type" not in a:
                raise ConfigError(f"{self.source}: adapters.{name}.type: missing; expected soap, sftp or xml-exchange")
            if "retry" in a:
                if not isinstance(a["retry"], dict):
                    raise ConfigError(f"{self.source}: adapters.{name}.retry: expected a table "
                                      f"(max_attempts, base_delay, max_delay)")
                try:
                    self.retry_for("deliver", name)
                except ValidationError as exc:
                    raise ConfigError(_format(exc, f"{self.source}: adapters.{name}.retry", sep=".",
                                              model=RetryPolicy)) from None
            for key in a:
                if key in ("password", "passphrase", "secret", "token", "private_key"):
                    raise ConfigError(
                        f"{self.source}: adapters.{name}.{key}: secrets are not allowed in the "
                        f"file; use {key}_env (an environment variable) or {key}_file"
                    )
                if key.endswith("_env") and f"{key[:-4]}_file" in a:
                    raise ConfigError(f"{self.source}: adapters.{name}: {key} and {key[:-4]}_file are both set; "
                                      f"expected one of them")
            bad = _non_finite(a, f"adapters.{_name(name)}")
            if bad:
                raise ConfigError(f"{self.source}: {bad[0]}: {bad[1]!r} is not a finite number; expected a "
                                  f"number of seconds, bytes or items")


def _non_finite(value: Any, key: str) -> tuple[str, float] | None:
    """The first inf or nan in an adapter's table (TOML has both; 1e400 is inf too), and its key."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{_name(str(k))}")
        if found:
            return found
    return None


def _model_of(tp: Any, part: object = None) -> type[BaseModel] | None:
    """The model class an annotation stands for (``X``, ``X | None``, ``str | X``), or the
    member named ``part`` of a union (pydantic names a union member in an error's place)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        models = [m for m in typing.get_args(tp) if isinstance(m, type) and issubclass(m, BaseModel)]
        named = [m for m in models if m.__name__ == part]
        return named[0] if named else models[0] if models else None
    return None


def _keys_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys the table at ``loc`` (below ``root``) takes, or None if that is not a model."""
    tp: Any = root
    for part in loc:
        model = _model_of(tp, part)
        if model is not None and part == model.__name__ and model is not tp:
            tp = model  # a union member's name
        elif model is not None and part in model.model_fields:
            tp = model.model_fields[str(part)].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return None
    model = _model_of(tp)
    if model is None:
        return None
    return [k for k in model.model_fields if not (model is Config and k in _INTERNAL)]


_NUMBER_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"})


def _format(exc: ValidationError, source: str, sep: str = ": ", model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(_name(p) if isinstance(p, str) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            expected = _keys_at(model or Config, err["loc"][:-1])
            if expected:
                msg += f" (unknown key; expected one of {', '.join(expected)})"
        elif err["type"] in ("model_type", "model_attributes_type"):
            msg = "expected a table"
        elif err["type"] in _NUMBER_ERRORS and isinstance(err.get("input"), (int, float)):
            msg += f" (got {err['input']!r})"
        lines.append(f"{source}{sep}{loc}: {msg}")
    return "\n".join(lines)


def load(path: str | Path | None) -> Config:
    """Load and validate a node configuration; ``None`` gives the embedded default."""
    if path is None:
        return embedded_default()
    if isinstance(path, str) and not path.strip():
        raise ConfigError("the configuration file's path is empty (is $GATEWAY_CONFIG set to an empty value?); "
                          "expected the path of a TOML file")
    p = Path(path)
    try:
        with p.open("rb") as f:  # at most one byte more than a configuration file may have (not /dev/zero)
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except OSError as exc:  # a folder, unreadable, a path through a file …
        raise ConfigError(f"{p}: cannot read the configuration file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than 1 MiB; expected a configuration file (TOML), which is far smaller")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte order mark, as Windows editors write
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}); a configuration file is TOML in UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_mapping(raw, source=str(p), base_dir=str(p.resolve().parent))


def from_mapping(raw: dict[str, Any], source: str = "<config>", base_dir: str = ".") -> Config:
    """Validate a configuration read from ``source``; relative paths are read from ``base_dir``."""
    top = ", ".join(k for k in Config.model_fields if k not in _INTERNAL)
    errors = [f"{source}: {k}: Extra inputs are not permitted (unknown key; expected one of {top})"
              for k in raw if k in _INTERNAL]
    try:
        cfg = Config.model_validate({**{k: v for k, v in raw.items() if k not in _INTERNAL},
                                     "source": source, "base_dir": base_dir})
    except ValidationError as exc:
        errors.append(_format(exc, source))
    if errors:
        raise ConfigError("\n".join(errors))
    cfg.check_references()
    return cfg


def embedded_default(base_dir: str = ".") -> Config:
    """SQLite in ./var, simulated legacy systems; adapter addresses are filled in when the
    simulators have started (``gateway.embedded``)."""
    return Config(simulators=True, base_dir=base_dir, node=NodeConfig(id="prefecture", name="州人民政府办公室",
                  units=["11522300GDR9YB9550"]))
