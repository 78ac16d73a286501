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
  per-item records of batch and ferry peers (``peer:`` / ``ferry:`` keys) follow a rule of
  their own (next).
- The records of the items batch and ferry peers sent (``peer:NODE`` one per batch item,
  ``ferry:NODE`` one per ferry file; gateway.federation.batch, ferry) not sent again for
  ``[worker] keep_peer_items_days`` (0: kept for ever). A peer sends an item again only
  while it has not recorded this node's answer, at every run of its link, and each time the
  record's ``at`` is refreshed; an old ``at`` means the peer stopped sending it that long
  ago. Should it still come again after that (a link down for longer, a dead letter put back
  by its operator), applying it again changes nothing: a forward is answered as the message
  already stored (message ids are kept for good), a status report moves no status back and
  adds no second receipt, a recall of a recalled copy does nothing. An item refused
  (``rejected``) is never forgotten: it must be refused again, never taken on a second look.
- Job runs (``job_runs``, one a run, gateway.scheduler) started more than ``[worker]
  keep_job_runs_days`` ago, finished, except each job's newest run and its newest ``ok`` run
  (``/metrics`` and ``gateway sync --list`` show them) and the newest row of all (on
  SQLite its id is where the next run's starts; the audit log's ``job.run`` entries name run
  ids). A tick that old is never run again (a tick more than 60 s late is not run), so the
  unique (job, tick) row that kept it to one run is no longer needed; the audit log keeps a
  ``job.run`` entry of every run.

The newest outbox row is always kept, whatever its state: SQLite numbers a new row one past
the highest id still there, and outbox ids are the sequence numbers peers deduplicate by
(``gateway.federation.batch``), so they must never be given out twice.

Not pruned: messages, copies, receipts (a document's record), the audit log (never), the
federation's nonces (gateway.federation.api purges them minutes after use), directory
versions (gateway.federation.directory keeps the newest few), stored content (the ``blobs``
job), adapters' cursors (a row per adapter and key).

Outbox rows, keys and job runs go in slices of ``SLICE``, each in its own transaction (a
writer holds SQLite's lock briefly), each found by an index (``ix_ingested_at``, migration
0013, for keys; ``ix_job_runs_job_started`` for runs), and one ``housekeeping.prune`` audit
entry says what went. Each slice's DELETE repeats its conditions: on PostgreSQL a row changed
meanwhile (a key refreshed by a collection run, or by a peer sending its item again) is
checked again as it is now, and kept.
"""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Delete, delete, func, or_, select, text

from gateway import audit
from gateway.models import IdempotencyRecord, IngestedItem, JobRun, OutboxEntry

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from gateway.node import Node

log = logging.getLogger("gateway.prune")

SLICE = 5000

#: the names of the jobs that have runs, one index lookup each (a loose scan of the unique
#: (job, tick) index: SQLite and PostgreSQL both read the table's distinct names slowly)
_JOB_NAMES = text("WITH RECURSIVE j(name) AS (SELECT min(job) FROM job_runs UNION ALL "
                  "SELECT (SELECT min(job) FROM job_runs WHERE job > j.name) FROM j WHERE j.name IS NOT NULL) "
                  "SELECT name FROM j WHERE name IS NOT NULL")


def run(node: Node, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    worker = node.config.worker
    done_before = now - timedelta(days=worker.keep_done_days)
    idem_before = now - timedelta(days=node.config.api.idempotency_days)
    newest = select(func.max(OutboxEntry.id)).scalar_subquery()
    one_slice = delete(OutboxEntry).where(OutboxEntry.id.in_(
        select(OutboxEntry.id).where(OutboxEntry.state == "done", OutboxEntry.finished_at < done_before,
                                     OutboxEntry.id < newest).limit(SLICE))).execution_options(synchronize_session=False)
    outbox = _in_slices(node, one_slice)
    out: dict[str, Any] = {"outbox_done_removed": outbox, "done_before": done_before.isoformat(timespec="seconds"),
                           "idempotency_before": idem_before.isoformat(timespec="seconds")}
    removed = outbox
    if worker.keep_ingested_days:
        seen_before = now - timedelta(days=worker.keep_ingested_days)
        # legacy adapters' keys only: an adapter's name has no ':', a peer's record has (see above)
        n = _forget(node, IngestedItem.at < seen_before, IngestedItem.adapter.not_like("%:%"))
        out.update(ingested_removed=n, ingested_before=seen_before.isoformat(timespec="seconds"))
        removed += n
    if worker.keep_peer_items_days:
        sent_before = now - timedelta(days=worker.keep_peer_items_days)
        n = _forget(node, IngestedItem.at < sent_before,
                    or_(IngestedItem.adapter.like("peer:%"), IngestedItem.adapter.like("ferry:%")),
                    IngestedItem.outcome != "rejected")
        out.update(peer_items_removed=n, peer_items_before=sent_before.isoformat(timespec="seconds"))
        removed += n
    started_before = now - timedelta(days=worker.keep_job_runs_days)
    runs = _job_runs(node, started_before)
    out.update(job_runs_removed=runs, job_runs_before=started_before.isoformat(timespec="seconds"))
    removed += runs
    with node.db.begin() as s:  # the keys (small rows: one statement) and the audit entry together
        idem = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < idem_before)
                         .execution_options(synchronize_session=False)).rowcount or 0  # type: ignore[attr-defined]
        out["idempotency_removed"] = idem
        if removed or idem:
            audit.append(s, actor="job:prune", action="housekeeping.prune",
                         obj="outbox,idempotency,ingested,job_runs", outcome="ok", detail=out)
    if removed or idem:
        log.info("prune: %d finished outbox rows, %d idempotency keys, %d keys of legacy items, %d records of "
                 "peers' items, %d job runs removed", outbox, idem, out.get("ingested_removed", 0),
                 out.get("peer_items_removed", 0), runs)
    return out


def _forget(node: Node, *where: ColumnElement[bool]) -> int:
    """Remove the ingested keys matching ``where`` (``at`` first: ix_ingested_at finds them)."""
    return _in_slices(node, delete(IngestedItem).where(
        IngestedItem.key.in_(select(IngestedItem.key).where(*where).limit(SLICE)), *where)
        .execution_options(synchronize_session=False))


def _job_runs(node: Node, started_before: datetime) -> int:
    """Remove the finished runs started before ``started_before``, job by job (found by
    ix_job_runs_job_started), but for each job's newest and newest ok run and the newest row."""
    with node.db.sessions() as s:
        names = list(s.scalars(_JOB_NAMES))
        keep = {s.scalar(select(func.max(JobRun.id)))}
        for name in names:
            keep |= _newest(s, name)
    keep.discard(None)  # (NOT IN a list holding NULL is never true)
    total = 0
    for name in names:
        where = (JobRun.job == name, JobRun.started_at < started_before, JobRun.outcome != "running",
                 JobRun.id.not_in(keep))
        total += _in_slices(node, delete(JobRun).where(JobRun.id.in_(select(JobRun.id).where(*where).limit(SLICE)),
                                                       *where).execution_options(synchronize_session=False))
    return total


def _newest(s: Session, name: str) -> set[int | None]:
    """The runs of job ``name`` that /metrics and ``gateway sync --list`` show: its newest
    run (by tick and by start) and its newest ok run."""
    job = select(JobRun.id).where(JobRun.job == name)
    return {s.scalar(job.order_by(JobRun.tick.desc()).limit(1)),
            s.scalar(job.order_by(JobRun.started_at.desc(), JobRun.id.desc()).limit(1)),
            s.scalar(job.where(JobRun.outcome == "ok").order_by(JobRun.tick.desc()).limit(1))}


def _in_slices(node: Node, one_slice: Delete) -> int:
    """Run ``one_slice`` (a DELETE of at most SLICE rows), each time in its own transaction,
    until it removes fewer; the rows removed."""
    total, n = 0, SLICE
    while n == SLICE:
        with node.db.begin() as s:
            n = s.execute(one_slice).rowcount or 0  # type: ignore[attr-defined]
        total += n
    return total
