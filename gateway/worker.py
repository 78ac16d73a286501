"""The delivery worker: claim outbox rows, call the adapter, record the outcome.

* Claims are leased (``lease_seconds``); a row whose worker died returns to the queue when
  its lease expires. A live worker renews the leases of the rows it holds (waiting, being
  delivered, or delivered with the outcome not recorded yet) every quarter lease, and first
  thing once the database is back after an outage; and a worker takes rows back only after
  it has reached the database for a whole lease without a break. So an outage longer than
  the lease does not let one worker take back, and deliver again, a row another worker
  delivered just before it (that one renews as soon as the database answers, well inside
  the other's lease of waiting). On PostgreSQL, claims use ``FOR UPDATE SKIP LOCKED`` so
  several workers share the queue without blocking each other.
* Rows are claimed by urgency (特急 first), then due time, then age, and only as many as
  there are idle threads, so an urgent document never waits behind a claimed backlog.
* The claim reads everything a delivery needs (envelope, recipient) in the same
  transaction; outcomes are recorded in batches, one transaction for all the outcomes that
  are ready, so the database is not the bottleneck in front of a fast legacy system.
* Failures retry with exponential backoff and jitter up to the adapter's ``max_attempts``;
  permanent errors and exhausted retries are dead-lettered (status ``failed``).
* A peer node that does not answer (its link down for hours or days) is held: its rows wait
  in the queue, untried and not counted against ``max_attempts``, while one request now and
  then (at most every ``max_delay``) finds out whether it is back; then they are all due.
* Delivery is at-least-once: a crash after the adapter call but before the outcome is
  committed makes the row run again, and the adapter's idempotency (per-delivery
  ``remote_ref``) makes the second call a no-op at the receiver.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import CursorResult, Integer, bindparam, exists, or_, select, update

from adapters.base import Delivery as AdapterDelivery
from adapters.base import DeliveryError, PermanentError, RetryableError
from gateway import audit, events, nodekey
from gateway.config import RetryPolicy
from gateway.db import driver_mark, driver_stamp, outage, outage_text
from gateway.envelope import Envelope, Recipient
from gateway.federation.client import UNREACHABLE, UNREACHABLE_CODES
from gateway.models import table, Delivery, Message, OutboxEntry
from gateway.node import Node

if TYPE_CHECKING:
    from gateway.federation.sm2 import SM2PrivateKey

log = logging.getLogger("gateway.worker")

#: seconds the recorder waits for more outcomes before committing a batch: each commit costs a
#: turn of the write lock, an fsync and an audit-chain read, so a fast peer's outcomes are
#: recorded a few dozen at a time (a crash inside the window means those deliveries run again,
#: which the peers' idempotent document ids absorb, as after any crash before recording)
RECORD_WINDOW = 0.05
#: forwards to one node sent together in one request (the receiver accepts them in turn)
FORWARDS_PER_REQUEST = 8
#: outbox kinds that go to a peer node (when their target is one)
PEER_KINDS = ("forward", "status", "recall")


def backoff(policy: RetryPolicy, attempt: int) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries of many rows
    that failed together spread out instead of hitting the recovering peer at once."""
    cap = min(policy.max_delay, policy.base_delay * (2 ** max(0, attempt - 1)))
    return cap / 2 + random.uniform(0, cap / 2)


@lru_cache(maxsize=256)
def _envelope(message_id: str, xml: bytes) -> Envelope:
    # Stored envelopes were validated when they were accepted. Cached for the copies of one
    # message to many units (each entry holds the XML and its tree: a few hundred KB at most
    # for a 40-attachment document, so 256 of them stay well inside the worker's memory).
    return Envelope.from_xml(xml, validate=False)


# Statements built once (constructing them per call costs more than running them).
_OUTBOX = table(OutboxEntry)


_EARLIER = _OUTBOX.alias("earlier")


def _claim_statement(skip_locked: bool, by_target: bool = False):  # type: ignore[no-untyped-def]
    if by_target:
        # a batch for one peer (sync jobs): everything pending for it, in the order it was queued
        sub = (select(_OUTBOX.c.id).where(_OUTBOX.c.state == "pending", _OUTBOX.c.target == bindparam("for_target"))
               .order_by(_OUTBOX.c.id).limit(bindparam("limit", type_=Integer)))
    else:
        # Within a conversation (初报, 续报 …) rows leave for a node in order: a row waits while
        # an earlier row of its conversation to the same target is pending or in flight.
        in_order = or_(_OUTBOX.c.conversation.is_(None), ~exists().where(
            _EARLIER.c.conversation == _OUTBOX.c.conversation, _EARLIER.c.target == _OUTBOX.c.target,
            _EARLIER.c.id < _OUTBOX.c.id, _EARLIER.c.state.in_(("pending", "claimed"))))
        # rows for peers reached only by sync jobs (batch and ferry links) wait for those jobs;
        # a row this worker still has in hand (its lease ran out while its delivery was running,
        # and the reaper gave it back) is not claimed by it again: claimed_by is the worker's
        # id, so that delivery's late outcome would be recorded over the second claim's
        sub = (select(_OUTBOX.c.id)
               .where(_OUTBOX.c.state == "pending", _OUTBOX.c.next_attempt_at <= bindparam("now"), in_order,
                      _OUTBOX.c.target.not_in(bindparam("parked", expanding=True)),
                      _OUTBOX.c.id.not_in(bindparam("in_hand", expanding=True)))
               .order_by(_OUTBOX.c.priority, _OUTBOX.c.next_attempt_at, _OUTBOX.c.id)
               .limit(bindparam("limit", type_=Integer)))
    if skip_locked:
        sub = sub.with_for_update(skip_locked=True)
    return (update(_OUTBOX).where(_OUTBOX.c.id.in_(sub.scalar_subquery()))
            .values(state="claimed", claimed_by=bindparam("me"), lease_until=bindparam("lease"))
            .returning(_OUTBOX.c.id))


_CLAIM = _claim_statement(False)
_CLAIM_PG = _claim_statement(True)  # FOR UPDATE SKIP LOCKED: workers never block each other
_CLAIM_TARGET = _claim_statement(False, by_target=True)
_CLAIM_TARGET_PG = _claim_statement(True, by_target=True)
_CLAIMED_ROWS = (
    select(OutboxEntry.id, OutboxEntry.kind, OutboxEntry.target, OutboxEntry.attempts, OutboxEntry.payload,
           OutboxEntry.priority, Delivery.message_id, Delivery.unit, Delivery.unit_name, Delivery.copy_type,
           Delivery.copy_no, Delivery.status, Delivery.remote_ref, Message.envelope_xml)
    .outerjoin(Delivery, Delivery.id == OutboxEntry.delivery_id)
    .outerjoin(Message, Message.id == Delivery.message_id)
    .where(OutboxEntry.id.in_(bindparam("ids", expanding=True))))
_DONE = (update(_OUTBOX)
         .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)), _OUTBOX.c.state == "claimed",
                _OUTBOX.c.claimed_by == bindparam("me"))
         .values(state="done", attempts=_OUTBOX.c.attempts + 1, finished_at=bindparam("now"), last_error=None)
         .returning(_OUTBOX.c.id, _OUTBOX.c.delivery_id, _OUTBOX.c.attempts, _OUTBOX.c.target))
_RENEW = (update(_OUTBOX)
          .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)), _OUTBOX.c.state == "claimed",
                 _OUTBOX.c.claimed_by == bindparam("me"))
          .values(lease_until=bindparam("lease"))
          .returning(_OUTBOX.c.id))


def queued_units(node: Node, message_id: str, target: str, units: list[str], resend: bool = False) -> list[str]:
    """Of ``units`` forwarded to node ``target``, those whose copy is still queued here (or,
    for a forward sent again by reconciliation, not yet final)."""
    statuses = ("queued", "delivered") if resend else ("queued",)
    with node.db.sessions() as s:
        queued = set(s.scalars(select(Delivery.unit).where(
            Delivery.message_id == message_id, Delivery.route_kind == "node",
            Delivery.target == target, Delivery.status.in_(statuses))))
    return [u for u in units if u in queued]


@dataclass
class Job:
    """One claimed outbox row with what its delivery needs."""

    id: int
    kind: str
    target: str
    attempts: int
    payload: dict | None
    priority: int = 2
    message_id: str | None = None
    envelope_xml: bytes | None = None
    recipient: Recipient | None = None
    delivery_status: str | None = None
    remote_ref: str | None = None  # the delivery's, as stored at accept


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Jobs in claim order, status reports (and forwards) for the same node put together."""
    ready, out = deque(jobs), []
    while ready:
        out.append(_take_group(ready))
    return out


def _take_group(ready: deque[Job]) -> list[Job]:
    """The next group from the local queue: its first job, and with a status report or a
    forward the others ready for the same node (status reports are applied there in one
    transaction; forwards one by one, so a few per request keep several requests, and
    commits, in flight)."""
    job = ready.popleft()
    group = [job]
    if job.kind in ("status", "forward"):
        cap = 199 if job.kind == "status" else FORWARDS_PER_REQUEST - 1
        group += [j for j in ready if j.kind == job.kind and j.target == job.target][:cap]
        for j in group[1:]:
            ready.remove(j)
    return group


def _batch_size(threads: int, pace: float | None, lease: float) -> int:
    """Rows a claim tops the local queue up to: ``8 × threads``, but no more than are
    delivered in a quarter of the lease at the current pace (deliveries a second; None
    before it is known), and at least ``threads``."""
    batch = 8 * threads
    if pace is not None:
        batch = max(threads, min(batch, int(pace * lease / 4)))
    return batch


def jobs_from_rows(rows) -> list[Job]:  # type: ignore[no-untyped-def]
    """Jobs from rows of ``_CLAIMED_ROWS``, in the given order."""
    return [Job(r.id, r.kind, r.target, r.attempts, r.payload, r.priority, r.message_id, r.envelope_xml,
                Recipient(r.unit, r.unit_name, r.copy_type, r.copy_no) if r.unit else None, r.status, r.remote_ref)
            for r in rows]


@dataclass
class Outcome:
    job: Job
    error: DeliveryError | None = None
    remote_id: str | None = None
    extra: dict = field(default_factory=dict)


class Worker:
    def __init__(self, node: Node, *, worker_id: str | None = None, threads: int | None = None) -> None:
        self.node = node
        self.cfg = node.config.worker
        self.threads = threads or self.cfg.threads
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        #: the delivery threads have ended (stop): the recorder ends once it has recorded the rest
        self._drained = threading.Event()
        self._threads: list[threading.Thread] = []
        #: claimed rows not started yet, most urgent first; the delivery threads take from it
        #: themselves (guarded by _cv, as are _busy and _closing)
        self._ready: deque[Job] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._busy = 0  # delivery threads running a group
        self._closing = False  # delivery threads finish (stop)
        self._done = 0  # groups' jobs finished (the dispatcher's measure of pace)
        self._low = 4 * self.threads  # fewer ready rows than this: the dispatcher claims more
        self._delivery_threads: list[threading.Thread] = []
        self._wake = threading.Event()  # the dispatcher: claim now
        self._outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
        #: ids of the rows claimed and not yet recorded (or given back): never claimed again
        #: meanwhile (guarded by _cv)
        self._in_hand: set[int] = set()
        #: ids of rows delivered (or tried) whose outcomes wait for the database to come back:
        #: this worker's reaper leaves them claimed (guarded by _cv)
        self._unrecorded: set[int] = set()
        #: since when (time.monotonic) this worker has reached the database without a break;
        #: None before its first round and while an outage lasts. Its reaper takes rows back
        #: only once this is a lease ago: a worker that held rows across the outage renews
        #: their leases first thing when the database is back, well inside that lease
        self._db_ok_since: float | None = None
        self._http = requests.Session()
        self._key: Ed25519PrivateKey | SM2PrivateKey | None = None
        #: peers whose rows only the sync jobs carry (batch and ferry links)
        self.parked = [name for name, p in node.config.peers.items() if p.link != "http"]
        #: peers that did not answer: until when (monotonic) their rows are left in the queue,
        #: and how long that hold was (it doubles, up to the peer's max_delay); guarded by _cv
        self._held: dict[str, tuple[float, float]] = {}

    # -- claiming ------------------------------------------------------------------------
    def claim(self, limit: int, *, target: str | None = None) -> list[Job]:
        """Claim up to ``limit`` due rows, most urgent first; with ``target``, the rows queued
        for that one peer in queue order, due or not (a sync job's batch)."""
        if limit <= 0:
            return []
        now = datetime.now(UTC)
        pg = self.node.db.postgres
        params: dict[str, object]
        if target is None:
            with self._cv:
                in_hand = list(self._in_hand)
                mono = time.monotonic()
                held = [peer for peer, (until, _) in self._held.items() if until > mono]
            claim, params = _CLAIM_PG if pg else _CLAIM, {"parked": self.parked + held, "in_hand": in_hand}
        else:
            claim, params = _CLAIM_TARGET_PG if pg else _CLAIM_TARGET, {"for_target": target}
        with self.node.db.begin_core() as s:
            ids = list(s.execute(claim, {"now": now, "limit": limit, "me": self.id, **params,
                                         "lease": now + timedelta(seconds=self.cfg.lease_seconds)}).scalars())
            if not ids:
                return []
            rows = s.execute(_CLAIMED_ROWS, {"ids": ids}).all()
        rows = sorted(rows, key=lambda r: r.id) if target else sorted(rows, key=lambda r: (r.priority, r.id))
        return jobs_from_rows(rows)

    def reap_expired_leases(self) -> int:
        """Return rows whose worker died (lease expired) to the queue. Not the rows whose
        outcomes this worker is waiting to record (a database outage longer than the lease):
        taken back, they would be delivered a second time."""
        now = datetime.now(UTC)
        with self._cv:
            unrecorded = list(self._unrecorded)
        expired = [OutboxEntry.state == "claimed", OutboxEntry.lease_until < now]
        if unrecorded:
            expired.append(OutboxEntry.id.not_in(unrecorded))
        with self.node.db.begin() as s:
            res = s.execute(update(OutboxEntry)
                            .where(*expired)
                            .values(state="pending", claimed_by=None, lease_until=None),
                            execution_options={"synchronize_session": False})
            return cast(CursorResult, res).rowcount or 0

    def renew_leases(self) -> int:
        """Extend the leases of the rows this worker holds (claimed and waiting here, being
        delivered, or delivered with the outcome not recorded yet), so that no other worker
        takes them back while this one is alive. A row another worker has taken over
        meanwhile (this worker's lease ran out while it could not reach the database) is not
        renewed; if it had not been started here, it is dropped from the local queue and not
        delivered: the other worker delivers it. The number of rows renewed."""
        with self._cv:
            held = list(self._in_hand)
        if not held:
            return 0
        lease = datetime.now(UTC) + timedelta(seconds=self.cfg.lease_seconds)
        with self.node.db.begin_core() as s:
            kept = set(s.execute(_RENEW, {"ids": held, "me": self.id, "lease": lease}).scalars())
        lost = set(held) - kept
        if lost:
            with self._cv:
                # only rows not started yet can still be left to their new owner; a row started
                # here is also not renewed once its outcome is recorded (the recorder lets go of
                # it just after its commit), and one taken over is said by record()
                dropped = [j for j in self._ready if j.id in lost]
                if dropped:
                    self._ready = deque(j for j in self._ready if j.id not in lost)
                    self._in_hand.difference_update(j.id for j in dropped)
            if dropped:
                log.warning("%d claimed rows not started here were taken over by another worker (their lease ran out "
                            "while this one could not reach the database); they are left to it", len(dropped))
        return len(kept)

    # -- processing ----------------------------------------------------------------------
    def execute(self, job: Job) -> Outcome:
        """Call the adapter (or send the webhook); never raises."""
        out = Outcome(job)
        try:
            if job.kind == "deliver":
                assert job.message_id and job.envelope_xml is not None and job.recipient
                env = _envelope(job.message_id, job.envelope_xml)
                res = self.node.adapter(job.target).deliver(AdapterDelivery(
                    message_id=job.message_id, recipient=job.recipient, envelope=env, attempt=job.attempts + 1,
                    ref=job.remote_ref))
                out.remote_id = res.remote_id
            elif job.kind == "forward":
                out.extra.update(self._forward(job))
            elif job.kind == "status":
                self.node.federation.client.post(job.target, "/status", {"items": [job.payload]})
            elif job.kind == "recall" and job.target in self.node.config.peers:
                assert job.message_id and job.recipient
                self.node.federation.client.post(job.target, "/recall", {"message_id": job.message_id,
                                                                         "units": [job.recipient.unit]})
                out.extra["requested"] = True
            elif job.kind == "recall":
                assert job.message_id and job.recipient
                if job.delivery_status == "queued":
                    # the copy is being delivered right now: recall it once that has finished
                    raise RetryableError("the copy is still being delivered; the recall follows it")
                out.extra["recalled"] = self.node.adapter(job.target).recall(job.message_id, job.recipient.unit,
                                                                             job.remote_ref)
            elif job.kind == "webhook":
                self._send_webhook(job.target, job.payload or {})
            else:
                raise PermanentError(f"unknown outbox kind {job.kind!r}")
        except DeliveryError as exc:
            out.error = exc
        except KeyError as exc:
            out.error = PermanentError(str(exc))
        except Exception as exc:  # noqa: BLE001 - an adapter bug must not kill the worker
            text = str(exc)
            query = urlsplit(job.target).query if job.kind == "webhook" and job.target else ""
            if query:  # stored, audited and logged: no ?token= of a webhook URL in any of them
                text = text.replace(query, "…")
                # a traceback would print the exception's own text (and its causes'), which
                # may carry the URL: the log gets where it was raised, with the query cut out
                at = traceback.extract_tb(exc.__traceback__)[-1]
                log.error("outbox %s: unexpected error sending a webhook: %s: %s (raised at %s:%s in %s)", job.id,
                          type(exc).__name__, text, at.filename, at.lineno, at.name)
            else:
                log.exception("outbox %s: unexpected error", job.id)
            out.error = RetryableError(f"{type(exc).__name__}: {text}")
        return out

    def _forward(self, job: Job) -> dict:
        """Hand a message to the next node for the units behind it that are still queued
        (a unit recalled meanwhile is left out)."""
        from gateway.federation.batch import item_for

        item = item_for(self.node, job)  # the same body a batch carries, less seq and kind
        if item is None:
            return {"units": [], "skipped": True}
        answer = self.node.federation.client.post(
            job.target, "/messages", {k: v for k, v in item.items() if k not in ("seq", "kind")})
        return {"units": item["units"], "answer": answer}

    def _policy(self, kind: str, target: str) -> RetryPolicy:
        return self.node.config.retry_for(kind, target)

    def record(self, outcomes: list[Outcome]) -> None:
        """Record outcomes in one transaction: successful deliveries with a few set-based
        statements (the common case, and the one a fast peer makes hot), the rest row by row."""
        if not outcomes:
            return
        fast = [o for o in outcomes if o.error is None and o.job.kind == "deliver"]
        forwarded = [o for o in outcomes if o.error is None and o.job.kind == "forward"]
        slow = [o for o in outcomes if o.error is not None or o.job.kind not in ("deliver", "forward")]
        if fast or forwarded:
            with self.node.db.begin_core() as conn:
                if fast:
                    self._record_delivered(conn, fast)
                if forwarded:
                    self._record_forwarded(conn, forwarded)
        if slow:
            with self.node.db.begin() as s:
                for o in slow:
                    self._record_one(s, o)

    def _record_delivered(self, s, outs: list[Outcome]) -> None:  # type: ignore[no-untyped-def]
        """Deliveries that succeeded: their rows done, their copies delivered, one audit entry
        each. Statements on the driver's cursor (as on the accept path): the recorder commits
        a batch every few dozen deliveries while the claimer and the API wait for the lock."""
        postgres = self.node.db.postgres
        m = driver_mark(postgres)
        stamp = driver_stamp(datetime.now(UTC), postgres)
        by_id = {o.job.id: o for o in outs}
        cur = s.connection.cursor()
        try:
            marks = ", ".join([m] * len(by_id))
            cur.execute(f"UPDATE outbox SET state = 'done', attempts = attempts + 1, finished_at = {m}, "
                        f"last_error = NULL WHERE id IN ({marks}) AND state = 'claimed' AND claimed_by = {m} "
                        f"RETURNING id, delivery_id, attempts, target", (stamp, *by_id, self.id))
            mine = cur.fetchall()
            if len(mine) < len(by_id):
                log.warning("%d delivery outcomes not recorded: their rows were taken over by another worker "
                            "(their lease ran out), which delivers them again", len(by_id) - len(mine))
            if not mine:
                return  # every lease expired and other workers took the rows over
            delivery_ids = [r[1] for r in mine]
            cur.execute(f"SELECT id, status, message_id, unit FROM deliveries WHERE id IN "
                        f"({', '.join([m] * len(delivery_ids))}){' FOR UPDATE' if postgres else ''}", delivery_ids)
            current = {r[0]: r for r in cur.fetchall()}
            changed = [r for r in mine if current[r[1]][1] == "queued"]
            if changed:
                cur.executemany(f"UPDATE deliveries SET status = 'delivered', delivered_at = {m}, updated_at = {m}, "
                                f"last_error = NULL, remote_id = {m} WHERE id = {m} AND status = 'queued'",
                                [(stamp, stamp, by_id[r[0]].remote_id, r[1]) for r in changed])
                events.status_changed_many(s, [(r[1], "queued", "delivered") for r in changed])
            actor = f"worker:{self.id}"
            audit.append_driver(cur, postgres, [audit.Record(
                actor, "delivery.attempt", f"delivery:{current[r[1]][2]}/{current[r[1]][3]}", "delivered",
                {"adapter": r[3], "attempt": r[2], "remote_id": by_id[r[0]].remote_id}) for r in mine])
        finally:
            cur.close()

    def _record_forwarded(self, s, outs: list[Outcome]) -> None:  # type: ignore[no-untyped-def]
        """Forwards handed over: the rows are done; the copies stay queued until the next
        node reports their status."""
        by_id = {o.job.id: o for o in outs}
        mine = s.execute(_DONE, {"ids": list(by_id), "me": self.id, "now": datetime.now(UTC)}).all()
        actor = f"worker:{self.id}"
        audit.append_many(s, [audit.Record(
            actor, "message.forward", f"message:{by_id[r.id].job.message_id}",
            "skipped" if by_id[r.id].extra.get("skipped") else "forwarded",
            {"node": r.target, "units": by_id[r.id].extra.get("units", []), "attempt": r.attempts,
             "accepted_at": (by_id[r.id].extra.get("answer") or {}).get("accepted_at")})
            for r in mine])

    def _record_one(self, s, o: Outcome) -> None:  # type: ignore[no-untyped-def]
        now = datetime.now(UTC)
        entry = s.get(OutboxEntry, o.job.id, with_for_update=True)
        if entry is None or entry.state != "claimed" or entry.claimed_by != self.id:
            return  # our lease expired and another worker took the row over
        if o.extra.get("held"):
            # the node does not answer: the row waits for it, its retry budget untouched (a link
            # may be down for a week; what was sent over it must not fail meanwhile); this
            # worker leaves the node alone until its hold ends (Worker._note_peer)
            entry.state, entry.claimed_by, entry.lease_until = "pending", None, None
            if not o.extra.get("tried"):
                return  # not tried: nothing happened to record
            message = str(o.error)[:2000]
            entry.last_error = message
            d = s.get(Delivery, entry.delivery_id) if entry.delivery_id else None
            if d is not None and entry.kind == "forward" and d.status == "queued":
                d.last_error = message
            audit.append(s, actor=f"worker:{self.id}", action="delivery.attempt",
                         obj=f"delivery:{d.message_id}/{d.unit}" if d else f"outbox:{entry.id}", outcome="waiting",
                         detail={"target": entry.target, "attempt": entry.attempts + 1, "error": message,
                                 "retryable": True})
            return
        entry.attempts += 1
        # locked, as a receipt locks it: one applied meanwhile (签收) is seen, never overwritten
        d = s.get(Delivery, entry.delivery_id, with_for_update=True) if entry.delivery_id else None
        obj = f"delivery:{d.message_id}/{d.unit}" if d else f"outbox:{entry.id}"
        actor = f"worker:{self.id}"
        err = o.error
        if err is None:
            # successful deliveries and forwards never come here: they are recorded set-based
            entry.state, entry.finished_at, entry.last_error = "done", now, None
            if entry.kind == "recall" and d is not None:
                if o.extra.get("recalled"):
                    prev, d.status, d.updated_at = d.status, "recalled", now
                    events.status_changed(s, d, prev)
                    outcome = "recalled"
                else:
                    d.reason, outcome = "撤回失败：对方已签收 (recall too late: already signed for)", "too-late"
                audit.append(s, actor=actor, action="delivery.recall", obj=obj, outcome=outcome,
                             detail={"adapter": entry.target})
            elif entry.kind == "recall":
                audit.append(s, actor=actor, action="delivery.recall", obj=obj, outcome="requested",
                             detail={"node": entry.target})
            elif entry.kind == "webhook":
                audit.append(s, actor=actor, action="webhook.send", obj=obj, outcome="sent",
                             detail={"url": events.shown_url(entry.target), "attempt": entry.attempts})
            elif entry.kind == "status":
                p = entry.payload or {}
                audit.append(s, actor=actor, action="status.send", obj=obj, outcome="sent",
                             detail={"node": entry.target, "status": p.get("status")})
            return
        policy = self._policy(entry.kind, entry.target)
        message = str(err)[:2000]
        entry.last_error = message
        if not err.retryable or entry.attempts >= policy.max_attempts:
            entry.state, entry.finished_at = "dead", now
            outcome = "dead-letter"
            if d is not None and entry.kind == "deliver" and d.status == "queued":
                prev, d.status, d.last_error, d.updated_at = d.status, "failed", message, now
                events.status_changed(s, d, prev)
            elif d is not None and entry.kind == "forward":
                # every unit behind that node fails with the forward
                for other in s.scalars(select(Delivery).where(
                        Delivery.message_id == d.message_id, Delivery.route_kind == "node",
                        Delivery.target == entry.target, Delivery.status == "queued",
                        Delivery.unit.in_((entry.payload or {}).get("units", [])))
                        .with_for_update().execution_options(populate_existing=True)):
                    prev, other.status, other.last_error, other.updated_at = other.status, "failed", message, now
                    events.status_changed(s, other, prev)
            elif d is not None and entry.kind == "recall" and d.status in ("queued", "delivered"):
                # the copy stays where it is; the caller sees why the recall did not happen
                d.reason, d.updated_at = f"撤回失败 (recall failed): {message}"[:2000], now
        else:
            entry.state, entry.claimed_by, entry.lease_until = "pending", None, None
            entry.next_attempt_at = now + timedelta(seconds=backoff(policy, entry.attempts))
            outcome = "retry"
            if d is not None and entry.kind in ("deliver", "forward"):
                d.last_error = message
        audit.append(s, actor=actor, action="webhook.attempt" if entry.kind == "webhook" else "delivery.attempt",
                     obj=obj, outcome=outcome, detail={"target": events.shown_url(entry.target)
                                                      if entry.kind == "webhook" else entry.target,
                                                      "attempt": entry.attempts,
                                                      "error": message, "retryable": err.retryable})

    def _send_webhook(self, url: str, payload: dict) -> None:
        shown = events.shown_url(url)  # errors are stored and audited: no ?token= in them
        if self._key is None:  # the node key: Ed25519, or SM2 where [federation] algorithm = "sm2"
            from gateway.federation.keys import own_key

            self._key = own_key(self.node.config)
        body = json.dumps(events.as_posted(payload), ensure_ascii=False, sort_keys=True).encode("utf-8")
        ts = str(int(time.time()))
        sig = nodekey.sign(self._key, ts.encode() + b"." + body)
        headers = {"Content-Type": "application/json; charset=utf-8", "Gateway-Timestamp": ts,
                   "Gateway-Signature": f"{nodekey.algorithm(self._key)}={sig}", "Gateway-Node": self.node.id}
        try:
            # never redirected: the receiver the administrator set is the only one that gets
            # the post (a redirect could send it to any host this node can reach)
            r = self._http.post(url, data=body, headers=headers, timeout=self.node.config.webhooks.timeout,
                                allow_redirects=False)
        except requests.RequestException as exc:
            raise RetryableError(f"webhook {shown}: {type(exc).__name__}") from None
        if r.is_redirect:
            raise RetryableError(f"webhook {shown}: HTTP {r.status_code}, a redirect (to "
                                 f"{events.shown_url(r.headers.get('Location') or '')!r}); "
                                 f"webhooks are not redirected: give the key the final address")
        if r.status_code >= 300:
            raise RetryableError(f"webhook {shown}: HTTP {r.status_code}")

    # -- running -------------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim and process one batch synchronously (tests, ``gateway worker --once``)."""
        jobs = self.claim(self.threads)
        outcomes: list[Outcome] = []
        for group in _groups(jobs):
            outcomes += self.execute_group(group)
        self.record(outcomes)
        return len(jobs)

    def drain(self, timeout: float = 30.0) -> None:
        """Process until nothing is due (tests, the demo, ``gateway worker --once``). Rows a
        worker that died left claimed are due once their lease has run out: nothing else
        returns them when no long-running worker is there to reap them."""
        self.reap_expired_leases()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run_once() == 0:
                return

    def start(self) -> None:
        self._stop.clear()
        self._drained.clear()
        self._closing = False
        self._delivery_threads = [threading.Thread(target=self._delivery_loop, name=f"delivery-{i}", daemon=True)
                                  for i in range(self.threads)]
        for t in self._delivery_threads:
            t.start()
        self._threads = [threading.Thread(target=self._dispatch_loop, name="outbox-dispatcher", daemon=True),
                         threading.Thread(target=self._record_loop, name="outbox-recorder", daemon=True)]
        for t in self._threads:
            t.start()

    def wake(self) -> None:
        self._wake.set()

    def execute_group(self, jobs: list[Job]) -> list[Outcome]:
        """Status reports and forwards for one node travel together: one signed request
        (``/status``, or ``/batch`` for forwards, applied there in order). Everything else
        runs one by one."""
        first = jobs[0]
        to_peer = first.kind in PEER_KINDS and first.target in self.node.config.peers
        probe = False
        if to_peer:
            hold, probe = self._hold_or_probe(first.target)
            if hold is not None:  # claimed before the node stopped answering: not tried now
                return [self._held_outcome(j, None) for j in jobs]
        outcomes = self._execute_group(jobs)
        if to_peer:
            self._note_peer(first.target, outcomes, probe)
        return outcomes

    # -- peers that do not answer ------------------------------------------------------------
    def _hold_or_probe(self, peer: str) -> tuple[float | None, bool]:
        """(seconds left of the hold on ``peer``, or None; whether this request is the one
        that finds out if a held peer is back). While that request runs the hold is extended,
        so that the peer's other rows wait for its answer rather than each try too."""
        with self._cv:
            until, last = self._held.get(peer, (0.0, 0.0))
            mono = time.monotonic()
            if until > mono:
                return until - mono, False
            if last:
                self._held[peer] = (mono + last, last)
                return None, True
        return None, False

    @staticmethod
    def _held_outcome(job: Job, error: DeliveryError | None) -> Outcome:
        """The outcome of a row for a held peer: ``error`` when it was tried (the request that
        found the node away), none when it was not. The row goes back to the queue as it was
        (its due time too: when the node is back, the claim takes the most urgent first)."""
        return Outcome(job, error=error or RetryableError(f"node {job.target} does not answer; waiting for it",
                                                          code=UNREACHABLE),
                       extra={"held": True, "tried": error is not None})

    def _note_peer(self, peer: str, outcomes: list[Outcome], probe: bool) -> None:
        """After a request to ``peer``: hold it when it did not answer (no connection, a
        timeout, 502/503/504), so that its other rows wait in the queue instead of each
        spending a delivery thread (and a timeout) and a retry on a link that is down. The
        hold doubles with each request that finds the node still away, up to the peer's
        ``max_delay``. Let it go when it answered, and make its waiting rows due."""
        def away(e: DeliveryError | None) -> bool:
            return e is not None and e.retryable and e.code in UNREACHABLE_CODES

        failed = next((o.error for o in outcomes if away(o.error)), None)
        if failed is not None:
            policy = self._policy("forward", peer)
            with self._cv:
                until, last = self._held.get(peer, (0.0, 0.0))
                mono = time.monotonic()
                if until <= mono or probe:  # (else another request found it away just now)
                    hold = min(policy.max_delay, max(policy.base_delay, 2 * last))
                    self._held[peer] = (mono + hold, hold)
            if not last:
                log.warning("node %s does not answer (%s); its forwards, status reports and recalls wait in the queue "
                            "(not counted as failed attempts); asking it again every %g s at most", peer, failed,
                            policy.max_delay)
            for i, o in enumerate(outcomes):
                if away(o.error):
                    outcomes[i] = self._held_outcome(o.job, o.error)
            return
        if not any(o.error is not None or not o.extra.get("skipped") for o in outcomes):
            return  # nothing was sent (every unit of the forward recalled): nothing learnt
        with self._cv:
            was = self._held.pop(peer, None)
        if was is not None:
            log.info("node %s answers again; %d rows queued for it are due now", peer, self._due_now(peer))

    def _due_now(self, peer: str) -> int:
        """Make every row waiting for ``peer`` due now (the link is back)."""
        now = datetime.now(UTC)
        try:
            with self.node.db.begin() as s:
                res = s.execute(update(OutboxEntry).where(
                    OutboxEntry.target == peer, OutboxEntry.state == "pending", OutboxEntry.kind.in_(PEER_KINDS),
                    OutboxEntry.next_attempt_at > now).values(next_attempt_at=now),
                    execution_options={"synchronize_session": False})
                return cast(CursorResult, res).rowcount or 0
        except Exception as exc:  # noqa: BLE001 - they come due by themselves, within max_delay
            log.warning("could not make the rows for node %s due now: %s", peer, exc)
            return 0

    def _execute_group(self, jobs: list[Job]) -> list[Outcome]:
        if len(jobs) == 1:
            return [self.execute(jobs[0])]
        try:
            if jobs[0].kind == "status":
                # in the order the changes happened (a 签收 after its 已送达)
                self.node.federation.client.post(jobs[0].target, "/status", {
                    "items": [j.payload for j in sorted(jobs, key=lambda j: j.id)]})
                return [Outcome(j) for j in jobs]
            return self._forward_many(jobs)
        except DeliveryError as exc:
            return [Outcome(j, error=exc) for j in jobs]
        except Exception as exc:  # noqa: BLE001 - must not kill the worker
            log.exception("%s to %s: unexpected error", jobs[0].kind, jobs[0].target)
            return [Outcome(j, error=RetryableError(f"{type(exc).__name__}: {exc}")) for j in jobs]

    def _forward_many(self, jobs: list[Job]) -> list[Outcome]:
        from gateway.federation.batch import outcome_for, split

        send, empty, refused = split(self.node, jobs)
        out = {j.id: Outcome(j, extra={"units": [], "skipped": True}) for j in empty}
        out.update({o.job.id: o for o in refused})
        if send:
            answer = self.node.federation.client.post(jobs[0].target, "/batch", {"items": [i for _, i in send]})
            results = {r.get("seq"): r for r in answer.get("results", []) if isinstance(r, dict)}
            stopped = {"outcome": "retry", "detail": "the node stopped before this item"}
            for j, item in send:
                out[j.id] = outcome_for(j, results.get(j.id, stopped), item["units"])
        return [out[j.id] for j in jobs]

    def _delivery_loop(self) -> None:
        """Take the most urgent ready group and run it, until stopped. The delivery threads
        take work themselves: handing each delivery out through the dispatcher cost a wake-up
        of that thread per delivery. The dispatcher is woken only to claim more."""
        cv = self._cv
        while True:
            with cv:
                while not self._ready and not self._closing:
                    cv.wait()
                if not self._ready:
                    return  # closing, and nothing left to take
                group = _take_group(self._ready)
                self._busy += 1
                refill = len(self._ready) < self._low
            if refill and not self._wake.is_set():
                self._wake.set()
            try:
                for outcome in self.execute_group(group):
                    self._outcomes.put(outcome)
            finally:
                with cv:
                    self._busy -= 1
                    self._done += len(group)

    def _dispatch_loop(self) -> None:
        """Keep a local queue of claimed rows for the delivery threads: one claim transaction
        per batch (up to ``8 × threads`` rows, again when fewer than half that are left; a
        claim costs about as much as several deliveries' own work), not per delivery. A row
        claimed later that is more urgent goes to the front of the queue, so a 特急 document
        accepted now waits only for the next claim, after about ``4 × threads`` deliveries
        (bench/urgency.py measures it).

        The batch is also bounded by the pace of delivery: no more rows than are delivered in
        a quarter of the lease. The leases of the rows held here are renewed, but rows queued
        here behind a slow peer are rows no other worker can take meanwhile, and a worker
        that dies leaves them all to wait for their lease.

        Every quarter lease, and first thing once the database is back after an outage, it
        renews the leases of the rows this worker holds (:meth:`renew_leases`); it takes back
        expired rows of other workers (:meth:`reap_expired_leases`) only once it has reached
        the database for a whole lease without a break."""
        last_reap = last_renew = 0.0
        every = max(1.0, self.cfg.lease_seconds / 4)
        away = False  # the last round met a database outage
        pace_at, pace_done, pace = time.monotonic(), 0, None
        self._db_ok_since = None
        self.node.db.hold_connection()
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                ok_since: float | None = self._db_ok_since
                if ok_since is None or now - last_renew > every:
                    # first thing once the database answers again: the rows held across an
                    # outage are this worker's before any other worker's reaper may take them
                    self.renew_leases()
                    last_renew = now
                if ok_since is not None and now - ok_since >= self.cfg.lease_seconds and now - last_reap > every:
                    self.reap_expired_leases()
                    last_reap = now
                with self._cv:
                    queued, free, done = len(self._ready), self.threads - self._busy, self._done
                if now - pace_at >= 1.0:  # deliveries a second, smoothed
                    rate = (done - pace_done) / (now - pace_at)
                    pace = rate if pace is None else (pace + rate) / 2
                    pace_at, pace_done = now, done
                batch = _batch_size(self.threads, pace, self.cfg.lease_seconds)
                self._low = batch // 2
                if queued < self._low:
                    fresh = self.claim(batch + free - queued)
                    if fresh:
                        with self._cv:
                            self._in_hand.update(j.id for j in fresh)
                            # an urgent row claimed now goes ahead of ordinary rows claimed earlier
                            self._ready = deque(sorted([*self._ready, *fresh], key=lambda j: j.priority))
                            self._cv.notify(len(fresh))
                if self._db_ok_since is None:
                    self._db_ok_since = now
                self._wake.wait(self.cfg.idle_sleep)
                self._wake.clear()
                if away:
                    log.info("the database is back; claiming rows again")
                    away = False
            except Exception as exc:  # the database may be briefly unavailable
                self._db_ok_since = None
                if outage(exc) is None:
                    log.exception("dispatcher loop error; retrying")
                elif not away:  # one line an outage, not one a second
                    log.warning("the database is unavailable (%s); claiming again every second until it is back",
                                outage_text(exc))
                    away = True
                self._stop.wait(1.0)
        self.node.db.release_connection()

    def release(self, ids: list[int]) -> None:
        """Give claimed rows back untouched (not attempted)."""
        if ids:
            self._release(ids)

    def _release(self, ids: list[int]) -> None:
        with self.node.db.begin() as s:
            s.execute(update(OutboxEntry).where(OutboxEntry.id.in_(ids), OutboxEntry.claimed_by == self.id,
                                                OutboxEntry.state == "claimed")
                      .values(state="pending", claimed_by=None, lease_until=None),
                      execution_options={"synchronize_session": False})

    def _record_loop(self) -> None:
        self.node.db.hold_connection()
        while True:
            try:
                first = self._outcomes.get(timeout=0.2)
            except queue.Empty:
                if self._drained.is_set():  # not _stop: deliveries still running put outcomes later
                    self.node.db.release_connection()
                    return
                continue
            batch = [first]
            # Gather what finishes within a few milliseconds: one commit (one fsync, one
            # turn of the write lock) then records many deliveries instead of one or two.
            window_end = time.monotonic() + RECORD_WINDOW
            while len(batch) < 200:
                try:
                    batch.append(self._outcomes.get(timeout=max(0.0, window_end - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._record_until_done(batch)
            except Exception:  # keep the rows claimed: their lease expires and they run again
                log.exception("recording %d outcomes failed; their rows will be retried", len(batch))
                time.sleep(0.5)
            finally:
                with self._cv:
                    self._in_hand.difference_update(o.job.id for o in batch)

    #: how long a stopping worker still tries to record outcomes while the database is away
    RECORD_PATIENCE_STOPPING = 5.0

    def _record_until_done(self, batch: list[Outcome]) -> None:
        """Record ``batch``; while the database is away (restarting, stopped, out of
        connections), keep the outcomes and try again every second rather than drop them.
        Dropped, the rows would stay claimed until their lease ran out and be delivered a
        second time: a legacy system that does not deduplicate (an SFTP drop whose reader
        has taken the first file) would get the document twice. Recording again is safe:
        a row already recorded (a commit whose answer was lost) is no longer ``claimed``
        by this worker, and is left alone. A stopping worker gives up after
        RECORD_PATIENCE_STOPPING seconds (the rows come back when their lease runs out)."""
        try:
            self._record_retrying(batch)
        finally:
            with self._cv:
                self._unrecorded.difference_update(o.job.id for o in batch)

    def _record_retrying(self, batch: list[Outcome]) -> None:
        away_since: float | None = None
        while True:
            try:
                self.record(batch)
            except Exception as exc:
                if outage(exc) is None:
                    raise
                now = time.monotonic()
                self._db_ok_since = None  # the dispatcher's reaper waits a lease from its return
                if away_since is None:
                    away_since = now
                    with self._cv:
                        self._unrecorded.update(o.job.id for o in batch)
                    log.warning("the database is unavailable (%s); keeping %d delivery outcomes and recording them "
                                "once it is back", outage_text(exc), len(batch))
                if self._drained.is_set() and now - away_since > self.RECORD_PATIENCE_STOPPING:
                    log.warning("stopping: %d delivery outcomes not recorded (the database is still unavailable); "
                                "their rows return to the queue when their lease runs out", len(batch))
                    return
                time.sleep(1.0)
                continue
            if away_since is not None:
                log.info("the database is back; %d delivery outcomes recorded", len(batch))
            return

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, give back the rows not started, wait for the deliveries running and
        record their outcomes. Waits ``timeout`` for the deliveries all together (not each
        thread in turn: eight threads stuck on a legacy system that does not answer would
        hold a ``gateway worker`` for 80 s past its SIGTERM, beyond what a service manager
        waits before it kills); a delivery still running then is left to its lease."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        dispatcher, recorder = self._threads or (None, None)
        if dispatcher is not None:
            dispatcher.join(timeout)  # claims nothing more after this
        # rows not started yet go back to the queue at once, not after their lease
        with self._cv:
            unstarted = [j.id for j in self._ready]
            self._ready.clear()
            self._in_hand.difference_update(unstarted)
            self._closing = True
            self._cv.notify_all()
        for t in self._delivery_threads:
            t.join(max(0.0, deadline - time.monotonic()))
        running = sum(t.is_alive() for t in self._delivery_threads)
        if running:
            log.warning("stopping: %d deliveries still running after %g s; their rows return to the queue when "
                        "their lease runs out (worker.lease_seconds)", running, timeout)
        self._drained.set()
        if unstarted:
            try:
                self._release(unstarted)
            except Exception:  # noqa: BLE001 - their lease returns them anyway
                log.warning("could not give back %d unstarted rows", len(unstarted), exc_info=True)
        if recorder is not None:
            recorder.join(timeout)  # records what the delivery threads finished
        self._http.close()
