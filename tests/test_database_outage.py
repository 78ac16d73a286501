"""The database goes away and comes back while the node works: PostgreSQL restarted or stopped
by its operator, SQLite's disk full. Callers get 503 (507 for a full disk) problem+json with
Retry-After, never a 500; /readyz says not ready; the log says so in one line, not a traceback
per request; the connection pool, the delivery worker and the API recover by themselves once
the database is back; an outcome of a delivery made during the outage is recorded afterwards,
not dropped (dropped, the row would be delivered a second time once its lease ran out).

Each PostgreSQL test runs on a private cluster of its own, which it stops and starts."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url

from adapters.simulators.cluster import stop_process_group, to_toml
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from gateway import config as config_mod
from gateway import migrate
from gateway.models import AuditEntry, Delivery, Message, OutboxEntry
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import COUNTY_A, PREFECTURE, Api, RecordingAdapter, node_config
from tests.plugins.postgres import PrivateCluster, _pg_bin
from tests.plugins.tcpproxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent


class Cluster(PrivateCluster):
    def stop_server(self) -> None:
        """``pg_ctl stop -m fast``, as an operator stops it: sessions are ended, nothing is lost."""
        self._check("pg_ctl stop -m fast", self._pg_ctl("-m", "fast", "-w", "stop"))


@pytest.fixture
def pg(tmp_path) -> Iterator[tuple[Cluster, Node]]:  # type: ignore[no-untyped-def]
    """A node (worker threads not started) on a private cluster that the test may stop."""
    pg_bin = _pg_bin()
    assert pg_bin is not None, "PostgreSQL server binaries not found (tests/run installs them)"
    cluster = Cluster(pg_bin)
    url = cluster.start()
    try:
        RecordingAdapter.instances.clear()
        cfg = node_config(tmp_path, url)
        migrate.upgrade(cfg.database_url())
        node = Node(cfg)
        try:
            yield cluster, node
        finally:
            node.close()
    finally:
        cluster.stop()


def _problem(r, status: int, kind: str) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"
    assert r.get_json()["type"] == f"urn:egov:gateway:problem:{kind}"
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.postgres
def test_while_postgresql_is_stopped_callers_get_503_and_the_node_recovers_by_itself(pg, caplog):  # type: ignore[no-untyped-def]
    cluster, node = pg
    api = Api(node)
    doc = api.document(title="数据库停机期间收文")
    assert api.post("/api/v1/documents", json=doc).status_code == 202
    cluster.stop_server()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        for _ in range(3):  # a new document, a status read, an upload: each a 503, not a 500
            _problem(api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "停机"}), 503,
                     "database-unavailable")
        _problem(api.get("/api/v1/documents"), 503, "database-unavailable")
        ready = api.client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["status"] == "not ready"
    assert not any(r.exc_info for r in caplog.records), "an outage is not a bug: no traceback"
    said = [r.getMessage() for r in caplog.records if "database is unavailable" in r.getMessage()]
    assert len(said) == 1, said  # the first refusal says so; the next ones within 10 s are counted
    assert "answered 503" in said[0] and "OperationalError" in said[0]
    cluster.start_again()  # the same gateway objects, no restart: the pool opens new connections
    r = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "停机"})
    assert r.status_code == 202, r.get_data(as_text=True)
    assert api.client.get("/readyz").status_code == 200
    with node.db.sessions() as s:
        assert len(s.scalars(select(Message.id)).all()) == 2  # nothing of the refused requests was stored


@pytest.mark.postgres
def test_a_delivery_made_while_postgresql_was_away_is_recorded_once_it_is_back(pg, tmp_path):  # type: ignore[no-untyped-def]
    """The legacy system took the document, then the database went away for longer than the
    row's lease. The worker keeps the outcome and records it when the database is back;
    neither its own reaper nor the lease hands the row out again: one delivery, not two."""
    cluster, node = pg
    node.config.worker.lease_seconds = 1  # the outage (about 2 s) outlasts the lease
    api = Api(node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    rec = node.adapter("rec")
    assert isinstance(rec, RecordingAdapter)
    outage_over = threading.Event()

    def database_goes_away(_delivery: object) -> None:
        rec.hook = None  # once
        cluster.stop_server()

    rec.hook = database_goes_away
    w = Worker(node)
    w.start()
    try:
        deadline = time.monotonic() + 30
        while not rec.delivered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.delivered, "the worker did not deliver"
        time.sleep(2)  # longer than the lease: without the database nothing can be recorded meanwhile
        cluster.start_again()
        outage_over.set()
        while time.monotonic() < deadline:
            with node.db.sessions() as s:
                if s.scalar(select(Delivery.status).where(Delivery.message_id == mid)) == "delivered":
                    break
            time.sleep(0.1)
        time.sleep(1.5)  # a lease and a reaper's round: a row taken back would be delivered again now
    finally:
        w.stop()
    with node.db.sessions() as s:
        assert s.scalar(select(Delivery.status).where(Delivery.message_id == mid)) == "delivered"
        assert s.scalar(select(OutboxEntry.state)) == "done"
    assert list(rec.effects.values()) == [1], rec.effects


def _no_room_left(node: Node) -> dict[str, int]:
    """From now on SQLite's file may not grow (its own page limit, which fails as a full file
    system does: SQLITE_FULL); set ``["pages"]`` to 0 and drop the connections to give room."""
    room = {"pages": 0}  # 0: no limit

    @event.listens_for(node.db.engine, "connect")
    def _limit(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        if room["pages"]:
            dbapi_conn.execute(f"PRAGMA max_page_count={room['pages']}")

    room["pages"] = node.db.engine.pool.connect().dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
    node.db.engine.dispose()  # every connection opened from now on has no room left
    node.db._drop_group_connection()
    return room


def _fill(api: Api, doc: dict) -> list[int]:
    """Send ``doc`` until the database is full (the file has a little slack in its last
    pages); the statuses, the last a 507 storage-full."""
    statuses = []
    for i in range(200):
        r = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": f"满-{i}"})
        statuses.append(r.status_code)
        if r.status_code != 202:
            _problem(r, 507, "storage-full")
            break
    assert statuses[-1] == 507, statuses
    return statuses


def test_sqlite_out_of_space_answers_507_and_stores_nothing_until_there_is_room(tmp_path, caplog):  # type: ignore[no-untyped-def]
    """SQLite's SQLITE_FULL (a full file system; here SQLite's own page limit, which fails the
    same way at the same place) is a 507 storage-full with Retry-After, not a 500."""
    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        doc = api.document(title="磁盘已满")
        assert api.post("/api/v1/documents", json=doc).status_code == 202
        room = _no_room_left(node)
        caplog.clear()
        big = {**doc, "title": "磁盘已满" * 100}
        statuses = _fill(api, big)
        assert not any(r.exc_info for r in caplog.records)
        room["pages"] = 0
        node.db.engine.dispose()
        node.db._drop_group_connection()
        r = api.post("/api/v1/documents", json=big, headers={"Idempotency-Key": f"满-{len(statuses) - 1}"})
        assert r.status_code == 202, r.get_data(as_text=True)
        with node.db.sessions() as s:
            assert len(s.scalars(select(Message.id)).all()) == len(statuses) + 1
    finally:
        node.close()


def test_readyz_says_not_ready_for_a_while_after_an_accept_met_a_full_database(tmp_path):  # type: ignore[no-untyped-def]
    """Every accept fails 507 while the database's disk is full, a disk the node may not see
    (PostgreSQL's): once one did, /readyz answers 503 for FULL_RECENTLY seconds, in every
    process of the node (another process of the same node is a second Node here), so that a
    load balancer sends the accepts elsewhere; then it is ready again and the next 507, if
    the disk is still full, takes it out again."""
    from gateway.app import create_app
    from gateway.room import FULL_RECENTLY

    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    node, other = Node(cfg), None
    try:
        api = Api(node)
        doc = api.document(title="磁盘已满")
        assert api.client.get("/readyz").status_code == 200
        mark = node.data_dir / "storage-full.seen"
        assert not mark.exists()  # the probe wrote nothing
        _no_room_left(node)
        _fill(api, {**doc, "title": "磁盘已满" * 100})
        r = api.client.get("/readyz")
        assert r.status_code == 503 and r.get_json()["status"] == "not ready", r.get_json()
        said = r.get_json()["checks"]["storage"]
        assert said.startswith("full: ") and "no disk space left" in said and "507" in said, said
        other = Node(cfg)  # another gunicorn worker of the node: it answered no 507 itself
        assert create_app(node=other).test_client().get("/readyz").status_code == 503
        os.utime(mark, (time.time() - FULL_RECENTLY - 1,) * 2)  # as if FULL_RECENTLY seconds had passed
        later = Node(cfg)  # (a process whose own memory is clear, and whose database has room)
        try:
            r = create_app(node=later).test_client().get("/readyz")
            assert r.status_code == 200 and r.get_json()["checks"]["storage"] == "ok", r.get_json()
        finally:
            later.close()
    finally:
        node.close()
        if other is not None:
            other.close()


@pytest.mark.postgres
def test_gateway_worker_rides_out_a_postgresql_restart_and_stops_on_sigterm(pg, tmp_path):  # type: ignore[no-untyped-def]
    """A real ``gateway worker`` process: the database stops and starts again under it; it says
    so in one line each way (no traceback), delivers what was accepted meanwhile, and exits 0
    on SIGTERM."""
    cluster, node = pg
    raw = {"node": {"id": "prefecture", "name": "州人民政府办公室", "data_dir": str(tmp_path / "var"),
                    "units": list(node.config.node.units)},
           "database": {"url": node.db.url},
           "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": 30, "poll_interval": 600},
           "adapters": {"rec": {"type": "recording"}, "rec2": {"type": "recording"}},
           "routes": [{"adapter": "rec"}]}
    conf = tmp_path / "worker.toml"
    conf.write_text(to_toml(raw), encoding="utf-8")
    api = Api(node)
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        # (tests.crashpoint: the gateway command with the "recording" adapter type; no crash set)
        proc = subprocess.Popen([sys.executable, "-m", "tests.crashpoint", "-c", str(conf), "worker"], cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "GATEWAY_TEST_CRASH": ""}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def delivered(n: int) -> bool:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text(errors="replace")
                with node.db.sessions() as s:
                    if len(s.scalars(select(Delivery.id).where(Delivery.status == "delivered")).all()) >= n:
                        return True
                time.sleep(0.1)
            return False

        assert api.post("/api/v1/documents", json=api.document(title="重启前")).status_code == 202
        assert delivered(1), log.read_text(errors="replace")
        cluster.stop_server()
        time.sleep(1.5)  # the worker's rounds meet the outage
        cluster.start_again()
        assert api.post("/api/v1/documents", json=api.document(title="重启后")).status_code == 202
        assert delivered(2), log.read_text(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text
    assert "the database is unavailable" in text and "the database is back" in text, text


class GatedSoapState(DocExchangeState):
    """The legacy SOAP service, counting SendDocument calls; the first one is held (before it
    takes effect) until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.sends = 0
        self.arrived, self.go_on = threading.Event(), threading.Event()

    def send_document(self, fields: Any) -> str:
        with self._lock:
            self.sends += 1
            first = self.sends == 1
        if first:
            self.arrived.set()
            assert self.go_on.wait(60)
        return super().send_document(fields)


@pytest.mark.postgres
def test_two_workers_an_outage_longer_than_the_lease_the_document_goes_to_the_soap_service_once(pg, tmp_path):  # type: ignore[no-untyped-def]
    """Two ``gateway worker`` processes share the database. Worker A calls the legacy SOAP
    service; PostgreSQL stops before A can record the outcome and stays away longer than the
    lease; when it is back, A reaches it a moment after B (its connection takes longer to come
    back). B does not take the row back and send the document a second time: A renews the
    leases of what it holds as soon as it can, and B takes rows back only after it has reached
    the database for a whole lease. One SendDocument call, A's outcome recorded."""
    cluster, _ = pg
    lease = 4
    soap = SoapServiceServer(GatedSoapState()).start()
    state = soap.state
    assert isinstance(state, GatedSoapState)
    proxies = [TcpProxy(cluster.port), TcpProxy(cluster.port)]
    url = make_url(pg[1].db.url)
    raw = {"node": {"id": "prefecture", "name": "州人民政府办公室", "data_dir": str(tmp_path / "var"),
                    "units": [PREFECTURE]},
           "database": {"url": url.render_as_string(hide_password=False)},
           "worker": {"threads": 2, "idle_sleep": 0.05, "lease_seconds": lease, "poll_interval": 600},
           "adapters": {"docexchange": {"type": "soap", "wsdl": str(ROOT / "schemas/legacy/docexchange.wsdl"),
                                        "address": soap.url, "timeout": 60}},
           "routes": [{"units": [COUNTY_A], "adapter": "docexchange"}]}
    node = Node(config_mod.from_mapping(raw, source="test"))
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    try:
        for i, proxy in enumerate(proxies):  # each worker reaches the database through its own proxy
            conf = tmp_path / f"worker{i}.toml"
            conf.write_text(to_toml({**raw, "database": {"url": url.set(port=proxy.port).render_as_string(
                hide_password=False)}}), encoding="utf-8")
            with open(logs[i], "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(conf), "worker"],
                                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True))

        def said(i: int) -> str:
            return logs[i].read_text(errors="replace")

        deadline = time.monotonic() + 60
        while not all("running" in said(i) for i in range(2)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, said(0) + said(1)
            time.sleep(0.1)
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
        assert state.arrived.wait(30), said(0) + said(1)
        with node.db.sessions() as s:
            holder = s.scalar(select(OutboxEntry.claimed_by))
        a = next(i for i, p in enumerate(procs) if f":{p.pid}:" in (holder or ""))
        time.sleep(lease / 2)  # a worker that holds a row does not lose it while its call takes long
        cluster.stop_server()
        for proxy in proxies:
            proxy.cut()
        state.go_on.set()  # the service takes the document and answers; A cannot record it
        time.sleep(lease + 1)
        cluster.start_again()
        proxies[1 - a].open()
        time.sleep(lease / 2)  # B is back; A's connection takes longer
        proxies[a].open()
        while time.monotonic() < deadline + 30:
            with node.db.sessions() as s:
                if s.scalar(select(OutboxEntry.state)) == "done":
                    break
            time.sleep(0.1)
        time.sleep(1)
        for p in procs:
            stop_process_group(p, 30)
        with node.db.sessions() as s:
            row = s.execute(select(OutboxEntry.state, OutboxEntry.claimed_by, OutboxEntry.attempts)).one()
            status = s.scalar(select(Delivery.status).where(Delivery.message_id == mid))
            attempts = s.execute(select(AuditEntry.actor, AuditEntry.outcome)
                                 .where(AuditEntry.action == "delivery.attempt")).all()
        assert state.sends == 1, (state.sends, said(0), said(1))
        assert (row.state, row.claimed_by, row.attempts) == ("done", holder, 1)
        assert status == "delivered"
        assert [tuple(x) for x in attempts] == [(f"worker:{holder}", "delivered")]
        assert "Traceback" not in said(0) + said(1)
    finally:
        for p in procs:
            stop_process_group(p, 30)
        for proxy in proxies:
            proxy.close()
        soap.stop()
        node.close()


def test_renewing_leases_extends_the_rows_still_held_and_drops_the_unstarted_ones_taken_over(gw_node):  # type: ignore[no-untyped-def]
    """After an outage a worker renews the leases of the rows it holds. A row it claimed but
    had not started, which another worker took over meanwhile (this worker was cut off from
    the database longer than the lease), is left to that worker: dropped from the local
    queue, not delivered here as well. The rows still its own get a new lease."""
    from collections import deque
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    api = Api(gw_node)
    for title in ("续租一", "续租二"):
        assert api.post("/api/v1/documents", json=api.document(title=title)).status_code == 202
    w = Worker(gw_node, worker_id="worker-a")
    jobs = w.claim(2)
    assert len(jobs) == 2
    w._ready, w._in_hand = deque(jobs), {j.id for j in jobs}  # as the dispatcher keeps them
    lost, kept = jobs
    with gw_node.db.begin() as s:  # the other worker's reaper and claim, while worker-a was away
        s.execute(update(OutboxEntry).where(OutboxEntry.id == lost.id).values(claimed_by="worker-b"))
        s.execute(update(OutboxEntry).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    assert w.renew_leases() == 1
    assert [j.id for j in w._ready] == [kept.id] and w._in_hand == {kept.id}
    with gw_node.db.sessions() as s:
        leases = dict(s.execute(select(OutboxEntry.claimed_by, OutboxEntry.lease_until)).all())
    assert leases["worker-a"] > datetime.now(UTC) + timedelta(seconds=gw_node.config.worker.lease_seconds / 2)
    assert leases["worker-b"] < datetime.now(UTC)  # not worker-a's to renew


def test_renewing_leases_as_an_outcome_is_recorded_says_nothing_of_a_takeover(gw_node, caplog):  # type: ignore[no-untyped-def]
    """The recorder lets go of a row just after its outcome's commit: a renewal in between
    finds the row no longer claimed. That is no takeover, and no warning says there was one
    (a busy node would otherwise log one now and then, every quarter lease)."""
    from collections import deque

    api = Api(gw_node)
    for title in ("续租三", "续租四"):
        assert api.post("/api/v1/documents", json=api.document(title=title)).status_code == 202
    w = Worker(gw_node, worker_id="worker-a")
    jobs = w.claim(2)
    assert len(jobs) == 2
    recorded, waiting = jobs
    w._ready, w._in_hand = deque([waiting]), {j.id for j in jobs}  # `recorded` is being delivered
    w.record([w.execute(recorded)])  # committed; the recorder has not let go of it yet
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.worker"):
        assert w.renew_leases() == 1
    assert [r.getMessage() for r in caplog.records] == []
    assert [j.id for j in w._ready] == [waiting.id]


_CHECKPOINT_WITHOUT_ROOM = r"""
import logging, os, resource, signal, sys, time
from gateway import logs
from gateway.db import Database

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
logs.setup()
db = Database(f"sqlite:///{sys.argv[1]}/gateway.db")
db.CHECKPOINT_SECONDS = 0.05
with db.begin_core() as c:
    c.exec_driver_sql("CREATE TABLE t (x TEXT)")
size = os.path.getsize(f"{sys.argv[1]}/gateway.db")
for _ in range(10):  # the WAL holds what the database file must grow by to take it in
    with db.begin_core() as c:
        c.exec_driver_sql("INSERT INTO t VALUES (?)", ("x" * 30000,))
resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))  # the file may not grow
db._ensure_checkpointer()
time.sleep(0.6)  # a dozen rounds fail
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
time.sleep(0.3)
db.dispose()
"""


def test_wal_checkpoints_that_cannot_write_say_so_once_and_once_when_they_work_again(tmp_path):  # type: ignore[no-untyped-def]
    """The checkpointer runs every second in every process; while the database file cannot
    grow (a full disk) each round fails. One line when that starts, one when it ends, not a
    traceback a second per process."""
    p = subprocess.run([sys.executable, "-c", _CHECKPOINT_WITHOUT_ROOM, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr, p.stderr
    failed = [x for x in lines if "WAL checkpoint failed" in x]
    assert len(failed) == 1 and "disk I/O error" in failed[0], p.stderr
    assert sum("WAL checkpoints work again" in x for x in lines) == 1, p.stderr


@pytest.mark.postgres
def test_a_scheduled_job_that_meets_the_database_away_is_one_log_line_and_the_next_tick_runs(pg, tmp_path, caplog):  # type: ignore[no-untyped-def]
    import queue
    from datetime import UTC, datetime

    from gateway import scheduler

    cluster, node = pg
    cfg = node_config(tmp_path, node.db.url, schedules={"prune": {"cron": "* * * * *"}})
    n = Node(cfg)
    try:
        sched = scheduler.Scheduler(n)
        q: queue.Queue[object] = queue.Queue()
        cluster.stop_server()
        q.put(datetime.now(UTC))
        q.put(scheduler._STOP)
        with caplog.at_level(logging.INFO):
            sched._runner("prune", q)  # the job's runner thread, run here: one tick, then stop
        assert not any(r.exc_info for r in caplog.records), "an outage is not a bug: no traceback"
        said = [r.getMessage() for r in caplog.records if r.name == "gateway.scheduler"]
        assert len(said) == 1 and "not run, the database is unavailable" in said[0], said
        cluster.start_again()
        q.put(datetime.now(UTC))
        q.put(scheduler._STOP)
        sched._runner("prune", q)
        assert [r.outcome for r in scheduler.last_runs(n, ["prune"]).values()] == ["ok"]
    finally:
        n.close()


def test_a_refusal_the_outage_keeps_out_of_the_audit_log_is_a_line_now_and_then_not_a_traceback(  # type: ignore[no-untyped-def]
        tmp_path, caplog, monkeypatch):
    """A POST refused for its content (audited as a refused change, gateway.api.auth.Refusals)
    while the database is away: the refusal is answered as always; that its audit entry could
    not be written is said as the outage's answers say it (one line now and then), not with a
    traceback for every refusal."""
    import contextlib

    import sqlalchemy.exc

    from gateway.api import problems

    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)
        assert api.get("/api/v1/documents").status_code == 200  # the key is known (cached) from here on

        @contextlib.contextmanager
        def away():  # type: ignore[no-untyped-def]
            raise sqlalchemy.exc.TimeoutError("QueuePool limit of size 10 overflow 10 reached")
            yield

        monkeypatch.setattr(node.db, "begin", away)
        monkeypatch.setattr(problems.OUTAGE_LOG, "_last", -float("inf"))  # no line of an earlier test counts
        caplog.clear()
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                r = api.post("/api/v1/documents", data=b"{", content_type="application/json")
                assert r.status_code == 400, r.get_data(as_text=True)
        assert not any(r.exc_info for r in caplog.records), "an outage is not a bug: no traceback"
        said = [r.getMessage() for r in caplog.records if "not audited" in r.getMessage()]
        assert len(said) == 1 and "database is unavailable" in said[0], said
    finally:
        monkeypatch.undo()
        node.close()


def test_only_a_database_that_is_away_or_full_is_an_outage() -> None:
    """psycopg's OperationalError also covers errors of the work itself: a statement timeout,
    a lock timeout, a deadlock, a value past a limit. Answered 503 "send it again", a request
    that fails the same way every time would be retried for ever, and its traceback (the bug
    it shows) never logged."""
    import psycopg
    import psycopg.errors as pe
    import sqlalchemy.exc

    from gateway.db import outage

    def wrapped(orig: Exception) -> Exception:
        return sqlalchemy.exc.OperationalError("SELECT 1", {}, orig)

    for away in (psycopg.OperationalError("connection failed: Connection refused"), pe.AdminShutdown("x"),
                 pe.CannotConnectNow("x"), pe.TooManyConnections("x"), pe.ConnectionFailure("x")):
        assert outage(wrapped(away)) == "away", away
    assert outage(wrapped(pe.DiskFull("x"))) == "full"
    for work in (pe.QueryCanceled("x"), pe.LockNotAvailable("x"), pe.DeadlockDetected("x"),
                 pe.ProgramLimitExceeded("x"), pe.UndefinedTable("x")):
        assert outage(wrapped(work)) is None, work


def test_a_postgresql_host_that_never_answers_fails_a_connection_instead_of_hanging(monkeypatch):
    """A database host that accepts TCP and then says nothing (a hung server, a half-open
    firewall): the engine gives up after its connect timeout, and the error is an outage (503
    to callers), where libpq alone would wait for ever and a gunicorn worker loading the app
    would be killed by its boot timeout again and again. A URL's own connect_timeout wins."""
    import socket

    import sqlalchemy.exc

    from gateway import db

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    monkeypatch.setattr(db, "CONNECT_TIMEOUT_S", 1)
    try:
        for url in (f"postgresql+psycopg://gw@127.0.0.1:{port}/gateway",
                    f"postgresql+psycopg://gw@127.0.0.1:{port}/gateway?connect_timeout=2"):
            engine = db.make_engine(url)
            outcome: list[BaseException] = []

            def connect(engine=engine, outcome=outcome) -> None:  # type: ignore[no-untyped-def]
                try:
                    engine.connect().close()
                except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
                    outcome.append(exc)

            t = threading.Thread(target=connect, daemon=True)
            t.start()
            t.join(60)  # a hang, not a speed: without a connect timeout this never ends
            assert not t.is_alive(), f"connecting to a silent server did not give up ({url})"
            assert len(outcome) == 1 and isinstance(outcome[0], sqlalchemy.exc.OperationalError), outcome
            assert db.outage(outcome[0]) == "away"
            engine.dispose()
    finally:
        silent.close()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # PostgreSQL only
def test_a_postgresql_that_takes_no_writes_answers_a_send_503_and_reads_still_work(api, database_url):  # type: ignore[no-untyped-def]
    """A primary demoted in a failover, or a database its administrator put read-only, refuses
    writes (SQLSTATE 25006): a document sent then is a 503 database-unavailable with
    Retry-After (send it again), not a 500; reads are answered; once writes are taken again
    the same request is stored once."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    name = url.database

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
            # the node's connections end (as in a failover), and its new ones take the setting
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    doc = api.document(title="只读数据库")
    read_only(True)
    try:
        for _ in range(3):  # the first may meet a connection the failover cut: the others are refused writes
            r = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "ro-1"})
            assert r.status_code == 503, r.get_data(as_text=True)[:500]
            assert r.get_json()["type"].endswith(":database-unavailable") and int(r.headers["Retry-After"]) >= 1
        assert api.get("/api/v1/documents").status_code == 200
    finally:
        read_only(False)
    r = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "ro-1"})
    assert r.status_code == 202, r.get_json()
    with api.node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 1
