"""The delivery worker: claim outbox rows, call the adapter, record the outcome.

* Claims are leased (``lease_seconds``); a row whose worker died returns to the queue when
  its lease expires. On PostgreSQL, claims use ``FOR UPDATE SKIP LOCKED`` so several
  workers share the queue without blocking each other.
* Rows are claimed by urgency (特急 first), then due time, then age, and only as many as
  there are idle threads, so an urgent document never waits behind a claimed backlog.
* Failures retry with exponential backoff and jitter up to the adapter's ``max_attempts``;
  permanent errors and exhausted retries are dead-lettered (status ``failed``).
* Delivery is at-least-once: a crash after the adapter call but before the commit makes the
  row run again, and the adapter's idempotency (per-delivery ``remote_ref``) makes the
  second call a no-op at the receiver.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, UTC
from functools import lru_cache

import requests
from sqlalchemy import select, update

from adapters.base import DeliveryError, PermanentError, RetryableError
from adapters.base import Delivery as AdapterDelivery
from gateway import audit, events, nodekey
from gateway.config import RetryPolicy
from gateway.envelope import Envelope, Recipient
from gateway.models import Delivery, Message, OutboxEntry
from gateway.node import Node

log = logging.getLogger("gateway.worker")


def aware(dt: datetime | None) -> datetime | None:
    if dt is None or dt.tzinfo is not None:
        return dt
    return dt.replace(tzinfo=UTC)


def backoff(policy: RetryPolicy, attempt: int) -> float:
    """Exponential backoff with jitter: half fixed, half random, so retries of many rows
    that failed together spread out instead of hitting the recovering peer at once."""
    cap = min(policy.max_delay, policy.base_delay * (2 ** max(0, attempt - 1)))
    return cap / 2 + random.uniform(0, cap / 2)


@lru_cache(maxsize=2048)
def _envelope(message_id: str, xml: bytes) -> Envelope:
    return Envelope.from_xml(xml)


class Worker:
    def __init__(self, node: Node, *, worker_id: str | None = None, threads: int | None = None) -> None:
        self.node = node
        self.cfg = node.config.worker
        self.threads = threads or self.cfg.threads
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._wake = threading.Event()
        self._http = requests.Session()
        self._key = None

    # -- claiming ------------------------------------------------------------------------
    def claim(self, limit: int) -> list[int]:
        if limit <= 0:
            return []
        now = datetime.now(UTC)
        sub = (select(OutboxEntry.id)
               .where(OutboxEntry.state == "pending", OutboxEntry.next_attempt_at <= now)
               .order_by(OutboxEntry.priority, OutboxEntry.next_attempt_at, OutboxEntry.id)
               .limit(limit))
        if self.node.db.postgres:
            sub = sub.with_for_update(skip_locked=True)
        stmt = (update(OutboxEntry)
                .where(OutboxEntry.id.in_(sub.scalar_subquery()))
                .values(state="claimed", claimed_by=self.id,
                        lease_until=now + timedelta(seconds=self.cfg.lease_seconds))
                .returning(OutboxEntry.id, OutboxEntry.priority))
        with self.node.db.begin() as s:
            rows = s.execute(stmt, execution_options={"synchronize_session": False}).all()
        rows.sort(key=lambda r: (r[1], r[0]))
        return [r[0] for r in rows]

    def reap_expired_leases(self) -> int:
        """Return rows whose worker died (lease expired) to the queue."""
        now = datetime.now(UTC)
        with self.node.db.begin() as s:
            res = s.execute(update(OutboxEntry)
                            .where(OutboxEntry.state == "claimed", OutboxEntry.lease_until < now)
                            .values(state="pending", claimed_by=None, lease_until=None),
                            execution_options={"synchronize_session": False})
            return res.rowcount or 0

    # -- processing ----------------------------------------------------------------------
    def process(self, entry_id: int) -> None:
        with self.node.db.sessions() as s:
            entry = s.get(OutboxEntry, entry_id)
            if entry is None or entry.state != "claimed" or entry.claimed_by != self.id:
                return
            kind, target, attempts, payload = entry.kind, entry.target, entry.attempts, entry.payload
            d = s.get(Delivery, entry.delivery_id) if entry.delivery_id else None
            msg = s.get(Message, d.message_id) if d else None
            snapshot = None
            if d is not None and msg is not None:
                snapshot = (msg.id, msg.envelope_xml, Recipient(d.unit, d.unit_name, d.copy_type, d.copy_no))
        err: DeliveryError | None = None
        result_id: str | None = None
        outcome_extra: dict = {}
        try:
            if kind == "deliver":
                assert snapshot is not None
                mid, xml, recipient = snapshot
                env = _envelope(mid, xml)
                res = self.node.adapter(target).deliver(
                    AdapterDelivery(message_id=mid, recipient=recipient, envelope=env, attempt=attempts + 1))
                result_id = res.remote_id
            elif kind == "recall":
                assert snapshot is not None
                outcome_extra["recalled"] = self.node.adapter(target).recall(snapshot[0], snapshot[2].unit)
            elif kind == "webhook":
                self._send_webhook(target, payload or {})
            else:
                raise PermanentError(f"unknown outbox kind {kind!r}")
        except DeliveryError as exc:
            err = exc
        except KeyError as exc:
            err = PermanentError(str(exc))
        except Exception as exc:  # noqa: BLE001 - an adapter bug must not kill the worker
            log.exception("outbox %s: unexpected error", entry_id)
            err = RetryableError(f"{type(exc).__name__}: {exc}")
        self._record(entry_id, err, result_id, outcome_extra)

    def _policy(self, kind: str, target: str) -> RetryPolicy:
        if kind == "webhook":
            return self.node.config.webhooks.retry
        raw = self.node.config.adapters.get(target, {}).get("retry")
        return RetryPolicy(**raw) if raw else self.cfg.retry

    def _record(self, entry_id: int, err: DeliveryError | None, result_id: str | None, extra: dict) -> None:
        now = datetime.now(UTC)
        with self.node.db.begin() as s:
            entry = s.get(OutboxEntry, entry_id, with_for_update=True)
            if entry is None or entry.state != "claimed" or entry.claimed_by != self.id:
                return  # our lease expired and another worker took the row over
            entry.attempts += 1
            d = s.get(Delivery, entry.delivery_id) if entry.delivery_id else None
            obj = f"delivery:{d.message_id}/{d.unit}" if d else f"outbox:{entry.id}"
            if err is None:
                entry.state, entry.finished_at, entry.last_error = "done", now, None
                if entry.kind == "deliver" and d is not None:
                    if d.status == "queued":
                        prev, d.status, d.delivered_at, d.updated_at = d.status, "delivered", now, now
                        d.remote_id, d.last_error = result_id, None
                        events.status_changed(s, d, prev)
                    audit.append(s, actor=f"worker:{self.id}", action="delivery.attempt", obj=obj,
                                 outcome="delivered", detail={"adapter": entry.target, "attempt": entry.attempts,
                                                              "remote_id": result_id})
                elif entry.kind == "recall" and d is not None:
                    if extra.get("recalled"):
                        prev, d.status, d.updated_at = d.status, "recalled", now
                        events.status_changed(s, d, prev)
                        outcome = "recalled"
                    else:
                        d.reason, outcome = "撤回失败：对方已签收 (recall too late: already signed for)", "too-late"
                    audit.append(s, actor=f"worker:{self.id}", action="delivery.recall", obj=obj,
                                 outcome=outcome, detail={"adapter": entry.target})
                elif entry.kind == "webhook":
                    audit.append(s, actor=f"worker:{self.id}", action="webhook.send", obj=obj,
                                 outcome="sent", detail={"url": entry.target, "attempt": entry.attempts})
                return
            policy = self._policy(entry.kind, entry.target)
            message = str(err)[:2000]
            entry.last_error = message
            if not err.retryable or entry.attempts >= policy.max_attempts:
                entry.state, entry.finished_at = "dead", now
                outcome = "dead-letter"
                if d is not None and entry.kind == "deliver" and d.status in ("queued",):
                    prev, d.status, d.last_error, d.updated_at = d.status, "failed", message, now
                    events.status_changed(s, d, prev)
            else:
                entry.state, entry.claimed_by, entry.lease_until = "pending", None, None
                entry.next_attempt_at = now + timedelta(seconds=backoff(policy, entry.attempts))
                outcome = "retry"
                if d is not None and entry.kind == "deliver":
                    d.last_error = message
            audit.append(s, actor=f"worker:{self.id}", action=f"{'delivery' if entry.kind != 'webhook' else 'webhook'}.attempt",
                         obj=obj, outcome=outcome, detail={"target": entry.target, "attempt": entry.attempts,
                                                          "error": message, "retryable": err.retryable})

    def _send_webhook(self, url: str, payload: dict) -> None:
        if self._key is None:
            self._key = nodekey.load_or_create(self.node.data_dir)
        body = json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")
        ts = str(int(time.time()))
        sig = nodekey.sign(self._key, ts.encode() + b"." + body)
        headers = {"Content-Type": "application/json; charset=utf-8", "Gateway-Timestamp": ts,
                   "Gateway-Signature": f"ed25519={sig}", "Gateway-Node": self.node.id}
        try:
            r = self._http.post(url, data=body, headers=headers, timeout=self.node.config.webhooks.timeout)
        except requests.RequestException as exc:
            raise RetryableError(f"webhook {url}: {type(exc).__name__}") from None
        if r.status_code >= 300:
            raise RetryableError(f"webhook {url}: HTTP {r.status_code}")

    # -- running -------------------------------------------------------------------------
    def run_once(self) -> int:
        """Claim and process one batch synchronously (tests, ``gateway worker --once``)."""
        ids = self.claim(self.threads)
        for i in ids:
            self.process(i)
        return len(ids)

    def drain(self, timeout: float = 30.0) -> None:
        """Process until nothing is due (tests, the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run_once() == 0:
                return

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="delivery")
        self._thread = threading.Thread(target=self._loop, name="outbox-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _done(self, _f: object) -> None:
        with self._busy_lock:
            self._busy -= 1
        self._wake.set()

    def _loop(self) -> None:
        last_reap = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_reap > max(1.0, self.cfg.lease_seconds / 4):
                    self.reap_expired_leases()
                    last_reap = time.monotonic()
                with self._busy_lock:
                    free = self.threads - self._busy
                ids = self.claim(free)
                for i in ids:
                    with self._busy_lock:
                        self._busy += 1
                    assert self._pool is not None
                    self._pool.submit(self.process, i).add_done_callback(self._done)
                if not ids or free - len(ids) <= 0:
                    self._wake.wait(self.cfg.idle_sleep)
                    self._wake.clear()
            except Exception:  # noqa: BLE001 - the database may be briefly unavailable
                log.exception("dispatcher loop error; retrying")
                self._stop.wait(1.0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()
