"""Per-process federation state of a node: the signing client and the pinned peer keys."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from gateway.federation import keys
from gateway.federation.client import PeerClient

if TYPE_CHECKING:
    from gateway.node import Node


class Federation:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.config
        self._keys = {name: keys.peer_key(cfg, name, p) for name, p in cfg.peers.items()}
        self._client: PeerClient | None = None
        self._lock = threading.Lock()
        self._last_purge = 0.0

    @property
    def client(self) -> PeerClient:
        with self._lock:
            if self._client is None:
                self._client = PeerClient(self.node.config)
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
