"""Group commit (gateway.db.Database.write): concurrent units share a commit, a failing unit
is undone alone, and each caller returns only after its unit is durable."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, insert, select

from gateway import migrate
from gateway.db import Database
from gateway.models import AdapterState


def test_concurrent_units_commit_and_a_failing_one_is_undone_alone(database_url):
    migrate.upgrade(database_url)
    db = Database(database_url)
    results: dict[int, object] = {}

    def unit(i: int):  # type: ignore[no-untyped-def]
        def fn(s):  # type: ignore[no-untyped-def]
            s.execute(insert(AdapterState.__table__).values(adapter="t", key=f"k{i}", value=str(i)))
            if i % 5 == 0:
                raise ValueError(f"unit {i} refuses")
            return i
        try:
            results[i] = db.write(fn)
        except ValueError as exc:
            results[i] = exc

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(k for k, v in results.items() if isinstance(v, ValueError)) == list(range(0, 40, 5))
    assert all(results[i] == i for i in range(40) if i % 5)
    # a fresh engine sees exactly the committed units
    other = Database(database_url)
    with other.sessions() as s:
        keys = set(s.scalars(select(AdapterState.key)))
        assert s.scalar(select(func.count()).select_from(AdapterState)) == 32
    assert keys == {f"k{i}" for i in range(40) if i % 5}
    other.dispose()
    db.dispose()


def test_a_unit_error_reaches_its_caller_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)

    def bad(s):  # type: ignore[no-untyped-def]
        raise KeyError("missing")

    with pytest.raises(KeyError):
        db.write(bad)
    assert db.write(lambda s: 42) == 42
    db.dispose()


def test_sqlite_group_is_fsynced_before_its_callers_return_and_other_connections_stay_full(tmp_path, monkeypatch):
    """The group's connection commits with synchronous=NORMAL and the group-commit thread
    fsyncs the WAL itself (outside the writer lock); a caller returns only after that fsync.
    Every other connection, and the pool, keeps synchronous=FULL (2)."""
    import os

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    wal = f"{tmp_path}/g.db-wal"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):  # type: ignore[no-untyped-def]
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def unit(i):  # type: ignore[no-untyped-def]
        def fn(s):  # type: ignore[no-untyped-def]
            s.execute(insert(AdapterState.__table__).values(adapter="t", key=f"k{i}", value="v"))
            return synced.count(wal)
        return fn

    for i in range(3):
        during = db.write(unit(i))
        # SQLite's own syncs do not pass through os.fsync: these are the group-commit thread's
        assert synced.count(wal) == during + 1 and synced[-1] == wal
    held = db._held  # the group-commit thread's connection is its own, not this thread's
    assert getattr(held, "conn", None) is None
    for _ in range(3):  # pooled connections: FULL
        with db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    db.dispose()
