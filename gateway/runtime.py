"""Background work of a node: the delivery worker and the receipt collector (poller)."""
from __future__ import annotations

import sys

from gateway.inbound import Collector
from gateway.node import Node
from gateway.worker import Worker


class Runtime:
    """``[worker] enabled = false`` runs the API alone (e.g. several API instances with the
    workers elsewhere)."""

    def __init__(self, node: Node, *, worker: bool | None = None, collector: bool | None = None) -> None:
        self.node = node
        enabled = node.config.worker.enabled
        self.worker = Worker(node) if (enabled if worker is None else worker) else None
        self.collector = Collector(node) if (enabled if collector is None else collector) else None

    def start(self) -> Runtime:
        # Delivery threads would otherwise keep the GIL for 5 ms slices while the dispatcher
        # and the outcome recorder wait; 1 ms keeps the queue moving (measured: +15-20 %).
        sys.setswitchinterval(0.001)
        if self.worker:
            self.worker.start()
        if self.collector:
            self.collector.start()
        return self

    def stop(self) -> None:
        if self.collector:
            self.collector.stop()
        if self.worker:
            self.worker.stop()
