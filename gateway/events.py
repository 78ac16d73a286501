"""Status changes of a delivery, turned into audit entries and webhooks for the caller.

A webhook is an outbox row of kind ``webhook``: it is committed with the change it reports,
and the worker sends and retries it like any delivery.
"""
from __future__ import annotations

from datetime import datetime, UTC

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.orm import Session

from gateway.models import table, ApiKey, Delivery, Message, OutboxEntry


def status_changed(s: Session, d: Delivery, previous: str) -> None:
    """A webhook row for one changed delivery (ORM path: the session flushes ``d`` first)."""
    status_changed_many(s, [(d.id, previous, d.status)])


_WEBHOOK_TARGETS = (
    select(Delivery.id, Delivery.message_id, Delivery.unit, Delivery.signer, Delivery.receipt_no,
           Delivery.reason, Message.subsystem, ApiKey.webhook_url)
    .join(Message, Message.id == Delivery.message_id)
    .join(ApiKey, ApiKey.id == Message.api_key_id)
    .where(Delivery.id.in_(bindparam("ids", expanding=True)), ApiKey.revoked_at.is_(None),
           ApiKey.webhook_url.is_not(None)))


def status_changed_many(s: Session | Connection, changes: list[tuple[int, str, str]]) -> None:
    """Webhook rows for (delivery id, previous, new status) changes: one query finds the
    deliveries whose caller has a webhook; most have none, and then nothing is written."""
    ids = [c[0] for c in changes]
    targets = {r.id: r for r in s.execute(_WEBHOOK_TARGETS, {"ids": ids})}
    if not targets:
        return
    now = datetime.now(UTC)
    for delivery_id, previous, status in changes:
        t = targets.get(delivery_id)
        if t is None:
            continue
        event = {"event": f"{t.subsystem}.status", "message_id": t.message_id, "unit": t.unit, "status": status,
                 "previous": previous, "signer": t.signer, "receipt_no": t.receipt_no, "reason": t.reason,
                 "at": now.isoformat()}
        s.execute(insert(table(OutboxEntry)).values(
            kind="webhook", delivery_id=delivery_id, target=t.webhook_url, payload=event, priority=1,
            state="pending", attempts=0, next_attempt_at=now, created_at=now))
