"""SFTP drop adapter (县级值班与公文交换目录): legacy contract ``shared/legacy/README.md`` §2.

Per unit the server has ``inbox/`` (files for the legacy system) and ``outbox/`` (files it
produces), XML in GB18030. A writer uploads ``NAME.xml.part``, renames it to ``NAME.xml`` and
then creates the empty done file ``NAME.xml.ok``; a reader takes only files whose ``.ok``
exists and afterwards moves both to ``archive/`` (or to ``failed/`` beside ``NAME.xml.error``).

* :meth:`SftpAdapter.deliver` writes ``GW_<remote_ref>.xml`` (the ``archive`` format of
  :mod:`adapters.archive`) into the recipient's inbox. Idempotent: if the final name already
  exists (in the inbox, or already taken into ``archive/`` / ``failed/``) it is delivered.
  A transfer cut halfway leaves at most ``.part``, never a partial file under the final name.
* :meth:`SftpAdapter.poll` collects receipts (回执) ``HZ_<docid>_<unit>.xml`` and, when
  ``duty_report_to`` is set, duty reports (值班报告) ``ZB_<unit>_<yyyymmddHHMMSS>.xml`` from
  the configured units' outboxes. Keys are ``<adapter>:<outbox path>/<file>:<sha256>``, so
  they are stable across restarts. ``ack`` moves to ``archive/``, ``reject`` to ``failed/``,
  the file only if it still holds what was read (a new receipt under the name waits for the
  next poll).
* The server's host key is pinned (``host_key`` or ``known_hosts_file``); any other key is
  refused as a security event (:class:`HostKeyMismatch`, a :class:`PermanentError`).

Configuration (``[adapters.NAME]``, Camel-like names)::

    type = "sftp"
    host = "drop.county.example"
    port = 22
    username = "gateway"
    private_key_file = "keys/drop_ed25519"   # key auth only; passphrase_env / passphrase_file
    host_key = "ssh-ed25519 AAAA..."         # or a list, or known_hosts_file = "keys/known_hosts"
    root = "."                               # remote base folder; the templates are below it
    inbox = "{unit}/inbox"
    outbox = "{unit}/outbox"
    move = "{unit}/archive"                  # where ack() moves a collected file
    move_failed = "{unit}/failed"            # where reject() moves it, beside NAME.error
    units = ["1152230107CTPD8U2P"]           # whose outbox is polled
    done_file = true                         # create NAME.ok after the rename
    read_lock = "done-file"                  # or "stable-size" with stable_seconds = 5
    max_per_poll = 100
    max_file_size = 16777216                 # larger outbox files go to failed/
    connect_timeout = 10                     # seconds, TCP connect + SSH handshake
    so_timeout = 60                          # seconds a stalled server may keep a call waiting
    server_alive_interval = 30               # SSH keepalive; 0 = off
    duty_report_to = "11522300QNNHM83X1E"    # optional: ingest ZB_ duty reports for this unit
    appids = { "1152230107CTPD8U2P" = "JXF-OA" }   # optional, for the archive format
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import posixpath
import re
import socket
import stat
import string
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import paramiko
from lxml import etree

from adapters import archive
from adapters.base import (
    Adapter,
    AdapterContext,
    ConfigError,
    Delivery,
    DeliveryError,
    DeliveryResult,
    Health,
    PermanentError,
    PolledItem,
    RetryableError,
    register,
)
from gateway import xmlsafe
from gateway.envelope import Envelope, Recipient
from gateway.units import uscc_problem

log = logging.getLogger(__name__)

LEGACY_NS = "urn:egov:gateway:legacy:v1"

# Names are built into remote paths, so only these shapes are ever used. No "_" in a unit or
# "." in a ref, so HZ_/ZB_ names split unambiguously and ".." can never appear.
_UNIT = r"[0-9A-Za-z]{1,32}"
_REF = r"[0-9A-Za-z][0-9A-Za-z-]{0,63}"
UNIT_RE = re.compile(_UNIT)
REF_RE = re.compile(_REF)
RECEIPT_NAME_RE = re.compile(rf"HZ_(?P<ref>{_REF})_(?P<unit>{_UNIT})\.xml")
DUTY_NAME_RE = re.compile(rf"ZB_(?P<unit>{_UNIT})_(?P<ts>\d{{14}})\.xml")
#: the legacy reader's note beside a document of ours it moved to failed/
REFUSED_NOTE_RE = re.compile(rf"GW_(?P<ref>{_REF})\.xml\.error")

DONE_SUFFIX = ".ok"
PART_SUFFIX = ".part"
ERROR_SUFFIX = ".error"

# Our receive window: paramiko's 2 MiB default is enough on a LAN, 8 MiB keeps a download
# streaming over a higher-latency county link. The server controls the upload window.
WINDOW_SIZE = 8 * 1024 * 1024
MAX_PACKET_SIZE = 32 * 1024
# AEAD ciphers first: measured ~1.4x the throughput of aes-ctr + hmac-sha2 in paramiko.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# Which signature algorithms a pinned key of a given type may be presented with.
_KEY_ALGS = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}
_IDLE_CLIENTS = 2  # SFTP channels kept open on the one transport for reuse

_NS_KEYS = uuid.UUID("1f0d2c4e-7b0a-5e61-8d3c-5a9e0b7c2f41")


KNOWN_KEYS = frozenset(
    ["type", "host", "port", "username", "private_key_file", "passphrase_env", "passphrase_file", "host_key", "known_hosts_file", "root", "inbox", "outbox", "move", "move_failed", "units", "done_file", "read_lock", "stable_seconds", "max_per_poll", "max_file_size", "connect_timeout", "so_timeout", "server_alive_interval", "duty_report_to", "appids"]
)


class HostKeyMismatch(PermanentError):
    """The server presented a host key that is not the pinned one (or none is pinned for
    it). A security event: never retried, never accepted automatically."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style ``SHA256:...`` fingerprint with the key type, as ``ssh-keygen -l`` shows."""
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return f"{key.get_name()} SHA256:{digest}"


def parse_public_key(line: str) -> paramiko.PKey:
    """``"ssh-ed25519 AAAA... [comment]"`` (a known_hosts line with or without the host
    field) -> a public key. Raises ValueError."""
    tokens = line.split()
    if len(tokens) >= 3 and not tokens[0].startswith(("ssh-", "ecdsa-", "sk-")):
        tokens = tokens[1:]  # known_hosts line: drop the host names
    if len(tokens) < 2:
        raise ValueError("expected '<key type> <base64 key>'")
    try:
        blob = base64.b64decode(tokens[1], validate=True)
        return paramiko.PKey.from_type_string(tokens[0], blob)
    except (binascii.Error, paramiko.SSHException, ValueError) as exc:
        raise ValueError(f"not a {tokens[0]} public key: {exc}") from None


def _safe_component(name: str) -> bool:
    """A single, harmless path component: a name from a listing is never trusted further."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and ".." not in name
    )


@dataclass(frozen=True)
class SftpSettings:
    """Validated configuration (see the module docstring)."""

    host: str
    port: int
    username: str
    private_key_file: Path
    host_keys: tuple[paramiko.PKey, ...]
    known_hosts_file: Path | None
    root: str
    inbox: str
    outbox: str
    move: str
    move_failed: str
    units: tuple[str, ...]
    done_file: bool
    read_lock: str
    stable_seconds: float
    max_per_poll: int
    max_file_size: int
    connect_timeout: float
    so_timeout: float
    server_alive_interval: int
    duty_report_to: str | None
    appids: Mapping[str, str]


@register("sftp")
class SftpAdapter(Adapter):
    """The SFTP drop (see the module docstring). Thread-safe: one SSH transport is shared by
    all callers; each operation takes its own SFTP channel on it."""

    subsystems = frozenset({"documents"})  # the legacy contract carries official documents only

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        super().__init__(name, config, context)
        self.settings = self._read_settings()
        self._pkey = self._load_private_key()
        self._lock = threading.Lock()
        self._transport: paramiko.Transport | None = None
        self._idle: list[paramiko.SFTPClient] = []
        #: How many SSH connections this adapter has opened (diagnostics, tests).
        self.connections_opened = 0
        # stable-size read lock: (unit, name) -> (size, mtime, first seen with them)
        self._observed: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._unit_turn = 0

    # -- configuration -------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return f"adapters.{self.name}.{key}"

    def _opt(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if key not in self.config:
            return default
        val = self.config[key]
        # bool is an int in Python; a port of `true` is still wrong.
        if not isinstance(val, kind) or (isinstance(val, bool) and bool not in _as_tuple(kind)):
            names = " or ".join(k.__name__ for k in _as_tuple(kind))
            raise ConfigError(f"{self._key(key)}: expected {names}, got {type(val).__name__}")
        return val

    def _path_template(self, key: str, default: str) -> str:
        tmpl = self._opt(key, str, default)
        fields = {f for _, f, _, _ in string.Formatter().parse(tmpl) if f is not None}
        if fields != {"unit"}:
            raise ConfigError(
                f"{self._key(key)}: {tmpl!r} must contain {{unit}} and no other placeholder"
            )
        sample = tmpl.format(unit="U")
        if sample.startswith("/") or "\x00" in sample or ".." in sample.split("/"):
            raise ConfigError(
                f"{self._key(key)}: {tmpl!r} must be a relative path below root without '..'"
            )
        return tmpl

    def _unit_code(self, key: str, value: object) -> str:
        problem = uscc_problem(value)
        if problem:
            raise ConfigError(f"{self._key(key)}: {value!r}: {problem}")
        return str(value)

    def _read_settings(self) -> SftpSettings:
        unknown = sorted(set(self.config) - KNOWN_KEYS)
        if unknown:  # a misspelt read_lock must not silently become the default
            raise ConfigError(
                f"{self._key(unknown[0])}: unknown setting; expected one of "
                f"{', '.join(sorted(KNOWN_KEYS))}"
            )
        host = self.require("host")
        if not host.strip():
            raise ConfigError(f"{self._key('host')}: must not be empty")
        port = self._opt("port", int, 22)
        if not 0 < port < 65536:
            raise ConfigError(f"{self._key('port')}: {port} is not a TCP port")
        username = self.require("username")
        key_file = self._file(self.require("private_key_file"), "private_key_file")

        host_keys: list[paramiko.PKey] = []
        raw = self._opt("host_key", (str, list), None)
        for i, line in enumerate([raw] if isinstance(raw, str) else raw or []):
            try:
                host_keys.append(parse_public_key(str(line)))
            except ValueError as exc:
                raise ConfigError(f"{self._key('host_key')}[{i}]: {exc}") from None
        known_hosts = self._opt("known_hosts_file", str, None)
        known_hosts_path = self._file(known_hosts, "known_hosts_file") if known_hosts else None
        if known_hosts_path is not None:  # read now: a file that cannot be would refuse every connection
            try:
                paramiko.HostKeys(str(known_hosts_path))
            except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError) as exc:
                raise ConfigError(f"{self._key('known_hosts_file')}: {known_hosts_path} is not a known_hosts "
                                  f"file OpenSSH writes ({type(exc).__name__}: {exc})") from None
        if not host_keys and known_hosts_path is None:
            raise ConfigError(
                f"{self._key('host_key')}: missing; the server's host key must be pinned with "
                'host_key = "ssh-ed25519 AAAA..." or known_hosts_file'
            )

        root = self._opt("root", str, ".") or "."
        if "\x00" in root or ".." in root.split("/"):
            raise ConfigError(f"{self._key('root')}: {root!r} must not contain '..' or NUL")
        units = self._opt("units", list, [])
        units = tuple(self._unit_code(f"units[{i}]", u) for i, u in enumerate(units))
        read_lock = self._opt("read_lock", str, "done-file")
        if read_lock not in ("done-file", "stable-size"):
            raise ConfigError(
                f"{self._key('read_lock')}: {read_lock!r}; expected 'done-file' or 'stable-size'"
            )
        duty = self._opt("duty_report_to", str, None)
        appids = self._opt("appids", dict, {})

        def positive(key: str, default: float, kind: type | tuple[type, ...] = (int, float)) -> Any:
            val = self._opt(key, kind, default)
            if val <= 0:
                raise ConfigError(f"{self._key(key)}: must be positive, got {val}")
            return val

        return SftpSettings(
            host=host,
            port=port,
            username=username,
            private_key_file=key_file,
            host_keys=tuple(host_keys),
            known_hosts_file=known_hosts_path,
            root=root.rstrip("/") or "/",
            inbox=self._path_template("inbox", "{unit}/inbox"),
            outbox=self._path_template("outbox", "{unit}/outbox"),
            move=self._path_template("move", "{unit}/archive"),
            move_failed=self._path_template("move_failed", "{unit}/failed"),
            units=units,
            done_file=self._opt("done_file", bool, True),
            read_lock=read_lock,
            stable_seconds=float(self._opt("stable_seconds", (int, float), 5)),
            max_per_poll=positive("max_per_poll", 100, int),
            max_file_size=positive("max_file_size", 16 * 1024 * 1024, int),
            connect_timeout=float(positive("connect_timeout", 10)),
            so_timeout=float(positive("so_timeout", 60)),
            server_alive_interval=int(self._opt("server_alive_interval", int, 30)),
            duty_report_to=self._unit_code("duty_report_to", duty) if duty is not None else None,
            appids={str(k): str(v) for k, v in appids.items()},
        )

    def _file(self, value: str, key: str) -> Path:
        p = Path(value)
        p = p if p.is_absolute() else self.context.base_dir / p
        if not p.is_file():
            raise ConfigError(f"{self._key(key)}: {p} is not a readable file")
        return p

    def _load_private_key(self) -> paramiko.PKey:
        try:
            passphrase = self.context.secret(self.config, "passphrase")
        except ConfigError as exc:
            raise ConfigError(f"adapters.{self.name}.{exc}") from None
        key = self._key("private_key_file")
        # Bytes: from_path hands the passphrase to cryptography, which refuses str. Positional:
        # the keyword is `passphrase` in paramiko 3/4 and `password` in 5.
        secret = passphrase.encode("utf-8") if passphrase is not None else None
        try:
            return paramiko.PKey.from_path(self.settings.private_key_file, secret)
        except (paramiko.PasswordRequiredException, TypeError) as exc:
            # paramiko 3 raises PasswordRequiredException, 5 lets cryptography's TypeError out
            if secret is None:
                raise ConfigError(
                    f"{key}: the key is encrypted; set passphrase_env or passphrase_file"
                ) from None
            raise ConfigError(f"{key}: cannot load the key: {exc}") from None
        except (paramiko.SSHException, paramiko.UnknownKeyType, OSError, ValueError) as exc:
            raise ConfigError(f"{key}: cannot load the key (wrong passphrase?): {exc}") from None

    # -- paths ---------------------------------------------------------------------------
    def _dir(self, template: str, unit: str) -> str:
        return posixpath.join(self.settings.root, template.format(unit=unit))

    @property
    def _where(self) -> str:
        s = self.settings
        return f"sftp://{s.username}@{s.host}:{s.port}/{s.root.lstrip('/')}"

    # -- connection ----------------------------------------------------------------------
    def _pinned_keys(self) -> list[paramiko.PKey]:
        s = self.settings
        keys = list(s.host_keys)
        if s.known_hosts_file is not None:
            try:
                known = paramiko.HostKeys(str(s.known_hosts_file))
            except (OSError, paramiko.SSHException, paramiko.hostkeys.InvalidHostKey) as exc:
                raise PermanentError(
                    f"{self._key('known_hosts_file')}: cannot read: {exc}"
                ) from None
            lookup = s.host if s.port == 22 else f"[{s.host}]:{s.port}"
            entry = known.lookup(lookup)
            if entry:
                keys.extend(entry.values())
        return keys

    def _connect(self) -> paramiko.Transport:
        """Open, verify and authenticate one SSH connection (called with ``_lock`` held)."""
        s = self.settings
        pinned = self._pinned_keys()
        if not pinned:
            raise HostKeyMismatch(
                f"{self._where}: no host key is pinned for {s.host}:{s.port} "
                f"in {s.known_hosts_file}; refusing to connect to an unknown server",
                code="host-key-unknown",
            )
        try:
            sock = socket.create_connection((s.host, s.port), timeout=s.connect_timeout)
        except OSError as exc:
            raise RetryableError(f"{self._where}: cannot connect: {exc}", code="connect") from exc
        # paramiko leaves Nagle on; with it every SFTP read >= 256 KB stalls ~40 ms on the
        # delayed-ACK interplay. Keepalive lets the kernel notice a dead peer on idle links.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        transport = paramiko.Transport(
            sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
        )
        try:
            opts = transport.get_security_options()
            # Ask only for the pinned key types, so the server presents the key we can check.
            algs: list[str] = []
            for k in pinned:
                for alg in _KEY_ALGS.get(k.get_name(), (k.get_name(),)):
                    if alg not in algs and alg in opts.key_types:
                        algs.append(alg)
            opts.key_types = tuple(algs) or opts.key_types
            opts.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in opts.ciphers) + tuple(
                c for c in opts.ciphers if c not in PREFERRED_CIPHERS
            )
            transport.banner_timeout = s.connect_timeout
            transport.handshake_timeout = s.connect_timeout
            transport.auth_timeout = s.connect_timeout
            try:
                transport.start_client(timeout=s.connect_timeout)
            except paramiko.IncompatiblePeer as exc:
                raise HostKeyMismatch(
                    f"{self._where}: the server offers no host key of the pinned type(s) "
                    f"({', '.join(fingerprint(k) for k in pinned)}): {exc}",
                    code="host-key-mismatch",
                ) from None
            presented = transport.get_remote_server_key()
            if not any(presented.asbytes() == k.asbytes() for k in pinned):
                log.error(
                    "sftp %s: host key mismatch (presented %s)", self.name, fingerprint(presented)
                )
                raise HostKeyMismatch(
                    f"{self._where}: HOST KEY MISMATCH, refusing to connect: the server presented "
                    f"{fingerprint(presented)}, but the pinned key is "
                    f"{' or '.join(fingerprint(k) for k in pinned)}",
                    code="host-key-mismatch",
                )
            try:
                transport.auth_publickey(s.username, self._pkey)
            except paramiko.AuthenticationException as exc:
                # An administrator can fix this without touching the message: retryable.
                raise RetryableError(
                    f"{self._where}: the server refused key authentication for {s.username}: {exc}",
                    code="auth-failed",
                ) from None
            if s.server_alive_interval > 0:
                transport.set_keepalive(s.server_alive_interval)
        except DeliveryError:
            transport.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as exc:
            transport.close()
            raise RetryableError(
                f"{self._where}: SSH handshake failed: {exc}", code="connect"
            ) from exc
        self.connections_opened += 1
        return transport

    def _open_client(self, transport: paramiko.Transport) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(transport)
        if client is None:
            raise paramiko.SSHException("the server refused the sftp subsystem")
        # A server that stops answering must not hang a worker: bounded waits on the channel.
        client.get_channel().settimeout(self.settings.so_timeout)
        return client

    def _checkout(self) -> paramiko.SFTPClient:
        with self._lock:
            transport = self._transport
            if transport is None or not transport.is_active():
                if transport is not None:
                    transport.close()
                self._transport = transport = None
                self._idle.clear()
                self._transport = transport = self._connect()
            while self._idle:
                client = self._idle.pop()
                if not client.get_channel().closed:
                    return client
        try:
            return self._open_client(transport)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if isinstance(exc, paramiko.ChannelException) and transport.is_active():
                # The connection is fine, the server just refused one more channel (its
                # MaxSessions): keep the transport for the other callers. Anything else
                # means the transport is broken, even if its reader thread has not noticed.
                raise RetryableError(
                    f"{self._where}: the server refused an SFTP channel: {_describe(exc)}",
                    code="channel",
                ) from exc
            # A transport idle since before a server restart can look alive until used:
            # reconnect once, then leave it to the caller's retry policy.
            with self._lock:
                if self._transport is transport and transport is not None:
                    transport.close()
                    self._transport = None
                    self._idle.clear()
                if self._transport is None:
                    self._transport = self._connect()
                transport = self._transport
            return self._open_client(transport)

    def _checkin(self, client: paramiko.SFTPClient, error: BaseException | None) -> None:
        with self._lock:
            transport = client.get_channel().get_transport()
            if error is None and transport is self._transport and len(self._idle) < _IDLE_CLIENTS:
                self._idle.append(client)
                return
            broken = (
                transport is self._transport
                and transport is not None
                and (not transport.is_active() or _breaks_connection(error))
            )
        _close_quietly(client)
        if broken:
            self._drop_transport()

    def _drop_transport(self) -> None:
        with self._lock:
            transport, self._transport = self._transport, None
            idle, self._idle = self._idle, []
        for c in idle:
            _close_quietly(c)
        if transport is not None:
            transport.close()

    @contextmanager
    def _session(self) -> Iterator[paramiko.SFTPClient]:
        """An SFTP client on the shared transport. After any error the client is closed
        (stray pipelined responses may be pending on it) and a dead transport dropped."""
        client = self._checkout()
        try:
            yield client
        except BaseException as exc:
            self._checkin(client, exc)
            raise
        self._checkin(client, None)

    @property
    def transport(self) -> paramiko.Transport | None:
        """The current SSH transport, if connected (diagnostics, tests)."""
        return self._transport

    # -- deliver -------------------------------------------------------------------------
    def deliver(self, delivery: Delivery) -> DeliveryResult:
        """Write ``GW_<remote_ref>.xml`` into the recipient's inbox (see module docstring)."""
        unit = delivery.recipient.unit
        ref = delivery.remote_ref
        for what, value, pattern in (("unit", unit, UNIT_RE), ("remote ref", ref, REF_RE)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise PermanentError(
                    f"{what} {value!r} is not usable in an SFTP file name", code="bad-name"
                )
        name = f"GW_{ref}.xml"
        inbox = self._dir(self.settings.inbox, unit)
        final = posixpath.join(inbox, name)
        part = final + PART_SUFFIX
        step = f"looking for {final}"  # what the server refused, for the message
        try:
            with self._session() as sftp:
                if _exists(sftp, final):
                    if self.settings.done_file and not _exists(sftp, final + DONE_SUFFIX):
                        step = f"creating {final}{DONE_SUFFIX}"
                        _touch(sftp, final + DONE_SUFFIX)  # we crashed between rename and .ok
                    return DeliveryResult(remote_id=ref, detail=f"{final} already delivered")
                taken = posixpath.join(self._dir(self.settings.move, unit), name)
                if _exists(sftp, taken):
                    return DeliveryResult(
                        remote_id=ref, detail=f"already taken by the legacy system: {taken}"
                    )
                refused = posixpath.join(self._dir(self.settings.move_failed, unit), name)
                if _exists(sftp, refused):
                    raise PermanentError(
                        f"the legacy system refused {name} (it is in {refused}): "
                        f"{_read_note(sftp, refused + ERROR_SUFFIX)}", code="refused"
                    )
                if not _exists(sftp, inbox):
                    raise RetryableError(
                        f"{self._where}: inbox {inbox} does not exist", code="no-inbox"
                    )
                step = f"writing {part}"
                if _exists(sftp, part):  # what a cut-off earlier attempt left (or a planted link)
                    sftp.remove(part)  # only then: an upload-only drop may refuse every delete
                written = self._upload(sftp, delivery, part)
                size = sftp.stat(part).st_size
                if size != written:
                    raise RetryableError(
                        f"{part}: the server has {size} bytes, {written} were sent"
                    )
                step = f"renaming {part} to {name}"
                _rename_over(sftp, part, final)
                if self.settings.done_file:
                    step = f"creating {final}{DONE_SUFFIX}"
                    _touch(sftp, final + DONE_SUFFIX)
        except DeliveryError:
            raise
        except archive.ArchiveFormatError as exc:
            raise PermanentError(
                f"cannot write the archive for {delivery.delivery_id}: {exc}", code="format"
            ) from exc
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RetryableError(
                f"{self._where}: delivering {name} failed {step}: {_describe(exc)}", code="transfer"
            ) from exc
        log.info("sftp %s: delivered %s (%d bytes)", self.name, final, written)
        return DeliveryResult(remote_id=ref, detail=f"{final} ({written} bytes)")

    def _upload(self, sftp: paramiko.SFTPClient, delivery: Delivery, path: str) -> int:
        # iter_archive checks the envelope and every blob before returning, so a document
        # that can never be written fails before anything exists on the server.
        chunks = archive.iter_archive(
            delivery.envelope,
            delivery.recipient,
            self.context.blobs,
            archive_id=delivery.remote_ref,
            appids=self.settings.appids or None,
        )
        # Unbuffered (bufsize=0): each archive chunk goes straight into pipelined 32 KB
        # write requests without a copy into paramiko's write buffer; memory is one chunk.
        fh = sftp.open(path, "wb", bufsize=0)
        written = 0
        try:
            fh.set_pipelined(True)
            for chunk in chunks:
                fh.write(chunk)
                written += len(chunk)
            _confirm_writes(fh)
        except BaseException:
            fh.close()
            if sftp.get_channel().get_transport().is_active():
                try:  # e.g. a blob that changed while streaming: leave nothing behind
                    _remove_quietly(sftp, path)
                except (OSError, EOFError, paramiko.SSHException):
                    pass
            raise
        fh.close()
        return written

    # -- poll ----------------------------------------------------------------------------
    def poll(self) -> list[PolledItem]:
        """Receipts and duty reports from the configured units' outboxes, at most
        ``max_per_poll`` files per call (rejected ones count). Files that cannot be read
        as their name promises are moved to ``failed/`` at once and not returned."""
        s = self.settings
        if not s.units:
            return []
        # Start from a different unit each poll, so one busy unit cannot starve the rest.
        turn = self._unit_turn % len(s.units)
        self._unit_turn += 1
        units = s.units[turn:] + s.units[:turn]
        items: list[PolledItem] = []
        budget = s.max_per_poll
        try:
            with self._session() as sftp:
                for unit in units:
                    if budget <= 0:
                        break
                    budget -= self._poll_unit(sftp, unit, budget, items)
        except DeliveryError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise RetryableError(
                f"{self._where}: polling failed: {_describe(exc)}", code="poll"
            ) from exc
        return items

    def _poll_unit(
        self, sftp: paramiko.SFTPClient, unit: str, budget: int, items: list[PolledItem]
    ) -> int:
        """Take up to ``budget`` files from one outbox; return how many were taken."""
        folder = self._dir(self.settings.outbox, unit)
        try:
            entries = _listdir_attr(sftp, folder)
        except FileNotFoundError:
            log.warning("sftp %s: outbox %s does not exist", self.name, folder)
            return 0
        except OSError as exc:
            if _breaks_connection(exc):
                raise
            # one unit's folder the server will not list (permissions) must not stop the others
            log.error("sftp %s: cannot list outbox %s of %s: %s", self.name, folder, unit, _describe(exc))
            return 0
        names = {e.filename for e in entries}
        ready: list[paramiko.SFTPAttributes] = []
        now = time.monotonic()
        seen: set[tuple[str, str]] = set()
        for e in entries:
            name = e.filename
            if not isinstance(name, str) or not _safe_component(name):
                # Never used to build a path: a listing is data from the other side.
                log.warning("sftp %s: skipping suspicious name %r in %s", self.name, name, folder)
                continue
            if not name.endswith(".xml") or not name.startswith(self._prefixes()):
                continue  # companions (.ok/.part/.error) and files that are not ours
            if self.settings.read_lock == "done-file":
                if name + DONE_SUFFIX not in names:
                    continue
            else:
                key = (unit, name)
                seen.add(key)
                if not self._stable(key, e, now):
                    continue
            ready.append(e)
        if self.settings.read_lock == "stable-size":
            for key in [k for k in self._observed if k[0] == unit and k not in seen]:
                del self._observed[key]
        refused = self._refusals(sftp, unit, budget, items)
        budget -= refused
        ready.sort(key=lambda e: (e.st_mtime or 0, e.filename))
        taken = 0
        for e in ready[:budget]:
            taken += 1
            try:
                item = self._take(sftp, unit, folder, e)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if sftp.get_channel().closed or not sftp.get_channel().get_transport().is_active():
                    raise  # the connection is gone: the whole poll is retried
                # One unreadable file (permissions, vanished) must not block the others.
                log.warning(
                    "sftp %s: cannot read %s/%s: %s", self.name, folder, e.filename, _describe(exc)
                )
                continue
            if item is not None:
                items.append(item)
        return taken + refused

    def _refusals(self, sftp: paramiko.SFTPClient, unit: str, budget: int, items: list[PolledItem]) -> int:
        """The legacy reader moves a document it cannot take to ``failed/`` beside a
        ``GW_<ref>.xml.error`` note: each such note becomes a REFUSED receipt, so the copy
        fails with the note as its reason instead of staying "delivered". The files stay
        where the legacy side put them (its folder); the key, made of the note's content, is
        what keeps a note from being taken twice."""
        folder = self._dir(self.settings.move_failed, unit)
        try:
            entries = _listdir_attr(sftp, folder)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if _breaks_connection(exc):
                raise
            log.error("sftp %s: cannot list %s of %s: %s", self.name, folder, unit, _describe(exc))
            return 0
        mark_key = f"refused-mtime:{unit}"
        mark = archive.refusal_mark(self.context.state, mark_key)
        taken = 0
        for e in sorted(entries, key=lambda e: (e.st_mtime or 0, e.filename)):
            m = REFUSED_NOTE_RE.fullmatch(e.filename) if isinstance(e.filename, str) else None
            if m is None or taken >= budget or not stat.S_ISREG(e.st_mode or 0) or (e.st_mtime or 0) < mark:
                continue
            taken += 1
            try:
                note = _read_file(sftp, posixpath.join(folder, e.filename), 64 * 1024, int(e.st_size or 0))
            except (OSError, EOFError, paramiko.SSHException) as exc:
                log.warning("sftp %s: cannot read %s/%s: %s", self.name, folder, e.filename, _describe(exc))
                continue
            rel = posixpath.join(self.settings.move_failed.format(unit=unit), e.filename)
            items.append(archive.refusal_item(
                self.context.state, mark_key, ref=m["ref"], unit=unit, note=note, mtime=e.st_mtime or 0,
                key=f"{self.name}:{rel}:{hashlib.sha256(note).hexdigest()}", source=f"{self._where}/{rel}"))
        return taken

    def _prefixes(self) -> tuple[str, ...]:
        return ("HZ_", "ZB_") if self.settings.duty_report_to else ("HZ_",)

    def _stable(self, key: tuple[str, str], e: paramiko.SFTPAttributes, now: float) -> bool:
        """stable-size read lock: same size and mtime as seen at least stable_seconds ago."""
        sig = (int(e.st_size or 0), int(e.st_mtime or 0))
        prev = self._observed.get(key)
        if prev is None or prev[:2] != sig:
            self._observed[key] = (*sig, now)
            return False
        return now - prev[2] >= self.settings.stable_seconds

    def _take(
        self, sftp: paramiko.SFTPClient, unit: str, folder: str, e: paramiko.SFTPAttributes
    ) -> PolledItem | None:
        name = e.filename
        path = posixpath.join(folder, name)
        if not stat.S_ISREG(e.st_mode or 0):
            # lstat attributes: a symlink is never followed, it may point anywhere.
            self._reject_now(
                sftp, unit, name, "not a regular file (a symlink or folder is never followed)"
            )
            return None
        if (e.st_size or 0) > self.settings.max_file_size:
            self._reject_now(
                sftp,
                unit,
                name,
                f"{e.st_size} bytes; at most {self.settings.max_file_size} are accepted",
            )
            return None
        data = _read_file(sftp, path, self.settings.max_file_size, int(e.st_size or 0))
        digest = hashlib.sha256(data).hexdigest()
        rel = posixpath.join(self.settings.outbox.format(unit=unit), name)
        key = f"{self.name}:{rel}:{digest}"
        try:
            item = self._interpret(unit, name, data, key)
        except (archive.ArchiveFormatError, xmlsafe.UnsafeXMLError, ValueError) as exc:
            self._reject_now(sftp, unit, name, f"{name}: {exc}")
            return None
        # only the file as read: another instance may have taken it meanwhile, and the legacy
        # side then writes its next receipt under the same name (an ARRIVE, then a SIGN)
        item._ack = partial(self._finish, unit, name, False, None, expect=digest)
        item._reject = partial(self._finish, unit, name, True, expect=digest)
        return item

    def _interpret(self, unit: str, name: str, data: bytes, key: str) -> PolledItem:
        source = f"{self._where}/{self.settings.outbox.format(unit=unit)}/{name}"
        m = RECEIPT_NAME_RE.fullmatch(name)
        if m:
            receipt = archive.parse_receipt(data)
            if receipt.remote_ref != m["ref"]:
                raise ValueError(
                    f"the name says document {m['ref']} but the receipt is for {receipt.remote_ref}"
                )
            if receipt.unit != m["unit"]:
                raise ValueError(
                    f"the name says unit {m['unit']} but the receipt is from {receipt.unit}"
                )
            if receipt.unit != unit:  # one unit's outbox never speaks for another unit
                raise ValueError(f"a receipt of unit {receipt.unit} in the outbox of {unit}")
            return PolledItem(key=key, receipt=receipt, source=source)
        m = DUTY_NAME_RE.fullmatch(name) if self.settings.duty_report_to else None
        if m:
            if m["unit"] != unit:
                raise ValueError(f"a duty report of unit {m['unit']} in the outbox of {unit}")
            datetime.strptime(m["ts"], "%Y%m%d%H%M%S")  # ValueError if not a real time
            original = xmlsafe.parse_legacy(data)
            if etree.QName(original).localname != "dutyreport" or original.get("unit") != unit:
                raise ValueError(f"expected a <dutyreport unit=\"{unit}\"> document (legacy README §2), "
                                 f"got <{etree.QName(original).localname} unit=\"{original.get('unit')}\">")
            wrapper = etree.Element(
                f"{{{LEGACY_NS}}}legacy", nsmap={None: LEGACY_NS}, format="dutyreport"
            )
            wrapper.append(original)
            envelope = Envelope(
                subsystem="duty",
                type="duty-report",
                sender_unit=m["unit"],
                recipients=[Recipient(self.settings.duty_report_to or "")],
                payload=wrapper,
                # deterministic, so a re-read file is the same message to the dedupe layer
                message_id=str(uuid.uuid5(_NS_KEYS, key)),
            )
            return PolledItem(key=key, envelope=envelope, source=source)
        raise ValueError(
            "the name matches neither HZ_<docid>_<unit>.xml"
            + (" nor ZB_<unit>_<yyyymmddHHMMSS>.xml" if self.settings.duty_report_to else "")
        )

    def _reject_now(self, sftp: paramiko.SFTPClient, unit: str, name: str, reason: str) -> None:
        log.warning("sftp %s: rejecting %s of %s: %s", self.name, name, unit, reason)
        try:
            self._move(sftp, unit, name, failed=True, reason=reason)
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.error("sftp %s: could not move %s to failed/: %s", self.name, name, _describe(exc))

    def _finish(self, unit: str, name: str, failed: bool, reason: str | None, *, expect: str | None = None) -> None:
        """ack (-> archive/) or reject (-> failed/ + NAME.error). Idempotent. With ``expect``
        (SHA-256), only if the file still holds what was read; else it is left for the next poll."""
        try:
            with self._session() as sftp:
                if expect is not None and not self._holds(sftp, unit, name, expect):
                    log.info("sftp %s: %s of %s changed since it was read (taken by another instance, "
                             "a new receipt under its name): left for the next poll", self.name, name, unit)
                    return
                self._move(sftp, unit, name, failed=failed, reason=reason)
        except DeliveryError:
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            verb = "reject" if failed else "ack"
            dst = self._dir(self.settings.move_failed if failed else self.settings.move, unit)
            raise RetryableError(
                f"{self._where}: {verb} of {name} failed moving it from "
                f"{self._dir(self.settings.outbox, unit)} to {dst}: {_describe(exc)}"
            ) from exc

    def _holds(self, sftp: paramiko.SFTPClient, unit: str, name: str, sha256: str) -> bool:
        """Whether the outbox file ``name`` is there and holds the content of that SHA-256."""
        path = posixpath.join(self._dir(self.settings.outbox, unit), name)
        try:
            data = _read_file(sftp, path, self.settings.max_file_size, 0)
        except FileNotFoundError:
            return False  # moved already (a repeated ack, or another instance's)
        return hashlib.sha256(data).hexdigest() == sha256

    def _move(
        self, sftp: paramiko.SFTPClient, unit: str, name: str, *, failed: bool, reason: str | None
    ) -> None:
        if not _safe_component(name):  # defence in depth; callers pass listed, checked names
            raise PermanentError(f"refusing to move {name!r}", code="bad-name")
        src_dir = self._dir(self.settings.outbox, unit)
        dst_dir = self._dir(self.settings.move_failed if failed else self.settings.move, unit)
        _makedirs(sftp, dst_dir)
        src, dst = posixpath.join(src_dir, name), posixpath.join(dst_dir, name)
        if _exists(sftp, src) and _exists(sftp, dst):
            # the legacy side reuses HZ_ names (an ARRIVE, then a SIGN): keep both copies
            dst = posixpath.join(dst_dir, f"{name[:-4]}.{time.strftime('%Y%m%d%H%M%S')}.{uuid.uuid4().hex[:6]}.xml")
        if failed:  # in GB18030, as everything on the drop (legacy README §2)
            note = (reason or "rejected").strip()[:4000] + "\n"
            with sftp.open(dst + ERROR_SUFFIX, "wb") as fh:
                fh.write(xmlsafe.gb18030_encode(note, errors="replace"))
        try:
            _rename_over(sftp, src, dst)
        except FileNotFoundError:
            log.info("sftp %s: %s already moved", self.name, src)
        try:
            _rename_over(sftp, src + DONE_SUFFIX, dst + DONE_SUFFIX)
        except FileNotFoundError:
            pass  # stable-size files have none; a repeated ack moved it already
        self._observed.pop((unit, name), None)

    # -- health --------------------------------------------------------------------------
    def check(self) -> Health:
        """Connect (or reuse the connection), stat ``root`` and each configured unit's inbox
        and outbox (a folder missing fails deliveries or leaves receipts uncollected)."""
        t0 = time.perf_counter()
        try:
            with self._session() as sftp:
                sftp.stat(self.settings.root)
                missing = [path for unit in self.settings.units
                           for path in (self._dir(self.settings.inbox, unit), self._dir(self.settings.outbox, unit))
                           if not _exists(sftp, path)]
                if missing:
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    return Health(False, f"{self._where}: {len(missing)} unit folder(s) do not exist: "
                                         f"{', '.join(missing[:5])}{more}")
        except HostKeyMismatch as exc:
            return Health(False, str(exc))
        except DeliveryError as exc:
            return Health(False, str(exc))
        except FileNotFoundError:
            return Health(False, f"{self._where}: root folder {self.settings.root} does not exist")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            return Health(False, f"{self._where}: {_describe(exc)}")
        ms = (time.perf_counter() - t0) * 1000
        return Health(True, f"{self._where} reachable", latency_ms=round(ms, 1))

    def close(self) -> None:
        self._drop_transport()


# -- SFTP helpers ----------------------------------------------------------------------------
def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


_CONNECTION_ERRNOS = {errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN}


def _breaks_connection(exc: BaseException | None) -> bool:
    """Does ``exc`` mean the SSH connection itself is unusable (as opposed to an SFTP status
    such as "no such file", which paramiko also raises as OSError)?"""
    if isinstance(exc, (EOFError, paramiko.SSHException, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        # paramiko's channel raises a bare socket.error("Socket is closed")
        return exc.errno in _CONNECTION_ERRNOS or str(exc) == "Socket is closed"
    return False


def _close_quietly(client: paramiko.SFTPClient) -> None:
    # Closing a channel sends a message; on a connection that is already gone that raises,
    # and there is nothing left to release.
    try:
        client.close()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def _read_note(sftp: paramiko.SFTPClient, path: str) -> str:
    try:
        with sftp.open(path, "rb") as fh:
            return archive.note_text(fh.read(64 * 1024)) or "no reason given"
    except (OSError, EOFError, paramiko.SSHException):
        return "no note beside it"


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.lstat(path)
        return True
    except FileNotFoundError:
        return False


def _touch(sftp: paramiko.SFTPClient, path: str) -> None:
    sftp.open(path, "wb").close()


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except FileNotFoundError:
        pass


def _rename_over(sftp: paramiko.SFTPClient, src: str, dst: str) -> None:
    """Atomic rename replacing ``dst`` (posix-rename@openssh.com); plain SFTP rename when the
    server lacks the extension (it then refuses an existing target, so remove it first)."""
    try:
        sftp.posix_rename(src, dst)
        return
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES):
            raise
        if "unsupported" not in str(exc).lower():
            raise
    _remove_quietly(sftp, dst)
    sftp.rename(src, dst)


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    if _exists(sftp, path):
        return
    parent = posixpath.dirname(path)
    if parent and parent not in (path, ".", "/"):
        _makedirs(sftp, parent)
    try:
        sftp.mkdir(path)
    except OSError:
        if not _exists(sftp, path):  # someone else may have created it meanwhile
            raise


def _listdir_attr(sftp: paramiko.SFTPClient, path: str) -> list[paramiko.SFTPAttributes]:
    """``sftp.listdir_attr(path)`` that survives a name which is not UTF-8 (a GB18030 name
    from the legacy side): paramiko decodes names strictly, so one such file would fail every
    listing of its folder. Such a name comes back with its bytes escaped (``\\xbb``); the
    backslash makes :func:`_safe_component` refuse it, so no path is ever built from it.
    Speaks the protocol as ``listdir_attr`` itself does (paramiko internals)."""
    t, msg = sftp._request(paramiko.sftp.CMD_OPENDIR, path)
    if t != paramiko.sftp.CMD_HANDLE:
        raise paramiko.SSHException(f"the server answered OPENDIR {path} with message type {t}")
    handle = msg.get_binary()
    entries = []
    while True:
        try:
            t, msg = sftp._request(paramiko.sftp.CMD_READDIR, handle)
        except EOFError:  # the server's "end of folder" (a dropped connection is SSHException)
            break
        if t != paramiko.sftp.CMD_NAME:
            raise paramiko.SSHException(f"the server answered READDIR {path} with message type {t}")
        for _ in range(msg.get_int()):
            name = msg.get_string().decode("utf-8", "backslashreplace")
            msg.get_string()  # the "ls -l" long name: never used
            attr = paramiko.SFTPAttributes._from_msg(msg, name)
            if name not in (".", ".."):
                entries.append(attr)
    sftp._request(paramiko.sftp.CMD_CLOSE, handle)
    return entries


def _read_file(sftp: paramiko.SFTPClient, path: str, limit: int, size_hint: int) -> bytes:
    with sftp.open(path, "rb") as fh:
        if size_hint > 64 * 1024:  # prefetch pipelines reads but costs a thread; not for receipts
            fh.prefetch(size_hint)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{path} grew beyond {limit} bytes while being read")
    return data


def _confirm_writes(fh: paramiko.SFTPFile) -> None:
    """Wait for the server's answer to every pipelined write and raise on the first error.

    paramiko registers pipelined writes without a handler, and ``close()`` neither waits
    for nor reports their status (it even swallows a dropped connection), so a failed write
    (disk full, quota) would otherwise pass silently. Uses paramiko internals (``_reqs``,
    ``_read_response``), hence the defensive ``getattr``; the size check after close stays
    as a second line of defence.
    """
    fh.flush()
    reqs = getattr(fh, "_reqs", None)
    read_response = getattr(fh.sftp, "_read_response", None)
    if reqs is None or read_response is None:  # pragma: no cover - paramiko changed
        return
    while reqs:
        read_response(reqs.popleft())
