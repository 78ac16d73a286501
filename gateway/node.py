"""One gateway node's runtime: configuration, database, blob store, adapters, routes.

Built once per process by the app factory or the command line; no import-time side effects.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


import adapters
from adapters.base import Adapter, AdapterContext
from gateway import room
from gateway.blobs import BlobStore
from gateway.config import Config
from gateway.db import Database
from gateway.models import AdapterState
from gateway.routing import RouteTable

if TYPE_CHECKING:
    from gateway.federation.state import Federation

log = logging.getLogger("gateway.node")


class DbStateStore:
    """Durable per-adapter key/value state (poll cursors), one row per key."""

    def __init__(self, db: Database, adapter: str) -> None:
        self.db, self.adapter = db, adapter

    def get(self, key: str, default: str | None = None) -> str | None:
        with self.db.sessions() as s:
            row = s.get(AdapterState, (self.adapter, key))
            return row.value if row else default

    def set(self, key: str, value: str) -> None:
        self._write(key, lambda _old: value)

    def advance(self, key: str, value: int) -> None:
        def higher(old: str | None) -> str | None:
            try:
                return str(value) if old is None or value > int(old) else None
            except ValueError:  # not a number: what the adapter reading it will say
                return str(value)
        self._write(key, higher)

    def _write(self, key: str, new: Callable[[str | None], str | None]) -> None:
        """Write ``new(stored value)`` (None: leave it) with the row locked. Two instances
        writing a key's first value at once: the second finds the first's row and goes again."""
        for last in (False, True):
            try:
                with self.db.begin() as s:
                    row = s.get(AdapterState, (self.adapter, key), with_for_update=True)
                    value = new(row.value if row else None)
                    if value is not None and row:
                        row.value = value
                    elif value is not None:
                        s.add(AdapterState(adapter=self.adapter, key=key, value=value))
                return
            except self.db.integrity_errors:
                if last:
                    raise


#: where the configuration each kind of process recorded last is kept (see
#: :meth:`Node.record_config`); no adapter has a name with ":" (config.ADAPTER_NAME)
_CONFIG_STATE = "node:"


def os_user() -> str:
    """The operating-system account running this process (under sudo, who ran sudo)."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


def changed_settings(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings trees (lists compare whole)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for k in sorted(set(before) | set(after)):
            out += changed_settings(before.get(k), after.get(k), f"{prefix}{k}.")
        return out
    return [] if before == after else [prefix[:-1]]


class Node:
    def __init__(self, config: Config, db: Database | None = None) -> None:
        self.config = config
        self.db = db or Database(config.database_url(), config.database.pool_size)
        self.data_dir = config.data_dir
        # made private to the service's user: the database, the blobs (classified documents'
        # titles and contents) and the node key live below it
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs = BlobStore(self.data_dir / "blobs")
        #: when a write last met a full database, and the folders whose free space /readyz watches
        self.full_database = room.FullDatabase(self.data_dir)
        self.storage_folders = room.folders(self.data_dir, self.db.url)
        from gateway import payloads

        payloads.warm()  # before any request or delivery thread can race to build them
        from gateway.federation.directory import DirectoryCache

        #: the newest stored federation directory (re-read from the database every few seconds)
        self.directory: DirectoryCache = DirectoryCache(self.db, config, on_change=lambda: self._routes.invalidate())
        self._routes = RouteTable(config.routes, config, directory=self.directory_node)
        self._adapters: dict[str, Adapter] = {}
        self._attachments: dict[str, str] = {}
        self._lock = threading.Lock()
        self._federation: Federation | None = None

    @functools.cached_property
    def metrics_token(self) -> str | None:
        """What /metrics asks callers for (``[api] metrics_token_env``/``_file``), or None."""
        return self.config.metrics_token()

    @property
    def id(self) -> str:
        return self.config.node.id

    @property
    def routes(self) -> RouteTable:
        """The route table. Its cached routes are dropped when a newer directory has been stored
        by any process (looked up at most every few seconds)."""
        self.directory.check()
        return self._routes

    def directory_node(self, unit: str) -> str | None:
        """The node that serves ``unit`` according to the newest stored directory."""
        return self.directory.node_for(unit)

    def known_nodes(self) -> frozenset[str]:
        """Every node id this node knows: its own, its peers' and the directory's (see
        envelope.id_owner: an id ending in one of them is that node's)."""
        return self.directory.nodes() | {self.id, *self.config.peers}

    def adapter(self, name: str) -> Adapter:
        with self._lock:
            a = self._adapters.get(name)
            if a is None:
                if name not in self.config.adapters:
                    raise KeyError(f"no adapter named {name!r} is configured")
                ctx = AdapterContext(blobs=self.blobs, state=DbStateStore(self.db, name),
                                     base_dir=Path(self.config.base_dir), timezone=self.config.node.timezone)
                a = adapters.create(name, self.config.adapters[name], ctx)
                self._adapters[name] = a
            return a

    @property
    def federation(self) -> Federation:
        """Signing client and pinned peer keys (built on first use)."""
        with self._lock:
            if self._federation is None:
                from gateway.federation.state import Federation

                self._federation = Federation(self)
            return self._federation

    def check_adapters(self) -> None:
        """Build every configured adapter now, so that a wrong setting (a misspelt key, a key
        file that is not there, an unset password variable, a local WSDL without the
        configured operation) stops the start with a message naming the file and the key,
        instead of failing each delivery later. Nothing is contacted: each adapter reads its
        settings and local files only."""
        from gateway.config import ConfigError

        _ = self.metrics_token  # readable, if one is configured (read once: rotating it needs a reload)
        from gateway.federation.keys import check_own_key

        check_own_key(self.config)  # it signs webhooks and node requests: a damaged one stops the start
        for name in self.adapter_names():
            try:
                a = self.adapter(name)
                raw = self.config.adapters[name]
                try:
                    a.context.secret(raw, "callback_token")  # readable, if one is configured
                except adapters.base.ConfigError as exc:
                    raise ConfigError(f"adapters.{name}.{exc}") from None
                policy = raw.get("attachments")
                if policy is not None and policy not in adapters.base.ATTACHMENT_POLICIES:
                    raise ConfigError(f"adapters.{name}.attachments: {policy!r}; expected \"refuse\" (a document "
                                      f"with 附件 to a unit behind it is refused) or \"omit\" (sent with its body "
                                      f"only)")
                if policy is not None and a.takes_attachments:
                    raise ConfigError(f"adapters.{name}.attachments: adapter type {a.type_name} carries "
                                      f"attachments; the setting is for protocols that do not (soap)")
                allow = raw.get("callback_allow", [])
                if not isinstance(allow, list) or not all(isinstance(x, str) for x in allow):
                    raise ConfigError(f"adapters.{name}.callback_allow: expected a list of addresses, "
                                      f"e.g. [\"127.0.0.1\", \"10.1.2.3\"]")
            except (adapters.base.ConfigError, ConfigError) as exc:
                msg = str(exc)
                raise ConfigError(f"{self.config.source}: {msg if msg.startswith('adapters.') else f'adapters.{name}: {msg}'}") from None
            except Exception as exc:  # noqa: BLE001 - e.g. a local WSDL that is not valid XML
                raise ConfigError(f"{self.config.source}: adapters.{name}: cannot be set up: "
                                  f"{type(exc).__name__}: {exc}") from None
        for i, r in enumerate(self.config.routes):
            if r.adapter and r.subsystem != "*":
                a = self.adapter(r.adapter)
                if a.subsystems is not None and r.subsystem not in a.subsystems:
                    raise ConfigError(f"{self.config.source}: routes[{i}].subsystem: {r.subsystem!r} messages "
                                      f"cannot go to adapter {r.adapter!r} (type {a.type_name} carries "
                                      f"{', '.join(sorted(a.subsystems))} only)")

    def adapter_names(self) -> list[str]:
        return sorted(self.config.adapters)

    def record_config(self, process: str) -> None:
        """Audit the configuration this process starts with (``config.change``) when it differs
        from the one the same kind of process (``api``, ``serve``, ``worker``) recorded last: its SHA-256, the previous one, the settings that changed
        (dotted keys) and the file. The settings themselves (never a secret: the file may only
        name where secrets are) are kept in ``adapter_state`` for the next comparison. Several
        processes starting with one configuration record it once. The node key is recorded
        too (``node.key``, see :func:`gateway.federation.keys.record_own_key`)."""
        from gateway.federation.keys import record_own_key

        self._record_settings(process)
        record_own_key(self.db, self.config, f"{process}:{os_user()}")

    def _record_settings(self, process: str) -> None:
        from gateway import audit

        settings = self.config.model_dump(mode="json", exclude={"source", "base_dir", "simulators"})
        text = audit.canonical(settings)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        for last in (False, True):
            try:
                with self.db.begin() as s:
                    # one row per kind of process: an API and a `gateway worker` given files of
                    # their own would otherwise record a change at every restart of either
                    state_key = (_CONFIG_STATE, f"config:{process}")
                    row = s.get(AdapterState, state_key, with_for_update=True)
                    before = json.loads(row.value) if row else None
                    if before is not None and before.get("sha256") == digest:
                        return
                    detail: dict[str, object] = {"process": process, "sha256": digest, "file": self.config.source}
                    if before is not None:
                        changed = changed_settings(before.get("settings") or {}, settings)
                        detail.update(previous_sha256=before.get("sha256"), changed=changed[:100],
                                      changed_count=len(changed))
                    audit.append(s, actor=f"{process}:{os_user()}", action="config.change",
                                 obj=f"node:{self.id}", outcome="first" if before is None else "changed",
                                 detail=detail)
                    value = json.dumps({"sha256": digest, "settings": settings}, ensure_ascii=False)
                    if row is None:
                        s.add(AdapterState(adapter=state_key[0], key=state_key[1], value=value))
                    else:
                        row.value = value
                return
            except self.db.integrity_errors:  # another process recorded it first: compare again
                if last:
                    raise

    def attachments_policy(self, name: str) -> str:
        """What becomes of a document's attachments at adapter ``name`` (see
        adapters.base.attachments_policy), from the configuration alone; remembered."""
        policy = self._attachments.get(name)
        if policy is None:
            raw = self.config.adapters[name]
            policy = self._attachments[name] = adapters.base.attachments_policy(str(raw.get("type")), raw)
        return policy

    def close(self) -> None:
        with self._lock:
            for a in self._adapters.values():
                try:
                    a.close()
                except Exception:  # closing one adapter must not stop the others closing
                    log.warning("closing adapter %s failed", a.name, exc_info=True)
            self._adapters.clear()
            if self._federation is not None:
                self._federation.close()
        self.db.dispose()

