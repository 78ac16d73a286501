"""The one path every message takes, up to "accepted" (202).

``accept`` stores the message, one delivery row per recipient, one outbox row per delivery
that has an adapter route, one ``forward`` outbox row per next-hop node (carrying all the
units behind that node), and the audit entry — in ONE transaction. When it returns the
message is committed; a crash at any later instant loses nothing, because the worker finds
the outbox rows. Everything before it (parsing, validation, routing) stores nothing.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, cast
from datetime import datetime, UTC

from sqlalchemy import Connection, CursorResult, bindparam, insert, select, update
from sqlalchemy.orm import Session

from adapters.base import can_recall, carries, remote_ref
from gateway import audit, events, payloads
from gateway.db import driver_mark, driver_stamp, group_cursor, in_group_pipeline, json_text
from gateway.envelope import CLASSIFICATION_LEVEL, Envelope, EnvelopeError, Recipient, id_owner, same_message
from gateway.models import table, Delivery, Message, OutboxEntry
from gateway.node import Node
from gateway.routing import NoRoute, Route


class Rejected(ValueError):
    """Input that passed the schema but breaks a rule of this node; nothing was stored."""

    def __init__(self, kind: str, detail: str, status: int = 422, field: str | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.status, self.field = kind, detail, status, field


@dataclass(slots=True)
class StoredMessage:
    """What an accept stored (or found already stored): the fields its answer needs. A plain
    object, not an ORM instance, which would cost as much to build as an INSERT."""

    id: str
    accepted_at: datetime | None = None
    sender_unit: str | None = None
    classification: str | None = None
    urgency: str | None = None
    summary: dict | None = None


@dataclass
class Accepted:
    message: StoredMessage
    created: bool  # False: an earlier accept of the same message id / Idempotency-Key
    routes: list[Route] | None = None  # per recipient, in envelope order (when created)
    by_id: bool = False  # not created because a message with this id is stored (see accept)


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
            at = next(i for i, x in enumerate(env.recipients) if x is r)
            raise Rejected("no-route", str(exc), field=f"recipients.{at}.unit") from None
    for route in routes:
        if route.kind == "adapter" and route.target not in node.config.adapters:
            raise Rejected("no-route", f"route to adapter {route.target!r}, which is not configured")
        if route.kind == "adapter" and not _carries(node, route.target, env.subsystem):
            raise Rejected("no-route", f"the route for these recipients goes to adapter {route.target!r}, whose "
                                       f"legacy system cannot take {env.subsystem} messages; the route table "
                                       f"needs a row for subsystem {env.subsystem!r}")
        peer = node.config.peers.get(route.target) if route.kind == "node" else None
        if peer is not None and env.clearance_needed > CLASSIFICATION_LEVEL[peer.clearance]:
            # a node is never given a message above what its link is cleared for
            raise Rejected("no-route", f"the link to node {route.target} is cleared up to {peer.clearance}; "
                                       f"a {env.classification} message cannot travel on it")
    refusing = {route.target for route in routes
                if route.kind == "adapter" and node.attachments_policy(route.target) == "refuse"}
    if refusing and any(a.role == "attachment" for a in env.attachments):
        # never a copy without its 附件 that nobody knows of: the sender is told now
        units = [r.unit for r, route in zip(recipients or env.recipients, routes) if route.target in refusing]
        raise Rejected("attachments-not-carried",
                       f"the copies for {', '.join(units)} go to {', '.join(sorted(refusing))}, whose legacy system "
                       f"takes a document's body only (正文), not its attachments (附件); send the attachments "
                       f"another way, or merge them into the body; the node's operator may let that system "
                       f"receive the body alone ([adapters.NAME] attachments = \"omit\")", field="attachments")
    return routes


def recallable(node: Node) -> Callable[[str], bool]:
    """Whether the legacy system behind a configured adapter has a recall (see recall)."""
    return lambda adapter: adapter not in node.config.adapters or can_recall(
        str(node.config.adapters[adapter].get("type")))


def _carries(node: Node, adapter: str, subsystem: str) -> bool:
    return carries(str(node.config.adapters[adapter].get("type")), subsystem)


def accept(node: Node, env: Envelope, *, actor: str, source: str = "api", api_key_id: str | None = None,
           summary: dict | None = None, idempotency: IdempotencyKey | None = None,
           session: Session | Connection | None = None, units: Collection[str] | None = None,
           hops: tuple[str, ...] = (), new_id: bool = False) -> Accepted:
    """Store ``env`` (already validated) for delivery. Idempotent by message id and by
    (caller, Idempotency-Key). ``new_id``: the message id was just generated for this
    request (a UUIDv7 with this node's id), so no stored message can have it and the lookup
    is skipped. An id of the form ``<UUIDv7>:<node id>`` is that node's: a message from
    another origin is refused under it (``foreign-message-id``, see foreign_id).

    A message forwarded by another node names the ``units`` this node is to deliver to (the
    others are other nodes' business) and the ``hops`` (node ids) it has passed through,
    which it never goes back to."""
    try:
        # a payload this node wrote from a request model its API validated is held to its
        # XSD by tests, not checked again here (see Envelope.written_payload)
        if not env.payload_written:
            payloads.validate(env.payload)
        if source != "api":  # the API checked the subsystem's rules on its request already
            payloads.check_rules(env)
    except EnvelopeError as exc:
        raise Rejected("validation", str(exc)) from None
    if not new_id:
        problem = foreign_id(env.message_id, hops[0] if hops else node.id, node.known_nodes())
        if problem:
            raise Rejected("foreign-message-id", problem, field="message_id")
    recipients = env.recipients if units is None else [r for r in env.recipients if r.unit in units]
    routes = plan_routes(node, env, recipients, hops)
    # Everything but the statements is prepared here, not inside the transaction: writers
    # queue on one lock (SQLite), and what happens while holding it limits every accept.
    plan = _plan(env, recipients, routes, tuple(hops), node.id, node.db.postgres, actor, source, api_key_id,
                 summary)
    plan.new_id = new_id
    if session is not None:
        return _store(session, env, plan, idempotency)

    def unit(s: Connection) -> Accepted:
        return _store(s, env, plan, idempotency)

    # a copy for another node adds its forward row through SQLAlchemy (_forward_rows): such a
    # unit cannot share the group's pipeline; a new id without an Idempotency-Key is stored
    # without reading anything first (see _write_rows)
    pipelined = all(route.kind == "adapter" for route in routes)
    write_only = pipelined and new_id and idempotency is None
    try:
        # group commit: returns once committed
        out = node.db.write(unit, pipelined=pipelined, write_only=write_only)
    except node.db.integrity_errors:
        # Two identical requests raced (PostgreSQL: two transactions both found no message
        # and both inserted it); the other one committed first. Answer as it did.
        out = node.db.write(unit, pipelined=pipelined)
    if out.by_id:
        _same_or_conflict(node, env, plan)
    return out


def foreign_id(message_id: str, origin: str, known: Collection[str] = ()) -> str | None:
    """Why a message that comes from node ``origin`` (its first hop, or this node for one a
    caller or a legacy system gave it) may not have ``message_id``: the id is another node's
    (``<UUIDv7>:<node id>``, see envelope.new_message_id, or any id ending in ``:<node id>``
    of a ``known`` node, see envelope.own_id). Without this check a node, or a caller of one,
    that saw such an id could store a message under it wherever the real one has not
    arrived yet, and the real one would be refused there (409 message-id-conflict)."""
    owner = id_owner(message_id, known)
    if owner is None or owner == origin:
        return None
    return (f"message id {message_id} is node {owner}'s (an id ending in :{owner} is that node's), and this "
            f"message comes from node {origin}; send it under an id of its own, or none (the gateway then "
            f"makes one)")


def _same_or_conflict(node: Node, env: Envelope, plan: _Plan) -> None:
    """A message id sent again is a replay only if it carries the same message; a different
    one under a taken id is refused (409), never answered as if it had been stored."""
    with node.db.sessions() as s:
        stored = s.scalar(select(Message.envelope_xml).where(Message.id == env.message_id))
    if stored is not None and not same_message(stored, plan.message_row[_ENVELOPE_AT]):
        raise Rejected("message-id-conflict", f"message id {env.message_id} was used before for a different "
                                              f"message; a resent message must be identical (or use a new id)",
                       status=409)


#: one forward outbox row for the units of a message behind next hop ``hop`` (also used by
#: reconciliation to forward copies again)
_FIRST_OF_HOP = (select(Delivery.id).where(Delivery.message_id == bindparam("mid"), Delivery.route_kind == "node",
                                           Delivery.target == bindparam("hop"))
                 .order_by(Delivery.id).limit(1).scalar_subquery())
INSERT_FORWARD = insert(table(OutboxEntry)).values(
    kind="forward", delivery_id=_FIRST_OF_HOP, target=bindparam("hop"), payload=bindparam("payload"),
    priority=bindparam("priority"), state="pending", attempts=0, next_attempt_at=bindparam("now"),
    created_at=bindparam("now"), conversation=bindparam("conversation"))


_MESSAGE_COLUMNS = ("id", "subsystem", "type", "sender_unit", "classification", "clearance", "urgency",
                    "in_reply_to", "conversation_id", "api_key_id", "source", "summary", "envelope_xml",
                    "accepted_at")
_ENVELOPE_AT = _MESSAGE_COLUMNS.index("envelope_xml")
_DELIVERY_COLUMNS = ("message_id", "unit", "unit_name", "copy_type", "copy_no", "route_kind", "target",
                     "status", "remote_ref", "updated_at")
_IDEM_COLUMNS = ("api_key_id", "key", "request_hash", "message_id", "created_at")


class _Sql:
    """The accept path's statements for one driver (sqlite3 or psycopg), run on its cursor.

    Every other writer waits while they run (SQLite has one writer; PostgreSQL serialises the
    audit chain), so they skip SQLAlchemy's per-statement work (compiled-cache lookup, bind
    processing, result set-up), which costs more than the statements themselves. The values
    are stored exactly as the models' types store them (checked by tests/test_pipeline_sql.py)."""

    def __init__(self, postgres: bool) -> None:
        m = driver_mark(postgres)
        self.postgres = postgres

        def insert_sql(name: str, cols: tuple[str, ...], json_col: str = "") -> str:
            marks = [f"CAST({m} AS JSON)" if postgres and c == json_col else m for c in cols]
            return f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join(marks)})"

        self.idem = f"SELECT request_hash, message_id FROM idempotency WHERE api_key_id = {m} AND key = {m}"
        self.existing = f"SELECT sender_unit, api_key_id FROM messages WHERE id = {m}"
        self.message = insert_sql("messages", _MESSAGE_COLUMNS, "summary")
        self.deliveries = insert_sql("deliveries", _DELIVERY_COLUMNS)
        self.outbox = ("INSERT INTO outbox (kind, delivery_id, target, priority, state, attempts, next_attempt_at, "
                       f"created_at) SELECT 'deliver', id, target, {m}, 'pending', 0, {m}, {m} FROM deliveries "
                       f"WHERE message_id = {m} AND route_kind = 'adapter' ORDER BY id")
        self.idem_insert = insert_sql("idempotency", _IDEM_COLUMNS)
        self._accept_sql: dict[int, str] = {}

    def accept_one(self, n: int) -> str:
        """PostgreSQL: the message, its ``n`` deliveries, their outbox rows and the audit
        entry in one statement."""
        sql = self._accept_sql.get(n)
        if sql is None:
            row = "(" + ", ".join(["%s"] * len(_DELIVERY_COLUMNS)) + ")"
            sql = self._accept_sql[n] = (
                f"WITH new_message AS ({self.message} RETURNING id), "
                f"new_deliveries AS (INSERT INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) "
                f"VALUES {', '.join([row] * n)} RETURNING id, target, route_kind), "
                f"new_entry AS ({audit.PG_APPEND_ONE}) "
                "INSERT INTO outbox (kind, delivery_id, target, priority, state, attempts, next_attempt_at, "
                "created_at) SELECT 'deliver', id, target, %s, 'pending', 0, %s, %s FROM new_deliveries "
                "WHERE route_kind = 'adapter' ORDER BY id")
        return sql

    def stamp(self, t: datetime) -> object:
        return driver_stamp(t, self.postgres)


_SQL = {True: _Sql(True), False: _Sql(False)}

#: PostgreSQL: a message to at most this many units is stored by one statement (its
#: parameters, ten per unit, stay far below the protocol's 65,535); beyond, by one per table
ONE_STATEMENT_MAX = 1000


@dataclass
class _Plan:
    """An accept's rows, built before the transaction."""

    recipients: list[Recipient]
    routes: list[Route]
    hops: tuple[str, ...]
    self_id: str
    message: StoredMessage
    message_row: tuple
    delivery_rows: list[tuple]
    stamp: object  # the accept time as the database takes it
    audit: audit.Record
    new_id: bool = False  # see accept()


def _plan(env: Envelope, recipients: list[Recipient], routes: list[Route], hops: tuple[str, ...], self_id: str,
          postgres: bool, actor: str, source: str, api_key_id: str | None, summary: dict | None) -> _Plan:
    now = datetime.now(UTC)
    stamp = _SQL[postgres].stamp(now)
    summary = summary or {}
    message_row = (env.message_id, env.subsystem, env.type, env.sender_unit, env.classification,
                   env.clearance_needed, env.urgency, env.in_reply_to, env.conversation_id, api_key_id, source,
                   json_text(summary), env.to_xml(), stamp)
    delivery_rows = [(env.message_id, r.unit, r.name, r.copy_type, r.copy_no, route.kind, route.target,
                      "queued", remote_ref(env.message_id, r.unit), stamp) for r, route in zip(recipients, routes)]
    record = audit.Record(actor, "message.accept", f"message:{env.message_id}", detail={
        "subsystem": env.subsystem, "type": env.type, "sender": env.sender_unit,
        "recipients": len(env.recipients), "classification": env.classification,
        "urgency": env.urgency, "source": source,
        "forwarded": sum(1 for r in routes if r.kind == "node"),
        **({"hops": list(hops), "units": len(recipients)} if hops else {}),
    })
    message = StoredMessage(env.message_id, now, env.sender_unit, env.classification, env.urgency, summary)
    return _Plan(recipients, routes, hops, self_id, message, message_row, delivery_rows, stamp, record)


def _store(s: Session | Connection, env: Envelope, plan: _Plan, idem: IdempotencyKey | None) -> Accepted:
    if isinstance(s, Session):
        s.flush()  # the caller's pending rows (an audit entry, say) go first
    conn = s.connection() if isinstance(s, Session) else s
    sql = _SQL[conn.dialect.name == "postgresql"]
    cur = group_cursor(conn)
    try:
        return _store_rows(cur, sql, conn, env, plan, idem)
    finally:
        cur.close()


def _pipeline(conn: Connection, postgres: bool) -> Any:
    """PostgreSQL: a psycopg pipeline, in which statements are sent without waiting for each
    one's answer (a read waits for the answers up to it). An accept then takes one round
    trip for its reads (none for a new id without an Idempotency-Key) and one for all its
    writes, besides the commit, instead of nine."""
    if not postgres or in_group_pipeline(conn):  # the group's own pipeline carries them
        return nullcontext()
    return conn.connection.dbapi_connection.pipeline()  # type: ignore[union-attr]


def _store_rows(cur: Any, sql: _Sql, conn: Connection, env: Envelope, plan: _Plan,
                idem: IdempotencyKey | None) -> Accepted:
    with _pipeline(conn, sql.postgres):
        accepted = _write_rows(cur, sql, conn, env, plan, idem)
    if accepted.created:
        _forward_rows(conn, env, plan)
    return accepted


def _write_rows(cur: Any, sql: _Sql, conn: Connection, env: Envelope, plan: _Plan,
                idem: IdempotencyKey | None) -> Accepted:
    if idem is not None:
        cur.execute(sql.idem, (idem.api_key_id, idem.key))
        rec = cur.fetchone()
        if rec is not None:
            if rec[0] != idem.request_hash:
                raise Rejected("idempotency-key-reused",
                               f"Idempotency-Key {idem.key!r} was used before with a different request body: a "
                               f"retry sends the exact bytes it first sent, and a new document a new key",
                               status=422)
            return Accepted(StoredMessage(rec[1]), created=False)
    existing = None
    if not plan.new_id:
        cur.execute(sql.existing, (env.message_id,))
        existing = cur.fetchone()
    if existing is not None:
        api_key_id = plan.message_row[_MESSAGE_COLUMNS.index("api_key_id")]
        if existing[0] != env.sender_unit or (api_key_id and existing[1] != api_key_id):
            raise Rejected("message-id-conflict", f"message id {env.message_id} is already taken", status=409)
        return Accepted(StoredMessage(env.message_id), created=False, by_id=True)

    routes = plan.routes
    if sql.postgres and len(plan.delivery_rows) <= ONE_STATEMENT_MAX:
        # one statement (the chain's lock is taken before it, so that its snapshot has the
        # chain's head): one message for psycopg to send and PostgreSQL to answer, not four
        audit.lock_driver(cur, conn)
        cur.execute(sql.accept_one(len(plan.delivery_rows)),
                    (*plan.message_row, *(v for row in plan.delivery_rows for v in row),
                     *audit.pg_append_one_params(plan.audit), env.urgency_rank, plan.stamp, plan.stamp))
    else:
        cur.execute(sql.message, plan.message_row)
        # a document to 200 units is one executemany here, not 200 statements
        cur.executemany(sql.deliveries, plan.delivery_rows)
        if any(route.kind == "adapter" for route in routes):
            cur.execute(sql.outbox, (env.urgency_rank, plan.stamp, plan.stamp, env.message_id))
        audit.append_driver(cur, sql.postgres, [plan.audit], conn)
    if idem is not None:
        cur.execute(sql.idem_insert, (idem.api_key_id, idem.key, idem.request_hash, env.message_id, plan.stamp))
    return Accepted(plan.message, created=True, routes=routes)


def _forward_rows(conn: Connection, env: Envelope, plan: _Plan) -> None:
    """One ``forward`` outbox row per next node, whatever the number of units behind it
    (through SQLAlchemy, outside the pipeline: it reads each statement's result)."""
    hops: dict[str, list[str]] = {}
    for r, route in zip(plan.recipients, plan.routes):
        if route.kind == "node":
            hops.setdefault(route.target, []).append(r.unit)
    for hop, units in hops.items():
        conn.execute(INSERT_FORWARD, {"mid": env.message_id, "hop": hop, "priority": env.urgency_rank,
                                      "now": plan.message.accepted_at,
                                      "payload": {"units": units, "hops": [*plan.hops, plan.self_id]},
                                      "conversation": env.conversation_id})


@dataclass
class Recalled:
    """What a recall did: how many copies it withdrew or asked to recall, and the units whose
    delivered copy sits in a legacy system that has no recall (the reason is on the copy)."""

    acted: int = 0
    cannot: list[str] = field(default_factory=list)


#: the reason a delivered copy keeps when its legacy system has no recall
NO_RECALL = "撤回失败：收文系统不支持撤回，请联系收文单位处理 (the receiving system has no recall)"


def recall(s: Session, message_id: str, units: Collection[str] | None = None, *,
           recallable: Callable[[str], bool]) -> Recalled:
    """Withdraw (撤回) a message's copies not yet signed for: a copy still waiting in the
    outbox is simply not sent; one already handed over is recalled through its adapter or,
    for a copy at another node, by asking that node (its answer comes back as a status).
    ``recallable(adapter name)`` says whether that adapter's legacy system has a recall; a
    copy delivered to one that has none is left delivered with that reason. A copy whose
    recall is already under way counts as acted on, without a second request."""
    now = datetime.now(UTC)
    m = s.get(Message, message_id)
    assert m is not None
    # the message's copies locked and read again first (PostgreSQL): two recalls at once, or a
    # recall and a receipt (签收), see each other's changes, not the copies as loaded with m
    s.scalars(select(Delivery).where(Delivery.message_id == message_id).with_for_update()
              .execution_options(populate_existing=True)).all()
    ids = [d.id for d in m.deliveries]
    out = Recalled()
    asked = set(s.scalars(select(OutboxEntry.delivery_id).where(
        OutboxEntry.delivery_id.in_(ids), OutboxEntry.kind == "recall", OutboxEntry.state.in_(("pending", "claimed")))))
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
                out.acted += 1
                continue
        if d.status in ("delivered", "queued"):
            if d.id in asked:
                out.acted += 1
                continue
            if d.route_kind == "adapter" and not recallable(d.target or ""):
                d.reason, d.updated_at = NO_RECALL, now
                out.cannot.append(d.unit)
                continue
            s.add(OutboxEntry(kind="recall", delivery_id=d.id, target=d.target or "", priority=0,
                              next_attempt_at=now, created_at=now))
            out.acted += 1
    return out
