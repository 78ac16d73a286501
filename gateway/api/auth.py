"""API keys: ``gw_<id>_<secret>``, stored as SHA-256 of the secret (the secret is 256 random
bits, so a fast hash is enough; it is never stored or logged in clear).

Scopes are ``<subsystem>:<action>`` (``documents:send``, ``documents:read``,
``documents:recall``), ``blobs:write`` and ``admin``; ``*`` grants all. A key also has a
clearance (密级 level 0 非密 … 3 绝密) and, optionally, the units it may act for.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit
from datetime import datetime, UTC

from flask import g, request

from gateway import audit
from gateway.api.problems import Problem
from gateway.db import Database
from gateway.envelope import CLASSIFICATION_LEVEL
from gateway.events import shown_url
from gateway.models import ApiKey
from gateway.units import uscc_problem

SCOPES = ("documents:send", "documents:read", "documents:recall", "blobs:write", "admin", "*")


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    scopes: tuple[str, ...]
    clearance: int
    units: tuple[str, ...]

    def has(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}({self.name})"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(db: Database, *, name: str, scopes: list[str], clearance: str = "非密",
               units: list[str] | None = None, webhook_url: str | None = None, actor: str = "cli") -> str:
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
        parts = urlsplit(webhook_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"webhook URL {webhook_url!r}: expected an http:// or https:// URL, "
                             f"e.g. https://oa.example.internal/gateway-events")
        if parts.username is not None or parts.password is not None:
            raise ValueError("webhook URL: no user name or password in it (it is shown in logs and errors); "
                             "the posts are signed by this node, which is how the receiver knows them")
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    with db.begin() as s:
        s.add(ApiKey(id=key_id, name=name, secret_hash=_hash(secret), scopes=list(scopes),
                     clearance=CLASSIFICATION_LEVEL[clearance], units=list(units or []),
                     webhook_url=webhook_url))
        audit.append(s, actor=actor, action="admin.key.create", obj=f"key:{key_id}",
                     detail={"name": name, "scopes": scopes, "clearance": clearance, "units": units or [],
                             "webhook_url": shown_url(webhook_url) if webhook_url else None})
    return f"gw_{key_id}_{secret}"


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
        caller = Caller(k.id, k.name, tuple(k.scopes), k.clearance, tuple(k.units or ()))
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
