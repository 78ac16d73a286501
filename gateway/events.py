"""Status changes of a delivery, turned into audit entries and webhooks for the caller.

A webhook is an outbox row of kind ``webhook``: it is committed with the change it reports,
and the worker sends and retries it like any delivery.
"""
from __future__ import annotations

from datetime import datetime, UTC

from sqlalchemy.orm import Session

from gateway.models import ApiKey, Delivery, Message, OutboxEntry


def status_changed(s: Session, d: Delivery, previous: str, *, detail: dict | None = None) -> None:
    msg = s.get(Message, d.message_id)
    if msg is None or not msg.api_key_id:
        return
    key = s.get(ApiKey, msg.api_key_id)
    if key is None or not key.webhook_url or key.revoked_at is not None:
        return
    now = datetime.now(UTC)
    event = {
        "event": f"{msg.subsystem}.status",
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
    s.add(OutboxEntry(kind="webhook", delivery_id=d.id, target=key.webhook_url, payload=event,
                      priority=1, next_attempt_at=now, created_at=now))
