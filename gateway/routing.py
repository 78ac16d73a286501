"""The route table (content-based router): recipient unit -> adapter or peer node.

Order of lookup for a unit: the ``[[routes]]`` rows in configuration order (first match
wins), then the units each ``[peers.X]`` declares, then the signed federation directory
(the units each node serves). A unit at another node is reached through the *next hop*:
the node itself when this node has a link to it, otherwise the parent node (a county's
prefecture), which relays.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import Config, RouteConfig


@dataclass(frozen=True)
class Route:
    kind: str  # "adapter" or "node"
    target: str  # adapter name, or the next-hop node id
    node: str | None = None  # for node routes: the node that serves the unit


class NoRoute(LookupError):
    def __init__(self, unit: str, why: str = "") -> None:
        super().__init__(f"recipient unit {unit} has no route on this node{': ' + why if why else ''}")
        self.unit = unit


class RouteTable:
    """First matching row wins; rows are checked in configuration order."""

    def __init__(self, rows: list[RouteConfig], config: Config | None = None,
                 directory: Callable[[str], str | None] | None = None) -> None:
        self.rows = rows
        self.self_id = config.node.id if config else "local"
        self.peers = config.peers if config else {}
        self.parent = config.federation.parent if config else None
        self.directory = directory
        self._peer_units = {u: name for name, p in self.peers.items() for u in p.units}
        self._cache: dict[tuple[str, str, str], Route] = {}

    def invalidate(self) -> None:
        """Forget cached routes (a new directory arrived)."""
        self._cache = {}

    def route_for(self, subsystem: str, type_: str, unit: str, avoid: tuple[str, ...] = ()) -> Route:
        key = (subsystem, type_, unit)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._match(subsystem, type_, unit)
            if len(self._cache) > 100_000:
                self._cache = {}
            self._cache[key] = hit
        if hit.kind == "node" and hit.target in avoid:
            raise NoRoute(unit, f"its next hop {hit.target} has already carried this message (a routing loop)")
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
            return self._via(unit, r.node)
        node = self._peer_units.get(unit) or (self.directory(unit) if self.directory else None)
        if node is not None and node != self.self_id:
            return self._via(unit, node)
        raise NoRoute(unit, "no route, peer or federation directory names it; check the unit code, or ask this "
                            "node's operator to route it")

    def _via(self, unit: str, node: str) -> Route:
        if node == self.self_id:
            raise NoRoute(unit, "a route names this node itself")
        if node in self.peers:
            return Route("node", node, node)
        if self.parent:
            return Route("node", self.parent, node)
        raise NoRoute(unit, f"it is served by node {node}, which is not a peer of this node, and no "
                            f"[federation] parent is configured to relay")
