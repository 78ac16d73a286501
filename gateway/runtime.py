"""Background work of a node: the delivery worker, the receipt collector (poller) and the
scheduler of ``[schedules]`` jobs."""
from __future__ import annotations

import sys

from gateway.inbound import Collector
from gateway.node import Node
from gateway.scheduler import Scheduler, enabled_schedules
from gateway.worker import Worker


class Runtime:
    """``[worker] enabled = false`` runs the API alone (e.g. several API instances with the
    workers elsewhere). The scheduler runs where the worker runs, and only if some schedule
    is enabled; several instances may run it against one database (each tick runs once)."""

    def __init__(self, node: Node, *, worker: bool | None = None, collector: bool | None = None,
                 scheduler: bool | None = None) -> None:
        self.node = node
        enabled = node.config.worker.enabled
        # first: a bad [schedules] entry is a ConfigError before anything else is built
        want_scheduler = enabled if scheduler is None else scheduler
        self.scheduler = Scheduler(node) if want_scheduler and enabled_schedules(node.config) else None
        self.worker = Worker(node) if (enabled if worker is None else worker) else None
        # a [schedules.receipts] entry replaces the fixed-interval collector
        scheduled = self.scheduler is not None and "receipts" in enabled_schedules(node.config)
        want_collector = (enabled and not scheduled) if collector is None else collector
        self.collector = Collector(node) if want_collector else None

    def start(self) -> Runtime:
        # Delivery threads would otherwise keep the GIL for 5 ms slices while the dispatcher
        # and the outcome recorder wait; 1 ms keeps the queue moving (measured: +15-20 %).
        sys.setswitchinterval(0.001)
        if self.worker:
            self.worker.start()
        if self.collector:
            self.collector.start()
        if self.scheduler:
            self.scheduler.start()
        return self

    def stop(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
        if self.collector:
            self.collector.stop()
        if self.worker:
            self.worker.stop()
