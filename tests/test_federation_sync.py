"""Scheduled syncs between nodes, as separate processes on loopback: the link between the
prefecture and county B is a *batch* link (up only part of the time), carried by the
``push`` and ``pull`` jobs, run here with ``gateway sync JOB`` as an operator would.

Faults: county B down for the whole of a sync window, then up (everything arrives, once, in
order); county B killed in the middle of applying a batch (the next run resumes from its
cursor: no loss, no duplicate); reconciliation repairing a lost status report and a copy
the receiving node lost."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, delete, select, update

from adapters.simulators.cluster import CITY_B, COUNTY_A, PREFECTURE, REPO, Cluster, NodeProc
from gateway.models import Delivery, JobRun, Message, OutboxEntry
from tests.test_federation import rows, send, statuses, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("sync"), links={("prefecture", "county-b"): "batch"})
    try:
        c.start()
        yield c
    finally:
        c.close()


def sync(node: NodeProc, job: str) -> dict:
    r = node.cli("sync", job, check=False)
    assert r.stdout.strip(), r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (r.returncode == 0) == (out["outcome"] == "ok"), r
    return out


def execute(node: NodeProc, stmt) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(node.database_url, connect_args={"timeout": 30})
    try:
        with engine.begin() as conn:
            conn.execute(stmt)
    finally:
        engine.dispose()


def conversation(pref: NodeProc, n: int, tag: str) -> list[str]:
    """初报, 续报一 … of one conversation, each with its own body."""
    conv = f"conv-{tag}-{time.time_ns()}"
    titles = ["初报"] + [f"续报{i}" for i in range(1, n)]
    return [send(pref, PREFECTURE, (CITY_B,), title=f"{tag}{t}", conversation_id=conv) for t in titles]


def test_a_batch_link_waits_for_the_sync_jobs(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    mid = send(pref, PREFECTURE, (CITY_B,), title="批量链路测试")
    time.sleep(1.5)  # the delivery worker leaves batch peers alone
    assert statuses(pref, mid)[CITY_B]["status"] == "queued"
    assert rows(b, select(Message.id).where(Message.id == mid)) == []
    out = sync(pref, "push")
    assert out["outcome"] == "ok" and out["detail"]["county-b"]["ok"] >= 1
    assert rows(b, select(Message.source).where(Message.id == mid)) == [("node:prefecture",)]
    # county B's status reports wait in its outbox for the prefecture's pull
    deadline = time.monotonic() + 30
    while statuses(pref, mid)[CITY_B]["status"] != "signed":
        assert time.monotonic() < deadline, statuses(pref, mid)
        sync(pref, "pull")
        time.sleep(0.3)
    assert statuses(pref, mid)[CITY_B]["signer"] == "乙市人民政府办公室值班员"
    runs = rows(pref, select(JobRun.job, JobRun.trigger, JobRun.outcome).where(JobRun.job.in_(("push", "pull"))))
    assert ("push", "manual", "ok") in runs and ("pull", "manual", "ok") in runs


def test_county_down_for_the_whole_sync_window_then_everything_arrives_once_in_order(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    cluster.stop_node("county-b")
    try:
        mids = conversation(pref, 6, "停机")
        failed = sync(pref, "push")  # the sync window passes with county B down
        assert failed["outcome"] == "failed" and "county-b" in json.dumps(failed["detail"], ensure_ascii=False)
        assert {statuses(pref, m)[CITY_B]["status"] for m in mids} == {"queued"}
    finally:
        cluster.start_node("county-b")
    assert sync(pref, "push")["outcome"] == "ok"
    got = rows(b, select(Message.id, Message.accepted_at).where(Message.id.in_(mids)).order_by(Message.accepted_at))
    assert [m for m, _ in got] == mids  # once each, in conversation order
    docs = [d for d in b.soap.state.all_documents() if d.title.startswith("停机")]
    deadline = time.monotonic() + 30
    while len(docs) < len(mids) and time.monotonic() < deadline:
        time.sleep(0.2)
        docs = [d for d in b.soap.state.all_documents() if d.title.startswith("停机")]
    assert sorted(d.title for d in docs) == sorted(f"停机{t}" for t in ["初报"] + [f"续报{i}" for i in range(1, 6)])
    assert len({d.doc_id for d in docs}) == len(mids)


def test_a_batch_cut_in_the_middle_resumes_from_the_cursor(cluster: Cluster) -> None:
    pref, b = cluster.nodes["prefecture"], cluster.nodes["county-b"]
    mids = conversation(pref, 120, "中断")
    push = subprocess.Popen([sys.executable, "-m", "gateway.cli", "-c", str(pref.config_path), "sync", "push"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = len(rows(b, select(Message.id).where(Message.id.in_(mids))))
            if seen >= 5:
                break
            time.sleep(0.02)
        assert 0 < seen < len(mids), f"{seen} of {len(mids)} arrived before the cut; the batch was not cut"
        cluster.stop_node("county-b", sig=signal.SIGKILL)  # county B dies in the middle of the batch
    finally:
        push.wait(120)
    cluster.start_node("county-b")
    assert sync(pref, "push")["outcome"] == "ok"
    got = rows(b, select(Message.id).where(Message.id.in_(mids)).order_by(Message.accepted_at))
    assert [m for (m,) in got] == mids  # no loss, no duplicate, in order
    assert len(rows(b, select(Delivery.id).where(Delivery.message_id.in_(mids)))) == len(mids)
    left = rows(pref, select(OutboxEntry.state).where(OutboxEntry.kind == "forward", OutboxEntry.target == "county-b",
                                                     OutboxEntry.state != "done"))
    assert left == []


def test_reconciliation_repairs_a_lost_status_and_a_lost_copy(cluster: Cluster) -> None:
    pref, a = cluster.nodes["prefecture"], cluster.nodes["county-a"]
    lost_status = send(pref, PREFECTURE, (COUNTY_A,), title="对账一")
    lost_copy = send(pref, PREFECTURE, (COUNTY_A,), title="对账二")
    wait_for(pref, lost_status, {COUNTY_A: "signed"})
    wait_for(pref, lost_copy, {COUNTY_A: "signed"})
    # the 签收 report for the first never arrived (the prefecture still believes 'delivered')
    execute(pref, update(Delivery).where(Delivery.message_id == lost_status)
            .values(status="delivered", signer=None, receipt_no=None, signed_at=None))
    # county A lost its copy of the second (restored from an older backup)
    execute(a, delete(OutboxEntry).where(OutboxEntry.delivery_id.in_(
        select(Delivery.id).where(Delivery.message_id == lost_copy))))
    execute(a, delete(Delivery).where(Delivery.message_id == lost_copy))
    execute(a, delete(Message).where(Message.id == lost_copy))
    execute(pref, update(Delivery).where(Delivery.message_id == lost_copy).values(status="delivered"))
    out = sync(pref, "reconcile")
    assert out["outcome"] == "ok", out
    detail = out["detail"]["county-a"]
    assert detail["repaired"] >= 1 and detail["reforwarded"] >= 1, detail
    got = statuses(pref, lost_status)[COUNTY_A]
    assert got["status"] == "signed" and got["signer"] == "甲县人民政府办公室值班员"
    # the copy is forwarded again and arrives once (the legacy system deduplicates by doc id)
    deadline = time.monotonic() + 30
    while rows(a, select(Delivery.status).where(Delivery.message_id == lost_copy)) != [("delivered",)]:
        assert time.monotonic() < deadline, rows(a, select(Delivery.status).where(Delivery.message_id == lost_copy))
        time.sleep(0.2)
    assert len([d for d in a.soap.state.all_documents() if d.title == "对账二"]) == 1
