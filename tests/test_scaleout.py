"""Scale-out on one PostgreSQL: two API instances (separate gunicorn processes, no worker)
and two delivery workers (separate ``gateway worker`` processes, each also running the
scheduler) share one database. 10,000 documents sent alternately to both API instances are
each delivered exactly once to the SOAP peer, both workers do a real share of the work, and
the ``receipts`` job scheduled every 2 s runs once per tick across the two instances.

PostgreSQL only: the point is ``FOR UPDATE SKIP LOCKED`` claims and the advisory lock of the
scheduler across processes (SQLite is one process's embedded default).
"""
from __future__ import annotations

import collections
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from psycopg import sql
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from adapters.base import remote_ref
from adapters.simulators.cluster import stop_process_group, to_toml
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from gateway.models import AuditEntry, Delivery, JobRun, OutboxEntry

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent
PREFECTURE = "11522300GDR9YB9550"
COUNTY_A = "1152230107CTPD8U2P"

N_DOCS = 10_000
CLIENT_THREADS = 8
WORKER_THREADS = 8
TICK_SECONDS = 2
SEND_TIMEOUT = 150.0      # all 10,000 accepted (2-core machine, everything else running too)
DELIVER_TIMEOUT = 150.0   # all 10,000 at the peer, counted from the first POST
MIN_SHARE = 0.10


class CountingState(DocExchangeState):
    """The peer's state, plus how many SendDocument calls each doc_id got (the state itself
    keeps one effect per doc_id and answers repeats with the same receipt)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.sends: collections.Counter[str] = collections.Counter()

    def send_document(self, fields: Any) -> str:
        with self._lock:
            self.sends[str(fields["doc_id"])] += 1
        return super().send_document(fields)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the session's cluster (as ``database_url`` makes one)."""
    name = f"gw_scale_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


class Procs:
    """The processes the test starts: each in its own session, stopped by its process group
    id; their output in ``<tmp>/<name>.log``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "ab") as log:
            p = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                                      **(env or {})})
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}")

    def stop(self, name: str) -> None:
        stop_process_group(self.procs[name], 30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception as exc:  # noqa: BLE001 - stop the others anyway
                print(f"stopping {name} failed: {exc}", file=sys.stderr)

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(f"----- {name}.log (last {chars} characters) -----\n{self.log(name)[-chars:]}"
                         for name in self.procs)


def _cli(cfg: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(cfg), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, f"gateway {' '.join(args)}: {r.stdout}{r.stderr}"
    return r.stdout


def _config(tmp: Path, db_url: str, peer_url: str, *, worker: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"id": "prefecture", "name": "州人民政府办公室", "units": [PREFECTURE],
                 "data_dir": str(tmp / "var")},  # one data dir (blob store) for every instance
        "database": {"url": db_url, "pool_size": 12},
        "worker": {"enabled": worker, "threads": WORKER_THREADS, "idle_sleep": 0.05, "lease_seconds": 300,
                   "poll_interval": 5.0, "retry": {"max_attempts": 20, "base_delay": 0.2, "max_delay": 2.0}},
        "adapters": {"docexchange": {"type": "soap", "wsdl": str(REPO / "schemas/legacy/docexchange.wsdl"),
                                     "address": peer_url, "timeout": 60, "pool_size": 16}},
        "routes": [{"units": [COUNTY_A], "adapter": "docexchange"}],
    }
    if worker:
        cfg["schedules"] = {"receipts": {"cron": f"*/{TICK_SECONDS} * * * * *", "timezone": "UTC"}}
    return cfg


def _wait(pred: Any, timeout: float, what: Any, procs: Procs, interval: float = 0.2) -> None:
    """Wait for ``pred()``; ``what`` (a string, or a function giving one at the time of failure)
    says what for."""
    deadline = time.monotonic() + timeout
    while not pred():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _send_all(urls: list[str], key: str, sha: str, procs: Procs) -> tuple[dict[str, int], list[str]]:
    """POST N_DOCS one-recipient documents from CLIENT_THREADS threads, document i to API
    instance i % 2. Returns {message id: instance index} and the failures."""
    accepted: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def client(t: int) -> None:
        s = requests.Session()
        s.trust_env = False
        try:
            for i in range(t, N_DOCS, CLIENT_THREADS):
                if failures:
                    return  # the test has failed: do not wait out every request's timeout
                inst = i % len(urls)
                doc: dict[str, Any] = {
                    "sender_unit": PREFECTURE, "issuer": "州人民政府办公室", "doc_type": "通知",
                    "doc_number": f"州政办发〔2026〕{i + 1}号", "title": f"扩展测试 {i + 1}",
                    "written_date": "2026年11月26日", "recipients": [{"unit": COUNTY_A}],
                    "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}}
                for attempt in range(3):  # a connection reset is the client's problem, not a loss
                    try:
                        # the Idempotency-Key makes a retry after a lost answer safe
                        r = s.post(f"{urls[inst]}/api/v1/documents", json=doc, timeout=60,
                                   headers={**headers, "Idempotency-Key": f"scaleout-{i}"})
                        break
                    except requests.ConnectionError as exc:
                        if attempt == 2:
                            with lock:
                                failures.append(f"#{i}: {exc}")
                            r = None
                if r is None:
                    continue
                with lock:
                    if r.status_code == 202:
                        accepted[r.json()["id"]] = inst
                    else:
                        failures.append(f"#{i} -> {r.status_code} {r.text[:200]}")
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(CLIENT_THREADS)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + SEND_TIMEOUT
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
        if th.is_alive():
            procs.check_alive()
            raise AssertionError(f"sending {N_DOCS} documents took more than {SEND_TIMEOUT:g} s "
                                 f"({len(accepted)} accepted so far)")
    return accepted, failures


def test_two_workers_and_two_api_instances_deliver_10000_messages_exactly_once_and_run_each_tick_once(
        tmp_path: Path, pg_database: str) -> None:
    state = CountingState()
    peer = SoapServiceServer(state).start()
    procs = Procs(tmp_path)
    engine = create_engine(pg_database)
    try:
        worker_cfg = tmp_path / "worker.toml"
        api_cfg = tmp_path / "api.toml"
        worker_cfg.write_text(to_toml(_config(tmp_path, pg_database, peer.url, worker=True)), encoding="utf-8")
        api_cfg.write_text(to_toml(_config(tmp_path, pg_database, peer.url, worker=False)), encoding="utf-8")
        _cli(worker_cfg, "db", "upgrade")
        key = _cli(api_cfg, "keys", "create", "--name", "扩展测试", "--scope", "*",
                   "--clearance", "绝密").strip().splitlines()[-1]

        # two API instances: gunicorn with the production settings file; gunicorn never starts a
        # worker (only 'gateway serve' does), and their configuration says [worker] enabled = false
        urls = []
        for i in range(2):
            port = _free_port()
            urls.append(f"http://127.0.0.1:{port}")
            procs.start(f"api{i}", [sys.executable, "-m", "gunicorn", "-c", str(REPO / "config/gunicorn.conf.py"),
                                    "gateway.app:create_app()"],
                        env={"GATEWAY_CONFIG": str(api_cfg), "GATEWAY_BIND": f"127.0.0.1:{port}",
                             "GATEWAY_WORKERS": "1", "GATEWAY_THREADS": "8"})
        # two delivery workers (each with the scheduler: [schedules.receipts] is in their config)
        workers = [procs.start(f"worker{i}", [sys.executable, "-m", "gateway.cli", "-c", str(worker_cfg), "worker"])
                   for i in range(2)]
        _wait(lambda: all(_healthy(u) for u in urls), 90, "both API instances", procs)
        _wait(lambda: all("running" in procs.log(f"worker{i}") for i in range(2)), 90, "both workers", procs)
        sched_from = datetime.now(UTC)  # both schedulers are ticking from here on

        r = requests.post(f"{urls[0]}/api/v1/blobs", data="扩展测试 正文\n".encode() * 100, timeout=30,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        sha = r.json()["sha256"]

        t0 = time.monotonic()
        accepted, failures = _send_all(urls, key, sha, procs)
        t_sent = time.monotonic() - t0
        assert not failures, f"{len(failures)} documents not accepted, e.g. {failures[:3]}"
        assert len(accepted) == N_DOCS
        assert collections.Counter(accepted.values()) == {0: N_DOCS // 2, 1: N_DOCS // 2}

        _wait(lambda: state.documents >= N_DOCS, max(10.0, DELIVER_TIMEOUT - (time.monotonic() - t0)),
              lambda: f"{N_DOCS} documents at the peer (have {state.documents})", procs, interval=0.5)
        t_delivered = time.monotonic() - t0

        # the workers record outcomes in batches just after the peer answered: wait for the rows
        def outbox_open() -> int:
            with engine.connect() as c:
                return c.scalar(select(func.count()).select_from(OutboxEntry)
                                .where(OutboxEntry.state.in_(("pending", "claimed")))) or 0

        _wait(lambda: outbox_open() == 0, 60, "the outbox to drain", procs, interval=0.5)
        # let a few more ticks pass while both schedulers are running, then stop the workers
        time.sleep(TICK_SECONDS * 2 + 0.5)
        sched_to = datetime.now(UTC)
        for i in range(2):
            procs.stop(f"worker{i}")

        # -- exactly once at the peer ------------------------------------------------------
        want = {remote_ref(mid, COUNTY_A) for mid in accepted}
        got = {d.doc_id for d in state.all_documents()}
        assert got == want, f"{len(want - got)} accepted but not at the peer, {len(got - want)} unknown there"
        assert state.documents == N_DOCS
        with engine.connect() as c:
            # a second SendDocument for a doc_id is only legitimate after a failed attempt was
            # recorded for it (a retry); two workers claiming the same row would show up here
            retried = {obj for (obj,) in c.execute(select(AuditEntry.object).where(
                AuditEntry.action == "delivery.attempt", AuditEntry.outcome != "delivered"))}
        ref_of = {remote_ref(mid, COUNTY_A): f"delivery:{mid}/{COUNTY_A}" for mid in accepted}
        twice = {ref: n for ref, n in state.sends.items() if n > 1}
        unexplained = {ref: n for ref, n in twice.items() if ref_of.get(ref) not in retried}
        assert not unexplained, f"{len(unexplained)} documents were sent more than once without a recorded " \
                                f"retry (a row claimed twice?), e.g. {list(unexplained.items())[:3]}"

        # -- the database agrees -----------------------------------------------------------
        with engine.connect() as c:
            statuses = dict(c.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all())
            outbox = {(k, st): n for k, st, n in c.execute(select(OutboxEntry.kind, OutboxEntry.state, func.count())
                                                         .group_by(OutboxEntry.kind, OutboxEntry.state)).all()}
            by_actor = dict(c.execute(select(AuditEntry.actor, func.count()).where(
                AuditEntry.action == "delivery.attempt", AuditEntry.outcome == "delivered")
                .group_by(AuditEntry.actor)).all())
            delivered_objs = c.scalar(select(func.count(func.distinct(AuditEntry.object))).where(
                AuditEntry.action == "delivery.attempt", AuditEntry.outcome == "delivered"))
            runs = c.execute(select(JobRun.tick, JobRun.instance, JobRun.outcome, JobRun.started_at,
                                    JobRun.finished_at).where(JobRun.job == "receipts", JobRun.trigger == "schedule")
                             .order_by(JobRun.tick)).all()
        assert statuses == {"delivered": N_DOCS}, statuses
        assert outbox == {("deliver", "done"): N_DOCS}, outbox  # nothing pending, claimed or dead
        assert sum(by_actor.values()) == N_DOCS and delivered_objs == N_DOCS, (by_actor, delivered_objs)

        # -- both workers did a real share ---------------------------------------------------
        pids = {str(w.pid) for w in workers}
        shares = {actor: n / N_DOCS for actor, n in by_actor.items()}
        assert len(by_actor) == 2, f"deliveries by {by_actor}"
        assert {a.split(":")[2] for a in by_actor} == pids, (by_actor, pids)  # worker:<host>:<pid>:<hex>
        assert min(shares.values()) >= MIN_SHARE, f"one worker did almost nothing: {shares}"

        # -- one run of the scheduled job per tick, across both instances ---------------------
        ticks = [r.tick for r in runs]
        assert len(ticks) == len(set(ticks))  # the UNIQUE (job, tick) constraint, checked anyway
        instances = collections.Counter(r.instance for r in runs)
        assert {i.split(":")[1] for i in instances} <= pids, instances  # <host>:<pid>
        # Every tick of the window had a run, unless the previous run was still going on then
        # (a run holds the job's lock; a tick that finds it held past the next tick is skipped).
        first = sched_from.replace(microsecond=0) + timedelta(seconds=TICK_SECONDS)
        first += timedelta(seconds=(-first.second) % TICK_SECONDS)
        expected = []
        t = first
        while t <= sched_to - timedelta(seconds=TICK_SECONDS):
            expected.append(t)
            t += timedelta(seconds=TICK_SECONDS)
        have = set(ticks)
        missing = [t for t in expected if t not in have and not any(
            r.tick < t and (r.finished_at is None or r.finished_at > t) for r in runs)]
        assert len(expected) >= 10, f"the run was too short to judge the scheduler ({len(expected)} ticks)"
        assert not missing, f"{len(missing)} of {len(expected)} ticks had no run: {[m.isoformat() for m in missing[:5]]}"
        assert all(r.outcome == "ok" for r in runs), collections.Counter(r.outcome for r in runs)
        # both instances ran the scheduler the whole time: each won some ticks
        assert len(instances) == 2, f"every tick was run by one instance: {instances}"

        print(f"\nscale-out: {N_DOCS} accepted in {t_sent:.1f} s ({N_DOCS / t_sent:.0f}/s over 2 API "
              f"instances), all at the peer {t_delivered:.1f} s after the first POST; deliveries by worker "
              f"{sorted(by_actor.values())}; SendDocument calls {sum(state.sends.values())} "
              f"({len(twice)} doc_ids twice, each after a recorded retry); {len(ticks)} receipts runs "
              f"({len(expected)} ticks in the window), by instance {sorted(instances.values())}")
    except BaseException:
        print(procs.tails(), file=sys.stderr)
        raise
    finally:
        procs.stop_all()
        engine.dispose()
        peer.close()
