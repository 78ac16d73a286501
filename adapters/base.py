"""The adapter contract: a strict point of cut-off between the gateway and a legacy protocol.

Above this line the gateway knows envelopes, recipients and receipts; below it an adapter
knows SOAP, SFTP or an XML exchange format. An adapter never knows which subsystem it
carries, and nothing above it knows SOAP from SFTP.

Contract
--------
``deliver(delivery) -> DeliveryResult``
    Hand one envelope to the legacy system for one recipient unit. It MUST be idempotent
    per ``delivery.message_id`` + recipient: the worker delivers at least once, so a retry
    after a crash must not produce a second effect at the receiver (use the message id as
    the legacy system's document id, write files under a temporary name and rename).
    Returning means the legacy system has accepted the document ("delivered").
    Raise :class:`RetryableError` for trouble that may pass (connection refused, timeout,
    HTTP 503, SOAP ``Server.*``); raise :class:`PermanentError` for what retrying cannot fix
    (SOAP ``Client.*``, a rejected file name). Any other exception is treated as retryable.

``poll() -> Iterable[PolledItem]``
    Collect what the legacy system produced since last time: receipts (回执) and inbound
    envelopes, at most ``max_per_poll`` of them. Each item carries a stable ``key``; the
    gateway records keys in the same transaction as what it ingests and then calls
    ``item.ack()`` (or ``item.reject(reason)``), so an item is never ingested twice, even
    if the process dies between the commit and the ack.

``check() -> Health``
    Is the legacy system reachable and answering? Cheap; shown to administrators.

``close()``
    Release connections. Adapters are also context managers.

Configuration is data: an adapter is created by type name with a name and a mapping from
the config file (``[adapters.NAME]``); secrets come through ``context.secret(...)``.
"""
from __future__ import annotations

import abc
import hashlib
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Protocol
from collections.abc import Callable, Iterable, Mapping

from gateway.config import DEFAULT_TIMEZONE, NODE_ID, read_secret, timezone_problem, zone
from gateway.envelope import UUID7, Envelope, Receipt, Recipient


_REF_NS = uuid.UUID("6f1b8a52-4d0e-5c39-9a57-2f0c1e6b7d10")
_REF_NS_BYTES = _REF_NS.bytes


#: a message id this gateway made (a UUIDv7, gateway.envelope.new_message_id, followed since
#: 2026-11-28 by ':' and the node id): its first 48 bits are the time in milliseconds
_UUID7 = re.compile(rf"{UUID7}(?::{NODE_ID.pattern})?")


def remote_ref(message_id: str, unit: str) -> str:
    """The id a delivery goes by at the legacy system, made from the message id and the unit
    alone (so it is the same at every retry): a UUID (version 8, RFC 9562) whose first 48
    bits every unit of the message shares (the message id's time for an id this gateway
    made, which sorts by time; else the start of a SHA-1 of the message id) and whose other
    bits come from a SHA-1 of message id and unit.

    The shared, time-ordered start keeps the database's index on it compact: the 200 refs of
    a 200-unit document go into one or two index pages next to the newest, where SHA-1 alone
    (a UUIDv5, used until 2026-11-28) put each on a random page, and that one index was a
    quarter of the work of storing such a document. Deliveries stored before keep their
    UUIDv5: the worker hands adapters the ref stored with the delivery (Delivery.ref)."""
    if _UUID7.fullmatch(message_id):
        head = bytes.fromhex(message_id[:8] + message_id[9:13])
    else:
        head = hashlib.sha1(_REF_NS_BYTES + message_id.encode()).digest()[:6]
    b = bytearray(head + hashlib.sha1(_REF_NS_BYTES + f"{message_id}:{unit}".encode()).digest()[:10])
    b[6] = (b[6] & 0x0F) | 0x80  # version 8
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 9562 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def delivery_ref(message_id: str, unit: str, stored: str | None = None) -> str:
    """The remote ref a delivery goes by: the one stored with it at accept (``stored``; refs
    stored before 2026-11-28 are UUIDv5), else :func:`remote_ref` made now."""
    return stored or remote_ref(message_id, unit)


class DeliveryError(Exception):
    retryable: ClassVar[bool] = True

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class RetryableError(DeliveryError):
    retryable = True


class PermanentError(DeliveryError):
    retryable = False


class ConfigError(ValueError):
    """An adapter's configuration is wrong; the message names the key and what was expected."""


class BlobReader(Protocol):
    def open(self, sha256: str) -> BinaryIO: ...
    def size(self, sha256: str) -> int: ...


class StateStore(Protocol):
    """Small durable key/value state per adapter (poll cursors)."""

    def get(self, key: str, default: str | None = None) -> str | None: ...
    def set(self, key: str, value: str) -> None: ...
    def advance(self, key: str, value: int) -> None:
        """Store the number ``value`` unless the one stored is as high already: a high-water
        mark that never moves back, also when several instances advance it at once."""


@dataclass
class AdapterContext:
    blobs: BlobReader
    state: StateStore
    base_dir: Path = field(default_factory=Path.cwd)
    secrets: Callable[[str], str | None] = os.environ.get
    #: ``[node] timezone``: the zone of legacy times without an offset, unless the adapter's
    #: own ``timezone`` says otherwise
    timezone: str = DEFAULT_TIMEZONE

    def secret(self, config: Mapping[str, Any], key: str) -> str | None:
        """Resolve ``KEY_env`` (an environment variable) or ``KEY_file`` (a file) from config
        (:func:`gateway.config.read_secret`). A secret's value never sits in the TOML itself."""
        try:
            return read_secret(config, key, self.base_dir, self.secrets)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class Delivery:
    """One envelope for one recipient unit."""

    message_id: str
    recipient: Recipient
    envelope: Envelope
    attempt: int = 1
    #: the ref stored with the delivery when the message was accepted (the worker passes it)
    ref: str | None = None

    @property
    def delivery_id(self) -> str:
        return f"{self.message_id}:{self.recipient.unit}"

    @property
    def remote_ref(self) -> str:
        """The id this delivery goes by at the legacy system (SOAP ``doc_id``, the archive's
        ``archiveid``, the ``<docid>`` in SFTP file names): the one stored at accept
        (:func:`remote_ref` of that time), else :func:`remote_ref` now. The same at every
        retry, so the legacy system can deduplicate; distinct per recipient, because one
        message to two units behind the same system is two documents there. Receipts come
        back naming it."""
        return delivery_ref(self.message_id, self.recipient.unit, self.ref)


@dataclass
class DeliveryResult:
    remote_id: str | None = None
    detail: str = ""


@dataclass
class Health:
    ok: bool
    message: str
    latency_ms: float | None = None


@dataclass
class PolledItem:
    """Something an adapter collected. Exactly one of ``receipt`` / ``envelope`` is set."""

    key: str
    receipt: Receipt | None = None
    envelope: Envelope | None = None
    source: str = ""
    _ack: Callable[[], None] | None = None
    _reject: Callable[[str], None] | None = None
    #: why the item cannot be taken as it came (e.g. a receipt time no date-time can be read
    #: from): the gateway refuses it (audited, ``reject``) instead of storing a guess
    problem: str | None = None

    def ack(self) -> None:
        if self._ack:
            self._ack()

    def reject(self, reason: str) -> None:
        if self._reject:
            self._reject(reason)


#: keys of an ``[adapters.NAME]`` table that the gateway itself reads (the worker's retry
#: policy, the callback endpoint's guard) or this base class (``timezone``, as
#: :attr:`Adapter.legacy_tz`); the protocols' own code never sees them
GATEWAY_KEYS = frozenset({"retry", "callback_token_env", "callback_token_file", "callback_allow", "attachments",
                          "timezone"})

LEGACY_TIME_EXPECTED = ("expected a date and a time, e.g. 2026-11-20T10:15:00+08:00, 2026-11-20 10:15:00 "
                        "(local time) or 20261120101500")
_ISO_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d|\d{8}[Tt]\d", re.ASCII)
_COMPACT_TIME = re.compile(r"\d{14}", re.ASCII)
_SLASHED_TIME = re.compile(r"\d{4}/\d{1,2}/\d{1,2} \d{1,2}:\d{2}:\d{2}", re.ASCII)


def legacy_time(text: str, tz: tzinfo) -> datetime:
    """A time a legacy system wrote, aware: ISO 8601 with a date and a time (``T`` or a space
    between them; ``Z``, an offset or none), ``yyyymmddHHMMSS`` (as in SFTP file names) or
    ``yyyy/mm/dd HH:MM:SS``. A time without an offset is local time in ``tz`` (the legacy
    system's zone). A bare date is refused (it says no time: midnight would be a guess).
    Raises ValueError saying what was expected."""
    s = text.strip()
    try:
        if _COMPACT_TIME.fullmatch(s):
            t = datetime.strptime(s, "%Y%m%d%H%M%S")
        elif _SLASHED_TIME.fullmatch(s):
            t = datetime.strptime(s, "%Y/%m/%d %H:%M:%S")
        elif _ISO_DATE_TIME.match(s):
            t = datetime.fromisoformat(s)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{s[:60]!r} is not a date and time; {LEGACY_TIME_EXPECTED}") from None
    # a time no UTC date has (year 9999 at UTC-14) is refused when the receipt is applied
    # (gateway.inbound.check_receipt), as a value no column can keep
    return t if t.tzinfo else t.replace(tzinfo=tz)


#: ``[adapters.NAME] attachments`` for a protocol without attachments (Adapter.takes_attachments
#: False): a document with 附件 to a unit behind it is refused, or sent with its body only
ATTACHMENT_POLICIES = ("refuse", "omit")


class Adapter(abc.ABC):
    type_name: ClassVar[str]
    #: the subsystems (``documents`` …) whose messages this type can hand to its legacy
    #: system; None: any. A route that sends another subsystem's messages to it is refused
    #: (at start when the route names the subsystem, else when a message is accepted).
    subsystems: ClassVar[frozenset[str] | None] = None
    #: whether the legacy protocol carries a document's attachments (附件) besides its body
    takes_attachments: ClassVar[bool] = True

    def __init__(self, name: str, config: Mapping[str, Any], context: AdapterContext) -> None:
        self.name = name
        self.config = {k: v for k, v in config.items() if k not in GATEWAY_KEYS}
        self.context = context
        own = config.get("timezone")
        problem = None if own is None else timezone_problem(own)
        if problem:
            raise ConfigError(f"adapters.{name}.timezone: {problem} (the legacy system's zone, for its times "
                              f"written without an offset; default: [node] timezone)")
        #: the legacy system's time zone: its times written without an offset are local times there
        self.legacy_tz: tzinfo = zone(own or context.timezone)

    @abc.abstractmethod
    def deliver(self, delivery: Delivery) -> DeliveryResult: ...

    def poll(self) -> Iterable[PolledItem]:
        return ()

    @abc.abstractmethod
    def check(self) -> Health: ...

    def recall(self, message_id: str, unit: str, ref: str | None = None) -> bool:
        """Ask the legacy system to withdraw (撤回) a document not yet signed for (``ref``:
        the delivery's stored remote ref, see :attr:`Delivery.remote_ref`). Returns False
        if it was too late; raises if the protocol has no recall."""
        raise PermanentError(f"adapter type {self.type_name} cannot recall documents")

    def handle_callback(self, body: bytes, content_type: str) -> tuple[list[PolledItem], bytes, str]:
        """Take a push from the legacy system (e.g. the exchange box POSTing receipts).
        Returns the items to ingest and the response body and content type to answer."""
        raise PermanentError(f"adapter type {self.type_name} takes no callbacks")

    def close(self) -> None:
        pass

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers for config reading with clear errors
    def require(self, key: str, kind: type = str) -> Any:
        if key not in self.config:
            raise ConfigError(f"adapters.{self.name}.{key}: missing; expected a {kind.__name__}")
        val = self.config[key]
        if not isinstance(val, kind):
            raise ConfigError(
                f"adapters.{self.name}.{key}: expected a {kind.__name__}, got {type(val).__name__}"
            )
        return val


_REGISTRY: dict[str, type[Adapter]] = {}


def register(type_name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    def deco(cls: type[Adapter]) -> type[Adapter]:
        cls.type_name = type_name
        _REGISTRY[type_name] = cls
        return cls

    return deco


def _class(type_name: str) -> type[Adapter] | None:
    cls = _REGISTRY.get(type_name)
    if cls is None:
        from adapters import BUILTIN, load_builtin

        if type_name in BUILTIN:
            load_builtin(type_name)
        cls = _REGISTRY.get(type_name)
    return cls


def carries(type_name: str, subsystem: str) -> bool:
    """Can an adapter of type ``type_name`` carry messages of ``subsystem``? (An unknown
    type is refused elsewhere, when the adapter is built.)"""
    cls = _class(type_name)
    return cls is None or cls.subsystems is None or subsystem in cls.subsystems


def ca_problem(path: str | Path) -> str | None:
    """Why ``path`` is no CA bundle TLS can verify with (missing, unreadable, no PEM
    certificate in it); None if it is one. Checked at start: otherwise every call fails."""
    import ssl

    if not Path(path).is_file():
        return f"{path} does not exist"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError) as exc:
        return f"{path} holds no certificate TLS can use (expected PEM: -----BEGIN CERTIFICATE-----…): {exc}"
    return None


def attachments_policy(type_name: str, config: Mapping[str, Any]) -> str:
    """What becomes of a document's attachments at an adapter: "carry" (its protocol has
    them), else its ``attachments`` setting, "refuse" (the default) or "omit"."""
    cls = _class(type_name)
    if cls is None or cls.takes_attachments:
        return "carry"
    return str(config.get("attachments", "refuse"))


def can_recall(type_name: str) -> bool:
    """Does the legacy protocol of adapter type ``type_name`` have a recall (撤回)? The SOAP
    service has ``RecallDocument``; the SFTP drop and the exchange box have none."""
    cls = _class(type_name)
    return cls is not None and cls.recall is not Adapter.recall


def registered_types() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, config: Mapping[str, Any], context: AdapterContext) -> Adapter:
    type_name = config.get("type")
    if type_name not in _REGISTRY:
        from adapters import BUILTIN, load_builtin

        if type_name in BUILTIN:
            load_builtin(type_name)
    if type_name not in _REGISTRY:
        from adapters import BUILTIN

        raise ConfigError(
            f"adapters.{name}.type: {type_name!r} is not a known adapter type; "
            f"expected one of {', '.join(sorted({*BUILTIN, *_REGISTRY}))}"
        )
    return _REGISTRY[type_name](name, config, context)
