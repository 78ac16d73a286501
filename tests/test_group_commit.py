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
