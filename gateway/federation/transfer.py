"""What travels between nodes, and what each side does with it.

* A **forward** carries one message to the next node for the units behind it:
  ``{"message_id", "units": [...], "hops": [node ids it passed, sender last], "envelope": "<xml>"}``.
  The receiver accepts it once (by message id): a repeat gets the same answer. Bodies and
  attachments (claim checks) it does not have yet it fetches from the sender first, so
  "accepted" means the whole document is here.
* A **status** item reports a copy's new status back to the node the message came from:
  ``{"message_id", "unit", "status", "signer", "receipt_no", "reason", "at", "error"}``.
  Applied on the sender only to copies it forwarded to that very node, and only in the
  forward direction of the status machine, so repeats and stale reports change nothing.
* A **recall** asks the next node to withdraw its copies of a message for some units.
"""
from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from adapters.base import PermanentError, RetryableError
from gateway import audit, events, pipeline
from gateway.blobs import BlobNoSpace, BlobTooLarge
from gateway.envelope import CLASSIFICATION_LEVEL, Envelope, EnvelopeError
from gateway.models import Delivery, Message, ReceiptRecord
from gateway.node import Node

log = logging.getLogger("gateway.federation")

#: a status reported by the next node, and the local statuses it may move a copy from
STATUS_FROM: dict[str, tuple[str, ...]] = {
    # from failed too: the copy was put back in the queue there (gateway outbox retry), or
    # the forward did arrive although this node gave up on its answer
    "delivered": ("queued", "failed"),
    "signed": ("queued", "delivered", "failed"),
    "returned": ("queued", "delivered", "failed"),
    "recalled": ("queued", "delivered"),
    "failed": ("queued",),
}
MAX_HOPS = 6
#: bodies and attachments up to this size travel inside the forward (base64), up to
#: INLINE_TOTAL per message; larger ones are fetched by the receiver (a claim check)
INLINE_MAX = 256 * 1024
INLINE_TOTAL = 1024 * 1024


class TransferError(Exception):
    """A forward, status or recall the receiver refuses; ``kind`` is the problem type."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


# -- receiving a forward -------------------------------------------------------------------
def _str_list(body: dict, key: str) -> list[str]:
    v = body.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise TransferError(400, "validation", f"{key}: expected a non-empty list of strings")
    return v


@dataclass
class Incoming:
    """A forward that passed every check, its contents fetched or carried inline: ready to
    accept once :func:`store_inline` has stored ``blobs``."""

    peer: str
    env: Envelope
    units: list[str]
    hops: list[str]
    blobs: list[bytes] = field(default_factory=list)  # inline contents, checked, not stored yet


def store_inline(node: Node, batch: list[Incoming]) -> None:
    """Store the inline contents of forwards about to be accepted, durable together."""
    node.blobs.put_many([b for inc in batch for b in inc.blobs])


def import_message(node: Node, peer: str, body: Any) -> tuple[dict, bool]:
    """Check, store and accept one forward; the answer is the same for every repeat."""
    inc = prepare(node, peer, body)
    store_inline(node, [inc])
    try:
        acc = pipeline.accept(node, inc.env, **_accept_args(inc))
    except pipeline.Rejected as exc:
        raise TransferError(exc.status, exc.kind, exc.detail) from None
    return answer(node, inc, acc), acc.created


def _accept_args(inc: Incoming) -> dict[str, Any]:
    return dict(actor=f"node:{inc.peer}", source=f"node:{inc.peer}", units=set(inc.units), hops=tuple(inc.hops),
                summary={"via": inc.peer, "origin": inc.hops[0], "hops": inc.hops})


def accept_many(node: Node, batch: list[Incoming]) -> list[pipeline.Accepted | TransferError]:
    """Accept several checked forwards in ONE transaction (one commit), each in its own
    savepoint so that one refused forward leaves the others standing."""
    def unit(conn: Connection) -> list[pipeline.Accepted | TransferError]:
        out: list[pipeline.Accepted | TransferError] = []
        for inc in batch:
            try:
                with conn.begin_nested():
                    out.append(pipeline.accept(node, inc.env, session=conn, **_accept_args(inc)))
            except pipeline.Rejected as exc:
                out.append(TransferError(exc.status, exc.kind, exc.detail))
            except node.db.integrity_errors:  # the same message arrived by another request meanwhile
                out.append(pipeline.Accepted(pipeline.StoredMessage(inc.env.message_id), created=False))
        return out

    return node.db.write(unit)


def prepare(node: Node, peer: str, body: Any) -> Incoming:
    """Every check of a forward, and its small contents stored (or fetched from the sender);
    nothing of the message itself is stored yet."""
    if not isinstance(body, dict):
        raise TransferError(400, "validation", "expected a JSON object with message_id, units, hops, envelope")
    mid, xml = body.get("message_id"), body.get("envelope")
    if not isinstance(mid, str) or not isinstance(xml, str):
        raise TransferError(400, "validation", "message_id and envelope (the canonical XML) are required strings")
    units, hops = _str_list(body, "units"), _str_list(body, "hops")
    if hops[-1] != peer:
        raise TransferError(400, "validation", f"hops: the last hop must be the sending node {peer!r}, "
                                               f"got {hops[-1]!r}")
    if node.id in hops or len(hops) > MAX_HOPS:
        raise TransferError(422, "no-route", f"the message has already passed this node or too many nodes "
                                             f"({' -> '.join(hops)}): a routing loop")
    try:
        env = Envelope.from_xml(xml.encode("utf-8"))
    except EnvelopeError as exc:
        raise TransferError(422, "validation", f"envelope: {exc}") from None
    except ValueError as exc:  # xmlsafe's refusals (DTD, size, depth …)
        raise TransferError(400, "malformed-xml", f"envelope: {exc}") from None
    link = node.config.peers[peer].clearance
    if env.clearance_needed > CLASSIFICATION_LEVEL[link]:
        raise TransferError(403, "clearance-too-low", f"the link from node {peer} is cleared up to {link}; "
                                                      f"a {env.classification} message is refused")
    if env.message_id != mid:
        raise TransferError(400, "validation", f"message_id {mid!r} differs from the envelope's {env.message_id!r}")
    if env.sender_node != hops[0]:
        raise TransferError(422, "validation", f"the envelope's sender node {env.sender_node!r} is not the first "
                                               f"hop {hops[0]!r}")
    foreign = pipeline.foreign_id(mid, hops[0], node.known_nodes())
    if foreign:  # before anything is fetched; pipeline.accept checks it too
        raise TransferError(422, "foreign-message-id", foreign)
    # The origin must be known to serve the sender unit: by its [peers] entry or by the signed
    # directory. A hop list is the sender's word, so an origin nobody vouches for (a node id
    # made up by a peer) cannot lend its name to any unit. Only this node's parent, which
    # checked the origin itself when the message reached it, relays for other origins: a peer
    # that names another node first (a known one too) would otherwise send as its units.
    origin = hops[0]
    relayed_by_parent = origin != peer and peer == node.config.federation.parent
    if origin != peer and not relayed_by_parent:
        raise TransferError(422, "forbidden-unit", f"node {peer} is not this node's parent and relays for no "
                                                   f"other node; the message names node {origin} as its origin "
                                                   f"({' -> '.join(hops)})")
    declared = node.config.peers[origin].units if origin in node.config.peers else []
    vouched = env.sender_unit in declared or node.directory_node(env.sender_unit) == origin
    if not (vouched or relayed_by_parent):
        raise TransferError(422, "forbidden-unit", f"sender unit {env.sender_unit} is not served by node {origin} "
                                                   f"(neither [peers.{origin}] units nor the directory say so)")
    known = {r.unit for r in env.recipients}
    stray = [u for u in units if u not in known]
    if stray:
        raise TransferError(422, "validation", f"units {', '.join(stray)} are not recipients of the message")
    inline = _inline(node, env, body.get("blobs"))
    _fetch_blobs(node, peer, env, skip=inline)
    return Incoming(peer, env, units, hops, list(inline.values()))


def answer(node: Node, inc: Incoming, acc: pipeline.Accepted) -> dict:
    mid, units = inc.env.message_id, inc.units
    if acc.created and acc.message.accepted_at is not None:
        accepted_at = acc.message.accepted_at  # just stored, for exactly these units
    else:
        with node.db.sessions() as s:
            m = s.get(Message, mid)
            assert m is not None
            accepted_at = m.accepted_at
            here = set(s.scalars(select(Delivery.unit).where(Delivery.message_id == mid)))
        missing = [u for u in units if u not in here]
        if missing:
            # the same message id came before for other units: never two messages under one id
            raise TransferError(409, "message-id-conflict", f"message {mid} is already here for other units; "
                                                            f"units {', '.join(missing)} were not part of it")
    # the same answer for the first delivery and every repeat (the API says which it was in
    # the Idempotent-Replayed header)
    return {"message_id": mid, "node": node.id, "units": sorted(units),
            "accepted_at": accepted_at.isoformat().replace("+00:00", "Z")}


def inline_blobs(node: Node, env: Envelope) -> dict[str, str]:
    """The small bodies and attachments of ``env``, base64, to travel with its forward: most
    official documents are small, and a fetch back to the sender costs a signed round trip."""
    out: dict[str, str] = {}
    total = 0
    for a in env.attachments:
        if a.size > INLINE_MAX or total + a.size > INLINE_TOTAL or a.sha256 in out or not node.blobs.exists(a.sha256):
            continue
        with node.blobs.open(a.sha256) as f:
            out[a.sha256] = base64.b64encode(f.read()).decode("ascii")
        total += a.size
    return out


def _inline(node: Node, env: Envelope, blobs: Any) -> dict[str, bytes]:
    """The contents sent inline that this node lacks, decoded and checked against the
    envelope (stored later, together with the rest of the batch's)."""
    out: dict[str, bytes] = {}
    if not blobs:
        return out
    if not isinstance(blobs, dict):
        raise TransferError(400, "validation", "blobs: expected an object of SHA-256 -> base64 content")
    sizes = {a.sha256: a.size for a in env.attachments}
    for sha, b64 in blobs.items():
        if sha not in sizes or not isinstance(b64, str):
            raise TransferError(400, "validation", f"blobs: {sha!r} is not an attachment of the envelope")
        if node.blobs.touch(sha):  # stored already: marked in use (see BlobStore.in_use)
            continue
        try:
            data = base64.b64decode(b64, validate=True)
        except ValueError:
            raise TransferError(400, "validation", f"blobs: {sha[:12]}… is not base64") from None
        if len(data) != sizes[sha] or hashlib.sha256(data).hexdigest() != sha:
            raise TransferError(422, "validation", f"blobs: the content sent for {sha[:12]}… does not match "
                                                   f"its SHA-256 or size in the envelope")
        out[sha] = data
    return out


def _fetch_blobs(node: Node, peer: str, env: Envelope, skip: Mapping[str, bytes]) -> None:
    # the sizes are the peer's word: held to what a caller's upload or a ferry file may be
    limit = node.config.api.max_blob_bytes
    for a in env.attachments:
        if a.sha256 not in skip and a.size > limit:
            raise TransferError(413, "too-large", f"{a.name} is {a.size} bytes; this node accepts at most {limit}")
    for a in env.attachments:
        if a.sha256 in skip or node.blobs.touch(a.sha256):  # stored already: marked in use
            continue
        try:
            with node.federation.client.get_stream(peer, f"/messages/{env.message_id}/blobs/{a.sha256}") as r:
                r.raw.decode_content = True
                sha, size = node.blobs.put_stream(r.raw, max_bytes=a.size, keep_free=node.config.api.min_free_bytes)
        except (RetryableError, PermanentError) as exc:
            raise TransferError(502, "peer-unavailable", f"fetching {a.name} ({a.sha256[:12]}…) from node {peer} "
                                                         f"failed: {exc}") from None
        except BlobNoSpace as exc:
            raise TransferError(507, "storage-full", f"fetching {a.name} from node {peer}: {exc.strerror}") from None
        except BlobTooLarge:
            sha, size = "", a.size + 1  # more than the envelope says: refused below
        if sha != a.sha256 or size != a.size:
            raise TransferError(422, "validation", f"{a.name}: node {peer} sent content whose SHA-256 or size "
                                                   f"does not match the envelope")


def blob_allowed(node: Node, peer: str, message_id: str, sha256: str) -> bool:
    """A peer may fetch a blob only of a message this node forwards to it."""
    with node.db.sessions() as s:
        xml = s.scalar(select(Message.envelope_xml).where(
            Message.id == message_id,
            Message.id.in_(select(Delivery.message_id).where(Delivery.message_id == message_id,
                                                             Delivery.route_kind == "node",
                                                             Delivery.target == peer))))
    if xml is None:
        return False
    env = Envelope.from_xml(xml, validate=False)
    # the peer's clearance may have been lowered since the message was forwarded to it
    if env.clearance_needed > CLASSIFICATION_LEVEL[node.config.peers[peer].clearance]:
        return False
    return any(a.sha256 == sha256 for a in env.attachments)


# -- status coming back -------------------------------------------------------------------
def apply_statuses(node: Node, peer: str, items: Any) -> dict:
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise TransferError(400, "validation", "items: expected a list of status objects")
    counts: dict[str, int] = {}
    with node.db.begin() as s:
        for item in items:
            outcome = apply_status(s, peer, item)
            counts[outcome] = counts.get(outcome, 0) + 1
    return {"node": node.id, "outcomes": counts}


def _time(v: Any) -> datetime | None:
    """A status item's ``at``: None if it has none (the change is then dated on arrival); a
    value that is no date-time a column can keep is refused, never replaced by another time."""
    if v is None:
        return None
    expected = 'expected an ISO 8601 date-time with its offset, e.g. "2026-11-20T02:15:00+00:00", or null'
    if not isinstance(v, str):
        raise TransferError(400, "validation", f"a status item's at is {type(v).__name__}; {expected}")
    try:
        t = datetime.fromisoformat(v)
        if "T" not in v.upper() and " " not in v:  # fromisoformat takes a bare date as midnight
            raise ValueError
        # written by a node of an older version without its offset: its times were UTC
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise TransferError(400, "validation", f"a status item's at {v[:60]!r} is not a date-time in "
                                               f"range; {expected}") from None


def apply_status(s: Session, peer: str, item: dict) -> str:
    mid, unit, status = item.get("message_id"), item.get("unit"), item.get("status")
    if not isinstance(mid, str) or not isinstance(unit, str) or status not in STATUS_FROM:
        raise TransferError(400, "validation", f"a status item needs message_id, unit and a status among "
                                               f"{', '.join(STATUS_FROM)}; got {item!r}"[:400])
    d = s.scalars(select(Delivery).where(Delivery.message_id == mid, Delivery.unit == unit,
                                         Delivery.route_kind == "node", Delivery.target == peer)
                  .with_for_update()).first()
    if d is None:
        # not a copy this node forwarded to that node: never let one node report for another
        audit.append(s, actor=f"node:{peer}", action="status.reject", obj=f"delivery:{mid}/{unit}",
                     outcome="unmatched", detail={"status": status})
        return "unmatched"
    now = datetime.now(UTC)
    at = _time(item.get("at")) or now
    # cut to what the columns hold (signer, receipt_no VARCHAR(100), in characters), so that
    # PostgreSQL refuses no batch over one value; a 退回 reason is kept as the worker keeps one
    signer, receipt_no, reason = (str(item[k])[:most] if item.get(k) is not None else None
                                  for k, most in (("signer", 100), ("receipt_no", 100), ("reason", 2000)))
    outcome = "unchanged"
    if d.status in STATUS_FROM[status]:
        if status in ("signed", "returned"):  # a repeated report adds no second receipt
            s.add(ReceiptRecord(delivery_id=d.id, action=status.upper(), signer=signer, receipt_no=receipt_no,
                                reason=reason, time=at, source=f"node:{peer}", received_at=now))
        prev, d.status, d.updated_at = d.status, status, now
        if status == "delivered":
            d.delivered_at = at
        elif status in ("signed", "returned"):
            d.signer, d.receipt_no, d.signed_at = signer, receipt_no, at
            d.delivered_at = d.delivered_at or at
            if status == "returned":
                d.reason = reason
        elif status == "failed":
            d.last_error = str(item.get("error") or "failed at the receiving node")[:2000]
        events.status_changed(s, d, prev)
        outcome = status
    audit.append(s, actor=f"node:{peer}", action="status.accept", obj=f"delivery:{mid}/{unit}", outcome=outcome,
                 detail={"status": status, "signer": signer, "receipt_no": receipt_no, "reason": reason})
    return outcome


# -- recall from the sending node ---------------------------------------------------------
def recall(node: Node, peer: str, body: Any) -> dict:
    if not isinstance(body, dict) or not isinstance(body.get("message_id"), str):
        raise TransferError(400, "validation", "expected {\"message_id\": …, \"units\": [...]}")
    mid, units = body["message_id"], _str_list(body, "units")
    with node.db.begin() as s:
        m = s.get(Message, mid)
        if m is None or m.source != f"node:{peer}":
            raise TransferError(404, "not-found", f"no message {mid} came here from node {peer}")
        pipeline.recall(s, mid, set(units), recallable=pipeline.recallable(node))
        audit.append(s, actor=f"node:{peer}", action="message.recall", obj=f"message:{mid}",
                     detail={"units": units})
    return {"message_id": mid, "node": node.id, "units": units, "state": "recall-requested"}
