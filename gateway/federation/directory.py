"""The signed federation directory (节点目录): which nodes there are, their addresses and keys,
and the units (统一社会信用代码) each one serves.

The node with ``[federation] publish_directory = true`` (the prefecture) publishes it at
``GET /federation/v1/directory`` to its peers (signed requests only). The answer is
``{"document": "<canonical JSON>", "signature": "<base64>", "key_id": "<issuer>"}``: the
document is canonical JSON (sorted keys, no spaces, UTF-8) and the signature is made by the
issuer's node key (Ed25519; SM2 on a node with ``algorithm = "sm2"``) over exactly those
bytes::

    {"issuer": "prefecture", "version": 1764140000123,
     "issued_at": "2025-11-26T07:33:20.123Z", "expires_at": "2025-11-29T07:33:20.123Z",
     "nodes": [{"id": "prefecture", "name": "…", "url": "http://…", "public_key": "ed25519:…",
                "parent": null, "units": [{"code": "11522300GDR9YB9550", "name": null}]}, …]}

A fresh document is built and signed for every request; its ``version`` is the issue time
in milliseconds, so every document issued is a newer version (a renewal of the expiry too).

Other nodes fetch it with the scheduled job ``directory`` (:func:`refresh`) from
``[federation] directory_from`` or their parent, check it (signature by that peer's pinned
key, the issuer is that peer, not expired, well formed) and store it if its version is newer
than the newest they hold. The route table consults the newest stored directory after the
``[[routes]]`` rows and the ``[peers.X] units``. An *expired* directory keeps routing what it
lists: delivery degrades gracefully, ``/readyz`` says so and a warning is logged.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from flask import Blueprint, Response, current_app, request
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway import audit
from gateway.config import Config, ConfigError
from gateway.db import Database
from gateway.federation import keys
from gateway.models import DirectoryVersion
from gateway.scheduler import register
from gateway.units import uscc_problem

if TYPE_CHECKING:
    from gateway.node import Node

log = logging.getLogger("gateway.federation.directory")

#: where the directory is served, under /federation/v1
PATH = "/directory"
#: how many stored versions a node keeps (the newest routes; older ones are for inspection)
KEEP_VERSIONS = 10
_NODE_ID = re.compile(r"[a-z][a-z0-9-]{1,31}")

bp = Blueprint("federation_directory", __name__, url_prefix="/federation/v1")


# -- the document --------------------------------------------------------------------------
def canonical(obj: Any) -> bytes:
    """The exact bytes that are signed."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


def iso(t: datetime) -> str:
    """ISO 8601 in UTC with ``Z`` and milliseconds."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Directory:
    """A parsed directory document."""

    issuer: str
    version: int
    issued_at: datetime
    expires_at: datetime
    nodes: list[dict[str, Any]]
    #: unit code -> id of the node that serves it
    units: dict[str, str]

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at


def _time(doc: dict[str, Any], key: str) -> datetime:
    v = doc.get(key)
    if not isinstance(v, str) or not v.endswith("Z"):
        raise ValueError(f"{key}: expected an ISO 8601 time in UTC ending in Z, got {v!r}")
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"{key}: {v!r} is not an ISO 8601 time") from None
    return t.astimezone(UTC)


def _opt_str(node: dict[str, Any], key: str, where: str) -> str | None:
    v = node.get(key)
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{where}.{key}: expected a string or null, got {type(v).__name__}")
    return v


def parse(document: bytes) -> Directory:
    """Read and check the shape of a directory document. Raises ValueError saying what is wrong."""
    try:
        doc = json.loads(document.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the document is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("the document is not a JSON object")
    missing = [k for k in ("issuer", "version", "issued_at", "expires_at", "nodes") if k not in doc]
    if missing:
        raise ValueError(f"the document lacks {', '.join(missing)}")
    issuer, version = doc["issuer"], doc["version"]
    if not isinstance(issuer, str) or not issuer:
        raise ValueError("issuer: expected a node id")
    if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
        raise ValueError(f"version: expected a positive integer, got {version!r}")
    issued_at, expires_at = _time(doc, "issued_at"), _time(doc, "expires_at")
    if expires_at <= issued_at:
        raise ValueError(f"expires_at {doc['expires_at']} is not after issued_at {doc['issued_at']}")
    nodes = doc["nodes"]
    if not isinstance(nodes, list) or not nodes:
        raise ValueError("nodes: expected a non-empty list")
    units: dict[str, str] = {}
    seen: set[str] = set()
    for i, n in enumerate(nodes):
        where = f"nodes[{i}]"
        if not isinstance(n, dict):
            raise ValueError(f"{where}: expected an object")
        nid = n.get("id")
        if not isinstance(nid, str) or not _NODE_ID.fullmatch(nid):
            raise ValueError(f"{where}.id: {nid!r} is not a node id")
        if nid in seen:
            raise ValueError(f"{where}.id: node {nid} is listed twice")
        seen.add(nid)
        where = f"nodes[{i}] ({nid})"
        for key in ("name", "url", "parent"):
            _opt_str(n, key, where)
        pk = n.get("public_key")
        if not isinstance(pk, str):
            raise ValueError(f"{where}.public_key: expected ed25519:<base64> or sm2:<base64>")
        try:
            keys.parse_public(pk, f"{where}.public_key")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        node_units = n.get("units")
        if not isinstance(node_units, list):
            raise ValueError(f"{where}.units: expected a list")
        for j, u in enumerate(node_units):
            if not isinstance(u, dict):
                raise ValueError(f"{where}.units[{j}]: expected an object with code and name")
            code = u.get("code")
            problem = uscc_problem(code)
            if problem:
                raise ValueError(f"{where}.units[{j}].code: {code!r} is not a unified social credit code: {problem}")
            _opt_str(u, "name", f"{where}.units[{j}]")
            assert isinstance(code, str)
            if code in units:
                raise ValueError(f"{where}.units[{j}]: unit {code} is also listed for node {units[code]}")
            units[code] = nid
    if issuer not in seen:
        raise ValueError(f"the issuer {issuer} is not among the nodes")
    return Directory(issuer, version, issued_at, expires_at, nodes, units)


# -- publishing ----------------------------------------------------------------------------
def _dedup(codes: list[str]) -> list[str]:
    return list(dict.fromkeys(codes))


def build(node: Node, *, url: str | None = None, now: datetime | None = None) -> dict[str, Any]:
    """The directory as this node knows it from its configuration: itself (its ``[node]
    units`` and the units of its adapter routes) and each of its ``[peers]`` (url, pinned key,
    ``units``, and the units of ``[[routes]]`` rows that name it). ``url`` is this node's own
    address as its peers reach it. No unit names are configured anywhere, so names are null."""
    cfg = node.config
    now = now or datetime.now(UTC)
    own = _dedup([*cfg.node.units, *(u for r in cfg.routes if r.adapter for u in r.units)])
    by_peer: dict[str, list[str]] = {name: list(p.units) for name, p in cfg.peers.items()}
    for r in cfg.routes:
        if r.node in by_peer:
            by_peer[r.node].extend(r.units)
    taken = set(own)
    nodes = [{"id": cfg.node.id, "name": cfg.node.name, "url": url,
              "public_key": keys.public_text(keys.own_key(cfg)), "parent": cfg.federation.parent,
              "units": [{"code": u, "name": None} for u in own]}]
    for name, p in cfg.peers.items():
        units = []
        for u in _dedup(by_peer[name]):
            if u in taken:  # the first claim wins: this node's own, then peers in file order
                log.warning("directory: unit %s is configured for node %s and for another node; listed once", u, name)
                continue
            taken.add(u)
            units.append({"code": u, "name": None})
        pinned = node.federation.peer_key(name)
        assert pinned is not None
        nodes.append({"id": name, "name": None, "url": p.url or None, "public_key": keys.public_text(pinned),
                      # this node's peers are its children, apart from its own parent
                      "parent": None if name == cfg.federation.parent else cfg.node.id,
                      "units": units})
    expires = now + timedelta(hours=cfg.federation.directory_ttl_hours)
    # the version is the issue time in milliseconds: two documents issued in the same
    # millisecond by one configuration are the same document
    return {"issuer": cfg.node.id, "version": int(now.timestamp() * 1000), "issued_at": iso(now),
            "expires_at": iso(expires), "nodes": nodes}


def publish(node: Node, *, url: str | None = None, now: datetime | None = None) -> dict[str, str]:
    """A freshly built and signed directory, as served to peers."""
    document = canonical(build(node, url=url, now=now))
    signature = keys.own_key(node.config).sign(document)
    return {"document": document.decode("utf-8"), "signature": base64.b64encode(signature).decode(),
            "key_id": node.id}


@bp.get(PATH)
def serve_directory() -> Response:
    from gateway.api.problems import Problem
    from gateway.federation.api import authenticate

    n: Node = current_app.extensions["gateway.node"]
    peer = authenticate(n)
    if not n.config.federation.publish_directory:
        raise Problem(404, "not-found", f"node {n.id} does not publish the federation directory "
                                        f"([federation] publish_directory is false)")
    answer = publish(n, url=request.host_url.rstrip("/"))
    log.info("directory served to node %s", peer)
    return Response(json.dumps(answer, ensure_ascii=False), mimetype="application/json",
                    headers={"Cache-Control": "no-store"})


# -- fetching ------------------------------------------------------------------------------
class DirectoryError(Exception):
    """The directory could not be refreshed; the message says from which node and why."""


class DirectoryRejected(DirectoryError):
    """A fetched directory failed a check; the previous one stays in force. ``kind``:
    malformed, bad-signature, wrong-issuer, expired, not-yet-valid."""

    def __init__(self, peer: str, kind: str, reason: str, version: int | None = None) -> None:
        super().__init__(f"directory from node {peer} rejected ({kind}): {reason}; the previous directory "
                         f"stays in force")
        self.peer, self.kind, self.reason, self.version = peer, kind, reason, version


def source(config: Config) -> str | None:
    """The peer this node fetches the directory from, or None."""
    return config.federation.directory_from or config.federation.parent


def check(node: Node, peer: str, answer: Any, now: datetime | None = None) -> tuple[Directory, bytes, str]:
    """Verify a ``GET /federation/v1/directory`` answer from ``peer``. Raises
    :class:`DirectoryRejected`."""
    now = now or datetime.now(UTC)
    if not isinstance(answer, dict) or not all(isinstance(answer.get(k), str)
                                               for k in ("document", "signature", "key_id")):
        raise DirectoryRejected(peer, "malformed", "expected a JSON object with the strings document, "
                                                   "signature and key_id")
    if answer["key_id"] != peer:
        raise DirectoryRejected(peer, "wrong-issuer", f"it is signed by {answer['key_id']!r}, not by node {peer} "
                                                      f"it was fetched from")
    key = node.federation.peer_key(peer)
    if key is None:
        raise DirectoryRejected(peer, "bad-signature", f"no public key of node {peer} is pinned in [peers]")
    try:
        document = answer["document"].encode("utf-8")
    except UnicodeEncodeError:
        raise DirectoryRejected(peer, "malformed", "the document is not valid Unicode text") from None
    try:
        signature = base64.b64decode(answer["signature"], validate=True)
        key.verify(signature, document)
    except (ValueError, InvalidSignature):
        raise DirectoryRejected(peer, "bad-signature", f"the signature does not verify with the pinned key of "
                                                       f"node {peer} (the document was altered, or another key "
                                                       f"signed it)") from None
    try:
        d = parse(document)
    except ValueError as exc:
        raise DirectoryRejected(peer, "malformed", str(exc)) from None
    if d.issuer != peer:
        raise DirectoryRejected(peer, "wrong-issuer", f"the document names issuer {d.issuer!r}", d.version)
    if d.expired(now):
        raise DirectoryRejected(peer, "expired", f"version {d.version} expired at {iso(d.expires_at)} "
                                                 f"(this node's clock: {iso(now)})", d.version)
    skew = node.config.federation.max_skew
    if d.issued_at > now + timedelta(seconds=skew):
        raise DirectoryRejected(peer, "not-yet-valid", f"version {d.version} is issued at {iso(d.issued_at)}, "
                                f"more than {skew:.0f} s ahead of this node's clock ({iso(now)}); check the "
                                f"clocks (NTP)", d.version)
    return d, document, answer["signature"]


def refresh(node: Node) -> dict[str, Any]:
    """The job ``directory``: fetch, verify and store the directory (see the module doc)."""
    peer = source(node.config)
    if peer is None:
        if node.config.federation.publish_directory:
            return {"outcome": "publisher", "reason": f"node {node.id} publishes the directory itself"}
        raise DirectoryError(f"node {node.id} has no directory source: set [federation] directory_from "
                             f"or parent to the peer that publishes it")
    answer = node.federation.client.get_json(peer, PATH)
    try:
        d, document, signature = check(node, peer, answer)
    except DirectoryRejected as exc:
        raw = answer.get("document") if isinstance(answer, dict) else None
        with node.db.begin() as s:
            audit.append(s, actor=f"node:{peer}", action="directory.reject", obj=f"directory:{peer}",
                         outcome=exc.kind, detail={
                             "peer": peer, "reason": exc.reason, "version": exc.version,
                             "sha256": hashlib.sha256(raw.encode()).hexdigest() if isinstance(raw, str) else None})
        log.warning("%s", exc)
        raise
    detail: dict[str, Any] = {"source": peer, "version": d.version, "nodes": len(d.nodes), "units": len(d.units),
                              "expires_at": iso(d.expires_at)}
    try:
        with node.db.begin() as s:
            newest = s.scalar(select(func.max(DirectoryVersion.version)))
            if newest is not None and d.version <= newest:
                if d.version < newest:
                    log.warning("directory from node %s: version %d is older than the stored %d; not applied",
                                peer, d.version, newest)
                return {**detail, "outcome": "unchanged", "stored_version": newest}
            s.add(DirectoryVersion(version=d.version, issuer=d.issuer, issued_at=d.issued_at,
                                   expires_at=d.expires_at, document=document, signature=signature,
                                   fetched_at=datetime.now(UTC)))
            s.flush()
            cutoff = s.scalar(select(DirectoryVersion.version).order_by(DirectoryVersion.version.desc())
                              .offset(KEEP_VERSIONS - 1).limit(1))
            if cutoff is not None:
                s.execute(delete(DirectoryVersion).where(DirectoryVersion.version < cutoff))
            audit.append(s, actor=f"node:{peer}", action="directory.update", obj=f"directory:{peer}", detail={
                **detail, "previous": newest, "sha256": hashlib.sha256(document).hexdigest()})
    except IntegrityError:  # another instance stored the same version a moment ago
        return {**detail, "outcome": "unchanged", "stored_version": d.version}
    node.directory.check(force=True)
    log.info("directory version %d from node %s stored: %d nodes, %d units, expires %s", d.version, peer,
             len(d.nodes), len(d.units), iso(d.expires_at))
    return {**detail, "outcome": "stored"}


register("directory", refresh, "fetch and verify the signed federation directory")


# -- using it ------------------------------------------------------------------------------
_NEWEST = select(func.max(DirectoryVersion.version))


class DirectoryCache:
    """The newest stored directory, as routing reads it: ``unit -> node id``.

    The database is the truth: the newest version is looked up again at most every
    :attr:`interval` seconds, so a directory stored by any process (a ``gateway sync``, the
    scheduler in another instance) is in use everywhere within a few seconds. When the
    version changes ``on_change`` is called (the node drops its cached routes)."""

    interval = 2.0

    def __init__(self, db: Database, config: Config, on_change: Callable[[], None] | None = None) -> None:
        self.db = db
        self.enabled = source(config) is not None
        self.on_change = on_change
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._version: int | None = None
        self._units: dict[str, str] = {}
        self._nodes: frozenset[str] = frozenset()
        self._expires: datetime | None = None
        self._warned: int | None = None

    def node_for(self, unit: str) -> str | None:
        self.check()
        return self._units.get(unit)

    def nodes(self) -> frozenset[str]:
        """The node ids the newest stored directory names."""
        self.check()
        return self._nodes

    def check(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.monotonic() - self._checked < self.interval):
            return
        with self._lock:
            if not force and time.monotonic() - self._checked < self.interval:
                return
            self._checked = time.monotonic()
            try:
                self._reload()
            except SQLAlchemyError as exc:  # keep routing by what we have
                log.warning("directory: cannot read the stored directory (%s); using the one in memory",
                            type(exc).__name__)
            if self._expires is not None and self._warned != self._version and datetime.now(UTC) >= self._expires:
                self._warned = self._version
                log.warning("directory version %s expired at %s; still routing by it (degraded): "
                            "run 'gateway sync directory' and check the link to its publisher",
                            self._version, iso(self._expires))

    def _reload(self) -> None:
        with self.db.sessions() as s:
            newest = s.scalar(_NEWEST)
            if newest == self._version:
                return
            row = s.get(DirectoryVersion, newest) if newest is not None else None
        if row is None:
            self._version, self._units, self._expires = None, {}, None
            self._nodes = frozenset()
        else:
            try:
                d = parse(row.document)
            except ValueError as exc:  # verified when stored: the database was changed since
                log.error("directory version %d in the database does not parse (%s); ignored", row.version, exc)
                return
            self._version, self._units, self._expires = d.version, d.units, d.expires_at
            self._nodes = frozenset(n["id"] for n in d.nodes)
        if self.on_change is not None:
            self.on_change()


# -- state for /readyz and /metrics --------------------------------------------------------
@dataclass(frozen=True)
class State:
    #: ok, expired (degraded: still routing by it), none (none stored yet), publishing, unknown
    state: str
    text: str
    version: int | None = None
    expires_at: datetime | None = None

    @property
    def degraded(self) -> bool:
        return self.state == "expired"


def _newest_row(node: Node) -> tuple[int, str, datetime] | None:
    with node.db.sessions() as s:
        row = s.execute(select(DirectoryVersion.version, DirectoryVersion.issuer, DirectoryVersion.expires_at)
                        .order_by(DirectoryVersion.version.desc()).limit(1)).first()
    return None if row is None else (row[0], row[1], row[2])


def state(node: Node, now: datetime | None = None) -> State | None:
    """The directory's state on this node, read from the database; None when this node
    neither fetches nor publishes one."""
    peer = source(node.config)
    if peer is None:
        if node.config.federation.publish_directory:
            ttl = node.config.federation.directory_ttl_hours
            return State("publishing", f"publishing: signed afresh for each request, valid {ttl:g} h")
        return None
    try:
        newest = _newest_row(node)
    except SQLAlchemyError as exc:
        return State("unknown", f"unreadable: {type(exc).__name__}")
    if newest is None:
        return State("none", f"none yet: no directory from node {peer} has been stored; run 'gateway sync "
                             f"directory' (routing uses the configuration only)")
    version, issuer, expires = newest
    now = now or datetime.now(UTC)
    if now >= expires:
        return State("expired", f"expired at {iso(expires)} (version {version} from node {issuer}); still "
                                f"routing by it (degraded): run 'gateway sync directory' and check the link to "
                                f"node {peer}", version, expires)
    return State("ok", f"ok: version {version} from node {issuer}, expires {iso(expires)}", version, expires)


def metrics(node: Node) -> Iterator[GaugeMetricFamily]:
    """Gauges of the newest stored directory (none when there is none)."""
    try:
        newest = _newest_row(node)
    except SQLAlchemyError:  # not migrated yet: /readyz says so
        return
    if newest is None:
        return
    version, issuer, expires = newest
    left = GaugeMetricFamily("gateway_directory_expiry_seconds", "Seconds until the newest stored federation "
                             "directory expires (negative: expired, still routing by it)", labels=["issuer"])
    left.add_metric([issuer], (expires - datetime.now(UTC)).total_seconds())
    yield left
    ver = GaugeMetricFamily("gateway_directory_version", "Version of the newest stored federation directory",
                            labels=["issuer"])
    ver.add_metric([issuer], float(version))
    yield ver
