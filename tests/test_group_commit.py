"""Group commit (gateway.db.Database.write): concurrent units share a commit, a failing unit
is undone alone, and each caller returns only after its unit is durable."""
from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import func, insert, select

from gateway import audit, migrate, pgbatch
from gateway.db import Database, driver_mark, group_cursor
from gateway.models import AdapterState, AuditEntry
from tests.plugins.groupcommit import in_one_group


def _outcome(db: Database, fn) -> object:  # type: ignore[no-untyped-def]
    """What ``db.write(fn)`` gave its caller: the unit's result, or the ValueError it raised."""
    try:
        return db.write(fn)
    except ValueError as exc:
        return exc


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
        results[i] = _outcome(db, fn)

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
    """The group's connection commits with synchronous=NORMAL and the group's leader
    fdatasyncs the WAL itself (outside the writer lock); a caller returns only after that.
    A WAL file new since the last sync has its folder synced too, once. Every other
    connection, and the pool, keeps synchronous=FULL (2)."""
    import os

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    wal = f"{tmp_path}/g.db-wal"
    synced: list[str] = []
    datasynced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def recorder(real, *into):  # type: ignore[no-untyped-def]
        def sync(fd):  # type: ignore[no-untyped-def]
            for x in into:
                x.append(os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        return sync

    monkeypatch.setattr(os, "fsync", recorder(real_fsync, synced))
    monkeypatch.setattr(os, "fdatasync", recorder(real_fdatasync, synced, datasynced))

    def unit(i):  # type: ignore[no-untyped-def]
        def fn(s):  # type: ignore[no-untyped-def]
            s.execute(insert(AdapterState.__table__).values(adapter="t", key=f"k{i}", value="v"))
            return synced.count(wal)
        return fn

    for i in range(3):
        during = db.write(unit(i))
        # SQLite's own syncs do not pass through os: these are the leader's
        assert synced.count(wal) == during + 1
    assert datasynced == [wal] * 3  # data and size, not the modification time
    assert synced.count(str(tmp_path)) == 1  # the new WAL's folder entry, on the first sync only
    # the group's own connection commits NORMAL (its WAL sync is the leader's); no other does
    assert db._gconn is not None
    assert db._gconn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0] == 1
    for _ in range(3):  # pooled connections: FULL
        with db.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    db.dispose()  # the last connection closes: SQLite removes the WAL file
    assert not os.path.exists(wal)
    db = Database(url)
    db.write(unit(3))  # ... so the next write makes a new one, whose folder entry is synced again
    assert synced.count(str(tmp_path)) == 2 and synced[-1] == str(tmp_path)
    db.dispose()


def test_no_caller_is_left_waiting_when_the_lead_passes_between_threads(tmp_path):
    """Leader/follower: callers arriving at every moment of a group (while it runs, as the
    lead is released or passed on) all return, each with its own unit committed once."""
    import random

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    done: list[int] = []
    lock = threading.Lock()

    def caller(t: int) -> None:
        rnd = random.Random(t)
        for i in range(60):
            k = t * 1000 + i

            def fn(s, k=k):  # type: ignore[no-untyped-def]
                s.execute(insert(AdapterState.__table__).values(adapter="t", key=f"k{k}", value="v"))
                return k

            assert db.write(fn) == k
            with lock:
                done.append(k)
            if rnd.random() < 0.3:
                threading.Event().wait(rnd.random() / 1000)

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a caller never returned"
    assert len(done) == 12 * 60
    with db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(AdapterState)) == 12 * 60
    db.dispose()


def test_a_forked_child_starts_with_its_own_group_state(tmp_path):
    """A child forked while a parent thread leads a group (the leader lock held, the
    parent's connection open) writes with fresh state instead of waiting on that lock."""
    import os
    import signal

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    db.write(lambda s: s.execute(insert(AdapterState.__table__).values(adapter="t", key="parent", value="v")))
    assert db._leader.acquire(blocking=False)  # as if a parent thread were leading a group
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        signal.alarm(20)  # a child stuck on the parent's lock dies instead of hanging the test
        try:
            db.write(lambda s: s.execute(insert(AdapterState.__table__).values(adapter="t", key="child", value="v")))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    db._leader.release()
    assert os.waitstatus_to_exitcode(status) == 0
    with db.sessions() as s:
        assert set(s.scalars(select(AdapterState.key))) == {"parent", "child"}
    db.dispose()


def test_the_wal_starts_over_under_steady_writes(tmp_path):
    """A PASSIVE checkpoint never catches up with writers that keep committing, and SQLite
    starts the WAL over only when a commit finds it all copied: without the RESTART step
    the WAL grew by every frame written (1.5 GB in 40 s of accepts)."""
    import time

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    db.WAL_RESTART_FRAMES = 200
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            n = written[0]
            db.write(lambda s, n=n: s.execute(insert(AdapterState.__table__).values(
                adapter="t", key=f"k{n}", value="x" * 3000)))
            written[0] += 1

    th = threading.Thread(target=writer)
    th.start()
    try:
        frames = []
        deadline = time.monotonic() + 120  # a generous bound for a slow disk; about 3 s here
        while written[0] < 1500 and time.monotonic() < deadline:
            frames.append(db.checkpoint()[0])
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(30)
    # each row fills about a page: the writer wrote far more frames than the WAL now holds
    assert written[0] >= 1500, f"only {written[0]} writes in 120 s"
    assert max(frames[len(frames) // 2:]) < written[0] // 2, (written[0], frames)
    db.dispose()


def test_a_unit_alone_in_its_group_that_fails_leaves_nothing(database_url):
    """A group of one runs without a savepoint: its failure rolls the transaction back."""
    migrate.upgrade(database_url)
    db = Database(database_url)

    def bad(s):  # type: ignore[no-untyped-def]
        s.execute(insert(AdapterState.__table__).values(adapter="t", key="alone", value="v"))
        raise ValueError("refused after writing")

    with pytest.raises(ValueError):
        db.write(bad)
    db.write(lambda s: s.execute(insert(AdapterState.__table__).values(adapter="t", key="next", value="v")))
    with db.sessions() as s:
        assert set(s.scalars(select(AdapterState.key))) == {"next"}
    db.dispose()


def test_the_wal_restart_waits_for_a_long_reader_only_briefly(tmp_path):
    """Writers wait while the RESTART checkpoint runs, so a reader still on an old snapshot
    (a long report) is waited for a tenth of a second, not the 30 s busy timeout; the
    checkpoint then ends like a PASSIVE one and the writers go on."""
    import sqlite3
    import time

    url = f"sqlite:///{tmp_path}/g.db"
    migrate.upgrade(url)
    db = Database(url)
    db.WAL_RESTART_FRAMES = 10
    for i in range(40):
        db.write(lambda s, i=i: s.execute(insert(AdapterState.__table__).values(
            adapter="t", key=f"k{i}", value="x" * 3000)))
    reader = sqlite3.connect(f"{tmp_path}/g.db", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM adapter_state").fetchone()[0] == 40  # a snapshot
    try:
        db.write(lambda s: s.execute(insert(AdapterState.__table__).values(adapter="t", key="late", value="v")))
        t0 = time.monotonic()
        db.checkpoint()
        waited = time.monotonic() - t0
        t0 = time.monotonic()
        db.write(lambda s: s.execute(insert(AdapterState.__table__).values(adapter="t", key="after", value="v")))
        assert waited < 5 and time.monotonic() - t0 < 5, waited
    finally:
        reader.execute("COMMIT")
        reader.close()
    db.dispose()


def test_a_group_sets_savepoints_only_once_one_of_its_units_has_failed(database_url, monkeypatch):
    """Units of one group run without savepoints; when one fails, the group is rolled back and
    run again with a savepoint per unit: the others are committed once, the failing one not."""
    migrate.upgrade(database_url)
    db = Database(database_url)
    runs: list[str] = []
    with_savepoint: list[int] = []
    real_run = Database._run
    monkeypatch.setattr(Database, "_run", staticmethod(
        lambda conn, cur, job: (with_savepoint.append(1), real_run(conn, cur, job))[1]))

    def group(keys: list[str], failing: str | None) -> dict[str, object]:
        """The first unit holds the lead until the others are queued: they form one group."""
        queued = threading.Event()
        results: dict[str, object] = {}

        def unit(key: str):  # type: ignore[no-untyped-def]
            def fn(s):  # type: ignore[no-untyped-def]
                runs.append(key)
                if key == keys[0]:
                    assert queued.wait(10)
                s.execute(insert(AdapterState.__table__).values(adapter="g", key=key, value="v"))
                if key == failing:
                    raise ValueError(f"{key} refuses")
                return key
            results[key] = _outcome(db, fn)

        first = threading.Thread(target=unit, args=(keys[0],))
        first.start()
        while keys[0] not in runs:
            time.sleep(0.01)
        others = [threading.Thread(target=unit, args=(k,)) for k in keys[1:]]
        for t in others:
            t.start()
        while len(db._jobs) < len(others):
            time.sleep(0.01)
        queued.set()
        for t in [first, *others]:
            t.join(30)
        return results

    res = group(["a0", "a1", "a2", "a3", "a4"], failing=None)
    assert res == {k: k for k in ("a0", "a1", "a2", "a3", "a4")}
    assert with_savepoint == [] and sorted(runs) == ["a0", "a1", "a2", "a3", "a4"]  # each ran once

    runs.clear()
    res = group(["b0", "b1", "b2", "b3", "b4"], failing="b2")
    assert isinstance(res.pop("b2"), ValueError) and res == {k: k for k in ("b0", "b1", "b3", "b4")}
    assert len(with_savepoint) == 4  # the group of four after the failure ran again unit by unit
    with db.sessions() as s:
        assert sorted(s.scalars(select(AdapterState.key).where(AdapterState.adapter == "g"))) == [
            "a0", "a1", "a2", "a3", "a4", "b0", "b1", "b3", "b4"]
    db.dispose()


def test_two_nodes_processes_appending_in_groups_keep_one_audit_chain(database_url):
    """Two Database objects on one database (two gunicorn workers) append audit entries in
    groups from many threads, some units failing after their entry. A group takes the
    chain's lock once for all its units (PostgreSQL); a failing unit's savepoint gives back a
    lock it took, and the next unit takes it again: the chain never forks and holds exactly
    the entries of the units that succeeded."""
    migrate.upgrade(database_url)
    dbs = [Database(database_url), Database(database_url)]
    done: list[str] = []

    def unit(db: Database, name: str, fail: bool):  # type: ignore[no-untyped-def]
        def fn(conn):  # type: ignore[no-untyped-def]
            cur = group_cursor(conn)
            try:
                audit.append_driver(cur, db.postgres, [audit.Record("test", "group.append", name)], conn)
            finally:
                cur.close()
            if fail:
                raise ValueError(f"{name} refuses")
            return name
        return fn

    def writer(d: int, t: int) -> None:
        for i in range(12):
            name = f"db{d}-t{t}-{i}"
            try:
                # the first "process" sends its groups in one message (PostgreSQL), the
                # other one through psycopg's pipeline
                done.append(dbs[d].write(unit(dbs[d], name, fail=i % 5 == 2), pipelined=True, write_only=d == 0))
            except ValueError:
                pass

    threads = [threading.Thread(target=writer, args=(d, t)) for d in range(2) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(done) == 2 * 6 * 10  # 12 units per thread, 2 of them refused
    with dbs[0].sessions() as s:
        result = audit.verify(s)
        objects = set(s.scalars(select(AuditEntry.object).where(AuditEntry.action == "group.append")))
    assert result.ok, result.problem
    assert objects == set(done)
    for db in dbs:
        db.dispose()


def _put(key: str, value: object = "v", comment: str = ""):  # type: ignore[no-untyped-def]
    """A write_only unit: one adapter_state row, on the cursor the group gives it (a
    ``comment`` makes it another statement)."""
    def fn(conn):  # type: ignore[no-untyped-def]
        m = driver_mark(conn.dialect.name == "postgresql")
        cur = group_cursor(conn)
        try:
            cur.execute(f"INSERT INTO adapter_state (adapter, key, value) VALUES ({m}, {m}, {m}){comment}",
                        ("w", key, value))
        finally:
            cur.close()
        return key
    return fn


def _one_group(db: Database, fns: list) -> list:  # type: ignore[type-arg]
    """Each ``db.write(fn, write_only=True)`` from a thread of its own, all in one group."""
    return in_one_group(db, [lambda fn=fn: db.write(fn, pipelined=True, write_only=True) for fn in fns])


@pytest.fixture
def sends(monkeypatch):  # type: ignore[no-untyped-def]
    """Every transaction sent in one message (gateway.pgbatch): (statements, outcome)."""
    got: list[tuple[int, str]] = []
    real = pgbatch.send_transaction

    def spy(pg, statements, prepared, encoding="utf-8"):  # type: ignore[no-untyped-def]
        try:
            real(pg, statements, prepared, encoding)
        except Exception as exc:
            got.append((len(statements), type(exc).__name__))
            raise
        got.append((len(statements), "committed"))

    monkeypatch.setattr(pgbatch, "send_transaction", spy)
    return got


def _keys(db: Database) -> list[str]:
    with db.sessions() as s:
        return sorted(s.scalars(select(AdapterState.key).where(AdapterState.adapter == "w")))


def test_a_group_sent_in_one_message_is_undone_alone_when_one_unit_fails(database_url, sends):
    """Units that only write form a group whose transaction PostgreSQL gets in one message.
    When one unit fails there (a duplicate key), the group runs again unit by unit: the
    failing caller gets the driver's IntegrityError, the others are committed once, and the
    next group goes in one message again (its statements are prepared anew where need be)."""
    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        assert _one_group(db, [_put(f"c{i}") for i in range(4)]) == ["c0", "c1", "c2", "c3"]
        # the last unit's statement is new: PostgreSQL skips its PREPARE after the failure
        out = _one_group(db, [_put("d0"), _put("d1"), _put("c1"), _put("d3", comment=" /* d */")])
        assert [out[0], out[1], out[3]] == ["d0", "d1", "d3"]
        assert isinstance(out[2], db.integrity_errors), out[2]
        assert _one_group(db, [_put("e0"), _put("e1", comment=" /* d */")]) == ["e0", "e1"]
        assert _keys(db) == ["c0", "c1", "c2", "c3", "d0", "d1", "d3", "e0", "e1"]
        if db.postgres:
            assert sends == [(4, "committed"), (4, "BatchFailed"), (2, "committed")]
        else:
            assert sends == []  # SQLite: write_only changes nothing
    finally:
        db.dispose()


def _own_backend_ends(conn):  # type: ignore[no-untyped-def]
    """A write_only unit during which the server ends the group's connection (as a server
    crash or an administrator's pg_terminate_backend ends it while a group is on the wire)."""
    cur = group_cursor(conn)
    try:
        cur.execute("SELECT pg_terminate_backend(pg_backend_pid())", ())
    finally:
        cur.close()
    return "gone"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_connection_lost_while_a_group_is_sent_in_one_message_is_dropped_without_a_traceback(
        database_url, sends, caplog):
    """The connection breaks while pgbatch has a group in libpq's pipeline mode: the callers
    get an outage (503 at the API), and the connection is dropped as broken. Closing it like a
    healthy one made SQLAlchemy roll it back first, which failed on the lost connection and
    logged "Exception during reset" with a traceback through pgbatch, once per lost group."""
    from gateway.db import outage

    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        assert db.write(_put("before"), write_only=True) == "before"
        caplog.clear()
        with pytest.raises(Exception) as lost:
            db.write(_own_backend_ends, write_only=True)
        assert outage(lost.value) == "away", lost.value
        assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"], \
            [(r.name, r.getMessage()) for r in caplog.records]
        assert db.write(_put("after"), write_only=True) == "after"  # a new connection
        assert sends == [(1, "committed"), (1, "BatchFailed"), (1, "committed")]
        assert _keys(db) == ["after", "before"]
    finally:
        db.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_statements_sent_in_one_message_are_prepared_again_when_the_server_forgot_them(database_url, sends,
                                                                                       monkeypatch):
    """pgbatch prepares its statements on the group's connection. psycopg answers a rollback
    with DEALLOCATE ALL once it has prepared statements of its own: the group then forgets
    pgbatch's too, and its next one-message group prepares them again (it does not fail).
    If something else deallocates them unseen, one group fails, runs again unit by unit
    (nothing is lost), and the next one is sent in one message again. A parameter pgbatch
    cannot write as text sends its group through psycopg. Beyond PREPARED_MAX statements,
    new ones are sent unprepared."""
    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        db.write(_put("p0"), write_only=True)
        for i in range(6):  # psycopg prepares a statement it has run five times
            db.write(_put(f"q{i}"), pipelined=True)
        mine = db._gconn.connection.dbapi_connection  # type: ignore[union-attr]
        assert mine._prepared._names, "psycopg should have prepared a statement by now"

        def refuse(conn):  # type: ignore[no-untyped-def]
            _put("r0")(conn)
            raise ValueError("refused after writing")

        with pytest.raises(ValueError):
            db.write(refuse, pipelined=True)  # rolled back: psycopg deallocates everything
        assert db.write(_put("p1"), write_only=True) == "p1"
        assert sends == [(1, "committed"), (1, "committed")]

        mine.execute("DEALLOCATE ALL")  # behind the gateway's back
        assert db.write(_put("p2"), write_only=True) == "p2"
        assert db.write(_put("p3"), write_only=True) == "p3"
        assert sends[2:] == [(1, "BatchFailed"), (1, "committed")]

        class Tag(str):
            pass

        assert db.write(_put("p4", Tag("v")), write_only=True) == "p4"  # psycopg writes a str subclass
        assert sends[4:] == [(1, "TypeError")]  # refused before anything was sent

        monkeypatch.setattr(pgbatch, "PREPARED_MAX", len(db._prepared.names))
        assert db.write(_put("p5", comment=" /* another statement */"), write_only=True) == "p5"
        assert sends[5:] == [(1, "committed")] and len(db._prepared.names) == pgbatch.PREPARED_MAX
        assert _keys(db) == ["p0", "p1", "p2", "p3", "p4", "p5", "q0", "q1", "q2", "q3", "q4", "q5"]
    finally:
        db.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_write_only_unit_that_reads_or_uses_sqlalchemy_is_run_the_usual_way(database_url, sends, caplog):
    """While a write_only group is recorded, its connection is in autocommit mode: a
    statement run through SQLAlchemy would be committed at once, outside the group's
    transaction (and again when the group runs a second time). Such a unit, or one that
    reads a result, is refused while recording; its group runs unit by unit, each row is
    stored once, and the mistake is logged."""
    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        def through_sqlalchemy(conn):  # type: ignore[no-untyped-def]
            conn.execute(insert(AdapterState.__table__).values(adapter="w", key="s0", value="v"))
            return "s0"

        def reading(conn):  # type: ignore[no-untyped-def]
            cur = group_cursor(conn)
            cur.execute("SELECT count(*) FROM adapter_state")
            n = cur.fetchone()[0]
            _put(f"s{n + 1}")(conn)
            return "read"

        assert db.write(_put("dup"), write_only=True) == "dup"
        # the third unit fails, so the group runs a second time: a statement committed at once
        # the first time would be a duplicate then, and its caller would get an error
        out = _one_group(db, [_put("r0"), through_sqlalchemy, _put("dup")])
        assert out[:2] == ["r0", "s0"] and isinstance(out[2], db.integrity_errors), out
        assert db.write(reading, write_only=True) == "read"
        assert _keys(db) == ["dup", "r0", "s0", "s4"]
        assert sends == [(1, "committed")]  # neither group after the first went in one message
        assert sum("write_only unit of work" in r.message for r in caplog.records) == 2
    finally:
        db.dispose()


def test_a_replayed_nonce_is_refused_without_undoing_its_group(database_url):
    """A replayed federation nonce inserts nothing: it raises no unique-key error, so the
    other units of its group are neither rolled back nor run a second time."""
    from gateway.federation.api import remember_nonce

    migrate.upgrade(database_url)
    db = Database(database_url)
    try:
        assert remember_nonce(db, "county-a", "n-1") is True
        runs: list[int] = []

        def other(conn):  # type: ignore[no-untyped-def]
            runs.append(1)
            conn.execute(insert(AdapterState.__table__).values(adapter="t", key="other", value="1"))
            return "stored"

        out = in_one_group(db, [lambda: remember_nonce(db, "county-a", "n-1"),
                                lambda: remember_nonce(db, "county-a", "n-2"),
                                lambda: db.write(other)])
        assert out == [False, True, "stored"]
        assert runs == [1]  # a unique-key error in the group would have run it twice
        assert remember_nonce(db, "county-b", "n-1") is True  # nonces are per sending node
    finally:
        db.dispose()
