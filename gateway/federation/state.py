"""Per-process federation state of a node: the signing client and the pinned peer keys."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.federation import keys
from gateway.federation.client import PeerClient

if TYPE_CHECKING:
    from gateway.node import Node

log = logging.getLogger("gateway.federation")


@dataclass
class _Window:
    start: float
    audited: int = 0
    suppressed: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    flushing: bool = False


class RejectAudit:
    """How refused node-to-node requests reach the audit log: each one, up to ``PER_MINUTE``
    a minute from one address; past that, that minute's further refusals are only counted, and
    the count goes into one entry (outcome ``suppressed``) when the minute is over. Every
    refusal writes to the hash chain, which every accept also waits on: without a bound, anyone
    who can reach the port could slow the node down with unsigned requests."""

    PER_MINUTE = 20
    WINDOW = 60.0
    #: addresses tracked at once; beyond, new ones share one window (a flood from many)
    MAX_ADDRESSES = 4096

    def __init__(self, write: Callable[[str, dict[str, Any]], None], clock: Callable[[], float] = time.monotonic,
                 timer: Callable[[float, Callable[[], None]], Any] | None = None,
                 what: str = "node requests") -> None:
        self._write = write  # (remote address, summary detail) -> one audit entry
        self.what = what  # for the log line
        self._clock = clock
        self._timer = timer or _daemon_timer
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def admit(self, addr: str, kind: str) -> bool:
        """True: audit this refusal now. False: it is counted for the minute's summary."""
        now = self._clock()
        with self._lock:
            key = addr if addr in self._windows or len(self._windows) < self.MAX_ADDRESSES else "*"
            w = self._windows.get(key)
            if w is None or now - w.start >= self.WINDOW:
                if w is not None and w.suppressed and not w.flushing:
                    self._flush_locked(key, w)
                w = self._windows[key] = _Window(now)
            if w.audited < self.PER_MINUTE:
                w.audited += 1
                return True
            w.suppressed += 1
            w.kinds[kind] += 1
            if w.suppressed == 1:
                log.warning("more than %d refused %s from %s within a minute: the rest of the "
                            "minute is counted, not audited one by one", self.PER_MINUTE, self.what, key)
                w.flushing = True
                self._timer(max(0.0, w.start + self.WINDOW - now), lambda: self._flush(key, w))
            return False

    def _flush(self, key: str, w: _Window) -> None:
        with self._lock:
            if self._windows.get(key) is w:
                del self._windows[key]
            self._flush_locked(key, w)

    def _flush_locked(self, key: str, w: _Window) -> None:
        if not w.suppressed:
            return
        count, kinds = w.suppressed, dict(w.kinds)
        w.suppressed = 0
        w.kinds.clear()
        try:
            self._write(key, {"count": count, "kinds": kinds, "window_seconds": self.WINDOW,
                              "remote_addr": key if key != "*" else "(many addresses)"})
        except Exception:  # noqa: BLE001 - the log still has it
            log.exception("could not audit %d suppressed refusals from %s", count, key)


def _daemon_timer(delay: float, fn: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


class Federation:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config
        self._keys = {name: keys.peer_key(cfg, name, p) for name, p in cfg.peers.items()}
        self._client: PeerClient | None = None
        self._lock = threading.Lock()
        self._last_purge = 0.0
        self.rejects = RejectAudit(self._audit_suppressed)
        self._own: keys.NodeKey | None = None

    @property
    def own_key(self) -> keys.NodeKey:
        """This node's key (loaded once), which signs its answers to peers."""
        if self._own is None:
            self._own = keys.own_key(self.node.config)
        return self._own

    def _audit_suppressed(self, addr: str, detail: dict[str, Any]) -> None:
        from gateway import audit

        with self.node.db.begin() as s:
            audit.append(s, actor="node:unknown", action="federation.reject", obj="/federation/v1/",
                         outcome="suppressed", detail=detail)

    @property
    def client(self) -> PeerClient:
        with self._lock:
            if self._client is None:
                self._client = PeerClient(self.node.config, self.peer_key)
            return self._client

    def peer_key(self, key_id: str) -> keys.PeerKey | None:
        """The pinned public key (Ed25519 or SM2) of the peer ``key_id``, or None."""
        return self._keys.get(key_id)

    def maybe_purge_nonces(self) -> None:
        if time.monotonic() - self._last_purge < 60:
            return
        self._last_purge = time.monotonic()
        from gateway.federation.api import purge_nonces

        purge_nonces(self.node)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
