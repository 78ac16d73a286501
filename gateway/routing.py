"""The route table (content-based router): recipient unit -> adapter or peer node."""
from __future__ import annotations

from dataclasses import dataclass

from gateway.config import RouteConfig


@dataclass(frozen=True)
class Route:
    kind: str  # "adapter" or "node"
    target: str


class NoRoute(LookupError):
    def __init__(self, unit: str) -> None:
        super().__init__(f"recipient unit {unit} has no route on this node")
        self.unit = unit


class RouteTable:
    """First matching row wins; rows are checked in configuration order."""

    def __init__(self, rows: list[RouteConfig]) -> None:
        self.rows = rows
        self._cache: dict[tuple[str, str, str], Route] = {}  # the table is fixed for the process

    def route_for(self, subsystem: str, type_: str, unit: str) -> Route:
        key = (subsystem, type_, unit)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._match(subsystem, type_, unit)
            if len(self._cache) > 100_000:
                self._cache.clear()
        return hit

    def _match(self, subsystem: str, type_: str, unit: str) -> Route:
        for r in self.rows:
            if r.subsystem not in ("*", subsystem) or r.type not in ("*", type_):
                continue
            if r.units and unit not in r.units:
                continue
            if r.adapter:
                return Route("adapter", r.adapter)
            assert r.node
            return Route("node", r.node)
        raise NoRoute(unit)
