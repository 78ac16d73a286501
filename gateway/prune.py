"""The ``prune`` job: rows that only grow and that nothing reads once they are old.

- Outbox rows ``done`` (delivered, sent, recalled before delivery) for more than ``[worker]
  keep_done_days``: the copy, its receipts and the audit log keep what happened; the row was
  the worker's to-do. Dead and waiting rows are never removed (``gateway outbox`` shows them).
- Idempotency-Key records older than ``[api] idempotency_days``: a caller repeating a request
  after that is not retrying one; the message id stays a key for good (the message is kept).

The newest outbox row is always kept, whatever its state: SQLite numbers a new row one past
the highest id still there, and outbox ids are the sequence numbers peers deduplicate by
(``gateway.federation.batch``), so they must never be given out twice.

Outbox rows go in slices of ``SLICE``, each in its own transaction (a writer holds SQLite's
lock briefly), and one ``housekeeping.prune`` audit entry says what went.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select

from gateway import audit
from gateway.models import IdempotencyRecord, OutboxEntry

if TYPE_CHECKING:
    from gateway.node import Node

log = logging.getLogger("gateway.prune")

SLICE = 5000


def run(node: Node, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    done_before = now - timedelta(days=node.config.worker.keep_done_days)
    idem_before = now - timedelta(days=node.config.api.idempotency_days)
    newest = select(func.max(OutboxEntry.id)).scalar_subquery()
    one_slice = delete(OutboxEntry).where(OutboxEntry.id.in_(
        select(OutboxEntry.id).where(OutboxEntry.state == "done", OutboxEntry.finished_at < done_before,
                                     OutboxEntry.id < newest).limit(SLICE))).execution_options(synchronize_session=False)
    outbox, n = 0, SLICE
    while n == SLICE:
        with node.db.begin() as s:
            n = s.execute(one_slice).rowcount or 0  # type: ignore[attr-defined]
        outbox += n
    out: dict[str, Any] = {"outbox_done_removed": outbox, "done_before": done_before.isoformat(timespec="seconds"),
                           "idempotency_before": idem_before.isoformat(timespec="seconds")}
    with node.db.begin() as s:  # the keys (small rows: one statement) and the audit entry together
        idem = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < idem_before)
                         .execution_options(synchronize_session=False)).rowcount or 0  # type: ignore[attr-defined]
        out["idempotency_removed"] = idem
        if outbox or idem:
            audit.append(s, actor="job:prune", action="housekeeping.prune", obj="outbox,idempotency",
                         outcome="ok", detail=out)
    if outbox or idem:
        log.info("prune: %d finished outbox rows, %d idempotency keys removed", outbox, idem)
    return out
