"""Reconciliation (对账): compare what this node and each peer believe about the copies this
node forwarded, and repair the gaps.

For every copy forwarded to a peer that is not final here (still ``queued`` or
``delivered``) and whose forward has left, the job asks the peer what it knows
(``POST /federation/v1/reconcile``). Then:

* the peer has moved further (delivered, signed for, returned, recalled, failed) but the
  report never arrived (a dead-lettered status, a restored database): the status is applied
  here as if it had been reported, with its receipt;
* the peer has no such copy at all (its database was restored from an older backup, or a
  forward was lost): the copy is forwarded again. Forwards are idempotent at the receiver,
  so a copy that does exist is never doubled.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session, aliased

from adapters.base import PermanentError, RetryableError
from gateway import audit, pipeline
from gateway.federation import require_peers, transfer
from gateway.models import Delivery, Message, OutboxEntry
from gateway.node import Node

log = logging.getLogger(__name__)

CHUNK = 500  # copies asked about in one request (one keyset slice)
#: copies of messages accepted longer ago than this are not reconciled (they are settled, or an
#: operator's matter)
WINDOW = timedelta(days=30)
_OPEN = ("queued", "delivered")


def answer(node: Node, peer: str, items: Any) -> dict[str, Any]:
    """The receiving side: the status of each asked copy that came here from ``peer``."""
    if not isinstance(items, list) or len(items) > CHUNK or not all(
            isinstance(i, dict) and isinstance(i.get("message_id"), str) and isinstance(i.get("unit"), str)
            for i in items):
        raise transfer.TransferError(400, "validation", f"items: expected at most {CHUNK} objects with "
                                                        "message_id and unit")
    wanted = {(i["message_id"], i["unit"]) for i in items}
    found: dict[tuple[str, str], dict[str, Any]] = {}
    with node.db.sessions() as s:
        q = (select(Delivery).join(Message, Message.id == Delivery.message_id)
             .where(Message.source == f"node:{peer}", Delivery.message_id.in_({m for m, _ in wanted})))
        for d in s.scalars(q):
            if (d.message_id, d.unit) in wanted:
                at = d.signed_at or d.delivered_at or d.updated_at
                found[(d.message_id, d.unit)] = {
                    "message_id": d.message_id, "unit": d.unit, "status": d.status, "signer": d.signer,
                    "receipt_no": d.receipt_no, "reason": d.reason, "at": at.isoformat() if at else None,
                    "error": d.last_error if d.status == "failed" else None}
    return {"node": node.id, "items": [found.get((m, u), {"message_id": m, "unit": u, "status": "unknown"})
                                       for m, u in sorted(wanted)]}


def _open_copies(node: Node, peer: str, after: int | None = None,
                 limit: int = CHUNK) -> list[tuple[int, str, str, str]]:
    """The next ``limit`` copies forwarded to ``peer`` that are not final here, of messages
    accepted in the last WINDOW, past copy id ``after`` (a keyset slice, in id order; None:
    from the start of the window): (id, message id, unit, status). Copies are numbered in the
    order their messages were accepted, so the window is a range of the primary key, read
    from its start instead of the whole table."""
    fwd = aliased(OutboxEntry)
    sibling = aliased(Delivery)
    # the forward of a message to a node hangs on its first copy for that node; correlated to
    # the copy asked about (two levels down, SQLAlchemy would otherwise read ``deliveries`` in
    # the subquery anew: a check of one arbitrary message, the same for every copy)
    in_flight = exists().where(
        fwd.kind == "forward", fwd.target == peer, fwd.state.in_(("pending", "claimed")),
        fwd.delivery_id == select(sibling.id).where(
            and_(sibling.message_id == Delivery.message_id, sibling.route_kind == "node", sibling.target == peer))
        .order_by(sibling.id).limit(1).correlate(Delivery).scalar_subquery())
    with node.db.sessions() as s:
        if after is None:
            after = _before_window(s, datetime.now(UTC) - WINDOW)
        return [(r.id, r.message_id, r.unit, r.status) for r in s.execute(
            select(Delivery.id, Delivery.message_id, Delivery.unit, Delivery.status).where(
                Delivery.id > after, Delivery.route_kind == "node", Delivery.target == peer,
                Delivery.status.in_(_OPEN), ~in_flight).order_by(Delivery.id).limit(limit))]


def _before_window(s: Session, since: datetime) -> int:
    """The copy id just before the copies of the first message accepted at ``since`` or later
    (through the index of acceptance times); the last copy's id if there is none."""
    first = s.scalar(select(Message.id).where(Message.accepted_at >= since).order_by(Message.accepted_at).limit(1))
    if first is None:
        return s.scalar(select(func.max(Delivery.id))) or 0
    return (s.scalar(select(func.min(Delivery.id)).where(Delivery.message_id == first)) or 1) - 1


def run(node: Node, peers: list[str] | None = None) -> dict[str, Any]:
    """The scheduled job ``reconcile``."""
    out: dict[str, Any] = {}
    # over a ferry nothing comes back to a question: those copies settle by the return ferry
    for peer in peers if peers is not None else require_peers(
            [p for p, c in node.config.peers.items() if c.url and c.link != "ferry"],
            "peer it can ask (one with a url, not on a ferry link)"):
        counts = {"checked": 0, "repaired": 0, "reforwarded": 0, "agree": 0}
        try:
            after = None
            # slice by slice (keyset on the copy id): the open copies of a long outage are
            # never all in memory at once, and each slice is one question to the peer
            while chunk := _open_copies(node, peer, after):
                after = chunk[-1][0]
                mine = {(m, u): st for _, m, u, st in chunk}
                got = node.federation.client.post(peer, "/reconcile", {
                    "items": [{"message_id": m, "unit": u} for _, m, u, _ in chunk]})
                counts["checked"] += len(chunk)
                _repair(node, peer, mine, got.get("items", []), counts)
            out[peer] = counts
        except (RetryableError, PermanentError) as exc:
            out[peer] = {**counts, "error": str(exc)[:300]}
    if out and all("error" in v for v in out.values()):
        raise RetryableError("reconcile: no peer answered (" + "; ".join(v["error"] for v in out.values()) + ")")
    return out


def _repair(node: Node, peer: str, mine: dict[tuple[str, str], str], theirs: list[Any],
            counts: dict[str, int]) -> None:
    missing: dict[str, list[str]] = {}
    with node.db.begin() as s:
        for item in theirs:
            if not isinstance(item, dict):
                continue
            key = (item.get("message_id"), item.get("unit"))
            if key not in mine:
                continue  # the peer answered something we did not ask
            status = item.get("status")
            if status == "unknown":
                missing.setdefault(key[0], []).append(key[1])  # type: ignore[arg-type]
            elif status == mine[key] or status == "queued":
                counts["agree"] += 1
            elif status in transfer.STATUS_FROM:
                try:
                    applied = transfer.apply_status(s, peer, item)
                except transfer.TransferError as exc:  # one item the peer got wrong (a bad time):
                    # counted and logged; the others, and the peers after this one, go on
                    counts["refused"] = counts.get("refused", 0) + 1
                    log.warning("reconcile: %s's answer for %s at %s refused: %s", peer, key[0], key[1], exc.detail)
                    continue
                if applied == status:
                    counts["repaired"] += 1
                else:
                    counts["agree"] += 1
        now = datetime.now(UTC)
        for mid, units in missing.items():
            m = s.get(Message, mid)
            if m is None:
                continue
            hops = [*(m.summary or {}).get("hops", []), node.id]
            s.execute(pipeline.INSERT_FORWARD, {"mid": mid, "hop": peer, "priority": 1, "now": now,
                                                "conversation": m.conversation_id,
                                                "payload": {"units": units, "hops": hops, "resend": True}})
            audit.append(s, actor=f"reconcile:{node.id}", action="message.reforward", obj=f"message:{mid}",
                         outcome="queued", detail={"node": peer, "units": units,
                                                   "why": "the node has no record of these copies"})
            counts["reforwarded"] += len(units)
