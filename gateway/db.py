"""Engine, sessions, and how writes reach the disk.

SQLite runs in WAL mode with ``synchronous=FULL`` (accepted means committed, even on power
loss). Writers are serialised without ever sleeping in SQLite's busy handler: a thread lock
inside the process and an ``flock`` on ``<database>.writelock`` across processes (gunicorn
workers, ``gateway worker``), taken before ``BEGIN IMMEDIATE``. Reads
(:meth:`Database.sessions`) use a deferred ``BEGIN`` and never wait for a writer.

:meth:`Database.write` is *group commit*: concurrent callers' units of work run in one
transaction and one commit (one fsync) makes them all durable before any of them returns. A
failing unit is undone alone: the units first run one after the other with nothing in
between; if one fails, the transaction is rolled back and the group runs again with a
savepoint around each unit (so a unit may run twice, and must do only database work).
PostgreSQL gains the same way (one commit, one audit-chain lock per group; the group's
BEGIN and COMMIT go out with its statements, see :meth:`Database._begin`; a group of units
that only write is sent as one message, see :mod:`gateway.pgbatch`). There is no
commit thread: one of the callers leads each group (see :meth:`Database.write`). On SQLite
the group's connection commits with ``synchronous=NORMAL``; the leader then lets go of the
writer lock, passes the lead on, and syncs the WAL file itself (``fdatasync``) before any
caller of the group returns: the next group (of this process or another gunicorn worker) is
already written while this one waits for the disk, and one sync often covers both. Every
other connection keeps ``synchronous=FULL``.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import functools
import json
import logging
import os
import select
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy.exc
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from gateway import pgbatch
from gateway.durable import fsync_dir

_WRITE = "gateway_write"
log = logging.getLogger("gateway.db")
T = TypeVar("T")
_DATABASES: weakref.WeakSet[Database] = weakref.WeakSet()


def _after_fork() -> None:
    # runs in the child, which has only the forking thread: nothing can race this reset
    for db in list(_DATABASES):
        db._group_state()


os.register_at_fork(after_in_child=_after_fork)


#: how long a SQLite connection waits for a lock held by another process before it fails
BUSY_TIMEOUT_S = 30
#: seconds a PostgreSQL connection may take to open (libpq's connect_timeout)
CONNECT_TIMEOUT_S = 10

#: how JSON columns are written: Chinese as UTF-8, not \uXXXX escapes (half the bytes of a
#: title, and readable to an operator at the database's own prompt)
json_text = functools.partial(json.dumps, ensure_ascii=False)


#: SQLite's result codes for "no space left" and for a database it cannot reach or lock
_SQLITE_FULL, _SQLITE_AWAY = 13, frozenset({5, 6, 10, 14})  # FULL; BUSY, LOCKED, IOERR, CANTOPEN
#: PostgreSQL's SQLSTATE for a full disk (class 53: insufficient resources)
_PG_DISK_FULL = "53100"
#: PostgreSQL SQLSTATEs (prefixes) of a server that is away: class 08 (the connection), 53
#: (insufficient resources: out of connections, of memory), 57P (shut down, starting up).
#: Not the rest of psycopg's OperationalError: a statement timeout (57014), a lock timeout
#: (55P03), a deadlock (40P01) or a value past a limit (54000) say something about the work,
#: and a request that fails the same way every time must not be told to try again.
_PG_AWAY = ("08", "53", "57P")
#: a write refused because the server takes no writes just now: a primary demoted during a
#: failover, a standby answering, or a database put read-only by its administrator
_PG_READ_ONLY = "25006"


def outage(exc: BaseException) -> str | None:
    """What an error says about the database, rather than about the work that met it:
    ``"full"`` (no disk space left for it: SQLite's file system, PostgreSQL's), ``"away"``
    (the server is down, restarting or refused the connection, every connection is taken,
    the connection was cut, it takes no writes just now, SQLite's file is locked or
    unreadable), or None (anything else:
    a constraint, a bug). An outage passes by itself or once an operator has acted; the
    work is not at fault, so it is answered 503 or 507 and retried, never logged as a bug."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):  # the pool: every connection in use
        return "away"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "full"
    if isinstance(exc, pgbatch.BatchFailed) and exc.broken:
        return "away"
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return "away"
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        if code & 0xFF == _SQLITE_FULL:
            return "full"
        return "away" if code & 0xFF in _SQLITE_AWAY else None
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a SQLite-only installation
        return None
    sqlstate = getattr(orig, "sqlstate", None) if isinstance(orig, psycopg.Error) else None
    if sqlstate == _PG_DISK_FULL:
        return "full"
    if sqlstate == _PG_READ_ONLY:
        return "away"
    if isinstance(orig, psycopg.InterfaceError):
        return "away"
    if isinstance(orig, psycopg.OperationalError) and (sqlstate is None or sqlstate.startswith(_PG_AWAY)):
        return "away"  # no SQLSTATE: the client's own (connection refused, the server hung up)
    return None


def outage_text(exc: BaseException) -> str:
    """An outage's error in one line, for a log line or a stored error: its type and the
    first line of its message (SQLAlchemy appends a link, psycopg a hint on further lines)."""
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None else exc
    first = next((line.strip() for line in str(orig).splitlines() if line.strip()), "")
    return f"{type(orig).__name__}: {first}"[:300]


def make_engine(url: str, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S},
                               pool_size=pool_size, max_overflow=pool_size, json_serializer=json_text)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            # Savepoints (one per unit of a group commit) keep their undo pages in a statement
            # journal; on disk that is a temp file created, written and deleted per
            # transaction. In memory it costs no system call (durability is the WAL's business).
            cur.execute("PRAGMA temp_store=MEMORY")
            # Checkpoints run in a background thread (Database._checkpoint_loop), not inside
            # whichever commit happens to cross the WAL threshold: that commit would pay for
            # copying the whole WAL back, which shows up as tail latency on accepts.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            # when the WAL starts over, its file is cut back to this size (see Database.checkpoint)
            cur.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            # on the driver's connection: exec_driver_sql would cost a full statement execution
            conn.connection.dbapi_connection.execute(
                "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

        return engine
    # a database host that does not answer at all (down, firewalled) fails a connection after
    # CONNECT_TIMEOUT_S, not the operating system's minutes: a gunicorn worker loading the app
    # would otherwise be killed by its boot timeout over and over; a URL's own wins
    connect_args = {} if "connect_timeout" in make_url(url).query else {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                           json_serializer=json_text, connect_args=connect_args)

    @event.listens_for(engine, "before_cursor_execute")
    def _not_while_recording(conn, *_args):  # type: ignore[no-untyped-def]
        # the group's connection is in autocommit mode: such a statement would be committed
        # at once, outside the group's transaction
        if conn.info.get(_RECORDER) is not None:
            raise WriteOnlyMisuse("a write_only unit of work ran a statement through SQLAlchemy; "
                                  "it must use group_cursor()")

    return engine


_IN_GROUP_PIPELINE = "gateway_group_pipeline"


_AUDIT_LOCKED = "gateway_audit_locked"
_RECORDER = "gateway_group_recorder"


def claim_audit_lock(conn: Connection) -> bool:
    """PostgreSQL: must a unit running on ``conn`` take the audit chain's lock now? False
    only when ``conn`` runs a group commit (:meth:`Database.write`) whose transaction has
    taken it already (it is held until the commit); otherwise True, and a group's
    transaction remembers it as taken (:meth:`Database._begin` starts each one at False)."""
    info = conn.info
    if _AUDIT_LOCKED not in info:
        return True
    if info[_AUDIT_LOCKED]:
        return False
    info[_AUDIT_LOCKED] = True
    return True


def in_group_pipeline(conn: Connection) -> bool:
    """True while ``conn`` carries a group of ``pipelined`` units in one psycopg pipeline
    (see :meth:`Database.write`), or records a group of ``write_only`` ones: a unit then
    queues its statements there and opens no pipeline itself."""
    return bool(conn.info.get(_IN_GROUP_PIPELINE))


class WriteOnlyMisuse(RuntimeError):
    """A ``write_only`` unit of work (see :meth:`Database.write`) read a result, or ran a
    statement other than on :func:`group_cursor`: its group is run again unit by unit."""


class _Recorder:
    """The driver's cursor, for a ``write_only`` unit in a PostgreSQL group: it keeps the
    unit's statements, which the group sends in one message (:mod:`gateway.pgbatch`)."""

    __slots__ = ("statements",)

    def __init__(self) -> None:
        self.statements: list[pgbatch.Statement] = []

    def execute(self, sql: str, params: Any = ()) -> None:
        self.statements.append((sql, params))

    def executemany(self, sql: str, params_seq: Any) -> None:
        self.statements.extend((sql, params) for params in params_seq)

    def fetchone(self) -> Any:
        raise WriteOnlyMisuse("a write_only unit of work read a result")

    def close(self) -> None:
        pass


def group_cursor(conn: Connection) -> Any:
    """The cursor a unit of work runs its driver statements on: the recorder of a group of
    ``write_only`` units (see :meth:`Database.write`), else a new cursor of ``conn``'s
    driver connection (close it after use)."""
    return conn.info.get(_RECORDER) or conn.connection.cursor()


def driver_stamp(t: datetime, postgres: bool) -> object:
    """A timestamp as the driver takes it for a ``UTCDateTime`` column, for statements run on
    the DBAPI cursor: PostgreSQL takes the datetime, SQLite keeps text in SQLAlchemy's format."""
    # isoformat, cut before any offset: the same text as strftime("%Y-%m-%d %H:%M:%S.%f") at
    # half its cost (strftime goes through the C library's formatter)
    return t if postgres else t.isoformat(" ", "microseconds")[:26]


def driver_mark(postgres: bool) -> str:
    """The driver's parameter marker (psycopg ``%s``, sqlite3 ``?``)."""
    return "%s" if postgres else "?"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _server_hung_up(conn: Connection) -> bool:
    """PostgreSQL: has the server closed this idle connection (a restart, a crash, an
    administrator's pg_terminate_backend)? Nothing is in flight on it between two groups, so
    anything to read means the server said goodbye (a FATAL message, then end of file). One
    ``poll`` without waiting, where a ping would cost a round trip per group; without it,
    the first group after a server restart would fail and its callers get errors."""
    dbapi = conn.connection.dbapi_connection
    if dbapi is None or dbapi.closed:  # type: ignore[attr-defined]
        return True
    try:
        fd = dbapi.pgconn.socket  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - psycopg: the connection is already known to be lost
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _WriterLock:
    """One writer at a time: threads of this process, then processes sharing the file."""

    def __init__(self, path: str | None) -> None:
        self._thread_lock = threading.Lock()
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._path is None:
            return
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


class _Job:
    """A unit of work for a group commit. Its owner blocks in ``wait`` until the leader of
    the group that ran it calls ``finish``, or until it is made the next leader (``lead``).
    The latch is a plain lock: an Event costs several Python-level lock operations."""

    __slots__ = ("fn", "pipelined", "write_only", "result", "error", "lead", "_latch")

    def __init__(self, fn: Callable[[Connection], Any], pipelined: bool = False, write_only: bool = False) -> None:
        self.fn = fn
        self.pipelined = pipelined  # see Database.write
        self.write_only = write_only
        self.result: Any = None
        self.error: BaseException | None = None
        self.lead = False  # woken to lead the next group, not because it is done
        self._latch = threading.Lock()
        self._latch.acquire()

    def finish(self) -> None:
        self._latch.release()

    def promote(self) -> None:
        self.lead = True
        self._latch.release()

    def wait(self) -> None:
        self._latch.acquire()


class Database:
    #: at most this many units of work share one commit
    GROUP_MAX = 64

    def __init__(self, url: str, pool_size: int = 10) -> None:
        self.url = url
        self.engine = make_engine(url, pool_size)
        self.postgres = is_postgres(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(**{_WRITE: True})
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        #: a unique or foreign key violation, raised by SQLAlchemy or (statements run on the
        #: driver's cursor) by the driver itself
        self.integrity_errors: tuple[type[Exception], ...] = (
            sqlalchemy.exc.IntegrityError, self.engine.dialect.dbapi.IntegrityError)  # type: ignore[union-attr]
        self._lock: _WriterLock | None = None
        self._wal: str | None = None
        self._sync_self = False  # the group connection commits NORMAL and _sync_wal follows
        self._wal_synced: tuple[int, int] | None = None  # (st_dev, st_ino) of the WAL whose folder entry is synced
        if not self.postgres:
            db = make_url(url).database
            self._lock = _WriterLock(f"{db}.writelock" if db and db != ":memory:" else None)
            self._wal = f"{db}-wal" if db and db != ":memory:" else None
        self._checkpointer: threading.Thread | None = None
        self._closed = threading.Event()
        self._checkpointer_pid = 0
        self._checkpointer_lock = threading.Lock()
        self._held = threading.local()
        self._group_state()
        _DATABASES.add(self)

    def _group_state(self) -> None:
        """Group commit's state, made anew in a forked child (see _after_fork): a lock held
        by a thread of the parent, or the parent's connection, must not carry over."""
        self._pid = os.getpid()
        self._jobs: collections.deque[_Job] = collections.deque()  # append/popleft are atomic
        self._leader = threading.Lock()  # held by the thread leading a group, or passed on
        self._gconn: Connection | None = None  # the group's connection; only the leader uses it
        self._prepared = pgbatch.Prepared()  # on the group's connection, by gateway.pgbatch

    @contextmanager
    def begin(self) -> Iterator[Session]:
        """One write unit of work: committed on success, rolled back on any exception."""
        self._ensure_checkpointer()
        if self._lock is None:
            with self._writes.begin() as session:
                yield session
            return
        with self._lock, self._writes.begin() as session:
            yield session

    @contextmanager
    def begin_core(self) -> Iterator[Connection]:
        """A write transaction on a plain Connection: for hot paths made only of Core
        statements, without the ORM session's bookkeeping. A thread that called
        :meth:`hold_connection` gets its own kept connection."""
        self._ensure_checkpointer()
        held: Connection | None = getattr(self._held, "conn", None)
        if held is not None and self.postgres and _server_hung_up(held):
            log.warning("the database server closed a kept connection; opening a new one")
            self.release_connection()
            self.hold_connection()
            held = self._held.conn
        if held is not None:
            try:
                with self._lock or nullcontext(), held.begin():
                    yield held
            except BaseException:
                self.release_connection()  # the next transaction starts on a fresh connection
                raise
            return
        with self._lock or nullcontext(), self._write_engine.begin() as conn:
            yield conn

    def hold_connection(self) -> None:
        """This thread writes in a loop (the worker's claimer and recorder): keep one write
        connection for it, since a pool checkout and its events per transaction cost more than
        a small claim itself. :meth:`release_connection` gives it back."""
        if getattr(self._held, "conn", None) is None:
            self._held.conn = self._write_engine.connect()

    def release_connection(self) -> None:
        conn: Connection | None = getattr(self._held, "conn", None)
        self._held.conn = None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection is dropped either way
                conn.invalidate()

    def write(self, fn: Callable[[Connection], T], *, pipelined: bool = False, write_only: bool = False) -> T:
        """Run ``fn(connection)`` (Core statements only) in a transaction shared with other
        concurrent callers and return its result once that transaction is committed (group
        commit). An exception from ``fn`` is raised here and undoes only ``fn``'s own changes.
        ``fn`` may be run a second time, when another unit of its group failed (see the
        module docstring): it must do nothing but database work.

        ``pipelined``: ``fn`` runs its statements on the driver's cursor only (no SQLAlchemy
        execution), so that on PostgreSQL a group made only of such units sends all their
        statements in one psycopg pipeline: one round trip for the group instead of one per
        unit. Such a unit checks :func:`in_group_pipeline` and then opens no pipeline itself.

        ``write_only``: moreover, ``fn`` reads no result back (it only writes), and takes its
        cursor from :func:`group_cursor`. On PostgreSQL a group made only of such units is
        recorded, then sent with its BEGIN and COMMIT as one message (:mod:`gateway.pgbatch`),
        which costs a third of psycopg's client CPU. If that transaction fails, the units run
        again as usual (see the module docstring), where each one's error is its own.

        There is no commit thread: the caller that finds no group running leads one itself
        (it runs every queued unit, its own included, and commits them together); the others
        wait. A leader that finishes with units still queued passes the lead to the owner of
        the oldest, so nobody is kept leading for others. This saves a hand-over to another
        thread and back on every group."""
        self._ensure_checkpointer()
        job = _Job(fn, pipelined or write_only, write_only)
        self._jobs.append(job)
        if self._leader.acquire(blocking=False):
            self._lead(job)
        else:
            job.wait()
            if job.lead:  # the lead (and the leader lock) was passed to this thread
                self._lead(job)
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _lead(self, me: _Job) -> None:
        """Run groups, holding the lead, until ``me`` has run; then pass the lead on (or
        release it). Every job taken into a group is finished, whatever fails."""
        while True:
            batch: list[_Job] = []
            error: BaseException | None = None
            synced = False
            try:
                # The writer lock is taken before the group is gathered: on SQLite whatever
                # queued while another process wrote joins this commit.
                with self._lock or nullcontext():
                    batch = self._take()
                    synced = self._commit_group(batch)
            except BaseException as exc:  # the commit failed, so every unit of the group did
                batch = batch or self._take()
                if outage(exc) is None:  # an outage: each caller says so (503, the worker's log)
                    log.error("group commit of %d units failed: %s", len(batch), exc)
                error = exc
                # its state is unknown (a broken one may still be in libpq's pipeline mode): closed
                # as it is, not rolled back first (which fails on a lost connection, and logs
                # a traceback, once per lost group)
                self._drop_group_connection(broken=True)
            mine = me in batch  # always, unless more than GROUP_MAX were queued before it
            if mine:
                # The next group is written (by the next leader) while this one's fsync runs.
                self._hand_over()
            if synced:
                try:
                    self._sync_wal()  # committed above; durable from here, before anyone returns
                except BaseException as exc:
                    error = exc
            for job in batch:
                if error is not None and job.error is None:
                    job.error = error
                if job is not me:  # the leader is not waiting on its own latch
                    job.finish()
            if mine:
                return

    def _take(self) -> list[_Job]:
        """The queued jobs, oldest first, up to GROUP_MAX (only the leader takes)."""
        batch: list[_Job] = []
        jobs = self._jobs
        while jobs and len(batch) < self.GROUP_MAX:
            batch.append(jobs.popleft())
        return batch

    def _hand_over(self) -> None:
        """Give the lead to the owner of the oldest queued job, or release it. A job queued
        just as the lock is released is not stranded: its owner either got the lock, or
        failed to because this thread still held it, and then this check sees the job."""
        while True:
            if self._jobs:
                self._jobs[0].promote()  # the lock passes with it; only the leader pops
                return
            self._leader.release()
            if not self._jobs or not self._leader.acquire(blocking=False):
                return

    def _commit_group(self, batch: list[_Job]) -> bool:
        """Run the batch's units in one transaction and commit (the caller holds the writer
        lock). True when the WAL still has to be fsynced by this thread (see the module
        docstring for both)."""
        conn = self._group_connection()
        # First run: the units one after the other, no savepoint between them (PostgreSQL: two
        # statements and two round trips fewer per unit). A unit alone in its transaction
        # owns its failure; in a group, a failure rolls everything back and the group runs
        # again, each unit in its own savepoint, so that only the failing one is undone (a
        # unit may run twice: it does only database work).
        if self.postgres and all(job.write_only for job in batch):
            if self._send_group(conn, batch):
                return False
        elif self._first_run(conn, batch):
            return self._sync_self
        self._prepared.clear()  # see pgbatch.Prepared.clear
        with conn.begin():
            cur = conn.connection.cursor()
            try:
                self._begin(conn, cur)
                for job in batch:
                    job.result = None
                    self._run(conn, cur, job)
                self._commit(cur)
            finally:  # also when a savepoint statement itself fails (a lost connection)
                cur.close()
        return self._sync_self

    def _first_run(self, conn: Connection, batch: list[_Job]) -> bool:
        """The units one after the other in one transaction; True once it is committed, or
        once the only unit has failed (its error is its own)."""
        with conn.begin() as tx:
            cur = conn.connection.cursor()
            try:
                with self._group_pipeline(conn, batch):
                    self._begin(conn, cur)
                    for job in batch:
                        job.result = job.fn(conn)
                    self._commit(cur)
            except Exception as exc:
                tx.rollback()
                if len(batch) == 1:
                    batch[0].error = exc
                    self._prepared.clear()  # see pgbatch.Prepared.clear
                    return True
                return False
            else:
                return True  # committed on leaving the block
            finally:
                cur.close()

    def _send_group(self, conn: Connection, batch: list[_Job]) -> bool:
        """PostgreSQL, every unit ``write_only``: record their statements, then send them in
        one transaction (:func:`gateway.pgbatch.send_transaction`). True once committed;
        False if not (the connection is idle again). A broken connection raises."""
        recorder = _Recorder()
        info = conn.info
        info[_RECORDER], info[_IN_GROUP_PIPELINE], info[_AUDIT_LOCKED] = recorder, True, False
        try:
            for job in batch:
                job.result = job.fn(conn)
        except WriteOnlyMisuse as exc:
            log.error("%s; its group runs unit by unit", exc)
            return False
        except Exception:  # noqa: BLE001 - its second run gives the unit its error
            return False
        finally:
            info[_RECORDER], info[_IN_GROUP_PIPELINE] = None, False
            if conn.in_transaction():  # begun by a refused SQLAlchemy statement: nothing ran
                conn.rollback()
        dbapi: Any = conn.connection.dbapi_connection
        try:
            pgbatch.send_transaction(dbapi.pgconn, recorder.statements, self._prepared, dbapi.info.encoding)
        except pgbatch.BatchFailed as exc:
            if exc.broken:
                raise
            return False
        except TypeError as exc:  # a parameter pgbatch has no text form for: psycopg has
            log.error("a group could not be sent in one message (%s); sent unit by unit", exc)
            return False
        return True

    def _begin(self, conn: Connection, cur: Any) -> None:
        """PostgreSQL: open the group's transaction. The group connection does not let psycopg
        open and commit transactions itself (it is in autocommit mode): psycopg would wait for
        its BEGIN's answer and its COMMIT's apart from the statements between them, where
        these two statements travel in the group's pipeline with the rest (one round trip
        instead of three). SQLite's BEGIN IMMEDIATE is sent by the engine (make_engine)."""
        if self.postgres:
            conn.info[_AUDIT_LOCKED] = False
            cur.execute("BEGIN")

    def _commit(self, cur: Any) -> None:
        """PostgreSQL: close the group's transaction (see :meth:`_begin`)."""
        if self.postgres:
            cur.execute("COMMIT")

    @contextmanager
    def _group_pipeline(self, conn: Connection, batch: list[_Job]) -> Iterator[None]:
        """PostgreSQL, every unit ``pipelined``: one psycopg pipeline around them all. A
        statement that fails there is reported at the next read or at the end, maybe in
        another unit: it does not matter, since any failure in a group sends it to its
        second, unit-by-unit run (without this pipeline)."""
        if not self.postgres or not all(job.pipelined for job in batch):
            yield
            return
        conn.info[_IN_GROUP_PIPELINE] = True
        try:
            with conn.connection.dbapi_connection.pipeline():  # type: ignore[union-attr]
                yield
        finally:
            conn.info[_IN_GROUP_PIPELINE] = False

    def _group_connection(self) -> Connection:
        conn = self._gconn
        if conn is not None:
            if not (self.postgres and _server_hung_up(conn)):
                return conn
            log.warning("the database server closed the group commit connection; opening a new one")
            self._drop_group_connection(broken=True)
        conn = self._gconn = self._write_engine.connect()
        self._sync_self = False
        self._prepared = pgbatch.Prepared()
        if self.postgres:
            # _begin and _commit send BEGIN and COMMIT; detached from the pool, so that it is
            # closed for good afterwards, never lent out in autocommit mode
            conn.detach()
            conn.connection.dbapi_connection.autocommit = True  # type: ignore[union-attr]
        if self._wal is not None:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            # Only in WAL mode (a file system without shared memory leaves SQLite in its
            # rollback journal, where this connection simply stays FULL).
            if dbapi.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                # this connection's commits are made durable by _sync_wal; detached from the
                # pool, so that it is closed for good afterwards, never lent out with NORMAL
                conn.detach()
                dbapi.execute("PRAGMA synchronous=NORMAL")
                self._sync_self = True
        return conn

    def _drop_group_connection(self, broken: bool = False) -> None:
        """Close the group's connection; ``broken``: without the rollback a pool connection
        gets when it is closed (the group connection runs in autocommit mode, and a failed
        group leaves nothing open on it worth rolling back)."""
        conn, self._gconn = self._gconn, None
        if conn is None:
            return
        if broken:
            conn.invalidate()
            return
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - a broken connection is dropped either way
            conn.invalidate()

    CHECKPOINT_SECONDS = 1.0

    def _ensure_checkpointer(self) -> None:
        if self.postgres or (self._checkpointer is not None and self._checkpointer_pid == os.getpid()):
            return
        with self._checkpointer_lock:
            if self._checkpointer is None or self._checkpointer_pid != os.getpid():
                self._checkpointer_pid = os.getpid()
                self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="wal-checkpoint",
                                                      daemon=True)
                self._checkpointer.start()

    #: WAL frames (pages) beyond which a checkpoint starts the WAL over: 64 MiB of 4 KiB pages
    WAL_RESTART_FRAMES = 16384
    #: how long that checkpoint waits for readers, while every writer waits for it
    RESTART_WAIT_MS = 100

    def _checkpoint_loop(self) -> None:
        failing = False  # said once a streak (a full disk fails every round until space returns)
        while not self._closed.wait(self.CHECKPOINT_SECONDS):
            try:
                self.checkpoint()
            except Exception as exc:  # the next round tries again
                if outage(exc) is None:
                    log.warning("WAL checkpoint failed", exc_info=True)
                elif not failing:
                    log.warning("WAL checkpoint failed (%s); trying again every %g s", outage_text(exc),
                                self.CHECKPOINT_SECONDS)
                failing = True
            else:
                if failing:
                    log.info("WAL checkpoints work again")
                failing = False

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL's pages into the database file; returns (frames in the WAL, frames
        copied) as the last checkpoint saw them.

        A PASSIVE checkpoint copies what it can without waiting for, or blocking, anyone. But
        while writers keep committing it never catches up with them, and SQLite starts the WAL
        over only when a commit finds everything copied: under steady load the WAL grew
        without bound (1.5 GB after 40 s of accepts), and every read got slower as it searched
        a longer WAL index. So once the WAL holds more than WAL_RESTART_FRAMES, the rest is
        copied holding the writer lock (a few milliseconds: PASSIVE did the bulk), waiting
        up to RESTART_WAIT_MS for readers (RESTART); the next commit then writes the WAL
        from its start, and ``journal_size_limit`` trims the file."""
        with self.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            _busy, frames, copied = dbapi.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames > self.WAL_RESTART_FRAMES and self._lock is not None:
                with self._lock:
                    # Writers wait while this runs: a reader still on an old snapshot (a
                    # long report, say) is waited for briefly, not for BUSY_TIMEOUT_S; if
                    # it is not done by then, this round ends as a PASSIVE one and the
                    # next second tries again.
                    dbapi.execute(f"PRAGMA busy_timeout={self.RESTART_WAIT_MS}")
                    try:
                        _busy, frames, copied = dbapi.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                    finally:
                        dbapi.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
            return frames, copied

    def _sync_wal(self) -> None:
        """Make the WAL file durable up to the group just committed. Opened by name each
        time: our connection keeps the WAL in place, and a descriptor kept from earlier could
        point to a file SQLite has since removed (after every connection closed) and
        recreated.

        ``fdatasync``, as SQLite itself syncs: it writes the data and whatever metadata
        reading them back needs (the size, when the WAL grew), not the modification time, so
        a WAL rewritten in place from its start costs no file-system journal commit (A/B on
        the accept bench: 3.8% less CPU per accept over the whole machine). A WAL file new
        since the last sync also has its folder entry synced once, or a crash could lose the
        file itself."""
        assert self._wal is not None
        fd = os.open(self._wal, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._wal_synced:
                fsync_dir(os.path.dirname(os.path.abspath(self._wal)))
                self._wal_synced = (st.st_dev, st.st_ino)
        finally:
            os.close(fd)

    @staticmethod
    def _run(conn: Connection, cur: Any, job: _Job) -> None:
        """One unit of work in its own savepoint: if it fails, its changes alone are undone.
        The savepoint is set on the driver's cursor (a fortieth of the cost of
        ``Connection.begin_nested``, and it is paid while every other writer waits)."""
        cur.execute("SAVEPOINT gw_unit")
        try:
            job.result = job.fn(conn)
        except Exception as exc:
            job.error = exc
            cur.execute("ROLLBACK TO SAVEPOINT gw_unit")
            if _AUDIT_LOCKED in conn.info:  # a lock it took went with it (taken again if need be)
                conn.info[_AUDIT_LOCKED] = False
        cur.execute("RELEASE SAVEPOINT gw_unit")

    def dispose(self) -> None:
        """Stop the background threads and close every pooled connection."""
        self._closed.set()
        if self._pid == os.getpid() and self._leader.acquire(timeout=10):
            try:
                self._drop_group_connection()
            finally:
                self._leader.release()
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._checkpointer.join(10)
        self.engine.dispose()
