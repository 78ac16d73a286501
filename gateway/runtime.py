"""Background work of a node: the delivery worker and the receipt collector (poller)."""
from __future__ import annotations

from gateway.inbound import Collector
from gateway.node import Node
from gateway.worker import Worker


class Runtime:
    def __init__(self, node: Node, *, worker: bool = True, collector: bool = True) -> None:
        self.node = node
        self.worker = Worker(node) if worker else None
        self.collector = Collector(node) if collector else None

    def start(self) -> Runtime:
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
