"""Dead letters (死信): outbox rows the delivery worker gave up on.

A row is dead-lettered when its failure is final (a SOAP ``Client`` fault, a refused archive)
or when its retries ran out. Until now that was the end of it: the copy stayed ``failed`` and
only the database could bring it back. Once the cause is fixed (the legacy system is back, its
address or credentials corrected, the mapping mended), an operator lists the dead rows and
puts them back in the queue: ``gateway outbox list`` and ``gateway outbox retry``.

Putting a row back gives it a fresh retry budget (attempts from 0, due now), moves the copies
it failed back from ``failed`` to ``queued`` (the caller's webhook is told), and appends one
``admin.outbox.retry`` audit entry per row. A row whose copy has moved on since (a late
receipt signed it, say) is not put back. Everything happens in one transaction; with row
numbers given, either all of them go back or none does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway import audit, events
from gateway.db import Database
from gateway.models import Delivery, OutboxEntry

#: the outbox's kinds of work
KINDS = ("deliver", "forward", "recall", "webhook", "status")


@dataclass(frozen=True)
class DeadLetter:
    """One dead row as an operator sees it."""

    id: int
    kind: str
    target: str
    message_id: str | None
    unit: str | None  # deliver and recall: the copy's unit; forward: the units behind the hop
    attempts: int
    finished_at: datetime | None
    last_error: str | None


@dataclass
class Retried:
    """What ``requeue`` did (or, on a dry run, would do)."""

    ids: list[int] = field(default_factory=list)
    #: copies moved from failed back to queued
    copies: int = 0
    #: rows left dead, each with the reason
    skipped: dict[int, str] = field(default_factory=dict)


class RetryRefused(Exception):
    """Rows named by number that cannot be put back; nothing was changed."""

    def __init__(self, problems: dict[int, str]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{i}: {why}" for i, why in problems.items()))


def _query(kind: str | None, target: str | None, message_id: str | None, ids: Sequence[int] | None):  # type: ignore[no-untyped-def]
    q = (select(OutboxEntry, Delivery)
         .outerjoin(Delivery, Delivery.id == OutboxEntry.delivery_id)
         .where(OutboxEntry.state == "dead"))
    if ids:
        q = q.where(OutboxEntry.id.in_(list(ids)))
    if kind:
        q = q.where(OutboxEntry.kind == kind)
    if target:
        q = q.where(OutboxEntry.target == target)
    if message_id:
        q = q.where(Delivery.message_id == message_id)
    return q.order_by(OutboxEntry.id)


def _shown(entry: OutboxEntry, d: Delivery | None) -> DeadLetter:
    target = events.shown_url(entry.target) if entry.kind == "webhook" else entry.target  # no ?token=
    if entry.kind == "forward":
        unit = ",".join((entry.payload or {}).get("units", [])) or None
    else:
        unit = d.unit if d is not None else None
    return DeadLetter(entry.id, entry.kind, target, d.message_id if d is not None else None, unit,
                      entry.attempts, entry.finished_at, entry.last_error)


def dead_letters(db: Database, *, kind: str | None = None, target: str | None = None,
                 message_id: str | None = None, limit: int | None = None) -> tuple[list[DeadLetter], int]:
    """The dead rows (oldest first, at most ``limit``) and how many there are in all."""
    q = _query(kind, target, message_id, None)
    with db.sessions() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery())) or 0
        rows = s.execute(q.limit(limit) if limit else q).all()
        return [_shown(e, d) for e, d in rows], total


def _copies(s: Session, entry: OutboxEntry, d: Delivery | None) -> list[Delivery] | str:
    """The failed copies the row's retry brings back to queued, or why it must stay dead."""
    if entry.kind == "deliver":
        if d is None:
            return []
        # locked and read again: a receipt or status report applied meanwhile is not undone
        s.refresh(d, with_for_update=True)
        return [d] if d.status == "failed" else f"its copy for {d.unit} is now {d.status}, not failed"
    if entry.kind == "forward" and d is not None:
        units = (entry.payload or {}).get("units", [])
        behind = s.scalars(select(Delivery).where(
            Delivery.message_id == d.message_id, Delivery.route_kind == "node", Delivery.target == entry.target,
            Delivery.unit.in_(units)).with_for_update().execution_options(populate_existing=True)).all()
        failed = [x for x in behind if x.status == "failed"]
        if not failed:
            return f"none of its copies ({', '.join(units)}) is failed any more"
        return failed
    return []  # recall, webhook, status: the row alone


def requeue(db: Database, *, ids: Sequence[int] | None = None, kind: str | None = None, target: str | None = None,
            message_id: str | None = None, actor: str, dry_run: bool = False) -> Retried:
    """Put dead rows back in the queue: the rows numbered ``ids`` (all of them, or none:
    RetryRefused), or every dead row that the filters match (rows that cannot go back are
    skipped, with the reason)."""
    now = datetime.now(UTC)
    out = Retried()
    with db.begin() as s:
        rows = s.execute(_query(kind, target, message_id, ids).with_for_update(of=OutboxEntry)).all()
        problems: dict[int, str] = {}
        if ids:
            found = {e.id for e, _ in rows}
            for i in ids:
                if i not in found:
                    entry = s.get(OutboxEntry, i)
                    problems[i] = "no such outbox row" if entry is None else f"it is {entry.state}, not dead"
        plans = []
        for entry, d in rows:
            copies = _copies(s, entry, d)
            if isinstance(copies, str):
                if ids:
                    problems[entry.id] = copies
                else:
                    out.skipped[entry.id] = copies
                continue
            plans.append((entry, d, copies))
        if ids and problems:
            raise RetryRefused(problems)
        records, changed = [], []
        for entry, d, copies in plans:
            out.ids.append(entry.id)
            out.copies += len(copies)
            if dry_run:
                continue
            records.append(audit.Record(actor, "admin.outbox.retry",
                                        f"delivery:{d.message_id}/{d.unit}" if d is not None else f"outbox:{entry.id}",
                                        detail={"outbox_id": entry.id, "kind": entry.kind,
                                                "target": events.shown_url(entry.target) if entry.kind == "webhook"
                                                else entry.target,
                                                "attempts_before": entry.attempts,
                                                "last_error": (entry.last_error or "")[:500],
                                                "units": [c.unit for c in copies]}))
            entry.state, entry.attempts, entry.next_attempt_at = "pending", 0, now
            entry.finished_at, entry.claimed_by, entry.lease_until = None, None, None
            for c in copies:
                c.status, c.updated_at = "queued", now
                changed.append(c.id)
        if records:
            # rows first, the audit chain last, as every other writer takes them
            s.flush()
            events.status_changed_many(s, [(i, "failed", "queued") for i in changed])
            audit.append_many(s, records)
    return out
