"""Paths that run per request or per job stay bounded as the tables grow (bench/volume.py
measures a year's volume; these are its cheap guards), on SQLite and PostgreSQL.

What a statement costs is counted, not timed: on PostgreSQL the rows its plan touched
(EXPLAIN ANALYZE: each node's rows and rows removed by its filter, times its loops, over
every node), on SQLite the virtual-machine steps it took (a progress handler called at every
step): reading a table through costs at least one step per row."""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert

from adapters.base import remote_ref
from gateway import prune, scheduler
from gateway.models import Delivery, IngestedItem, JobRun, Message, table
from gateway.node import Node
from tests.plugins.gatewaynode import COUNTY_A, PREFECTURE, Api

N = 1500  # documents (3 copies each): enough that a scan shows against a page of 50


@contextmanager
def _statements(node: Node) -> Iterator[list[tuple[str, Any]]]:
    seen: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        seen.append((statement, params))

    event.listen(node.db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(node.db.engine, "before_cursor_execute", record)


def _touched(plan: dict[str, Any]) -> float:
    loops = plan.get("Actual Loops", 1)
    own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)) * loops
    return own + sum(_touched(p) for p in plan.get("Plans", []))


def _cost(node: Node, statement: str, params: Any) -> float:
    """Rows touched (PostgreSQL) or VM steps (SQLite) of one run of ``statement``, rolled back."""
    raw = node.db.engine.raw_connection()
    try:
        cur = raw.cursor()
        if node.db.postgres:
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params)
            doc = cur.fetchone()[0]
            raw.rollback()
            return _touched((json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])
        dbapi = raw.driver_connection
        steps = [0]

        def tick() -> int:
            steps[0] += 1
            return 0

        dbapi.execute("BEGIN")
        dbapi.set_progress_handler(tick, 1)
        try:
            cur.execute(statement, params)
            cur.fetchall()
        finally:
            dbapi.set_progress_handler(None, 1)
            dbapi.execute("ROLLBACK")
        return steps[0]
    finally:
        raw.close()


def _analyze(node: Node) -> None:
    with node.db.engine.connect() as conn:  # planner statistics, as autovacuum keeps them
        conn.exec_driver_sql("ANALYZE")
        conn.commit()


def _seed_documents(node: Node, key_id: str) -> list[tuple[datetime, str]]:
    """N documents of ``key_id``, one a minute up to now, 3 copies each (most signed); their
    (accepted_at, id), oldest first."""
    now = datetime.now(UTC)
    msgs, dels, out = [], [], []
    for i in range(N):
        at = now - timedelta(minutes=N - i)
        mid = f"vol-{i:06d}"
        out.append((at, mid))
        msgs.append(dict(id=mid, subsystem="documents", type="document", sender_unit=PREFECTURE,
                         classification="非密", clearance=0, urgency="平件", api_key_id=key_id, source="api",
                         summary={"title": "通知"}, envelope_xml=b"<e/>", accepted_at=at))
        for k in range(3):
            unit = f"{COUNTY_A[:-2]}{k:02d}"
            dels.append(dict(message_id=mid, unit=unit, route_kind="adapter", target="rec",
                             status="failed" if i % 97 == 0 and k == 0 else "signed",
                             remote_ref=remote_ref(mid, unit), updated_at=at))
    with node.db.begin() as s:
        s.execute(insert(table(Message)), msgs)
        s.execute(insert(table(Delivery)), dels)
    _analyze(node)
    return out


def _list_cost(node: Node, api: Api, query: str) -> float:
    with _statements(node) as seen:
        r = api.get(f"/api/v1/documents?{query}")
        assert r.status_code == 200, r.get_data(as_text=True)
    (statement, params), = [(q, p) for q, p in seen if "FROM messages" in q and "ORDER BY" in q]
    return _cost(node, statement, params)


def _cursor(at: datetime, mid: str) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), mid]).encode()).decode()


@pytest.mark.parametrize("own", [False, True], ids=["admin", "own-documents"])
def test_a_page_deep_in_the_list_costs_what_the_first_page_does(gw_node, own):
    """The cursor bounds the index range (accepted_at <= the cursor's time): a page far down
    the list does not read every newer document first."""
    api = Api(gw_node, scopes=("documents:read",) if own else ("*",))
    docs = _seed_documents(gw_node, api.key.split("_", 2)[1])
    first = _list_cost(gw_node, api, "limit=20")
    at, mid = docs[N // 10]  # nine tenths of the way down, newest first
    deep = _list_cost(gw_node, api, f"limit=20&cursor={_cursor(at, mid)}")
    assert deep <= 3 * first + 50, (first, deep)


def test_the_status_filter_reads_the_listed_documents_copies_not_the_whole_table(gw_node):
    """?status= asks, for each document of the page (newest first), whether one of its copies
    is in that status, through the (message_id, unit) index; it does not read every copy."""
    api = Api(gw_node)
    _seed_documents(gw_node, api.key.split("_", 2)[1])
    plain = _list_cost(gw_node, api, "limit=20")
    signed = _list_cost(gw_node, api, "limit=20&status=signed")
    assert signed <= 3 * plain + 100, (plain, signed)  # reading the 3 × N copies costs ten times more


def test_a_jobs_check_for_abandoned_runs_does_not_read_its_history(gw_node):
    """Before each run the scheduler looks for runs of the job left ``running`` by a process
    that died; a job run every five minutes has 105,000 finished runs a year, which that
    look-up must not read (the partial index ix_job_runs_running, migration 0012)."""
    now = datetime.now(UTC)
    runs = 3000
    with gw_node.db.begin() as s:
        s.execute(insert(table(JobRun)), [
            dict(job="vol-poll", tick=now - timedelta(minutes=5 * i), trigger="schedule", instance="n1",
                 outcome="ok", detail={}, started_at=now - timedelta(minutes=5 * i)) for i in range(1, runs + 1)])
    _analyze(gw_node)
    scheduler.register("vol-poll", lambda node: {}, "a test job")
    try:
        with _statements(gw_node) as seen:
            assert scheduler.run_job(gw_node, "vol-poll").outcome == "ok"
    finally:
        scheduler.unregister("vol-poll")
    (statement, params), = [(q, p) for q, p in seen if "FROM job_runs" in q and "outcome =" in q]
    cost = _cost(gw_node, statement, params)
    assert cost < runs / 10, cost
    if gw_node.db.postgres:
        return
    with gw_node.db.engine.connect() as conn:
        plan = " ".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params))
    assert "ix_job_runs_running" in plan, plan


def test_a_prune_with_little_to_remove_reads_no_history(gw_node):
    """``prune`` runs every night over the keys of every item ever taken and every job run:
    each slice of what it forgets is found by an index (ix_ingested_at, migration 0013;
    ix_job_runs_job_started), so a run with nothing old reads next to nothing, where a
    scan read every key on every run (millions after a few years)."""
    now = datetime.now(UTC)
    rows = 3000
    with gw_node.db.begin() as s:
        s.execute(insert(table(IngestedItem)), [
            dict(key=f"rec:HZ_{i}.xml:{i}" if i % 2 else f"batch:county-a:{i}",
                 adapter="rec" if i % 2 else "peer:county-a", outcome="ok", at=now - timedelta(minutes=i))
            for i in range(rows)])
        s.execute(insert(table(JobRun)), [
            dict(job="vol-poll", tick=now - timedelta(minutes=5 * i), trigger="schedule", instance="n1",
                 outcome="ok", detail={}, started_at=now - timedelta(minutes=5 * i)) for i in range(1, rows + 1)])
    _analyze(gw_node)
    with _statements(gw_node) as seen:
        out = prune.run(gw_node)
    assert (out["ingested_removed"], out["peer_items_removed"], out["job_runs_removed"]) == (0, 0, 0)
    reads = [(q, p) for q, p in seen if "FROM ingested" in q or "FROM job_runs" in q]
    assert len(reads) >= 4, reads  # the two kinds of keys, the jobs' names and their runs
    costs = [_cost(gw_node, q, p) for q, p in reads]
    assert max(costs) < rows / 10, list(zip(costs, (q for q, _ in reads)))


def _seed_months(node: Node, days: int = 150) -> datetime:
    """N documents over ``days`` days up to now, 3 copies each: two delivered here (most signed
    within hours), one forwarded to node county-a; one forwarded copy in 100 still open
    (delivered, not signed). Returns now."""
    now = datetime.now(UTC)
    step = timedelta(days=days) / N
    msgs, dels = [], []
    for i in range(N):
        at = now - step * (N - i)
        mid = f"vol-{i:06d}"
        msgs.append(dict(id=mid, subsystem="documents", type="document", sender_unit=PREFECTURE,
                         classification="非密", clearance=0, urgency="平件", api_key_id=None, source="api",
                         summary={"title": "通知"}, envelope_xml=b"<e/>", accepted_at=at))
        for k in range(3):
            unit = f"{COUNTY_A[:-2]}{k:02d}"
            to_node, still_open = k == 2, k == 2 and i % 100 == 0
            delivered, signed = at + timedelta(hours=1), at + timedelta(hours=5 + i % 40)
            dels.append(dict(message_id=mid, unit=unit, route_kind="node" if to_node else "adapter",
                             target="county-a" if to_node else "rec", status="delivered" if still_open else "signed",
                             remote_ref=remote_ref(mid, unit), delivered_at=delivered,
                             signed_at=None if still_open else signed,
                             updated_at=delivered if still_open else signed))
    with node.db.begin() as s:
        s.execute(insert(table(Message)), msgs)
        s.execute(insert(table(Delivery)), dels)
    _analyze(node)
    return now


def _sign_for_cost(node: Node, start: datetime, end: datetime) -> float:
    from systems.documents import assessment

    with _statements(node) as seen:
        rows = assessment.sign_for(node.db, start, end, 24, end)
    assert rows, "the period has deliveries"
    (statement, params), = [(q, p) for q, p in seen if "FROM deliveries" in q]
    return _cost(node, statement, params)


def test_the_sign_for_report_of_a_month_reads_that_months_copies_not_every_copy(gw_node):
    """``gateway report sign-for`` reads the copies delivered in its period through the index
    of delivery times (ix_deliveries_delivered_at, migration 0014): the last ten days of five
    months of copies cost a fraction of the whole five months, as a month costs a fraction of
    a year at a node."""
    now = _seed_months(gw_node)
    ten_days = _sign_for_cost(gw_node, now - timedelta(days=10), now)
    everything = _sign_for_cost(gw_node, now - timedelta(days=151), now)
    assert ten_days * 3 < everything, (ten_days, everything)  # a scan of the table costs about the same for both


def _open_copies_cost(node: Node, **kw: Any) -> float:
    from gateway.federation import reconcile

    with _statements(node) as seen:
        reconcile._open_copies(node, "county-a", **kw)
    return sum(_cost(node, q, p) for q, p in seen)


def test_reconcile_reads_the_copies_of_its_window_not_every_copy(gw_node, monkeypatch):
    """The ``reconcile`` job reads the copies of the messages accepted in its window (30
    days), a range of the primary key found through the index of acceptance times, slice by
    slice: the last 30 days of five months cost a fraction of the five months."""
    from gateway.federation import reconcile

    _seed_months(gw_node)
    month = _open_copies_cost(gw_node)
    monkeypatch.setattr(reconcile, "WINDOW", timedelta(days=200))
    everything = _open_copies_cost(gw_node)
    assert month * 3 < everything, (month, everything)
    monkeypatch.undo()
    # two open copies in the last 30 days (one every hundred messages), a slice of one each
    first = reconcile._open_copies(gw_node, "county-a", limit=1)
    rest = reconcile._open_copies(gw_node, "county-a", after=first[-1][0], limit=1)
    assert len(first) == 1 and len(rest) == 1
    assert reconcile._open_copies(gw_node, "county-a", after=rest[-1][0], limit=1) == []
    ids = [c[0] for c in first + rest]
    assert ids == sorted(set(ids)) and {c[3] for c in first + rest} == {"delivered"}
