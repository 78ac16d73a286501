"""The ``prune`` job (gateway.prune), on SQLite and PostgreSQL: finished outbox rows and old
Idempotency-Keys go, dead and waiting rows stay, the newest outbox row stays (its id must never
be given out again: peers deduplicate by it), the keys of legacy items gone from their source
for [worker] keep_ingested_days go, the records of peers' items not sent again for [worker]
keep_peer_items_days go (refused ones stay), old job runs go but for those /metrics shows, and
one audit entry says what went."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from adapters.base import PermanentError, PolledItem
from gateway import audit, prune, scheduler
from gateway.federation import batch
from gateway.inbound import collect
from gateway.models import AuditEntry, IdempotencyRecord, IngestedItem, JobRun, OutboxEntry
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, Api


def _rows(node) -> dict[int, str]:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return dict(s.execute(select(OutboxEntry.id, OutboxEntry.state).order_by(OutboxEntry.id)).all())


def _age(node, days: float) -> None:  # type: ignore[no-untyped-def]
    """Every finished row and Idempotency-Key as if from ``days`` ago."""
    then = datetime.now(UTC) - timedelta(days=days)
    with node.db.begin() as s:
        s.execute(update(OutboxEntry).where(OutboxEntry.finished_at.is_not(None)).values(finished_at=then))
        s.execute(update(IdempotencyRecord).values(created_at=then))


def test_prune_removes_old_finished_rows_and_keys_and_keeps_the_rest(gw_node):  # type: ignore[no-untyped-def]
    api = Api(gw_node)
    sent = [api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": f"k-{i}"})
            for i in range(3)]
    assert [r.status_code for r in sent] == [202, 202, 202]
    gw_node.adapter("rec2").failures.append(PermanentError("Client.Rejected: 发文机关代字未登记"))
    dead = api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,))).get_json()["id"]  # via rec2
    Worker(gw_node).drain()
    rows = _rows(gw_node)
    assert sorted(rows.values()).count("done") == 3 and "dead" in rows.values()
    waiting = api.post("/api/v1/documents", json=api.document()).get_json()["id"]  # not delivered yet

    assert scheduler.run_job(gw_node, "prune").outcome == "ok"  # nothing is old yet
    assert _rows(gw_node) == {**rows, max(_rows(gw_node)): "pending"}

    _age(gw_node, 31)
    before = _rows(gw_node)
    out = scheduler.get("prune").fn(gw_node)
    after = _rows(gw_node)
    assert (out["outbox_done_removed"], out["idempotency_removed"]) == (3, 3)
    assert sorted(after.values()) == ["dead", "pending"]  # the dead letter and the waiting copy
    assert max(after) == max(before)
    with gw_node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "housekeeping.prune")).one()
    assert entry.actor == "job:prune" and json.loads(entry.detail)["outbox_done_removed"] == 3
    with gw_node.db.sessions() as s:
        assert audit.verify(s).ok
    # the documents themselves are untouched
    assert api.get(f"/api/v1/documents/{sent[0].get_json()['id']}").get_json()["recipients"][0]["status"] == "delivered"
    assert api.get(f"/api/v1/documents/{dead}").get_json()["recipients"][0]["status"] == "failed"
    assert api.get(f"/api/v1/documents/{waiting}").status_code == 200
    # a key forgotten is a new request: the same Idempotency-Key now makes a new document
    again = api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": "k-0"})
    assert again.status_code == 202 and again.get_json()["id"] != sent[0].get_json()["id"]


def test_the_newest_outbox_row_is_kept_so_no_id_is_given_out_twice(gw_node):  # type: ignore[no-untyped-def]
    """All done and old: every row but the newest goes, and the next row's id is still past
    every id given out before (SQLite numbers a row one past the highest id still there)."""
    api = Api(gw_node)
    for _ in range(3):
        assert api.post("/api/v1/documents", json=api.document()).status_code == 202
    Worker(gw_node).drain()
    _age(gw_node, 400)
    highest = max(_rows(gw_node))
    assert scheduler.get("prune").fn(gw_node)["outbox_done_removed"] == 2
    assert list(_rows(gw_node)) == [highest]
    assert api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A,))).status_code == 202
    assert max(_rows(gw_node)) > highest


def _offer(node, *keys: str) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The legacy system behind adapter ``rec`` offers these items (files in its outbox, say)."""
    node.adapter("rec").pending_items = [PolledItem(key=k, source=k) for k in keys]
    return collect(node, "rec")


def _keys(node) -> set[str]:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return set(s.scalars(select(IngestedItem.key)))


def test_keys_of_legacy_items_gone_from_their_source_are_forgotten_the_rest_are_kept(gw_node):  # type: ignore[no-untyped-def]
    """An item taken and acknowledged (moved to archive/, the receipt cursor past it) cannot be
    offered again under its key: its key goes [worker] keep_ingested_days (90) after. One the
    source still offers (its acknowledgement failed) is seen at every run and kept however old;
    the records of batch and ferry peers' items are not this rule's (see the next test)."""
    gw_node.config.worker.keep_peer_items_days = 0
    assert _offer(gw_node, "rec:HZ_gone.xml:1", "rec:HZ_stuck.xml:2", "rec:HZ_recent.xml:3") == {"empty": 3}
    then = datetime.now(UTC) - timedelta(days=91)
    with gw_node.db.begin() as s:
        s.add_all([IngestedItem(key="batch:county-a:7", adapter="peer:county-a", outcome="ok", at=then),
                   IngestedItem(key="ferry:county-a:3:ab", adapter="ferry:county-a", outcome="{}", at=then)])
        s.execute(update(IngestedItem).where(IngestedItem.key != "rec:HZ_recent.xml:3").values(at=then))
    assert _offer(gw_node, "rec:HZ_stuck.xml:2") == {"duplicate": 1}  # still there: seen again now

    out = scheduler.get("prune").fn(gw_node)
    assert out["ingested_removed"] == 1
    assert _keys(gw_node) == {"rec:HZ_stuck.xml:2", "rec:HZ_recent.xml:3", "batch:county-a:7",
                              "ferry:county-a:3:ab"}
    with gw_node.db.sessions() as s:
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "housekeeping.prune")).one()
        assert audit.verify(s).ok
    assert json.loads(entry.detail)["ingested_removed"] == 1
    # still there a day past the limit, a run later: kept while its source offers it
    assert _offer(gw_node, "rec:HZ_stuck.xml:2") == {"duplicate": 1}
    assert prune.run(gw_node, now=datetime.now(UTC) + timedelta(days=1))["ingested_removed"] == 0


def test_keep_ingested_days_0_keeps_every_key(gw_node):  # type: ignore[no-untyped-def]
    _offer(gw_node, "rec:HZ_old.xml:1")
    gw_node.config.worker.keep_ingested_days = 0
    out = prune.run(gw_node, now=datetime.now(UTC) + timedelta(days=3650))
    assert "ingested_removed" not in out and _keys(gw_node) == {"rec:HZ_old.xml:1"}


def _peer_sends(node, *seqs: int) -> dict[int, str]:  # type: ignore[no-untyped-def]
    """Peer county-a sends batch items: even ones a status report for a copy it never had
    (applied: ``unmatched``), odd ones a recall of a message that is not here (refused)."""
    items = [{"seq": q, "kind": "status", "message_id": f"m-{q}", "unit": COUNTY_A, "status": "delivered"}
             if q % 2 == 0 else {"seq": q, "kind": "recall", "message_id": f"m-{q}", "units": [COUNTY_A]}
             for q in seqs]
    return {r["seq"]: r["outcome"] if r["outcome"] != "rejected" else r["type"]
            for r in batch.apply_items(node, "county-a", items)["results"]}


def test_records_of_peers_items_not_sent_again_are_forgotten_refused_ones_are_kept(gw_node):  # type: ignore[no-untyped-def]
    """A peer sends an item again only until it has recorded the answer, and each time its
    record is refreshed: one not sent for [worker] keep_peer_items_days (90) goes, one still
    being sent stays, and one refused stays for good (it must be refused again, never taken on a
    second look). A ferry file's record (one per file) follows the same rule."""
    assert _peer_sends(gw_node, 2, 3, 4) == {2: "ok", 3: "not-found", 4: "ok"}
    then = datetime.now(UTC) - timedelta(days=91)
    with gw_node.db.begin() as s:
        s.add(IngestedItem(key="ferry:county-a:1:ab", adapter="ferry:county-a", outcome='{"ok": 1}'))
        s.add(IngestedItem(key="rec:HZ_recent.xml:1", adapter="rec", outcome="empty"))
        s.execute(update(IngestedItem).where(IngestedItem.adapter != "rec").values(at=then))
    assert _peer_sends(gw_node, 4) == {4: "duplicate"}  # its answer was lost: sent again, refreshed

    out = prune.run(gw_node)
    assert out["peer_items_removed"] == 2 and out["ingested_removed"] == 0
    # (a record's key is batch:<peer>:<seq>:<what the item is>)
    assert {k.rsplit(":", 1)[0] for k in _keys(gw_node)} == {"batch:county-a:3", "batch:county-a:4", "rec:HZ_recent.xml"}
    with gw_node.db.sessions() as s:
        entry = s.scalars(select(AuditEntry).where(AuditEntry.action == "housekeeping.prune")).one()
        assert audit.verify(s).ok
    assert json.loads(entry.detail)["peer_items_removed"] == 2
    # the refused one is refused again, however old; one forgotten, should it come again after
    # all, is applied again without effect (a status that moves nothing)
    assert _peer_sends(gw_node, 2, 3) == {2: "ok", 3: "refused-before"}
    gw_node.config.worker.keep_peer_items_days = 0
    assert "peer_items_removed" not in prune.run(gw_node, now=datetime.now(UTC) + timedelta(days=3650))
    assert {"batch:county-a:2", "batch:county-a:3", "batch:county-a:4"} <= {k.rsplit(":", 1)[0] for k in _keys(gw_node)}


def _runs(node) -> dict[int, tuple[str, str]]:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return {r.id: (r.job, r.outcome) for r in s.scalars(select(JobRun).order_by(JobRun.id))}


def test_old_job_runs_go_but_each_jobs_newest_and_newest_success_and_the_highest_id_stay(gw_node):  # type: ignore[no-untyped-def]
    """One row a run (a receipts poll every five minutes: 105,000 a year): a run started more
    than [worker] keep_job_runs_days (90) ago goes, but not each job's newest run and newest ok
    run (/metrics: when it last succeeded), a run still marked running, nor the newest row (on
    SQLite the next run's id starts past it; job.run entries name run ids). The audit log keeps
    every run's entry."""
    flaky = [None, RuntimeError("the peer is down"), RuntimeError("the peer is down")]

    def hk_flaky(_node):  # type: ignore[no-untyped-def]
        if err := flaky.pop(0):
            raise err
        return {}

    scheduler.register("hk-steady", lambda _node: {})
    scheduler.register("hk-flaky", hk_flaky)
    try:
        outcomes = [scheduler.run_job(gw_node, job, actor="test").outcome
                    for job in ("hk-steady", "hk-flaky", "hk-steady", "hk-flaky", "hk-steady", "hk-flaky")]
        assert outcomes == ["ok", "ok", "ok", "failed", "ok", "failed"]
        old = datetime.now(UTC) - timedelta(days=100)
        with gw_node.db.begin() as s:
            for r in s.scalars(select(JobRun)):
                r.started_at, r.tick = old, r.tick - timedelta(days=100)
            s.add_all([JobRun(job="hk-steady", tick=old - timedelta(days=1), trigger="schedule", instance="i",
                              outcome="running", detail={}, started_at=old - timedelta(days=1)),  # died mid-run
                       # the highest id, though not the job's newest tick (an instance's clock behind)
                       JobRun(job="hk-steady", tick=old - timedelta(days=2), trigger="schedule", instance="i",
                              outcome="failed", detail={}, started_at=old - timedelta(days=2),
                              finished_at=old)])
        before = _runs(gw_node)
        ids = list(before)
        with gw_node.db.sessions() as s:
            job_run_entries = s.scalar(select(func.count()).where(AuditEntry.action == "job.run"))

        out = prune.run(gw_node)
        assert out["job_runs_removed"] == 3
        # kept: steady's newest; flaky's newest (failed) and newest ok; the running one; the highest id
        assert list(_runs(gw_node)) == [ids[1], ids[4], ids[5], ids[6], ids[7]]
        with gw_node.db.sessions() as s:
            assert s.scalar(select(func.count()).where(AuditEntry.action == "job.run")) == job_run_entries
            assert audit.verify(s).ok
        assert scheduler.run_job(gw_node, "hk-steady", actor="test").outcome == "ok"
        assert max(_runs(gw_node)) > max(ids)
        # that run marked the one left running abandoned (failed): it goes now, with the two no
        # longer the newest
        assert prune.run(gw_node)["job_runs_removed"] == 3
        assert list(_runs(gw_node)) == [ids[1], ids[5], max(_runs(gw_node))]
    finally:
        scheduler.unregister("hk-steady")
        scheduler.unregister("hk-flaky")
