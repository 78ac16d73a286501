"""The one path every message takes, up to "accepted" (202).

``accept`` stores the message, one delivery row per recipient, one outbox row per delivery
that has an adapter route, one ``forward`` outbox row per next-hop node (carrying all the
units behind that node), and the audit entry — in ONE transaction. When it returns the
message is committed; a crash at any later instant loses nothing, because the worker finds
the outbox rows. Everything before it (parsing, validation, routing) stores nothing.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import cast
from datetime import datetime, UTC

from sqlalchemy import Connection, CursorResult, DateTime, Integer, bindparam, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapters.base import remote_ref
from gateway import audit, events, payloads
from gateway.envelope import CLASSIFICATION_LEVEL, Envelope, EnvelopeError, Recipient
from gateway.models import table, Delivery, IdempotencyRecord, Message, OutboxEntry
from gateway.node import Node
from gateway.routing import NoRoute, Route


class Rejected(ValueError):
    """Input that passed the schema but breaks a rule of this node; nothing was stored."""

    def __init__(self, kind: str, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status = kind, detail, status


@dataclass
class Accepted:
    message: Message
    created: bool  # False: an earlier accept of the same message id / Idempotency-Key
    routes: list[Route] | None = None  # per recipient, in envelope order (when created)


@dataclass
class IdempotencyKey:
    api_key_id: str
    key: str
    request_hash: str


def plan_routes(node: Node, env: Envelope, recipients: list[Recipient] | None = None,
                avoid: tuple[str, ...] = ()) -> list[Route]:
    routes = []
    for r in env.recipients if recipients is None else recipients:
        try:
            routes.append(node.routes.route_for(env.subsystem, env.type, r.unit, avoid))
        except NoRoute as exc:
            raise Rejected("no-route", str(exc)) from None
    for route in routes:
        if route.kind == "adapter" and route.target not in node.config.adapters:
            raise Rejected("no-route", f"route to adapter {route.target!r}, which is not configured")
        peer = node.config.peers.get(route.target) if route.kind == "node" else None
        if peer is not None and env.clearance_needed > CLASSIFICATION_LEVEL[peer.clearance]:
            # a node is never given a message above what its link is cleared for
            raise Rejected("no-route", f"the link to node {route.target} is cleared up to {peer.clearance}; "
                                       f"a {env.classification} message cannot travel on it")
    return routes


def accept(node: Node, env: Envelope, *, actor: str, source: str = "api", api_key_id: str | None = None,
           summary: dict | None = None, idempotency: IdempotencyKey | None = None,
           session: Session | Connection | None = None, units: Collection[str] | None = None,
           hops: tuple[str, ...] = ()) -> Accepted:
    """Store ``env`` (already validated) for delivery. Idempotent by message id and by
    (caller, Idempotency-Key).

    A message forwarded by another node names the ``units`` this node is to deliver to (the
    others are other nodes' business) and the ``hops`` (node ids) it has passed through,
    which it never goes back to."""
    try:
        payloads.validate(env.payload)
    except EnvelopeError as exc:
        raise Rejected("validation", str(exc)) from None
    recipients = env.recipients if units is None else [r for r in env.recipients if r.unit in units]
    routes = plan_routes(node, env, recipients, hops)
    # serialised here, not inside the transaction: writers queue on one lock (SQLite), and
    # what happens while holding it limits every accept on the node
    plan = _Plan(recipients, routes, tuple(hops), node.id, env.to_xml())
    if session is not None:
        return _store(session, env, plan, actor, source, api_key_id, summary, idempotency)

    def unit(s: Connection) -> Accepted:
        return _store(s, env, plan, actor, source, api_key_id, summary, idempotency)

    try:
        return node.db.write(unit)  # group commit: returns once committed
    except IntegrityError:
        # Two identical requests raced; the other one committed first. Answer as it did.
        return node.db.write(unit)


# Statements built once: constructing them per request costs more than running them.
_IDEM = select(IdempotencyRecord.request_hash, IdempotencyRecord.message_id).where(
    IdempotencyRecord.api_key_id == bindparam("key_id"), IdempotencyRecord.key == bindparam("key"))
_EXISTING = select(Message.sender_unit, Message.api_key_id).where(Message.id == bindparam("mid"))
_INSERT_MESSAGE = insert(table(Message))
_INSERT_IDEM = insert(table(IdempotencyRecord))
_INSERT_OUTBOX = insert(table(OutboxEntry)).from_select(
    ["kind", "delivery_id", "target", "priority", "state", "attempts", "next_attempt_at", "created_at"],
    select(literal("deliver"), Delivery.id, Delivery.target, bindparam("priority", type_=Integer),
           literal("pending"), literal(0), bindparam("now", type_=DateTime(timezone=True)),
           bindparam("now2", type_=DateTime(timezone=True)))
    .where(Delivery.message_id == bindparam("mid"), Delivery.route_kind == "adapter")
    .order_by(Delivery.id))


_FIRST_OF_HOP = (select(Delivery.id).where(Delivery.message_id == bindparam("mid"), Delivery.route_kind == "node",
                                           Delivery.target == bindparam("hop"))
                 .order_by(Delivery.id).limit(1).scalar_subquery())
#: one forward outbox row for the units of a message behind next hop ``hop`` (also used by
#: reconciliation to forward copies again)
INSERT_FORWARD = insert(table(OutboxEntry)).values(
    kind="forward", delivery_id=_FIRST_OF_HOP, target=bindparam("hop"), payload=bindparam("payload"),
    priority=bindparam("priority"), state="pending", attempts=0, next_attempt_at=bindparam("now"),
    created_at=bindparam("now"), conversation=bindparam("conversation"))


@dataclass
class _Plan:
    recipients: list[Recipient]
    routes: list[Route]
    hops: tuple[str, ...]
    self_id: str
    envelope_xml: bytes


_DELIVERY_COLUMNS = ("message_id", "unit", "unit_name", "copy_type", "copy_no", "route_kind", "target",
                     "status", "remote_ref", "updated_at")


def _insert_deliveries(s: Session | Connection, env: Envelope, plan: _Plan, now: datetime) -> None:
    """One row per recipient through the driver's executemany: SQLAlchemy's per-row parameter
    processing costs more than the insert itself once a document goes to 200 units."""
    conn = s.connection() if isinstance(s, Session) else s
    sqlite = conn.dialect.name == "sqlite"
    # SQLite keeps DateTime as text in SQLAlchemy's own format; PostgreSQL takes the datetime
    ts: object = now.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else now
    mark = "?" if sqlite else "%s"
    sql = (f"INSERT INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) "
           f"VALUES ({', '.join([mark] * len(_DELIVERY_COLUMNS))})")
    conn.exec_driver_sql(sql, [
        (env.message_id, r.unit, r.name, r.copy_type, r.copy_no, route.kind, route.target,
         "queued", remote_ref(env.message_id, r.unit), ts)
        for r, route in zip(plan.recipients, plan.routes)])


def _store(s: Session | Connection, env: Envelope, plan: _Plan, actor: str, source: str,
           api_key_id: str | None, summary: dict | None, idem: IdempotencyKey | None) -> Accepted:
    if idem is not None:
        rec = s.execute(_IDEM, {"key_id": idem.api_key_id, "key": idem.key}).first()
        if rec is not None:
            if rec.request_hash != idem.request_hash:
                raise Rejected("idempotency-key-reused",
                               f"Idempotency-Key {idem.key!r} was used before with a different request body",
                               status=422)
            return Accepted(Message(id=rec.message_id), created=False)
    existing = s.execute(_EXISTING, {"mid": env.message_id}).first()
    if existing is not None:
        if existing.sender_unit != env.sender_unit or (api_key_id and existing.api_key_id != api_key_id):
            raise Rejected("message-id-conflict", f"message id {env.message_id} is already taken", status=409)
        return Accepted(Message(id=env.message_id), created=False)

    now = datetime.now(UTC)
    values = dict(
        id=env.message_id, subsystem=env.subsystem, type=env.type, sender_unit=env.sender_unit,
        classification=env.classification, clearance=env.clearance_needed, urgency=env.urgency,
        in_reply_to=env.in_reply_to, conversation_id=env.conversation_id, api_key_id=api_key_id,
        source=source, summary=summary or {}, envelope_xml=plan.envelope_xml, accepted_at=now,
    )
    routes = plan.routes
    s.execute(_INSERT_MESSAGE, values)
    # Bulk statements: a document to 200 units is two INSERTs here, not 400 round trips.
    _insert_deliveries(s, env, plan, now)
    if any(route.kind == "adapter" for route in routes):
        s.execute(_INSERT_OUTBOX, {"priority": env.urgency_rank, "now": now, "now2": now, "mid": env.message_id})
    hops: dict[str, list[str]] = {}
    for r, route in zip(plan.recipients, routes):
        if route.kind == "node":
            hops.setdefault(route.target, []).append(r.unit)
    for hop, units in hops.items():
        # one forward per next node, whatever the number of units behind it
        s.execute(INSERT_FORWARD, {"mid": env.message_id, "hop": hop, "priority": env.urgency_rank, "now": now,
                                    "payload": {"units": units, "hops": [*plan.hops, plan.self_id]},
                                    "conversation": env.conversation_id})
    if idem is not None:
        s.execute(_INSERT_IDEM, dict(api_key_id=idem.api_key_id, key=idem.key, request_hash=idem.request_hash,
                                     message_id=env.message_id, created_at=now))
    audit.append(s, actor=actor, action="message.accept", obj=f"message:{env.message_id}", detail={
        "subsystem": env.subsystem, "type": env.type, "sender": env.sender_unit,
        "recipients": len(env.recipients), "classification": env.classification,
        "urgency": env.urgency, "source": source,
        "forwarded": sum(1 for r in routes if r.kind == "node"),
        **({"hops": list(plan.hops), "units": len(plan.recipients)} if plan.hops else {}),
    })
    return Accepted(Message(**values), created=True, routes=routes)



def recall(s: Session, message_id: str, units: Collection[str] | None = None) -> None:
    """Withdraw (撤回) a message's copies not yet signed for: a copy still waiting in the
    outbox is simply not sent; one already handed over is recalled through its adapter or,
    for a copy at another node, by asking that node (its answer comes back as a status)."""
    now = datetime.now(UTC)
    m = s.get(Message, message_id)
    assert m is not None
    ids = [d.id for d in m.deliveries]
    for d in m.deliveries:
        if units is not None and d.unit not in units:
            continue
        if d.status == "queued":
            if d.route_kind == "adapter":
                waiting = bool(cast(CursorResult, s.execute(update(OutboxEntry).where(
                    OutboxEntry.delivery_id == d.id, OutboxEntry.kind == "deliver", OutboxEntry.state == "pending")
                    .values(state="done", last_error="recalled before delivery", finished_at=now))).rowcount)
            else:  # the hop's forward skips units that are no longer queued when it runs
                waiting = s.scalar(select(OutboxEntry.id).where(
                    OutboxEntry.kind == "forward", OutboxEntry.target == d.target, OutboxEntry.state == "pending",
                    OutboxEntry.delivery_id.in_(ids))) is not None
            if waiting:
                prev, d.status, d.updated_at = d.status, "recalled", now
                events.status_changed(s, d, prev)
                continue
        if d.status in ("delivered", "queued"):
            s.add(OutboxEntry(kind="recall", delivery_id=d.id, target=d.target or "", priority=0,
                              next_attempt_at=now, created_at=now))
