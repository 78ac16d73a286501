"""Stopping the delivery worker (``gateway worker`` on SIGTERM, ``gateway serve`` at exit):
what its threads finished is recorded before it ends."""
from __future__ import annotations

import threading
import time

from sqlalchemy import select

from gateway.models import Delivery, OutboxEntry
from gateway.worker import Worker
from tests.plugins.gatewaynode import Api


def test_a_delivery_running_when_the_worker_stops_is_recorded(gw_node):  # type: ignore[no-untyped-def]
    """The adapter call outlasts the recorder's idle wait (0.2 s): the outcome still goes in,
    instead of the row staying claimed until its lease runs out and being delivered again."""
    api = Api(gw_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    started = threading.Event()

    def slow(_delivery: object) -> None:
        started.set()
        time.sleep(0.5)

    gw_node.adapter("rec").hook = slow  # type: ignore[attr-defined]
    w = Worker(gw_node)
    w.start()
    assert started.wait(10)
    w.stop()
    with gw_node.db.sessions() as s:
        assert s.scalar(select(OutboxEntry.state)) == "done"
        assert s.scalar(select(Delivery.status).where(Delivery.message_id == mid)) == "delivered"


def test_a_stopping_worker_waits_for_its_stuck_deliveries_all_together_not_one_after_the_other(gw_node):  # type: ignore[no-untyped-def]
    """Four threads stuck on a legacy system that does not answer: ``stop(timeout)`` waits
    ``timeout`` for them all, not ``timeout`` for each in turn (a service manager kills a
    ``gateway worker`` that outstays its stop timeout). The stuck rows stay claimed: their
    lease returns them, since each delivery may still take effect."""
    api = Api(gw_node)
    for i in range(4):
        assert api.post("/api/v1/documents", json=api.document(title=f"卡住-{i}")).status_code == 202
    running = threading.Semaphore(0)
    answer = threading.Event()  # the legacy system answers only once this is set

    def stuck(_delivery: object) -> None:
        running.release()
        answer.wait(30)

    gw_node.adapter("rec").hook = stuck  # type: ignore[attr-defined]
    w = Worker(gw_node, threads=4)
    w.start()
    for _ in range(4):
        assert running.acquire(timeout=10)
    # the system answers 4 s from now: a stop that waited 1 s for each thread in turn would
    # still be waiting then (it waits past 4 s), one that waits 1 s for them all is long gone
    answers = threading.Timer(4.0, answer.set)
    answers.start()
    try:
        w.stop(timeout=1.0)
        assert not answer.is_set(), "stop() waited for each stuck delivery in turn"
    finally:
        answer.set()
        answers.cancel()
    with gw_node.db.sessions() as s:
        assert sorted(s.scalars(select(OutboxEntry.state))) == ["claimed"] * 4
