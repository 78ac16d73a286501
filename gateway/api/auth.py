"""API keys: ``gw_<id>_<secret>``, stored as SHA-256 of the secret (the secret is 256 random
bits, so a fast hash is enough; it is never stored or logged in clear).

Scopes are ``<subsystem>:<action>`` (``documents:send``, ``documents:read``,
``documents:recall``), ``blobs:write`` and ``admin``; ``*`` grants all. A key also has a
clearance (密级 level 0 非密 … 3 绝密) and, optionally, the units it may act for.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from datetime import datetime, UTC

from flask import current_app, g, request

from gateway import audit
from gateway.api.problems import OUTAGE_LOG, Problem, shown
from gateway.db import Database, outage, outage_text
from gateway.envelope import CLASSIFICATION_LEVEL
from gateway.events import shown_url
from gateway.models import ApiKey
from gateway.units import uscc_problem

log = logging.getLogger("gateway.api")

SCOPES = ("documents:send", "documents:read", "documents:recall", "blobs:write", "admin", "*")


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    scopes: tuple[str, ...]
    clearance: int
    units: tuple[str, ...]
    #: new content it may upload in any 24 hours (0: no limit); None: the node's default
    upload_quota: int | None = None

    def has(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}({self.name})"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(db: Database, *, name: str, scopes: list[str], clearance: str = "非密",
               units: list[str] | None = None, webhook_url: str | None = None, actor: str = "cli",
               upload_quota: int | None = None) -> str:
    """A new key (returned once, stored hashed). ``upload_quota``: bytes of new content a day
    (0: no limit); None: the node's ``[api] upload_quota_bytes_per_day``."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad:
        raise ValueError(f"unknown scope {bad[0]!r}; expected some of {', '.join(SCOPES)}")
    if clearance not in CLASSIFICATION_LEVEL:
        raise ValueError(f"unknown clearance {clearance!r}; expected 非密, 秘密, 机密 or 绝密")
    if not name.strip():
        raise ValueError("name: empty; expected who the key is for, e.g. 州政府办OA")
    for u in units or []:
        problem = uscc_problem(u)
        if problem:
            raise ValueError(f"unit {u!r}: {problem}")
    if webhook_url is not None:
        from gateway.config import url_problem

        parts = urlsplit(webhook_url)
        problem = url_problem(webhook_url)
        if problem:
            raise ValueError(f"webhook URL {webhook_url!r} {problem}: expected an http:// or https:// URL with a "
                             f"host, e.g. https://oa.example.internal/gateway-events")
        if parts.username is not None or parts.password is not None:
            raise ValueError("webhook URL: no user name or password in it (it is shown in logs and errors); "
                             "the posts are signed by this node, which is how the receiver knows them")
    if upload_quota is not None and upload_quota < 0:
        raise ValueError(f"upload quota {upload_quota}: expected 0 (no limit) or more bytes")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    with db.begin() as s:
        s.add(ApiKey(id=key_id, name=name, secret_hash=_hash(secret), scopes=list(scopes),
                     clearance=CLASSIFICATION_LEVEL[clearance], units=list(units or []),
                     webhook_url=webhook_url, upload_quota_bytes_per_day=upload_quota))
        detail: dict[str, object] = {"name": name, "scopes": scopes, "clearance": clearance, "units": units or [],
                                     "webhook_url": shown_url(webhook_url) if webhook_url else None}
        if upload_quota is not None:
            detail["upload_quota_bytes_per_day"] = upload_quota
        audit.append(s, actor=actor, action="admin.key.create", obj=f"key:{key_id}", detail=detail)
    return f"gw_{key_id}_{secret}"


def set_upload_quota(db: Database, key_id: str, quota: int | None, actor: str = "cli") -> int | None:
    """Give an active key its own daily upload quota (bytes, 0: no limit), or None: the
    node's default again. Returns the quota it had before; LookupError if there is no such
    active key. Audited; in force at every API process within CACHE_SECONDS."""
    if quota is not None and quota < 0:
        raise ValueError(f"upload quota {quota}: expected 0 (no limit) or more bytes")
    with db.begin() as s:
        k = s.get(ApiKey, key_id)
        if k is None or k.revoked_at is not None:
            raise LookupError(f"no active key with id {key_id}")
        before = k.upload_quota_bytes_per_day
        k.upload_quota_bytes_per_day = quota
        audit.append(s, actor=actor, action="admin.key.quota", obj=f"key:{key_id}",
                     detail={"upload_quota_bytes_per_day": quota, "before": before})
        return before


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """A number of bytes as an operator writes it: ``21474836480``, ``20GiB``, ``500 MiB``,
    ``1.5GB`` (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000). ValueError
    saying what is expected."""
    m = _SIZE.fullmatch(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"{text!r}: expected a number of bytes, optionally with a unit (KiB, MiB, GiB, TiB, "
                         f"or KB, MB, GB, TB), e.g. 20GiB")
    try:
        size = int(float(m.group(1)) * _UNITS[unit]) if "." in m.group(1) else int(m.group(1)) * _UNITS[unit]
    except (OverflowError, ValueError):  # a float past 1e308, or an integer of over 4300 digits
        size = MAX_SIZE + 1
    if size > MAX_SIZE:
        raise ValueError(f"{text!r}: expected at most {MAX_SIZE} bytes (8 EiB)")
    return size


#: the largest size a database column (64-bit signed) keeps
MAX_SIZE = 2**63 - 1


def shown_size(n: int) -> str:
    """``n`` bytes for people: 21474836480 -> '20 GiB', 1500 -> '1500 bytes'."""
    units = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    for unit, size in units:
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    about = next((f" (about {n / size:.1f} {unit})" for unit, size in units if n >= size), "")
    return f"{n} bytes{about}"


def forget_cached_keys() -> None:
    with _cache_lock:
        _cache.clear()


def revoke_key(db: Database, key_id: str, actor: str = "cli") -> bool:
    with db.begin() as s:
        k = s.get(ApiKey, key_id)
        if k is None or k.revoked_at is not None:
            return False
        k.revoked_at = datetime.now(UTC)
        audit.append(s, actor=actor, action="admin.key.revoke", obj=f"key:{key_id}")
        return True


def bearer() -> str | None:
    """The token of the request's ``Authorization: Bearer …`` header, if it has one."""
    h = request.headers.get("Authorization", "")
    return h[7:].strip() if h.lower().startswith("bearer ") else None


def _presented() -> str | None:
    return bearer() or request.headers.get("X-API-Key")


#: verified keys, per process, for a few seconds: a revocation takes effect within this time
CACHE_SECONDS = 5.0
_cache: dict[str, tuple[float, Caller]] = {}
_cache_lock = threading.Lock()


def authenticate(db: Database) -> Caller:
    token = _presented()
    if not token:
        raise Problem(401, "unauthenticated", "send an API key as 'Authorization: Bearer gw_…'")
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != "gw":
        raise Problem(401, "unauthenticated", "the API key is not in the form gw_<id>_<secret>")
    digest = _hash(token)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(digest)
    if hit is not None and now - hit[0] < CACHE_SECONDS:
        g.caller = hit[1]
        return hit[1]
    with db.sessions() as s:
        k = s.get(ApiKey, parts[1])
        if k is None or k.revoked_at is not None or not hmac.compare_digest(k.secret_hash, _hash(parts[2])):
            raise Problem(401, "unauthenticated", "the API key is unknown or revoked")
        caller = Caller(k.id, k.name, tuple(k.scopes), k.clearance, tuple(k.units or ()),
                        k.upload_quota_bytes_per_day)
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[digest] = (now, caller)
    g.caller = caller
    return caller


def require(db: Database, scope: str) -> Caller:
    caller = authenticate(db)
    if not caller.has(scope):
        raise Problem(403, "forbidden-scope", f"this API key lacks the scope {scope!r}")
    return caller


#: refusals that are security events (GB/T 22239: audit them): no or a bad key, a key used
#: beyond its scopes, units or clearance, a message id another node made (envelope.id_owner)
SECURITY_REFUSALS = frozenset({"unauthenticated", "forbidden-scope", "forbidden-unit", "clearance-too-low",
                               "metrics-token", "foreign-message-id"})


def _attempted_change(peer: str | None) -> bool:
    """A calling system's request that would have changed something (a document sent or
    recalled, content uploaded): refused for any reason, it is a failed action the audit log
    records (GB/T 22239: each event's outcome, success or failure). Legacy systems' callbacks
    are audited as ``inbound.reject`` and node requests as ``federation.reject`` instead."""
    return (peer is None and request.method == "POST" and request.path.startswith("/api/")
            and not request.path.startswith("/api/v1/callbacks/"))


class Refusals:
    """Audits the API's security refusals, and the refusals of requests that would have changed
    something, one entry each (``api.refuse``: who, which request, why, from where), up to
    RejectAudit.PER_MINUTE a minute per key or, without one, per address; past that a minute's
    refusals are counted into one entry. Without the bound a flood of bad keys (or of bad
    documents) would write to the hash chain that every accept waits on."""

    def __init__(self, db: Database) -> None:
        from gateway.federation.state import RejectAudit

        self.db = db
        self.limiter = RejectAudit(self._suppressed, what="API requests")

    def _suppressed(self, key: str, detail: dict[str, Any]) -> None:
        with self.db.begin() as s:
            audit.append(s, actor=key if key.startswith(("key:", "node:")) else "anonymous", action="api.refuse",
                         obj="/api/", outcome="suppressed", detail=detail)

    def __call__(self, exc: Problem) -> None:
        caller: Caller | None = g.get("caller")
        peer: str | None = g.get("fed_peer")  # a signed node request (gateway.federation.api)
        if exc.kind not in SECURITY_REFUSALS and not _attempted_change(peer):
            return
        token = _presented() or ""
        presented = token.split("_", 2)[1][:32] if token.startswith("gw_") and token.count("_") >= 2 else None
        addr = request.remote_addr or "?"
        if not self.limiter.admit(f"key:{caller.key_id}" if caller else f"node:{peer}" if peer else addr, exc.kind):
            return
        detail: dict[str, Any] = {"reason": exc.detail[:500], "remote_addr": addr}
        if exc.kind not in SECURITY_REFUSALS:
            detail["status"] = exc.status
        if caller is None and presented:
            detail["key_id"] = presented  # a revoked key still in use shows here
        try:
            with self.db.begin() as s:
                audit.append(s, actor=caller.actor if caller else f"node:{peer}" if peer else "anonymous",
                             action="federation.reject" if peer else "api.refuse",
                             obj=f"{request.method} {shown(request.path)}"[:400], outcome=exc.kind, detail=detail)
        except Exception as err:  # noqa: BLE001 - the refusal is answered all the same; the log has it
            if outage(err) is None:
                log.exception("could not audit a refused request")
            else:  # the database is away or full: a line now and then, as for the outage's answers
                OUTAGE_LOG.note(current_app, logging.WARNING, "%s %s: refused %s, not audited: the database is "
                                "unavailable (%s)", request.method, shown(request.path), exc.kind,
                                shown(outage_text(err)))
