"""The ``prune`` job (gateway.prune), on SQLite and PostgreSQL: finished outbox rows and old
Idempotency-Keys go, dead and waiting rows stay, the newest outbox row stays (its id must never
be given out again: peers deduplicate by it), the keys of legacy items gone from their source
for [worker] keep_ingested_days go, and one audit entry says what went."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from adapters.base import PermanentError, PolledItem
from gateway import audit, prune, scheduler
from gateway.inbound import collect
from gateway.models import AuditEntry, IdempotencyRecord, IngestedItem, OutboxEntry
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
    source still offers (its acknowledgement failed) is seen at every run and kept however old,
    and so are the cursors of batch and ferry peers, which may send an item again at any time."""
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
