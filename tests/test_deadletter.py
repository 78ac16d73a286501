"""Dead letters put back in the queue by an operator (gateway.deadletter), on SQLite and
PostgreSQL: the row's fresh retry budget, its copy back from failed to queued, the caller's
webhook told, one audit entry per row, and rows that cannot go back refused or skipped."""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from adapters.base import PermanentError, PolledItem
from gateway import audit, deadletter, migrate
from gateway.envelope import Receipt
from gateway.inbound import collect
from gateway.models import AuditEntry, Delivery, OutboxEntry
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, Api, node_config
from tests.test_webhooks_and_ops import Receiver


@pytest.fixture
def hook():  # type: ignore[no-untyped-def]
    r = Receiver()
    yield r
    r.server.shutdown()


def _dead(api: Api, recipients=(COUNTY_A,)) -> str:  # type: ignore[no-untyped-def]
    """A document whose every copy the legacy system refused for good."""
    node = api.node
    for unit in recipients:  # routes in the test config: CITY_B through rec2, the others through rec
        node.adapter("rec2" if unit == CITY_B else "rec").failures.append(
            PermanentError("Client.Rejected: 发文机关代字未登记"))
    body = api.post("/api/v1/documents", json=api.document(recipients=recipients)).get_json()
    Worker(node).drain()
    return body["id"]


def _outbox(node, kind: str = "deliver") -> list[OutboxEntry]:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return list(s.scalars(select(OutboxEntry).where(OutboxEntry.kind == kind).order_by(OutboxEntry.id)))


def test_a_dead_letter_is_listed_put_back_and_delivered(gw_node, hook):
    api = Api(gw_node, webhook_url=hook.url)
    mid = _dead(api)
    assert api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]["status"] == "failed"
    rows, total = deadletter.dead_letters(gw_node.db)
    assert total == 1 and len(rows) == 1
    row = rows[0]
    assert (row.kind, row.target, row.message_id, row.unit, row.attempts) == ("deliver", "rec", mid, COUNTY_A, 1)
    assert "发文机关代字未登记" in (row.last_error or "") and row.finished_at is not None

    out = deadletter.requeue(gw_node.db, ids=[row.id], actor="cli:operator")
    assert (out.ids, out.copies, out.skipped) == ([row.id], 1, {})
    entry = _outbox(gw_node)[0]
    assert (entry.state, entry.attempts, entry.finished_at) == ("pending", 0, None)
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert got["status"] == "queued" and "发文机关代字未登记" in got["last_error"]  # why it was retried
    assert deadletter.dead_letters(gw_node.db) == ([], 0)

    Worker(gw_node).drain()  # the legacy system takes it this time
    assert [d.recipient.unit for d in gw_node.adapter("rec").delivered] == [COUNTY_A]
    assert api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]["status"] == "delivered"
    # the caller's webhook heard every change, the retry's failed -> queued among them
    events = [(e.payload["previous"], e.payload["status"]) for e in _outbox(gw_node, "webhook")]
    assert events == [("queued", "failed"), ("failed", "queued"), ("queued", "delivered")]
    with gw_node.db.sessions() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "admin.outbox.retry")).all()
        attempts = s.scalars(select(AuditEntry.outcome).where(AuditEntry.action == "delivery.attempt")
                             .order_by(AuditEntry.seq)).all()
    assert [(e.actor, e.object) for e in entries] == [("cli:operator", f"delivery:{mid}/{COUNTY_A}")]
    detail = json.loads(entries[0].detail)
    assert detail["attempts_before"] == 1 and detail["units"] == [COUNTY_A] and detail["kind"] == "deliver"
    assert "发文机关代字未登记" in detail["last_error"]
    assert attempts == ["dead-letter", "delivered"]
    with gw_node.db.sessions() as s:
        assert audit.verify(s).ok


def test_rows_named_by_number_go_back_all_or_none(gw_node):
    api = Api(gw_node)
    _dead(api, recipients=(COUNTY_A, CITY_B))
    first, second = (r.id for r in deadletter.dead_letters(gw_node.db)[0])
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    Worker(gw_node).drain()
    done = next(e.id for e in _outbox(gw_node) if e.state == "done")
    with pytest.raises(deadletter.RetryRefused) as err:
        deadletter.requeue(gw_node.db, ids=[first, done, 999999], actor="cli:operator")
    assert err.value.problems == {done: "it is done, not dead", 999999: "no such outbox row"}
    # nothing moved: both rows still dead, both copies still failed, no audit entry
    assert deadletter.dead_letters(gw_node.db)[1] == 2
    with gw_node.db.sessions() as s:
        assert s.scalar(select(AuditEntry.seq).where(AuditEntry.action == "admin.outbox.retry")) is None
        assert sorted(s.scalars(select(Delivery.status))) == ["delivered", "failed", "failed"]
    # a dry run says what would go back and changes nothing either
    out = deadletter.requeue(gw_node.db, ids=[first, second], actor="cli:operator", dry_run=True)
    assert (out.ids, out.copies) == ([first, second], 2)
    assert deadletter.dead_letters(gw_node.db)[1] == 2
    assert body["id"]


def test_a_copy_that_moved_on_is_not_put_back(gw_node):
    """A late receipt signed for the copy after its delivery was given up on: retrying would
    hand the legacy system a document it already has. --all skips it, a number refuses it."""
    api = Api(gw_node)
    _dead(api, recipients=(COUNTY_A, CITY_B))
    rows = deadletter.dead_letters(gw_node.db)[0]
    signed = next(r for r in rows if r.unit == COUNTY_A)
    with gw_node.db.begin() as s:  # as a receipt applied through another path would leave it
        d = s.scalars(select(Delivery).where(Delivery.unit == COUNTY_A)).one()
        d.status, d.signer, d.signed_at = "signed", "李某", datetime.now(UTC)
    with pytest.raises(deadletter.RetryRefused) as err:
        deadletter.requeue(gw_node.db, ids=[signed.id], actor="cli:operator")
    assert err.value.problems == {signed.id: f"its copy for {COUNTY_A} is now signed, not failed"}
    out = deadletter.requeue(gw_node.db, target="rec", actor="cli:operator")  # the filter matches only rec's row
    assert (out.ids, out.skipped) == ([], {signed.id: f"its copy for {COUNTY_A} is now signed, not failed"})
    out = deadletter.requeue(gw_node.db, actor="cli:operator")
    assert len(out.ids) == 1 and out.ids[0] != signed.id and list(out.skipped) == [signed.id]
    Worker(gw_node).drain()
    assert [d.recipient.unit for d in gw_node.adapter("rec2").delivered] == [CITY_B]
    assert gw_node.adapter("rec").delivered == []


def test_filters_narrow_the_list_and_the_retry(gw_node):
    api = Api(gw_node)
    mid_a = _dead(api, recipients=(COUNTY_A,))
    _dead(api, recipients=(CITY_B,))
    assert [r.target for r in deadletter.dead_letters(gw_node.db, target="rec2")[0]] == ["rec2"]
    assert [r.message_id for r in deadletter.dead_letters(gw_node.db, message_id=mid_a)[0]] == [mid_a]
    assert deadletter.dead_letters(gw_node.db, kind="webhook") == ([], 0)
    rows, total = deadletter.dead_letters(gw_node.db, limit=1)
    assert len(rows) == 1 and total == 2
    out = deadletter.requeue(gw_node.db, message_id=mid_a, actor="cli:operator")
    assert out.copies == 1 and [r.target for r in deadletter.dead_letters(gw_node.db)[0]] == ["rec2"]


def test_a_receipt_for_a_put_back_copy_still_counts(gw_node):
    """After the retry the copy is delivered again under the same reference, and the legacy
    system's sign-for receipt applies as for any other copy."""
    api = Api(gw_node)
    mid = _dead(api)
    deadletter.requeue(gw_node.db, actor="cli:operator")
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    receipt = Receipt(unit=COUNTY_A, action="SIGNED", remote_ref=rec.delivered[0].remote_ref, signer="王某",
                      receipt_no="JXF-9", time=datetime(2026, 11, 28, 9, 0, tzinfo=UTC))
    rec.pending_items = [PolledItem(key="rec:9", receipt=receipt)]
    assert collect(gw_node, "rec") == {"signed": 1}
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert (got["status"], got["signer"]) == ("signed", "王某")


def test_a_webhook_the_caller_refused_to_the_end_is_sent_again(tmp_path, database_url):
    """Not only copies: a webhook (or a status report, a recall) that ran out of attempts goes
    back the same way, and no copy changes status for it."""
    cfg = node_config(tmp_path, database_url,
                      webhooks={"retry": {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.05}})
    migrate.upgrade(cfg.database_url())
    gw_node = Node(cfg)
    hook = Receiver(fail_first=3)
    try:
        api = Api(gw_node, webhook_url=hook.url)
        mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
        deadline = time.monotonic() + 10
        while not any(e.state == "dead" for e in _outbox(gw_node, "webhook")) and time.monotonic() < deadline:
            Worker(gw_node).run_once()
            time.sleep(0.02)
        rows = deadletter.dead_letters(gw_node.db, kind="webhook")[0]
        assert [(r.kind, r.target, r.message_id) for r in rows] == [("webhook", hook.url, mid)]
        out = deadletter.requeue(gw_node.db, ids=[rows[0].id], actor="cli:operator")
        assert (out.ids, out.copies) == ([rows[0].id], 0)
        Worker(gw_node).drain()
        assert len(hook.posts) == 4 and json.loads(hook.posts[-1][1])["status"] == "delivered"
        assert api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]["status"] == "delivered"
        with gw_node.db.sessions() as s:
            obj = s.scalar(select(AuditEntry.object).where(AuditEntry.action == "admin.outbox.retry"))
        assert obj == f"delivery:{mid}/{COUNTY_A}"
    finally:
        hook.server.shutdown()
        gw_node.close()
