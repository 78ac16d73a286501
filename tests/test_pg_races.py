"""Races between processes that share one PostgreSQL: a worker recording an outcome while a
receipt (回执) or a peer's status report is being applied, a worker stopped past its lease, a
delivery that outlives its lease, recalls (撤回) racing a sign-for (签收) or each other, an
operator's retry racing a sign-for, two instances polling one legacy system, one document
sent to two instances at once, a scheduled job's lock holder stopped or killed, and two
workers sharing a queue.

Each race is made deterministic, not left to luck: the test process holds the contended
rows (or the audit chain's lock) in an open transaction, starts the other party in a
process of its own (``python -m tests.test_pg_races ROLE ...``), waits until that process's
backend waits for a lock (``pg_stat_activity``), and only then commits; or it stops the
other process (SIGSTOP) at a known point and lets it go on (SIGCONT) when the test is ready.
"""
from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
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
from psycopg import sql
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url

from adapters.base import PermanentError, RetryableError, remote_ref
from adapters.simulators.exchange_box import FolderClerk
from adapters.simulators.sftp_server import LegacySftpClerk
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from gateway import audit, deadletter, inbound, migrate, pipeline, prune, scheduler
from gateway import config as config_mod
from gateway.envelope import Receipt
from gateway.inbound import apply_receipt
from gateway.models import AuditEntry, Delivery, IngestedItem, JobRun, Message, OutboxEntry, ReceiptRecord
from gateway.node import Node
from gateway.federation.transfer import apply_status
from gateway.worker import Outcome, Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, COUNTY_C, PREFECTURE, Api, RecordingAdapter, node_config

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parent.parent


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg_node(tmp_path: Path, postgres_url: str) -> Iterator[Node]:
    """A node on a fresh PostgreSQL database of its own."""
    name = f"gw_race_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    RecordingAdapter.instances.clear()
    cfg = node_config(tmp_path, url)
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    try:
        yield n
    finally:
        n.close()
        with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _soap_config(tmp: Path, url: str, soap_url: str) -> config_mod.Config:
    """COUNTY_A behind the simulated SOAP document service (the receipts are pulled from it)."""
    return node_config(tmp, url, adapters={"docexchange": {
        "type": "soap", "wsdl": str(REPO / "schemas/legacy/docexchange.wsdl"), "address": soap_url, "timeout": 30}},
        routes=[{"units": [COUNTY_A], "adapter": "docexchange"}])


#: a county node this node forwards CITY_B's and COUNTY_C's copies to (never reached here)
PEER = {"county": {"url": "http://127.0.0.1:9", "public_key": "ed25519:0/bdvI4sRy9xjQDCYbSRMbuX+550TV1uBZaUD9p7t80=",
                   "units": [COUNTY_C, CITY_B]}}


def _peer_config(tmp: Path, url: str) -> config_mod.Config:
    return node_config(tmp, url, peers=PEER, routes=[{"units": [COUNTY_A], "adapter": "rec"}])


def _sftp_config(tmp: Path, url: str, adapter: dict) -> config_mod.Config:
    """CITY_B's legacy system behind a file drop (SFTP or the exchange box's folder), adapter
    ``countydrop``; its duty reports (值班信息) go to PREFECTURE."""
    return node_config(tmp, url, adapters={"countydrop": adapter},
                       routes=[{"units": [CITY_B], "adapter": "countydrop"}, {"units": [PREFECTURE], "adapter": "rec"}])


def _start(node: Node, role: str, *args: str) -> subprocess.Popen[str]:
    """The other party: this module run as a script, on the node's database."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.test_pg_races", role, str(node.data_dir.parent), node.config.database_url(),
         *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_until_blocked(node: Node, *procs: subprocess.Popen[str], timeout: float = 60.0) -> None:
    """Until a backend of the node's database per process in ``procs`` waits for a lock."""
    url = _libpq(node.config.database_url())
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()").fetchone()[0] < len(procs):
            for proc in procs:
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    raise AssertionError(f"another process ended before it waited for a lock:\n{out}{err}")
            assert time.monotonic() < deadline, "the other processes never waited for a lock"
            time.sleep(0.02)


def _finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{out}{err}"
    return json.loads(out.strip().splitlines()[-1])


def _status(node: Node, mid: str) -> str:
    with node.db.sessions() as s:
        return s.scalar(select(Delivery.status).where(Delivery.message_id == mid, Delivery.unit == COUNTY_A)) or ""


def _recall_rows(node: Node, mid: str) -> int:
    with node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(OutboxEntry).join(
            Delivery, Delivery.id == OutboxEntry.delivery_id).where(
            OutboxEntry.kind == "recall", Delivery.message_id == mid)) or 0


def _signed(mid: str) -> Receipt:
    return Receipt(unit=COUNTY_A, action="SIGNED", remote_ref=remote_ref(mid, COUNTY_A), signer="李四",
                   receipt_no="QS-001")


def test_a_dead_letter_recorded_while_a_sign_for_is_applied_leaves_the_copy_signed(pg_node):
    """The legacy system got the document and signs for it while the worker, whose last
    attempt failed, dead-letters the row: the copy stays 签收 (signed), never goes back to
    failed."""
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    with pg_node.db.begin() as s:
        assert apply_receipt(s, _signed(mid), "rec") == "signed"
        s.flush()  # the copy's row and the audit chain are held until the commit
        worker = _start(pg_node, "dead-letter")
        _wait_until_blocked(pg_node, worker)
    assert _finish(worker) == {"jobs": 1}
    assert _status(pg_node, mid) == "signed"
    with pg_node.db.sessions() as s:
        assert s.scalar(select(OutboxEntry.state).where(OutboxEntry.kind == "deliver")) == "dead"


def test_a_recall_racing_a_sign_for_is_refused_once_the_copy_is_signed(pg_node):
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    Worker(pg_node).drain()
    assert _status(pg_node, mid) == "delivered"
    with pg_node.db.begin() as s:
        assert apply_receipt(s, _signed(mid), "rec") == "signed"
        s.flush()
        other = _start(pg_node, "recall", api.key, mid)
        _wait_until_blocked(pg_node, other)
    answer = _finish(other)
    assert answer["status"] == 409 and answer["type"].endswith(":conflict"), answer
    assert _recall_rows(pg_node, mid) == 0  # nothing asks the legacy system to recall a signed copy
    assert _status(pg_node, mid) == "signed"


def test_two_recalls_at_once_withdraw_a_waiting_copy_once(pg_node):
    """The first recall withdraws the copy still waiting in the outbox; the second, which
    waited for it, finds nothing left to recall (409) and asks the legacy system for nothing."""
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    with pg_node.db.begin() as s:
        assert pipeline.recall(s, mid, recallable=pipeline.recallable(pg_node)).acted == 1
        s.flush()
        other = _start(pg_node, "recall", api.key, mid)
        _wait_until_blocked(pg_node, other)
    answer = _finish(other)
    assert answer["status"] == 409 and answer["type"].endswith(":conflict"), answer
    assert _recall_rows(pg_node, mid) == 0
    assert _status(pg_node, mid) == "recalled"


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.parametrize("late", ["delivered", "refused"])
def test_a_worker_paused_past_its_lease_cannot_overwrite_the_outcome_of_the_one_that_took_over(pg_node, late):
    """Worker A is stopped (SIGSTOP) inside the adapter call until its lease has run out;
    worker B takes the row over and delivers it, and the copy is signed for; then A goes on
    and records its own outcome, a success or a refusal. Nothing of A's is recorded."""
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    paused = _start(pg_node, "pause-in-adapter", late)
    deadline = time.monotonic() + 60
    while not _stopped(paused.pid):
        assert paused.poll() is None and time.monotonic() < deadline, paused.communicate()
        time.sleep(0.02)
    try:
        with pg_node.db.sessions() as s:
            lease = s.scalar(select(OutboxEntry.lease_until))
        time.sleep(max(0.0, (lease - datetime.now(UTC)).total_seconds()) + 0.05)
        b = Worker(pg_node, worker_id="worker-b")
        assert b.reap_expired_leases() == 1
        assert b.run_once() == 1
        with pg_node.db.begin() as s:
            assert apply_receipt(s, _signed(mid), "rec") == "signed"
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert _finish(paused) == {"jobs": 1}
    assert _status(pg_node, mid) == "signed"
    with pg_node.db.sessions() as s:
        row = s.execute(select(OutboxEntry.state, OutboxEntry.attempts, OutboxEntry.claimed_by)).one()
        attempts = s.execute(select(AuditEntry.actor, AuditEntry.outcome)
                             .where(AuditEntry.action == "delivery.attempt")).all()
    assert tuple(row) == ("done", 1, "worker-b")
    assert [tuple(a) for a in attempts] == [("worker:worker-b", "delivered")]


def test_an_attempt_that_outlives_its_lease_keeps_its_row_until_its_outcome_is_recorded(pg_node):
    """One worker's adapter call takes three leases: its dispatcher renews the row's lease
    meanwhile, so no reaper (its own or another worker's) takes the row back and nobody
    claims it a second time. The late failure is recorded as a retry; the next attempt
    delivers the document, once."""
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    out = _finish(_start(pg_node, "outlive-lease"))
    assert out["calls"] == 2 and out["reaped"] == 0 and out["claims"] == 2 and out["rows"] == 1, out
    assert out["delivered"] == 1, out  # the legacy system has the document (once)
    assert _status(pg_node, mid) == "delivered", out
    with pg_node.db.sessions() as s:
        assert s.scalar(select(OutboxEntry.state)) == "done"


def test_two_instances_polling_the_same_soap_receipts_apply_each_once_and_both_finish(tmp_path, pg_node):
    """Two instances poll the legacy system's receipts at the same moment (the fixed-interval
    collector runs in every instance; only [schedules.receipts] runs it once): both get the
    same receipts, each receipt is applied once, and the instance that finds a receipt taken
    by the other goes on with the rest of its poll instead of failing it."""
    soap = SoapServiceServer(DocExchangeState()).start()
    try:
        node = Node(_soap_config(tmp_path, pg_node.config.database_url(), soap.url))
        try:
            api = Api(node)
            mids = [api.post("/api/v1/documents", json=api.document()).get_json()["id"] for _ in range(2)]
            Worker(node).drain()
            for mid in mids:
                soap.state.sign(remote_ref(mid, COUNTY_A), "李四")
            with psycopg.connect(_libpq(node.config.database_url()), autocommit=True) as chain:
                chain.execute("SELECT pg_advisory_lock(%s)", (audit._LOCK_ID,))  # every ingest waits here
                pollers = [_start(node, "collect", soap.url) for _ in range(2)]
                _wait_until_blocked(node, *pollers)
                chain.execute("SELECT pg_advisory_unlock(%s)", (audit._LOCK_ID,))
            counts = [_finish(p) for p in pollers]
            assert sorted(c.get("signed", 0) for c in counts) in ([0, 2], [1, 1]), counts
            assert all(sum(c.values()) == 2 and "error" not in c for c in counts), counts
            with node.db.sessions() as s:
                assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == 2
                assert set(s.scalars(select(Delivery.status))) == {"signed"}
                assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                    AuditEntry.action == "receipt.accept")) == 2
        finally:
            node.close()
    finally:
        soap.close()


@pytest.mark.parametrize("same", ["idempotency-key", "message-id"])
def test_one_document_sent_to_two_instances_at_the_same_instant_is_stored_once(tmp_path, pg_node, same):
    """Two API instances get the same document at once, with the same Idempotency-Key or the
    same message id; both get past their "already stored?" reads before either commits (the
    chain's lock is held until both wait for it). One message is stored, and both answer 202
    with its id."""
    api = Api(pg_node)
    doc = api.document()
    headers = {"Authorization": f"Bearer {api.key}"}
    if same == "idempotency-key":
        headers["Idempotency-Key"] = "race-1"
    else:
        doc["message_id"] = str(uuid.uuid4())
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"doc": doc, "headers": headers}, ensure_ascii=False), encoding="utf-8")
    with psycopg.connect(_libpq(pg_node.config.database_url()), autocommit=True) as chain:
        chain.execute("SELECT pg_advisory_lock(%s)", (audit._LOCK_ID,))
        senders = [_start(pg_node, "post", str(request)) for _ in range(2)]
        _wait_until_blocked(pg_node, *senders)
        chain.execute("SELECT pg_advisory_unlock(%s)", (audit._LOCK_ID,))
    answers = [_finish(p) for p in senders]
    assert [a["status"] for a in answers] == [202, 202], answers
    assert answers[0]["id"] == answers[1]["id"], answers
    with pg_node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 1
        assert s.scalar(select(func.count()).select_from(OutboxEntry)) == 1
        assert s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "message.accept")) == 1


def _stop_self(_node: Node) -> dict:
    os.kill(os.getpid(), signal.SIGSTOP)  # the test decides: go on, or be killed
    return {}


@pytest.mark.parametrize("then", ["resumed", "killed"])
def test_a_stopped_job_run_keeps_its_lock_and_a_killed_one_hands_the_job_over(pg_node, then):
    """An instance running a scheduled job is stopped (SIGSTOP) inside it: the others skip the
    job (its advisory lock is still held by the stopped one's session) and its tick. Resumed,
    it finishes its run; killed, its session ends, the lock goes with it, and the next tick
    runs on another instance, which marks the killed run abandoned."""
    scheduler.register("race-probe", _stop_self)
    try:
        tick = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
        holder = _start(pg_node, "job", tick.isoformat())
        deadline = time.monotonic() + 60
        while not _stopped(holder.pid):
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.02)
        try:
            later = tick + timedelta(minutes=1)
            assert scheduler.run_job(pg_node, "race-probe", trigger="schedule", tick=tick).detail == {"reason": "taken"}
            assert scheduler.run_job(pg_node, "race-probe", trigger="schedule", tick=later).detail == {"reason": "busy"}
        finally:
            os.kill(holder.pid, signal.SIGCONT if then == "resumed" else signal.SIGKILL)
        if then == "resumed":
            assert _finish(holder) == {"outcome": "ok"}
        else:
            holder.communicate(timeout=60)
            scheduler.unregister("race-probe")
            scheduler.register("race-probe", lambda _node: {})
            deadline = time.monotonic() + 10  # the server notices the dead session at once (its socket closed)
            while (run := scheduler.run_job(pg_node, "race-probe", trigger="schedule",
                                            tick=later)).outcome == "skipped":
                assert time.monotonic() < deadline, run
                time.sleep(0.05)
            assert run.outcome == "ok"
        with pg_node.db.sessions() as s:
            runs = {r.tick: (r.outcome, r.detail.get("error")) for r in s.scalars(select(JobRun))}
        assert runs == ({tick: ("ok", None)} if then == "resumed" else
                        {tick: ("failed", "Abandoned"), tick + timedelta(minutes=1): ("ok", None)})
    finally:
        scheduler.unregister("race-probe")


@pytest.mark.parametrize("refused", [0.0, 0.33])
def test_two_worker_processes_share_the_queue_without_claiming_a_row_twice(tmp_path, pg_node, refused):
    """Two worker processes (FOR UPDATE SKIP LOCKED) drain 160 rows, a quarter of them 特急,
    the legacy system refusing a share of the attempts for a while (retries with backoff).
    Every row ends delivered; each adapter call is one recorded attempt (a row run by two
    workers at once would show a call without one)."""
    api = Api(pg_node)
    sha = api.upload("正文".encode())
    docs = {}
    for i in range(160):
        doc = api.document(urgency="特急" if i % 4 == 0 else "平件", title=f"并发 {i}",
                           body={"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"})
        docs[api.post("/api/v1/documents", json=doc).get_json()["id"]] = doc["urgency"]
    go = tmp_path / "go"
    workers = [_start(pg_node, "drain", str(refused), str(go)) for _ in range(2)]
    for w in workers:  # both started, then both let go at once
        assert w.stdout is not None and w.stdout.readline().strip() == "ready", _finish(w)
    go.touch()
    outs = [_finish(w) for w in workers]
    calls = collections.Counter(ref for o in outs for ref, _ in o["calls"])
    delivered = collections.Counter(ref for o in outs for ref, ok in o["calls"] if ok)
    refs = {remote_ref(mid, COUNTY_A): mid for mid in docs}
    assert set(delivered) == set(refs) and set(delivered.values()) == {1}
    assert all(o["calls"] for o in outs), "one worker did nothing"
    with pg_node.db.sessions() as s:
        rows = s.execute(select(Delivery.remote_ref, OutboxEntry.state, OutboxEntry.attempts)
                         .join(OutboxEntry, OutboxEntry.delivery_id == Delivery.id)).all()
        audited = collections.Counter(obj for (obj,) in s.execute(
            select(AuditEntry.object).where(AuditEntry.action == "delivery.attempt")))
        order = [obj for (obj,) in s.execute(select(AuditEntry.object).where(
            AuditEntry.action == "delivery.attempt", AuditEntry.outcome == "delivered").order_by(AuditEntry.seq))]
    assert {r.state for r in rows} == {"done"}
    assert {r.remote_ref: r.attempts for r in rows} == dict(calls)
    assert {refs[ref]: n for ref, n in calls.items()} == {o.split("/")[0].split(":", 1)[1]: n
                                                            for o, n in audited.items()}
    urgent = [i for i, o in enumerate(order) if docs[o.split("/")[0].split(":", 1)[1]] == "特急"]
    print(f"\nlast urgent delivery: {urgent[-1] + 1} of {len(order)}; calls {sum(calls.values())}; "
          f"by worker {[len(o['calls']) for o in outs]}")


def test_a_forward_dead_lettered_while_the_next_node_reports_a_copy_leaves_that_copy_as_reported(tmp_path, pg_node):
    """A forward to the next node (two units behind it) is dead-lettered while that node's
    status report for the second unit (已送达) is being applied: the other copies fail with
    the forward, the reported one keeps its status."""
    node = Node(_peer_config(tmp_path, pg_node.config.database_url()))
    try:
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_C, CITY_B))).get_json()["id"]
        with node.db.begin() as s:
            assert apply_status(s, "county", {"message_id": mid, "unit": CITY_B, "status": "delivered"}) != "unmatched"
            s.flush()
            worker = _start(node, "forward-dead-letter")
            _wait_until_blocked(node, worker)
        assert _finish(worker) == {"jobs": 1}
        with node.db.sessions() as s:
            got = dict(s.execute(select(Delivery.unit, Delivery.status).where(Delivery.message_id == mid)).all())
        assert got == {COUNTY_C: "failed", CITY_B: "delivered"}
    finally:
        node.close()


def test_an_operator_retry_racing_a_late_sign_for_leaves_the_copy_signed(pg_node):
    """`gateway outbox retry` of a dead row while a late 签收 for its copy is being applied:
    the retry waits for the copy, finds it signed, and leaves the row dead."""
    api = Api(pg_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    pg_node.adapter("rec").failures.append(PermanentError("对方系统拒收 (refused)"))  # type: ignore[attr-defined]
    Worker(pg_node).drain()
    assert _status(pg_node, mid) == "failed"
    with pg_node.db.begin() as s:
        assert apply_receipt(s, _signed(mid), "rec") == "signed"
        s.flush()
        operator = _start(pg_node, "retry")
        _wait_until_blocked(pg_node, operator)
    answer = _finish(operator)
    assert "is now signed" in answer["refused"], answer
    assert _status(pg_node, mid) == "signed"
    with pg_node.db.sessions() as s:
        assert s.scalar(select(OutboxEntry.state)) == "dead"


def test_two_instances_polling_the_same_sftp_outbox_take_a_duty_report_in_once(tmp_path, pg_node, openssh_server):
    """Two instances poll the same SFTP outbound folder (real OpenSSH) at the same moment and
    both read the same duty report (ZB_ file): one message is accepted, the other instance
    counts a duplicate, and the file is moved to archive/ once."""
    sub = f"drop-{uuid.uuid4().hex[:8]}"
    adapter = openssh_server.adapter_config(sub, units=[CITY_B], duty_report_to=PREFECTURE)
    outbox = openssh_server.data_root / sub / CITY_B / "outbox"
    outbox.mkdir(parents=True)
    data = (REPO / "tests/data/ZB_1152230107CTPD8U2P_20261126145210.xml").read_bytes()
    name = f"ZB_{CITY_B}_20261126145210.xml"
    (outbox / name).write_bytes(data.replace(b"1152230107CTPD8U2P", CITY_B.encode()))
    (outbox / f"{name}.ok").write_bytes(b"")
    settings = tmp_path / "adapter.json"
    settings.write_text(json.dumps(adapter), encoding="utf-8")
    try:
        with psycopg.connect(_libpq(pg_node.config.database_url()), autocommit=True) as chain:
            chain.execute("SELECT pg_advisory_lock(%s)", (audit._LOCK_ID,))  # every accept waits here
            pollers = [_start(pg_node, "collect-sftp", str(settings)) for _ in range(2)]
            _wait_until_blocked(pg_node, *pollers)
            chain.execute("SELECT pg_advisory_unlock(%s)", (audit._LOCK_ID,))
        counts = sorted((_finish(p) for p in pollers), key=lambda c: sorted(c))
        assert counts == [{"accepted": 1}, {"duplicate": 1}], counts
        with pg_node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(Message).where(Message.subsystem == "duty")) == 1
        assert [p.name for p in (openssh_server.data_root / sub / CITY_B / "archive").glob("ZB_*.xml")] == [name]
        assert not (outbox / name).exists()
    finally:
        shutil.rmtree(openssh_server.data_root / sub, ignore_errors=True)


def test_two_instances_refusing_the_same_receipt_at_once_both_finish_their_round(tmp_path, pg_node):
    """Two instances poll the exchange box's folder at the same moment and both read a receipt
    for a document this node never sent: both refuse it and both get past their "recorded
    already?" read before either commits (the chain's lock is held until both wait for it).
    One records and audits the refusal; the other finds it recorded and goes on with its
    round instead of failing it on the unique violation."""
    box = tmp_path / "box"
    adapter = {"type": "xml-exchange", "mode": "folder", "folder": str(box)}
    clerk = FolderClerk(box)
    settings = tmp_path / "adapter.json"
    settings.write_text(json.dumps(adapter), encoding="utf-8")
    node = Node(_sftp_config(tmp_path, pg_node.config.database_url(), adapter))
    try:
        node.adapter("countydrop")  # the folders exist before the clerk writes
        clerk.write_receipt(remote_ref("never-sent-0001", CITY_B), CITY_B, "ARRIVED")
        with psycopg.connect(_libpq(node.config.database_url()), autocommit=True) as chain:
            chain.execute("SELECT pg_advisory_lock(%s)", (audit._LOCK_ID,))  # every refusal waits here
            pollers = [_start(node, "collect-sftp", str(settings)) for _ in range(2)]
            _wait_until_blocked(node, *pollers)
            chain.execute("SELECT pg_advisory_unlock(%s)", (audit._LOCK_ID,))
        counts = [_finish(p) for p in pollers]
        assert counts == [{"rejected": 1}, {"rejected": 1}], counts
        with node.db.sessions() as s:
            assert s.scalar(select(func.count()).select_from(AuditEntry).where(
                AuditEntry.action == "inbound.reject")) == 1
        assert len(list((box / "failed").glob("HZ_*.xml"))) == 1
    finally:
        node.close()


@pytest.mark.parametrize("drop", ["sftp", "exchange-box"])
def test_a_receipt_written_under_a_name_another_instance_just_collected_is_not_acknowledged_unread(
        request, tmp_path, pg_node, drop):
    """Instance B has read the ARRIVED receipt HZ_<ref>_<unit>.xml and is stopped (SIGSTOP)
    before it takes it in; instance A takes it in and moves it to archive/; the legacy system,
    whose receipt was collected, writes its SIGNED receipt under the same name. B goes on: it
    finds its receipt taken in already and acknowledges it, which must not move the new file
    away unread. The next poll takes the SIGNED receipt in: the copy is signed for."""
    if drop == "sftp":
        server = request.getfixturevalue("openssh_server")
        sub = f"drop-{uuid.uuid4().hex[:8]}"
        adapter = server.adapter_config(sub, units=[CITY_B])
        clerk = LegacySftpClerk(server.data_root / sub, units=[CITY_B]).clerk(CITY_B)
    else:
        adapter = {"type": "xml-exchange", "mode": "folder", "folder": str(tmp_path / "box")}
        clerk = FolderClerk(tmp_path / "box")
    settings = tmp_path / "adapter.json"
    settings.write_text(json.dumps(adapter), encoding="utf-8")
    node = Node(_sftp_config(tmp_path, pg_node.config.database_url(), adapter))
    try:
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,))).get_json()["id"]
        Worker(node).drain()
        ref = remote_ref(mid, CITY_B)
        assert [t.archive_id for t in clerk.take()] == [ref]
        clerk.write_receipt(ref, CITY_B, "ARRIVED")
        b = _start(node, "collect-paused", str(settings))
        deadline = time.monotonic() + 60
        while not _stopped(b.pid):
            assert b.poll() is None and time.monotonic() < deadline, b.communicate()
            time.sleep(0.02)
        try:
            assert inbound.collect(node, "countydrop") == {"recorded": 1}  # instance A
            clerk.sign(ref, CITY_B, signer="周某")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        assert _finish(b) == {"duplicate": 1}
        assert inbound.collect(node, "countydrop") == {"signed": 1}
        with node.db.sessions() as s:
            assert s.scalar(select(Delivery.status).where(Delivery.message_id == mid)) == "signed"
    finally:
        node.close()
        if drop == "sftp":
            shutil.rmtree(server.data_root / sub, ignore_errors=True)


# -- the other process -------------------------------------------------------------------------
#: the other process's [worker] settings, by role (short leases where leases run out)
_WORKER = {"drain": {"threads": 2, "retry": {"max_attempts": 20, "base_delay": 0.01, "max_delay": 0.05}},
           "pause-in-adapter": {"lease_seconds": 0.5}, "outlive-lease": {"lease_seconds": 1.0, "threads": 2}}


def test_a_legacy_key_seen_again_while_prune_removes_it_is_kept(pg_node):
    """An item not seen at its source for keep_ingested_days comes back (the source was out of
    reach) just as ``prune`` removes its key: the collection run refreshes the key and holds its
    row; prune, which picked the key while it was old, waits, then finds it seen again and
    keeps it. (Forgotten, the item would be taken a second time at the next run.)"""
    key = "rec:HZ_back.xml:1"
    with pg_node.db.begin() as s:
        s.add(IngestedItem(key=key, adapter="rec", outcome="ok", at=datetime.now(UTC) - timedelta(days=100)))
    result: dict[str, Any] = {}
    pruning = threading.Thread(target=lambda: result.update(prune.run(pg_node)))
    with pg_node.db.begin() as s:
        s.execute(update(IngestedItem).where(IngestedItem.key == key).values(at=datetime.now(UTC)))  # seen again
        pruning.start()
        url = _libpq(pg_node.config.database_url())
        deadline = time.monotonic() + 60
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'").fetchone()[0] < 1:
                assert pruning.is_alive() and time.monotonic() < deadline, "prune never waited for the row"
                time.sleep(0.02)
    pruning.join(60)
    assert result["ingested_removed"] == 0
    with pg_node.db.sessions() as s:
        assert s.get(IngestedItem, key) is not None


def _other(role: str, tmp: str, url: str, *args: str) -> dict:
    if role == "collect":
        node = Node(_soap_config(Path(tmp), url, args[0]))
    elif role in ("collect-sftp", "collect-paused"):
        node = Node(_sftp_config(Path(tmp), url, json.loads(Path(args[0]).read_text(encoding="utf-8"))))
    elif role == "forward-dead-letter":
        node = Node(_peer_config(Path(tmp), url))
    else:
        node = Node(node_config(Path(tmp), url, worker=_WORKER.get(role, {})))
    try:
        if role == "dead-letter":
            # the last attempt fails for good: the row is dead-lettered
            node.adapter("rec").failures.append(PermanentError("对方系统拒收 (refused)"))  # type: ignore[attr-defined]
            return {"jobs": Worker(node, worker_id="late-worker").run_once()}
        if role == "forward-dead-letter":
            # the forward's last attempt failed for good (the peer is never called here)
            w = Worker(node, worker_id="forwarder")
            jobs = w.claim(1)
            w.record([Outcome(j, error=PermanentError("对方节点拒收 (refused)")) for j in jobs])
            return {"jobs": len(jobs)}
        if role == "retry":
            with node.db.sessions() as s:
                dead = list(s.scalars(select(OutboxEntry.id).where(OutboxEntry.state == "dead")))
            try:
                return {"retried": deadletter.requeue(node.db, ids=dead, actor="admin:operator").ids}
            except deadletter.RetryRefused as exc:
                return {"refused": str(exc)}
        if role == "pause-in-adapter":
            (late,) = args
            adapter = node.adapter("rec")

            def pause(_delivery: object) -> None:
                os.kill(os.getpid(), signal.SIGSTOP)  # the test lets us go on when the row is taken over
                if late == "refused":
                    raise PermanentError("对方系统拒收 (refused)")

            adapter.hook = pause  # type: ignore[attr-defined]
            return {"jobs": Worker(node, worker_id="worker-a").run_once()}
        if role == "outlive-lease":
            return _outlive_lease(node)
        if role == "collect-paused":
            ingest = inbound.ingest

            def paused(*a: Any) -> str:  # stopped once the poll has read its items
                os.kill(os.getpid(), signal.SIGSTOP)
                return ingest(*a)

            inbound.ingest = paused  # type: ignore[assignment]
            return inbound.collect(node, "countydrop")
        if role in ("collect", "collect-sftp"):
            try:
                return inbound.collect(node, "docexchange" if role == "collect" else "countydrop")
            except Exception as exc:  # noqa: BLE001 - the test says which
                return {"error": 1, type(exc).__name__: 1}
        if role == "post":
            from gateway.app import create_app

            req = json.loads(Path(args[0]).read_text(encoding="utf-8"))
            r = create_app(node=node).test_client().post("/api/v1/documents", json=req["doc"], headers=req["headers"])
            return {"status": r.status_code, "id": (r.get_json() or {}).get("id"),
                    "replayed": r.headers.get("Idempotent-Replayed")}
        if role == "job":
            scheduler.register("race-probe", _stop_self)
            tick = datetime.fromisoformat(args[0])
            return {"outcome": scheduler.run_job(node, "race-probe", trigger="schedule", tick=tick).outcome}
        if role == "drain":
            return _drain(node, float(args[0]), Path(args[1]))
        if role == "recall":
            from gateway.app import create_app

            key, mid = args
            r = create_app(node=node).test_client().post(f"/api/v1/documents/{mid}/recall",
                                                         headers={"Authorization": f"Bearer {key}"})
            return {"status": r.status_code, "type": (r.get_json() or {}).get("type", "")}
        raise SystemExit(f"unknown role {role}")
    finally:
        node.close()


def _drain(node: Node, refused: float, go: Path) -> dict:
    """A worker until the outbox has nothing pending or claimed; the adapter refuses that
    share of the calls (retryable) while more than 40 rows are left."""
    rng = random.Random()
    adapter = node.adapter("rec")
    calls: list[tuple[str, bool]] = []
    left = [160]

    def flaky(delivery: Any) -> None:
        time.sleep(0.002)
        if left[0] > 40 and rng.random() < refused:
            calls.append((delivery.remote_ref, False))
            raise RetryableError("对方系统繁忙 (busy)")
        calls.append((delivery.remote_ref, True))

    adapter.hook = flaky  # type: ignore[attr-defined]
    w = Worker(node)
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while not go.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    w.start()
    while time.monotonic() < deadline:
        with node.db.sessions() as s:
            left[0] = s.scalar(select(func.count()).select_from(OutboxEntry).where(
                OutboxEntry.state.in_(("pending", "claimed")))) or 0
        if not left[0]:
            break
        time.sleep(0.05)
    w.stop()
    return {"calls": calls}


def _outlive_lease(node: Node) -> dict:
    """A worker whose first adapter call takes three leases, then fails (retryable); the
    next attempt succeeds. Its dispatcher keeps renewing the row's lease meanwhile."""
    w = Worker(node, worker_id="slow-worker", threads=2)
    reaped: list[int] = []
    claimed: list[int] = []
    reap, claim = w.reap_expired_leases, w.claim

    def reap_spy() -> int:
        n = reap()
        reaped.append(n)
        return n

    def claim_spy(limit: int, **kw: object) -> list:
        jobs = claim(limit, **kw)  # type: ignore[arg-type]
        claimed.extend(j.id for j in jobs)
        return jobs

    calls: list[int] = []
    lease = node.config.worker.lease_seconds

    def hook(_delivery: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(3 * lease)
            raise RetryableError("对方系统超时 (timed out, too late)")

    w.reap_expired_leases, w.claim = reap_spy, claim_spy  # type: ignore[method-assign]
    node.adapter("rec").hook = hook  # type: ignore[attr-defined]
    w.start()
    deadline = time.monotonic() + 30
    while not node.adapter("rec").delivered and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.05)
    w.stop()
    return {"delivered": len(node.adapter("rec").delivered), "calls": len(calls),  # type: ignore[attr-defined]
            "reaped": sum(reaped), "claims": len(claimed), "rows": len(set(claimed))}


if __name__ == "__main__":
    print(json.dumps(_other(*sys.argv[1:])))
