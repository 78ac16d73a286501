"""Status changes of a delivery, turned into webhooks for the caller and, for a message that
came from another node, a status report back to that node.

A webhook is an outbox row of kind ``webhook``, a status report one of kind ``status``: each
is committed with the change it reports, and the worker sends and retries it like any
delivery.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, UTC
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, and_, bindparam, insert, or_, select
from sqlalchemy.orm import Session

from gateway.config import SUBSYSTEMS
from gateway.models import table, ApiKey, DELIVERY_STATUSES, Delivery, Message, OutboxEntry


# The OpenAPI document's ``webhooks`` describe the body from this model (its docstring and
# descriptions are the caller's); status_changed_many writes it field for field, and
# tests/test_openapi_contract.py holds a real post to it.
class WebhookEvent(BaseModel):
    """一份收文的状态变化 (a copy's status changed): the body of every webhook post, every
    field always sent (null where there is no value)."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)
    id: uuid.UUID = Field(description="one per status change, the same in every retry of its post: drop a repeat "
                                      "by it")
    event: str = Field(description="<subsystem>.status (documents.status for documents)",
                       json_schema_extra={"enum": [f"{s}.status" for s in SUBSYSTEMS]})
    message_id: str = Field(description="the document's id, as the 202 of POST /api/v1/documents gave it")
    unit: str = Field(description="统一社会信用代码 of the receiving unit whose copy changed")
    status: str = Field(description="the copy's new status", json_schema_extra={"enum": list(DELIVERY_STATUSES)})
    previous: str = Field(description="its status before; when it is not the one you hold, read GET "
                                      "/api/v1/documents/{id}", json_schema_extra={"enum": list(DELIVERY_STATUSES)})
    signer: str | None = Field(default=None, description="签收人, once signed for")
    receipt_no: str | None = Field(default=None, description="the receiving system's receipt number")
    reason: str | None = Field(default=None, description="退回 reason, or why a recall did not happen")
    at: datetime = Field(description="when the change happened, in UTC (Z): for signed and returned the time the "
                                     "receipt gives, otherwise when the gateway recorded it")


def utc_text(t: datetime) -> str:
    """A time as the API writes it (pydantic): ISO 8601 in UTC with ``Z``."""
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def as_posted(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored webhook payload as it is posted. Payloads are stored at the status change and
    posted (and retried) later: those stored by earlier versions wrote ``at`` with
    ``+00:00``, and are posted with ``Z`` like every other, so that a receiver sees one form."""
    at = payload.get("at")
    if isinstance(at, str) and at.endswith("+00:00"):
        return {**payload, "at": at.removesuffix("+00:00") + "Z"}
    return payload


def shown_url(url: str) -> str:
    """A webhook URL as the audit log, errors and logs show it: without its query string, which
    is where receivers that cannot read headers keep a token (``?token=…``). The audit log is
    kept for good, and a token written there could not be taken back."""
    parts = urlsplit(url)
    if not parts.query and not parts.fragment:
        return url
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "…" if parts.query else "", ""))


class HideQueries(logging.Filter):
    """For the HTTP client library's logger (urllib3, which requests uses): its DEBUG lines
    name each request's target with its query string ("POST /hook?token=… HTTP/1.1" 200), so
    a node logging at DEBUG would write a webhook's token into its log. Every text argument
    with a ``?`` is shown as :func:`shown_url` shows a URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "?" in a for a in args):
            record.args = tuple(shown_url(a) if isinstance(a, str) and "?" in a else a for a in args)
        return True


logging.getLogger("urllib3.connectionpool").addFilter(HideQueries())


def status_changed(s: Session, d: Delivery, previous: str) -> None:
    """A webhook row for one changed delivery (ORM path: the session flushes ``d`` first)."""
    status_changed_many(s, [(d.id, previous, d.status)])


_WEBHOOK_TARGETS = (
    select(Delivery.id, Delivery.message_id, Delivery.unit, Delivery.signer, Delivery.receipt_no,
           Delivery.reason, Delivery.last_error, Delivery.signed_at, Message.subsystem, Message.source,
           ApiKey.webhook_url)
    .join(Message, Message.id == Delivery.message_id)
    .outerjoin(ApiKey, and_(ApiKey.id == Message.api_key_id, ApiKey.revoked_at.is_(None)))
    .where(Delivery.id.in_(bindparam("ids", expanding=True)),
           or_(ApiKey.webhook_url.is_not(None), Message.source.startswith("node:"))))
_INSERT = insert(table(OutboxEntry))


def status_changed_many(s: Session | Connection, changes: list[tuple[int, str, str]]) -> None:
    """Webhook rows for (delivery id, previous, new status) changes: one query finds the
    deliveries whose caller has a webhook; most have none, and then nothing is written."""
    ids = [c[0] for c in changes]
    targets = {r.id: r for r in s.execute(_WEBHOOK_TARGETS, {"ids": ids})}
    if not targets:
        return
    now = datetime.now(UTC)
    rows = []
    for delivery_id, previous, status in changes:
        t = targets.get(delivery_id)
        if t is None:
            continue
        # a 签收 or 退回 happened when the receipt says, not when it reached this node
        at = t.signed_at if status in ("signed", "returned") and t.signed_at else now
        if t.webhook_url:
            # id: one per status change, the same in every retry of its post (the payload is
            # stored), so that a receiver drops a repeat by it
            event = {"id": str(uuid.uuid4()), "event": f"{t.subsystem}.status", "message_id": t.message_id,
                     "unit": t.unit,
                     "status": status, "previous": previous, "signer": t.signer, "receipt_no": t.receipt_no,
                     "reason": t.reason, "at": utc_text(at)}  # (schema: WebhookEvent)
            # one copy's changes reach the caller in the order they happened: a post being
            # retried holds back the later ones of that copy (the worker's in-order claim)
            rows.append(dict(kind="webhook", delivery_id=delivery_id, target=t.webhook_url, payload=event,
                             priority=1, state="pending", attempts=0, next_attempt_at=now, created_at=now,
                             conversation=f"webhook:{delivery_id}"))
        if t.source.startswith("node:") and status != "queued":
            # back to the node the message came from (which passes it on towards the sender)
            item = {"message_id": t.message_id, "unit": t.unit, "status": status, "signer": t.signer,
                    "receipt_no": t.receipt_no, "reason": t.reason, "at": at.isoformat(),
                    "error": t.last_error if status == "failed" else None}
            rows.append(dict(kind="status", delivery_id=delivery_id, target=t.source.removeprefix("node:"),
                             payload=item, priority=1, state="pending", attempts=0, next_attempt_at=now,
                             created_at=now, conversation=None))
    if rows:
        s.execute(_INSERT, rows)
