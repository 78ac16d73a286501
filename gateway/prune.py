"""The ``prune`` job: rows that only grow and that nothing reads once they are old.

- Outbox rows ``done`` (delivered, sent, recalled before delivery) for more than ``[worker]
  keep_done_days``: the copy, its receipts and the audit log keep what happened; the row was
  the worker's to-do. Dead and waiting rows are never removed (``gateway outbox`` shows them).
- Idempotency-Key records older than ``[api] idempotency_days``: a caller repeating a request
  after that is not retrying one; the message id stays a key for good (the message is kept).
- The keys of items taken from legacy systems (``IngestedItem``, gateway.inbound) not seen at
  their source for ``[worker] keep_ingested_days`` (0: kept for ever). A key is written in the
  transaction that takes the item, and the item is acknowledged at its source right after (a
  file moved to ``archive/`` or ``failed/``, a SOAP receipt cursor moved past it); until it
  is, every collection run finds it again and refreshes ``at``. So an old ``at`` means the
  item left its source that long ago and cannot be offered again under its key: a file's key
  names its folder, name and SHA-256, a receipt's its sequence number, which the cursor has
  passed. (Were a legacy system to write the very same file again after that, it would be
  taken again: a receipt adds a second receipt row and moves no status back, an inbound
  message has an id made from its key and is answered as the message already stored.) The
  per-item cursor of batch and ferry peers (``peer:`` / ``ferry:`` keys) is kept: a peer
  may send an item again after any time, until it has recorded the answer.

The newest outbox row is always kept, whatever its state: SQLite numbers a new row one past
the highest id still there, and outbox ids are the sequence numbers peers deduplicate by
(``gateway.federation.batch``), so they must never be given out twice.

Outbox rows and ingested keys go in slices of ``SLICE``, each in its own transaction (a
writer holds SQLite's lock briefly), and one ``housekeeping.prune`` audit entry says what went.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Delete, delete, func, select

from gateway import audit
from gateway.models import IdempotencyRecord, IngestedItem, OutboxEntry

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
    outbox = _in_slices(node, one_slice)
    out: dict[str, Any] = {"outbox_done_removed": outbox, "done_before": done_before.isoformat(timespec="seconds"),
                           "idempotency_before": idem_before.isoformat(timespec="seconds")}
    ingested = 0
    keep = node.config.worker.keep_ingested_days
    if keep:
        seen_before = now - timedelta(days=keep)
        # legacy adapters' keys only: an adapter's name has no ':', a peer's cursor has (see above)
        ingested = _in_slices(node, delete(IngestedItem).where(IngestedItem.key.in_(
            select(IngestedItem.key).where(IngestedItem.at < seen_before, IngestedItem.adapter.not_like("%:%"))
            .limit(SLICE))).execution_options(synchronize_session=False))
        out.update(ingested_removed=ingested, ingested_before=seen_before.isoformat(timespec="seconds"))
    with node.db.begin() as s:  # the keys (small rows: one statement) and the audit entry together
        idem = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < idem_before)
                         .execution_options(synchronize_session=False)).rowcount or 0  # type: ignore[attr-defined]
        out["idempotency_removed"] = idem
        if outbox or idem or ingested:
            audit.append(s, actor="job:prune", action="housekeeping.prune", obj="outbox,idempotency,ingested",
                         outcome="ok", detail=out)
    if outbox or idem or ingested:
        log.info("prune: %d finished outbox rows, %d idempotency keys, %d keys of legacy items removed", outbox,
                 idem, ingested)
    return out


def _in_slices(node: Node, one_slice: Delete) -> int:
    """Run ``one_slice`` (a DELETE of at most SLICE rows), each time in its own transaction,
    until it removes fewer; the rows removed."""
    total, n = 0, SLICE
    while n == SLICE:
        with node.db.begin() as s:
            n = s.execute(one_slice).rowcount or 0  # type: ignore[attr-defined]
        total += n
    return total
