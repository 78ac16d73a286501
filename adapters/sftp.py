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
  next poll). A move the server refuses for that one file is logged and named by ``check()``,
  and does not stop the round: the file stays and is read (and acknowledged) again later.
  Polls are bounded whatever waits: see :meth:`SftpAdapter.poll`. A ``.ok`` whose file is gone
  is moved away after ``orphan_seconds``; a ``.part`` (the writer's) is never touched, only
  reported once it is a day old.
* The server's host key is pinned (``host_key`` or ``known_hosts_file``); any other key is
  refused as a security event (:class:`HostKeyMismatch`, a :class:`PermanentError`).
* Symlinks (the server follows them anywhere in a path; SFTP v3 cannot ask it not to): files
  are created with O_EXCL, never written through a name; a file is read only if lstat says it
  is a regular file and the open file still has that size and time; a folder below ``root``
  that is a symlink is refused (:meth:`SftpAdapter._check_folder`). What is left between a
  check and its use only the server closes (docs/operating.md, "The drop's server").

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
    orphan_seconds = 600                     # a NAME.ok without NAME is moved away after this
    max_per_poll = 100                       # files a poll takes (see SftpAdapter.poll)
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
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
#: A poll reads at most this many outbox entries per unit for each file it may take
#: (max_per_poll): with OpenSSH's 100 names a READDIR answer, 20 round trips at the default.
SCAN_FACTOR = 20
#: A .part upload unchanged for this long is reported (the legacy writer's; never touched).
STALE_PART_SECONDS = 24 * 3600
#: At most this many files whose move out of the outbox was refused are remembered for check().
_STUCK_KEPT = 100
#: A ``failed/`` folder whose modification time is what it was when it was last read through
#: is not read again, once a reading began at least this long after that time was first seen:
#: SFTP v3 gives times in whole seconds, so a note written later in the same second as a
#: reading leaves the folder's time as it was, and only a reading a second later is sure to
#: have seen everything written in that second (2: coarser file-system clocks).
FAILED_SETTLE_SECONDS = 2.0

_NS_KEYS = uuid.UUID("1f0d2c4e-7b0a-5e61-8d3c-5a9e0b7c2f41")


KNOWN_KEYS = frozenset(
    ["type", "host", "port", "username", "private_key_file", "passphrase_env", "passphrase_file", "host_key", "known_hosts_file", "root", "inbox", "outbox", "move", "move_failed", "units", "done_file", "read_lock", "stable_seconds", "orphan_seconds", "max_per_poll", "max_file_size", "connect_timeout", "so_timeout", "server_alive_interval", "duty_report_to", "appids"]
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
    orphan_seconds: float
    max_per_poll: int
    max_file_size: int
    connect_timeout: float
    so_timeout: float
    server_alive_interval: int
    duty_report_to: str | None
    appids: Mapping[str, str]


@dataclass
class _FailedRead:
    """What the last reading of a unit's ``failed/`` found (see SftpAdapter._refusals)."""

    mtime: int  # the folder's modification time, taken just before the reading
    first_seen: float  # when that time was first seen (time.monotonic())
    settled: bool  # the reading began FAILED_SETTLE_SECONDS or more after first_seen
    newest: int  # the newest time of the notes it found not older than the mark (0: none)
    complete: bool  # all those notes fitted that poll's budget


class UnsafeFolder(OSError):
    """A folder of the drop below ``root`` is a symlink (or not a folder): never followed."""


@dataclass
class _Pass:
    """One pass through a unit's outbox, from one poll to the next (see SftpAdapter.poll)."""

    handle: bytes  # the open directory handle (on the poll's SFTP channel)
    no: int  # the unit's pass number
    pending: list[tuple[str, paramiko.SFTPAttributes | None]] = field(default_factory=list)
    stale_parts: int = 0
    stale_sample: list[str] = field(default_factory=list)


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
        # stable-size read lock: (unit, name) -> (size, mtime, first seen with them, last pass seen in)
        self._observed: dict[tuple[str, str], tuple[int, int, float, int]] = {}
        self._unit_turn = 0
        # poll: its own SFTP channel, and on it each unit's pass through its outbox (see poll)
        self._poll_lock = threading.Lock()
        self._poll_client: paramiko.SFTPClient | None = None
        self._scans: dict[str, _Pass] = {}
        self._passes: dict[str, int] = {}  # unit -> number of its latest pass
        # (unit, name) -> (first seen with its .ok but without itself, the unit's pass then)
        self._orphans: dict[tuple[str, str], tuple[float, int]] = {}
        # unit -> (how many, some names) of the .part files its last pass found a day old
        self._stale_parts: dict[str, tuple[int, tuple[str, ...]]] = {}
        # (unit, name) -> why its move out of the outbox was refused (see _finish)
        self._stuck: dict[tuple[str, str], str] = {}
        # unit -> what the last reading of its failed/ found (see _refusals)
        self._failed_reads: dict[str, _FailedRead] = {}
        # unit -> (name, time, size) of the notes taken not older than the mark (see _refusals)
        self._notes_taken: dict[str, set[tuple[str, int, int]]] = {}
        # folder -> why it is refused (a symlink), until a check finds it a folder again
        self._unsafe: dict[str, str] = {}

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
            orphan_seconds=float(positive("orphan_seconds", 600)),
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

    def _check_folder(
        self, sftp: paramiko.SFTPClient, template: str, unit: str,
        seen: dict[str, paramiko.SFTPAttributes] | None = None
    ) -> paramiko.SFTPAttributes | None:
        """lstat each folder below ``root`` on the way to ``unit``'s folder of ``template``
        (``{unit}/inbox``: ``root/<unit>`` and ``root/<unit>/inbox``): that folder's attributes,
        or None when one of them does not exist. Raises :class:`UnsafeFolder` when one is a
        symlink or not a folder. The server follows a symlink anywhere in a path, so a folder
        swapped for one by someone who may write its parent would take the gateway's writes
        and moves out of the unit's folders (into another unit's inbox, say). Called before
        each delivery, each poll of a unit and each move: what is left is the moment between
        this check and the request that uses the path, which only the server's set-up closes
        (docs/operating.md, "The drop's server"). ``seen``: folders already checked by the
        caller's operation, with their attributes."""
        path, attrs = self.settings.root, None
        for part in template.format(unit=unit).split("/"):
            if part in ("", "."):
                continue
            path = posixpath.join(path, part)
            if seen is not None and path in seen:
                attrs = seen[path]
                continue
            try:
                attrs = sftp.lstat(path)
            except FileNotFoundError:
                if self._unsafe:
                    with self._lock:
                        self._unsafe.pop(path, None)
                return None
            mode = attrs.st_mode or 0
            if not stat.S_ISDIR(mode):
                what = "a symlink" if stat.S_ISLNK(mode) else "not a folder"
                message = (f"{self._where}: {path} is {what}; the gateway never follows a symlink "
                           f"below root, so it neither writes nor moves anything through it")
                with self._lock:
                    self._unsafe[path] = message
                raise UnsafeFolder(message)
            if self._unsafe:
                with self._lock:
                    self._unsafe.pop(path, None)
            if seen is not None:
                seen[path] = attrs
        return attrs

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
                seen: dict[str, paramiko.SFTPAttributes] = {}
                inbox_there = self._check_folder(sftp, self.settings.inbox, unit, seen) is not None
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
                    self._check_folder(sftp, self.settings.move_failed, unit, seen)
                    raise PermanentError(
                        f"the legacy system refused {name} (it is in {refused}): "
                        f"{_read_note(sftp, refused + ERROR_SUFFIX)}", code="refused"
                    )
                if not inbox_there:
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
        except UnsafeFolder as exc:
            raise RetryableError(f"delivering {name}: {exc}", code="unsafe-folder") from exc
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
        # "x": O_CREAT|O_EXCL, never through a symlink planted under the name (see _create)
        fh = sftp.open(path, "wxb", bufsize=0)
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
        as their name promises are moved to ``failed/`` at once and not returned.

        Bounded: an outbox is read a batch (one READDIR answer) at a time through a directory
        handle kept open from one poll to the next, so a poll reads at most
        ``SCAN_FACTOR * max_per_poll`` entries of each unit's outbox and holds only the files
        it takes, however many are waiting. Files come in the order the server lists them
        (not oldest first, which would need the whole folder listed every time); each pass
        through a folder goes on where the previous poll stopped, so every finished file is
        reached within one pass even while others are not acknowledged. With ``done-file``
        the ``.ok`` is what makes a file ready, wherever it stands in the listing."""
        s = self.settings
        if not s.units:
            return []
        # Start from a different unit each poll, so one busy unit cannot starve the rest.
        turn = self._unit_turn % len(s.units)
        self._unit_turn += 1
        units = s.units[turn:] + s.units[:turn]
        items: list[PolledItem] = []
        budget = s.max_per_poll
        with self._poll_lock:
            try:
                sftp = self._poll_session()
                try:
                    for unit in units:
                        if budget <= 0:
                            break
                        budget -= self._poll_unit(sftp, unit, budget, items)
                except BaseException as exc:
                    self._end_poll_session(exc)
                    raise
            except DeliveryError:
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                raise RetryableError(
                    f"{self._where}: polling failed: {_describe(exc)}", code="poll"
                ) from exc
        return items

    def _poll_session(self) -> paramiko.SFTPClient:
        """The SFTP channel polls use, kept (not pooled) while it lives: the outboxes'
        directory handles belong to it. A new channel starts every pass from the top."""
        client = self._poll_client
        if client is not None:
            channel = client.get_channel()
            transport = channel.get_transport()
            if not channel.closed and transport is not None and transport.is_active() and transport is self._transport:
                return client
            self._end_poll_session(None)
        self._poll_client = self._checkout()
        return self._poll_client

    def _end_poll_session(self, error: BaseException | None) -> None:
        client, self._poll_client = self._poll_client, None
        self._scans.clear()
        if client is None:
            return
        transport = client.get_channel().get_transport()
        _close_quietly(client)  # closing the channel closes its directory handles on the server
        if error is not None and transport is self._transport and transport is not None and (
            not transport.is_active() or _breaks_connection(error)
        ):
            self._drop_transport()

    def _poll_unit(
        self, sftp: paramiko.SFTPClient, unit: str, budget: int, items: list[PolledItem]
    ) -> int:
        """Take up to ``budget`` files from one outbox; return how many were taken."""
        folder = self._dir(self.settings.outbox, unit)
        seen: dict[str, paramiko.SFTPAttributes] = {}
        try:
            self._check_folder(sftp, self.settings.outbox, unit, seen)
        except UnsafeFolder as exc:
            log.error("sftp %s: outbox of %s not read: %s", self.name, unit, exc)
            return 0
        refused = self._refusals(sftp, unit, budget, items, seen)
        budget -= refused
        taken = 0
        for name, attrs in self._scan(sftp, unit, folder, budget):
            taken += 1
            try:
                if attrs is None:  # done-file: its .ok was listed; the file itself is looked at now
                    try:
                        attrs = sftp.lstat(posixpath.join(folder, name))
                    except FileNotFoundError:
                        self._orphan(sftp, unit, folder, name)
                        continue
                    attrs.filename = name
                item = self._take(sftp, unit, folder, attrs)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if sftp.get_channel().closed or not sftp.get_channel().get_transport().is_active():
                    raise  # the connection is gone: the whole poll is retried
                # One unreadable file (permissions, vanished) must not block the others.
                log.warning("sftp %s: cannot read %s/%s: %s", self.name, folder, name, _describe(exc))
                continue
            if item is not None:
                items.append(item)
        return taken + refused

    def _scan(
        self, sftp: paramiko.SFTPClient, unit: str, folder: str, budget: int
    ) -> list[tuple[str, paramiko.SFTPAttributes | None]]:
        """Up to ``budget`` files of the outbox ready to be taken, read on from where the
        previous poll left its pass, at most ``SCAN_FACTOR * max_per_poll`` entries.
        ``(name, None)``: the ``.ok`` of ``name`` was listed (done-file); ``(name, attrs)``:
        a file whose size has held for ``stable_seconds`` (stable-size)."""
        scan = self._scans.get(unit)
        ready: list[tuple[str, paramiko.SFTPAttributes | None]] = []
        if scan is not None:  # what the previous poll read but had no budget left for
            carried, scan.pending = scan.pending[:budget], scan.pending[budget:]
            ready = self._still_stable(sftp, unit, folder, carried, scan.no)
        limit = SCAN_FACTOR * self.settings.max_per_poll
        read = 0
        fresh = scan is None  # a pass begun by this poll ends it; one carried on may begin anew
        taken = {name for name, _ in ready}
        while len(ready) < budget and read < limit:
            try:
                if scan is None:
                    try:
                        handle = _opendir(sftp, folder)
                    except FileNotFoundError:
                        log.warning("sftp %s: outbox %s does not exist", self.name, folder)
                        return ready
                    no = self._passes[unit] = self._passes.get(unit, 0) + 1
                    scan = self._scans[unit] = _Pass(handle, no)
                batch = _readdir(sftp, scan.handle, folder)
            except OSError as exc:
                if _breaks_connection(exc):
                    raise
                # one unit's folder the server will not list (permissions) must not stop the others
                log.error("sftp %s: cannot list outbox %s of %s: %s", self.name, folder, unit, _describe(exc))
                self._scans.pop(unit, None)  # its handle, if any, closes with the channel
                return ready
            if batch is None:  # the end of the folder: a new pass starts at the top
                del self._scans[unit]
                self._end_pass(sftp, unit, folder, scan)
                scan = None
                if fresh:  # never two passes in one poll: the folder is read at most once
                    break
                fresh = True
                continue
            read += len(batch)
            now, wall = time.monotonic(), time.time()
            for e in batch:
                found = self._ready(unit, folder, e, scan, now, wall)
                if found is not None and found[0] not in taken:  # a new pass finds them again
                    taken.add(found[0])
                    (ready if len(ready) < budget else scan.pending).append(found)
        return ready

    def _still_stable(
        self, sftp: paramiko.SFTPClient, unit: str, folder: str,
        carried: list[tuple[str, paramiko.SFTPAttributes | None]], no: int,
    ) -> list[tuple[str, paramiko.SFTPAttributes | None]]:
        """stable-size: of the files an earlier poll found stable and left in the pass's
        pending list, those that still have the size and time they had then. The legacy
        writer, without done files, writes in place and reuses HZ_ names (an ARRIVE, then a
        SIGN): a file it began writing again since is not read half-written (and refused to
        failed/), but waits until it is stable again. done-file entries are looked at when
        taken (their .ok says they are finished)."""
        if self.settings.read_lock != "stable-size":
            return carried
        out: list[tuple[str, paramiko.SFTPAttributes | None]] = []
        now = time.monotonic()
        for name, seen in carried:
            try:
                attrs = sftp.lstat(posixpath.join(folder, name))
            except FileNotFoundError:
                continue  # taken (by another instance) or removed meanwhile
            except OSError as exc:
                if _breaks_connection(exc):
                    raise
                continue  # found again by a later pass
            attrs.filename = name
            if seen is not None and (attrs.st_size, attrs.st_mtime) == (seen.st_size, seen.st_mtime):
                out.append((name, attrs))
            else:
                self._stable((unit, name), attrs, now, no)  # changed: its wait starts again
        return out

    def _ready(
        self, unit: str, folder: str, e: paramiko.SFTPAttributes, scan: _Pass, now: float, wall: float
    ) -> tuple[str, paramiko.SFTPAttributes | None] | None:
        """Whether the listed entry ``e`` makes a file ready (see :meth:`_scan`)."""
        name = e.filename
        if not isinstance(name, str) or not _safe_component(name):
            # Never used to build a path: a listing is data from the other side.
            log.warning("sftp %s: skipping suspicious name %r in %s", self.name, name, folder)
            return None
        if name.endswith(PART_SUFFIX):
            # the legacy writer's upload: its own, never touched, only reported when it has
            # not changed for a day (a writer that died mid-upload)
            if (e.st_mtime or 0) < wall - STALE_PART_SECONDS:
                scan.stale_parts += 1
                if len(scan.stale_sample) < 3:
                    scan.stale_sample.append(name)
            return None
        if self.settings.read_lock == "done-file":
            base = name[: -len(DONE_SUFFIX)]
            if not name.endswith(DONE_SUFFIX) or not base.endswith(".xml") or not base.startswith(self._prefixes()):
                return None  # files (ready once their .ok is listed), .error notes, foreign files
            return base, None
        if not name.endswith(".xml") or not name.startswith(self._prefixes()):
            return None  # companions (.ok/.part/.error) and files that are not ours
        return (name, e) if self._stable((unit, name), e, now, scan.no) else None

    def _end_pass(self, sftp: paramiko.SFTPClient, unit: str, folder: str, scan: _Pass) -> None:
        """A pass through ``unit``'s outbox reached its end: close the handle, forget what
        that pass no longer saw, say what it found the legacy writer left unfinished."""
        try:
            sftp._request(paramiko.sftp.CMD_CLOSE, scan.handle)
        except OSError as exc:
            if _breaks_connection(exc):
                raise  # else the handle is the server's to forget; the channel's end closes it
        for key in [k for k, v in list(self._observed.items()) if k[0] == unit and v[3] != scan.no]:
            self._observed.pop(key, None)  # stable-size: files gone since the previous pass
        for key in [k for k, v in self._orphans.items() if k[0] == unit and v[1] < scan.no - 1]:
            del self._orphans[key]  # done files no longer orphaned (or gone)
        if scan.stale_parts:
            self._stale_parts[unit] = (scan.stale_parts, tuple(scan.stale_sample))
            log.warning("sftp %s: %d upload(s) in %s unchanged for more than a day, e.g. %s: "
                        "the legacy writer's, left alone", self.name, scan.stale_parts, folder,
                        ", ".join(scan.stale_sample))
        else:
            self._stale_parts.pop(unit, None)

    def _orphan(self, sftp: paramiko.SFTPClient, unit: str, folder: str, name: str) -> None:
        """``name.ok`` is in the outbox without ``name``. Seen so for ``orphan_seconds``
        (another reader may be between its two renames), the done file is moved away: to
        ``archive/`` when ``name`` is there (an acknowledgement cut between its two renames),
        else to ``failed/`` beside a note. Either way it is never taken as a file."""
        key, now = (unit, name), time.monotonic()
        if not _exists(sftp, posixpath.join(folder, name + DONE_SUFFIX)):
            self._orphans.pop(key, None)
            return
        first = self._orphans.get(key)
        if first is None or now - first[0] < self.settings.orphan_seconds:
            self._orphans[key] = (first[0] if first else now, self._passes.get(unit, 0))
            return
        del self._orphans[key]
        src = posixpath.join(folder, name + DONE_SUFFIX)
        archived = posixpath.join(self._dir(self.settings.move, unit), name)
        try:
            seen: dict[str, paramiko.SFTPAttributes] = {}
            self._check_folder(sftp, self.settings.move, unit, seen)
            self._check_folder(sftp, self.settings.move_failed, unit, seen)
            if _exists(sftp, archived):
                _rename_over(sftp, src, archived + DONE_SUFFIX)
                log.warning("sftp %s: %s was left behind by an acknowledgement cut short; "
                            "moved beside %s", self.name, src, archived)
                return
            failed_dir = self._dir(self.settings.move_failed, unit)
            _makedirs(sftp, failed_dir)
            dst = posixpath.join(failed_dir, name)
            if _exists(sftp, dst) or _exists(sftp, dst + ERROR_SUFFIX):
                dst = posixpath.join(failed_dir, f"{name[:-4]}.{datetime.now(self.legacy_tz):%Y%m%d%H%M%S}.{uuid.uuid4().hex[:6]}.xml")
            reason = (f"{name}{DONE_SUFFIX} was in the outbox without {name} for more than "
                      f"{self.settings.orphan_seconds:g} seconds: a done file whose file is gone")
            _create(sftp, dst + ERROR_SUFFIX, xmlsafe.gb18030_encode(reason + "\n", errors="replace"))
            _rename_over(sftp, src, dst + DONE_SUFFIX)
            log.warning("sftp %s: %s; moved to %s", self.name, reason, failed_dir)
        except FileNotFoundError:
            pass  # taken away meanwhile
        except OSError as exc:
            if _breaks_connection(exc):
                raise
            log.error("sftp %s: could not move the done file %s away: %s", self.name, src, _describe(exc))

    def _refusals(
        self, sftp: paramiko.SFTPClient, unit: str, budget: int, items: list[PolledItem],
        seen: dict[str, paramiko.SFTPAttributes]
    ) -> int:
        """The legacy reader moves a document it cannot take to ``failed/`` beside a
        ``GW_<ref>.xml.error`` note: each such note becomes a REFUSED receipt, so the copy
        fails with the note as its reason instead of staying "delivered". The files stay
        where the legacy side put them (its folder); the key, made of the note's content, is
        what keeps a note from being taken twice. The folder is read a batch at a time and
        only notes not older than the mark are kept (failed/ grows; it is not for us to empty).

        Read only when it may hold something new, since a poll costs one READDIR round trip
        per 100 entries there: not when its modification time (which every note created,
        renamed in or removed changes) is what it was at the last reading, that reading began
        ``FAILED_SETTLE_SECONDS`` or more after the time was first seen (so nothing of that
        second was missed), fitted its notes in the poll and they have all been taken (the
        mark reached the newest). Then the poll costs one LSTAT."""
        folder = self._dir(self.settings.move_failed, unit)
        mark_key = f"refused-mtime:{unit}"
        mark = archive.refusal_mark(self.context.state, mark_key)
        try:
            attrs = self._check_folder(sftp, self.settings.move_failed, unit, seen)
        except UnsafeFolder as exc:
            log.error("sftp %s: %s of %s not read: %s", self.name, folder, unit, exc)
            return 0
        if attrs is None:
            return 0
        mtime = None if attrs.st_mtime is None else int(attrs.st_mtime)
        now = time.monotonic()
        last = self._failed_reads.get(unit)
        if last is not None and mtime is not None and last.mtime == mtime:
            if last.settled and last.complete and mark >= last.newest:
                return 0  # nothing created, renamed in or removed since it was read through
            first_seen = last.first_seen
        else:
            first_seen = now
        # Notes of the mark's second are read again (the mark is in whole seconds); those this
        # adapter saw taken are passed over, so that more of one second than a poll takes are
        # each reached, instead of the first ones read again every poll.
        with self._lock:  # acks may come from another thread
            kept = self._notes_taken.setdefault(unit, set())
            kept.difference_update([n for n in kept if n[1] < mark])
            done = set(kept)
        try:
            notes = [e for e in _iterdir(sftp, folder)
                     if isinstance(e.filename, str) and REFUSED_NOTE_RE.fullmatch(e.filename)
                     and stat.S_ISREG(e.st_mode or 0) and (e.st_mtime or 0) >= mark
                     and _note_id(e) not in done]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            if _breaks_connection(exc):
                raise
            log.error("sftp %s: cannot list %s of %s: %s", self.name, folder, unit, _describe(exc))
            return 0
        complete = len(notes) <= budget
        taken = 0
        for e in sorted(notes, key=lambda e: (e.st_mtime or 0, e.filename)):
            m = REFUSED_NOTE_RE.fullmatch(e.filename)
            if m is None or taken >= budget:
                continue
            taken += 1
            try:
                note = _read_file(sftp, posixpath.join(folder, e.filename), 64 * 1024, int(e.st_size or 0), e)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                log.warning("sftp %s: cannot read %s/%s: %s", self.name, folder, e.filename, _describe(exc))
                complete = False
                continue
            rel = posixpath.join(self.settings.move_failed.format(unit=unit), e.filename)
            item = archive.refusal_item(
                self.context.state, mark_key, ref=m["ref"], unit=unit, note=note, mtime=e.st_mtime or 0,
                key=f"{self.name}:{rel}:{hashlib.sha256(note).hexdigest()}", source=f"{self._where}/{rel}")
            taken_note = partial(self._note_taken, unit, _note_id(e))
            item._ack = partial(_then, item._ack, taken_note)
            item._reject = partial(_then_reject, item._reject, taken_note)
            items.append(item)
        self._failed_reads[unit] = _FailedRead(
            mtime=mtime if mtime is not None else -1, first_seen=first_seen,
            settled=mtime is not None and now - first_seen >= FAILED_SETTLE_SECONDS,
            newest=max((int(e.st_mtime or 0) for e in notes), default=0), complete=complete)
        return taken

    def _note_taken(self, unit: str, note: tuple[str, int, int]) -> None:
        with self._lock:
            self._notes_taken.setdefault(unit, set()).add(note)

    def _prefixes(self) -> tuple[str, ...]:
        return ("HZ_", "ZB_") if self.settings.duty_report_to else ("HZ_",)

    def _stable(self, key: tuple[str, str], e: paramiko.SFTPAttributes, now: float, no: int) -> bool:
        """stable-size read lock: same size and mtime as seen at least stable_seconds ago
        (in an earlier pass; ``no`` is this pass's number)."""
        sig = (int(e.st_size or 0), int(e.st_mtime or 0))
        prev = self._observed.get(key)
        if prev is None or prev[:2] != sig:
            self._observed[key] = (*sig, now, no)
            return False
        self._observed[key] = (*prev[:3], no)
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
        data = _read_file(sftp, path, self.settings.max_file_size, int(e.st_size or 0), e)
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
            receipt = archive.parse_receipt(data, self.legacy_tz)
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
            message = (f"{self._where}: {verb} of {name} failed moving it from "
                       f"{self._dir(self.settings.outbox, unit)} to {dst}: {_describe(exc)}")
            if _breaks_connection(exc):  # the connection is gone: the round stops, tried again later
                raise RetryableError(message) from exc
            # The server refused this one file's move (permissions, a name in the way): the
            # gateway has recorded the item, so it stays in the outbox and is acknowledged
            # again (a duplicate, never ingested twice) when a later pass reads it. The other
            # files of the round go on; check() names it until a move succeeds.
            log.error("sftp %s: %s; left in the outbox, moved when a later poll reads it again",
                      self.name, message)
            with self._lock:
                self._stuck.pop((unit, name), None)
                self._stuck[(unit, name)] = message
                while len(self._stuck) > _STUCK_KEPT:
                    del self._stuck[next(iter(self._stuck))]

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
        dst_template = self.settings.move_failed if failed else self.settings.move
        dst_dir = self._dir(dst_template, unit)
        # the folder moved to (the outbox was checked by the poll that read the file)
        if self._check_folder(sftp, dst_template, unit) is None:
            _makedirs(sftp, dst_dir)
        src, dst = posixpath.join(src_dir, name), posixpath.join(dst_dir, name)
        src_there = _exists(sftp, src)
        if src_there and (_exists(sftp, dst) or (failed and _exists(sftp, dst + ERROR_SUFFIX))):
            # the legacy side reuses HZ_ names (an ARRIVE, then a SIGN): keep both copies, the
            # time in the name local time as in the legacy side's own names, whatever the server's
            # TZ. A note without its file (a reject cut short, or anything else under the name)
            # is left too: the new note is created, never written through what is there.
            stamp = f"{datetime.now(self.legacy_tz):%Y%m%d%H%M%S}"
            dst = posixpath.join(dst_dir, f"{name[:-4]}.{stamp}.{uuid.uuid4().hex[:6]}.xml")
        if failed and src_there:  # in GB18030, as everything on the drop (legacy README §2)
            note = (reason or "rejected").strip()[:4000] + "\n"
            _create(sftp, dst + ERROR_SUFFIX, xmlsafe.gb18030_encode(note, errors="replace"))
        try:
            _rename_over(sftp, src, dst)
        except FileNotFoundError:
            log.info("sftp %s: %s already moved", self.name, src)
        try:
            _rename_over(sftp, src + DONE_SUFFIX, dst + DONE_SUFFIX)
        except FileNotFoundError:
            pass  # stable-size files have none; a repeated ack moved it already
        self._observed.pop((unit, name), None)
        with self._lock:
            self._stuck.pop((unit, name), None)

    # -- health --------------------------------------------------------------------------
    def check(self) -> Health:
        """Connect (or reuse the connection), stat ``root`` and each configured unit's inbox
        and outbox (a folder missing fails deliveries or leaves receipts uncollected); lstat
        them and its archive/ and failed/ (a symlink among them is refused: see
        :meth:`_check_folder`)."""
        t0 = time.perf_counter()
        s = self.settings
        try:
            with self._session() as sftp:
                sftp.stat(s.root)
                missing: list[str] = []
                for unit in s.units:
                    seen: dict[str, paramiko.SFTPAttributes] = {}
                    for template in (s.inbox, s.outbox, s.move, s.move_failed):
                        try:
                            there = self._check_folder(sftp, template, unit, seen) is not None
                        except UnsafeFolder:
                            continue  # named below
                        if not there and template in (s.inbox, s.outbox):
                            missing.append(self._dir(template, unit))
                with self._lock:
                    unsafe = list(self._unsafe.values())
                if unsafe:
                    return Health(False, f"{len(unsafe)} folder(s) of the drop refused: {unsafe[0]}")
                if missing:
                    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                    return Health(False, f"{self._where}: {len(missing)} unit folder(s) do not exist: "
                                         f"{', '.join(missing[:5])}{more}")
                stuck = self._still_stuck(sftp)
                if stuck:
                    return Health(False, f"{len(stuck)} file(s) stay in an outbox because the server "
                                         f"refused to move them: {stuck[0]}")
        except HostKeyMismatch as exc:
            return Health(False, str(exc))
        except DeliveryError as exc:
            return Health(False, str(exc))
        except FileNotFoundError:
            return Health(False, f"{self._where}: root folder {self.settings.root} does not exist")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            return Health(False, f"{self._where}: {_describe(exc)}")
        ms = (time.perf_counter() - t0) * 1000
        stale = [f"{n} in {self._dir(self.settings.outbox, unit)} (e.g. {', '.join(names)})"
                 for unit, (n, names) in sorted(self._stale_parts.items())]
        note = (f"; .part uploads unchanged for more than a day (the legacy writer's, left alone): "
                f"{'; '.join(stale)}" if stale else "")
        return Health(True, f"{self._where} reachable{note}", latency_ms=round(ms, 1))

    def _still_stuck(self, sftp: paramiko.SFTPClient) -> list[str]:
        """Why files whose move out of the outbox was refused are still there (forgetting
        the ones gone since, looking at no more than five)."""
        with self._lock:
            stuck = list(self._stuck.items())
        for (unit, name), _ in stuck[:5]:
            if not _exists(sftp, posixpath.join(self._dir(self.settings.outbox, unit), name)):
                with self._lock:
                    self._stuck.pop((unit, name), None)
        with self._lock:
            return list(self._stuck.values())

    def close(self) -> None:
        with self._poll_lock:
            self._end_poll_session(None)
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


def _note_id(e: paramiko.SFTPAttributes) -> tuple[str, int, int]:
    return str(e.filename), int(e.st_mtime or 0), int(e.st_size or 0)


def _then(first: Callable[[], None] | None, then: Callable[[], None]) -> None:
    if first is not None:
        first()
    then()


def _then_reject(first: Callable[[str], None] | None, then: Callable[[], None], reason: str) -> None:
    if first is not None:
        first(reason)
    then()


def _read_note(sftp: paramiko.SFTPClient, path: str) -> str:
    try:
        attrs = sftp.lstat(path)
        if not stat.S_ISREG(attrs.st_mode or 0):
            return "no note beside it (not a regular file: never followed)"
        return archive.note_text(_read_file(sftp, path, 64 * 1024, 0, attrs, cut=True)) or "no reason given"
    except (OSError, EOFError, paramiko.SSHException):
        return "no note beside it"


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.lstat(path)
        return True
    except FileNotFoundError:
        return False


def _create(sftp: paramiko.SFTPClient, path: str, data: bytes = b"") -> None:
    """Create ``path`` holding ``data``, never through a symlink: O_CREAT|O_EXCL (SFTP v3's
    SSH_FXF_EXCL, paramiko's "x") fails on any name that exists, a symlink included (even a
    dangling one), where O_TRUNC would write into what a link planted under the name points
    to. OpenSSH answers such a failure "Failure" (SFTP v3 has no "exists" status)."""
    with sftp.open(path, "wxb") as fh:
        if data:
            fh.write(data)


def _touch(sftp: paramiko.SFTPClient, path: str) -> None:
    """The empty done file ``path``; whatever is already there under the name is left alone."""
    try:
        _create(sftp, path)
    except OSError as exc:
        if _breaks_connection(exc) or not _exists(sftp, path):
            raise


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
    except OSError as exc:
        try:  # someone else may have created it meanwhile: a folder, nothing else
            attrs = sftp.lstat(path)
        except FileNotFoundError:
            raise exc from None
        if not stat.S_ISDIR(attrs.st_mode or 0):
            raise UnsafeFolder(f"{path} is not a folder (a symlink?): it appeared while the gateway "
                               f"was creating it, and is never followed") from None


def _opendir(sftp: paramiko.SFTPClient, path: str) -> bytes:
    """OPENDIR: a directory handle to read with :func:`_readdir` (paramiko internals, as
    ``listdir_attr`` itself does; see :func:`_iterdir` for why)."""
    t, msg = sftp._request(paramiko.sftp.CMD_OPENDIR, path)
    if t != paramiko.sftp.CMD_HANDLE:
        raise paramiko.SSHException(f"the server answered OPENDIR {path} with message type {t}")
    return msg.get_binary()


def _readdir(sftp: paramiko.SFTPClient, handle: bytes, path: str) -> list[paramiko.SFTPAttributes] | None:
    """One READDIR: the next batch of entries (without ``.`` and ``..``), or None at the end
    of the folder. A name that is not UTF-8 comes back with its bytes escaped (``\\xbb``)."""
    try:
        t, msg = sftp._request(paramiko.sftp.CMD_READDIR, handle)
    except EOFError:  # the server's "end of folder" (a dropped connection is SSHException)
        return None
    if t != paramiko.sftp.CMD_NAME:
        raise paramiko.SSHException(f"the server answered READDIR {path} with message type {t}")
    entries = []
    for _ in range(msg.get_int()):
        name = msg.get_string().decode("utf-8", "backslashreplace")
        msg.get_string()  # the "ls -l" long name: never used
        attr = paramiko.SFTPAttributes._from_msg(msg, name)
        if name not in (".", ".."):
            entries.append(attr)
    return entries


def _iterdir(sftp: paramiko.SFTPClient, path: str) -> Iterator[paramiko.SFTPAttributes]:
    """``sftp.listdir_attr(path)`` a batch at a time, so a caller keeps only what it needs,
    and surviving a name which is not UTF-8 (a GB18030 name from the legacy side): paramiko
    decodes names strictly, so one such file would fail every listing of its folder. Such a
    name comes back with its bytes escaped (``\\xbb``); the backslash makes
    :func:`_safe_component` refuse it, so no path is ever built from it."""
    handle = _opendir(sftp, path)
    while (batch := _readdir(sftp, handle, path)) is not None:
        yield from batch
    sftp._request(paramiko.sftp.CMD_CLOSE, handle)


def _read_file(
    sftp: paramiko.SFTPClient, path: str, limit: int, size_hint: int,
    listed: paramiko.SFTPAttributes | None = None, *, cut: bool = False,
) -> bytes:
    """At most ``limit`` bytes of ``path`` (more: EFBIG, unless ``cut``). With ``listed`` (its
    lstat attributes, from a listing or an LSTAT), the open file must still be a regular file
    of that size and time (FSTAT on the handle): a name swapped for a symlink since it was
    looked at is opened through the link (SFTP v3 has no O_NOFOLLOW), and is then refused
    unless what the link points to has the very size and time the file had."""
    with sftp.open(path, "rb") as fh:
        if listed is not None:
            now = fh.stat()
            if not stat.S_ISREG(now.st_mode or 0) or (now.st_size, now.st_mtime) != (listed.st_size, listed.st_mtime):
                raise OSError(f"{path} is no longer the file listed (replaced since, or written "
                              f"again): left for a later poll")
        if size_hint > 64 * 1024:  # prefetch pipelines reads but costs a thread; not for receipts
            fh.prefetch(size_hint)
        data = fh.read(limit + (0 if cut else 1))
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
