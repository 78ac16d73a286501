"""Engine and session factory.

SQLite runs in WAL mode with ``synchronous=FULL`` (accepted means committed, even on power
loss). Write units of work (:meth:`Database.begin`) start with ``BEGIN IMMEDIATE`` and are
serialised by a per-process lock, so writers queue in order instead of sleeping in SQLite's
busy handler; reads (:meth:`Database.sessions`) use a deferred ``BEGIN`` and never wait for
a writer (WAL readers see the last commit). PostgreSQL is used as it is.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_WRITE = "gateway_write"


def make_engine(url: str, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=pool_size)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


class Database:
    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size)
        self.postgres = is_postgres(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self.engine.execution_options(**{_WRITE: True}), expire_on_commit=False)
        self._write_lock: threading.Lock | None = None if self.postgres else threading.Lock()

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """One write unit of work: committed on success, rolled back on any exception."""
        if self._write_lock is None:
            with self._writes.begin() as session:
                yield session
            return
        with self._write_lock, self._writes.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
