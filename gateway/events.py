"""Status changes of a delivery, turned into audit entries and webhooks for the caller.

A webhook is an outbox row of kind ``webhook``: it is committed with the change it reports,
and the worker sends and retries it like any delivery.
"""
from __future__ import annotations

from datetime import datetime, UTC

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.orm import Session

from gateway.models import table, ApiKey, Delivery, Message, OutboxEntry


def status_changed(s: Session, d: Delivery, previous: str, *, detail: dict | None = None) -> None:
    # Two narrow lookups: this runs for every status change, often with no webhook at all.
    row = s.execute(select(Message.subsystem, ApiKey.webhook_url)
                    .join(ApiKey, ApiKey.id == Message.api_key_id)
                    .where(Message.id == d.message_id, ApiKey.revoked_at.is_(None))).first()
    if row is None or not row.webhook_url:
        return
    now = datetime.now(UTC)
    event = {
        "event": f"{row.subsystem}.status",
        "message_id": d.message_id,
        "unit": d.unit,
        "status": d.status,
        "previous": previous,
        "signer": d.signer,
        "receipt_no": d.receipt_no,
        "reason": d.reason,
        "at": now.isoformat(),
        **(detail or {}),
    }
    s.add(OutboxEntry(kind="webhook", delivery_id=d.id, target=row.webhook_url, payload=event,
                      priority=1, next_attempt_at=now, created_at=now))


_WEBHOOK_TARGETS = (
    select(Delivery.id, Delivery.message_id, Delivery.unit, Delivery.signer, Delivery.receipt_no,
           Delivery.reason, Message.subsystem, ApiKey.webhook_url)
    .join(Message, Message.id == Delivery.message_id)
    .join(ApiKey, ApiKey.id == Message.api_key_id)
    .where(Delivery.id.in_(bindparam("ids", expanding=True)), ApiKey.revoked_at.is_(None),
           ApiKey.webhook_url.is_not(None)))


def status_changed_many(s: Session | Connection, changes: list[tuple[int, str, str]]) -> None:
    """Webhook rows for many (delivery id, previous, new status) changes with two queries."""
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
