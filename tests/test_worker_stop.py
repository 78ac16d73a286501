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
