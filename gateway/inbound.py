"""What legacy systems produce, fed into the same path: receipts (回执) update delivery
status; inbound envelopes are accepted like any other message.

Idempotent consumer: each polled item's key is stored in the same transaction as its effect,
and only then is the item acknowledged at the source (file moved to archive/, cursor
advanced). A crash between the two leaves the item at the source; the next poll sees its key
already recorded and just acknowledges it again.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, UTC

from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters.base import ConfigError, PolledItem
from gateway.config import ConfigError as NodeConfigError
from gateway import audit, events, pipeline
from gateway.envelope import Receipt
from gateway.models import Delivery, IngestedItem, ReceiptRecord
from gateway.node import Node

log = logging.getLogger("gateway.inbound")

#: status a receipt moves a delivery to, from the statuses where that move is allowed
TRANSITIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ARRIVED": ("delivered", ("queued",)),
    "SIGNED": ("signed", ("queued", "delivered", "failed")),
    "RETURNED": ("returned", ("queued", "delivered", "failed")),
    "RECALLED": ("recalled", ("queued", "delivered")),
    "REFUSED": ("failed", ("queued", "delivered")),
}


class UnmatchedReceipt(LookupError):
    pass


def find_delivery(s: Session, r: Receipt, adapter: str | None = None) -> Delivery | None:
    """The delivery a receipt is about; with ``adapter``, only one that adapter made (a
    legacy system speaks only for the copies handed to it, never for another system's)."""
    q = select(Delivery)
    if adapter is not None:
        q = q.where(Delivery.route_kind == "adapter", Delivery.target == adapter)
    if r.remote_ref:
        q = q.where(Delivery.remote_ref == r.remote_ref)
    elif r.message_id:
        q = q.where(Delivery.message_id == r.message_id, Delivery.unit == r.unit)
    else:
        return None
    d = s.scalars(q.with_for_update()).first()
    if d is not None and r.unit and d.unit != r.unit:
        return None  # a receipt from another unit than the one we sent to: never trust it
    return d


#: the longest values a receipt's fields may have (the columns that keep them)
_RECEIPT_LIMITS = {"signer": 100, "receipt_no": 100, "remote_ref": 64, "message_id": 128, "unit": 18}


def check_receipt(r: Receipt) -> None:
    """Refuse (UnmatchedReceipt) a receipt that no column could keep as it is: a value longer
    than its column, or a time that cannot be written in UTC (year 9999 at UTC-14)."""
    for name, most in _RECEIPT_LIMITS.items():
        value = getattr(r, name)
        if value is not None and len(value) > most:
            raise UnmatchedReceipt(f"the receipt's {name} is {len(value)} characters long; at most {most} are kept")
    if r.time is not None:
        try:
            r.time.astimezone(UTC)
        except (OverflowError, ValueError):
            raise UnmatchedReceipt(f"the receipt's time {r.time.isoformat()} is out of range") from None


#: the note of an item refused again (its first refusal's reason is in the audit log)
REFUSED_BEFORE = "this item was refused when it first came; the reason is in the audit log (inbound.reject)"


def apply_receipt(s: Session, r: Receipt, source: str) -> str:
    """Apply a receipt that adapter ``source`` collected."""
    check_receipt(r)
    d = find_delivery(s, r, adapter=source)
    if d is None:
        raise UnmatchedReceipt(f"no delivery through adapter {source} matches the receipt "
                               f"(ref {r.remote_ref or r.message_id}, unit {r.unit})")
    now = datetime.now(UTC)
    s.add(ReceiptRecord(delivery_id=d.id, action=r.action, signer=r.signer, receipt_no=r.receipt_no,
                        reason=r.reason, time=r.time, source=source, received_at=now))
    new, allowed = TRANSITIONS.get(r.action, (None, ()))
    outcome = "recorded"
    if new and d.status in allowed:
        prev = d.status
        d.status, d.updated_at = new, now
        if r.action == "ARRIVED" and d.delivered_at is None:
            d.delivered_at = r.time or now
        if r.action in ("SIGNED", "RETURNED"):
            d.signer, d.receipt_no = r.signer, r.receipt_no
            d.signed_at = r.time or now
        if r.action == "RETURNED":
            d.reason = r.reason
        if r.action == "REFUSED":
            d.last_error = f"refused by the legacy system: {r.reason or 'no reason given'}"[:2000]
        events.status_changed(s, d, prev)
        outcome = new
    audit.append(s, actor=f"adapter:{source}", action="receipt.accept", obj=f"delivery:{d.message_id}/{d.unit}",
                 outcome=outcome, detail={"action": r.action, "signer": r.signer, "receipt_no": r.receipt_no,
                                          "reason": r.reason})
    return outcome


def _again(seen: IngestedItem) -> str:
    """The outcome of an item stored before: refused again if it was refused, else a duplicate."""
    return "rejected" if seen.outcome == "rejected" else "duplicate"


def ingest(node: Node, adapter_name: str, item: PolledItem) -> str:
    """Apply one polled item exactly once; acknowledge it at the source afterwards."""
    if len(item.key) > 400:  # IngestedItem.key; a key this long is no legacy system's own
        reason = f"the item's key is {len(item.key)} characters long; at most 400 are kept"
        with node.db.begin() as s:
            audit.append(s, actor=f"adapter:{adapter_name}", action="inbound.reject", obj=item.key[:200],
                         outcome="rejected", detail={"reason": reason, "source": item.source})
        log.warning("%s: rejected %s…: %s", adapter_name, item.key[:80], reason)
        item.reject(reason)
        return "rejected"
    try:
        with node.db.begin() as s:
            seen = s.get(IngestedItem, item.key)
            if seen is not None:
                outcome = _again(seen)
                # still at its source (its acknowledgement did not happen): its key is kept as
                # long as that lasts, not just [worker] keep_ingested_days (gateway.prune)
                seen.at = datetime.now(UTC)
            else:
                if item.problem is not None:
                    raise UnmatchedReceipt(item.problem)
                if item.receipt is not None:
                    outcome = apply_receipt(s, item.receipt, adapter_name)
                elif item.envelope is not None:
                    acc = pipeline.accept(node, item.envelope, actor=f"adapter:{adapter_name}",
                                          source=f"adapter:{adapter_name}", session=s)
                    outcome = "accepted" if acc.created else "duplicate-message"
                else:
                    outcome = "empty"
                s.add(IngestedItem(key=item.key, adapter=adapter_name, outcome=outcome))
    except (UnmatchedReceipt, pipeline.Rejected) as exc:
        reason = str(exc)
        try:
            with node.db.begin() as s:
                if s.get(IngestedItem, item.key) is None:
                    s.add(IngestedItem(key=item.key, adapter=adapter_name, outcome="rejected"))
                    audit.append(s, actor=f"adapter:{adapter_name}", action="inbound.reject", obj=item.key,
                                 outcome="rejected", detail={"reason": reason, "source": item.source})
        except node.db.integrity_errors:
            # another instance polling the same source refused the item at the same moment and
            # recorded (and audited) it first: refused here all the same, the round goes on
            pass
        log.warning("%s: rejected %s: %s", adapter_name, item.key, reason)
        item.reject(reason)
        return "rejected"
    except node.db.integrity_errors:
        with node.db.sessions() as s:
            seen = s.get(IngestedItem, item.key)
            if seen is None:
                raise  # some other constraint: a bug, not a race
            # another instance polling the same source took the item at the same moment and
            # committed it first (its effect rolled back here): a duplicate, acknowledged as one
            outcome = _again(seen)
    if outcome == "rejected":
        # refused when first collected, and the process died before the item was moved to
        # failed/: it is refused again, never acknowledged as if it had been taken
        item.reject(REFUSED_BEFORE)
        return outcome
    item.ack()
    return outcome


def collect(node: Node, adapter_name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in node.adapter(adapter_name).poll():
        outcome = ingest(node, adapter_name, item)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def collect_all(node: Node) -> dict[str, dict[str, int]]:
    out = {}
    wrong: Exception | None = None
    for name in node.adapter_names():
        try:
            out[name] = collect(node, name)
        except (ConfigError, NodeConfigError) as exc:
            # a setting that is wrong is no system that cannot be reached: the run fails,
            # naming it, once the other adapters have been polled
            log.warning("polling %s failed: %s", name, exc)
            out[name] = {"error": 1}
            wrong = wrong or exc
        except Exception as exc:  # noqa: BLE001 - one unreachable system must not stop the others
            log.warning("polling %s failed: %s", name, exc)
            out[name] = {"error": 1}
    if wrong is not None:
        raise wrong
    return out


class Collector:
    """Polls every adapter on a fixed interval in a background thread."""

    def __init__(self, node: Node, interval: float | None = None) -> None:
        self.node = node
        self.interval = interval or node.config.worker.poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="collector", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                collect_all(self.node)
            except Exception as exc:  # noqa: BLE001 - a setting gone wrong: said every round, the loop goes on
                log.error("polling stopped short: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
