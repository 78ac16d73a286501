"""Recall (撤回) where the legacy protocol has none, recall retried with an Idempotency-Key,
and a recall the legacy system failed: on SQLite and PostgreSQL."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from adapters.base import Adapter, PermanentError, can_recall, register
from gateway import migrate
from gateway.models import AuditEntry, OutboxEntry
from gateway.node import Node
from gateway.pipeline import NO_RECALL
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, Api, RecordingAdapter, node_config


@register("recording-no-recall")
class NoRecallAdapter(RecordingAdapter):
    """A legacy system whose protocol has no recall, like the SFTP drop and the exchange box."""

    recall = Adapter.recall  # type: ignore[assignment]


@pytest.fixture
def mixed(tmp_path, database_url) -> Iterator[Node]:  # type: ignore[no-untyped-def]
    """COUNTY_A behind rec (it can recall), CITY_B behind rec2 (it cannot)."""
    RecordingAdapter.instances.clear()
    cfg = node_config(tmp_path, database_url, adapters={"rec2": {"type": "recording-no-recall"}})
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield n
    n.close()


def _recalls(node: Node) -> int:
    with node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.kind == "recall")) or 0


def test_the_builtin_protocols_say_whether_they_can_recall():
    assert can_recall("soap") and not can_recall("sftp") and not can_recall("xml-exchange")
    assert not can_recall("no-such-type")


def test_a_copy_in_a_system_without_recall_keeps_its_status_and_says_why(mixed):
    api = Api(mixed)
    mid = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, CITY_B))).get_json()["id"]
    Worker(mixed).drain()
    r = api.post(f"/api/v1/documents/{mid}/recall")
    assert r.status_code == 202, r.get_json()
    got = {x["unit"]: x for x in r.get_json()["recipients"]}
    assert got[CITY_B]["status"] == "delivered" and got[CITY_B]["reason"] == NO_RECALL
    assert _recalls(mixed) == 1  # only COUNTY_A's copy is asked for
    Worker(mixed).drain()
    got = {x["unit"]: x for x in api.get(f"/api/v1/documents/{mid}").get_json()["recipients"]}
    assert (got[COUNTY_A]["status"], got[CITY_B]["status"]) == ("recalled", "delivered")
    with mixed.db.sessions() as s:
        detail = s.scalar(select(AuditEntry.detail).where(AuditEntry.action == "message.recall"))
    assert CITY_B in (detail or "")
    # nothing is left dead: a recall the protocol cannot make is never queued
    with mixed.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.state == "dead")) == 0


def test_recalling_only_copies_in_systems_without_recall_is_refused(mixed):
    api = Api(mixed)
    mid = api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,))).get_json()["id"]
    Worker(mixed).drain()
    r = api.post(f"/api/v1/documents/{mid}/recall")
    assert r.status_code == 409 and r.content_type == "application/problem+json"
    problem = r.get_json()
    assert problem["type"] == "urn:egov:gateway:problem:recall-not-supported"
    assert CITY_B in problem["detail"] and "no recall" in problem["detail"]
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert got["status"] == "delivered" and got["reason"] is None  # refused: nothing was stored
    assert _recalls(mixed) == 0


def test_a_recall_sent_again_is_answered_again_and_asks_once(gw_node):
    api = Api(gw_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    other = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    Worker(gw_node).drain()
    key = {"Idempotency-Key": "oa-recall-37"}
    first = api.post(f"/api/v1/documents/{mid}/recall", headers=key)
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = api.post(f"/api/v1/documents/{mid}/recall", headers=key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["recipients"] == first.get_json()["recipients"]
    # without a key, a recall already under way is not asked for a second time either
    assert api.post(f"/api/v1/documents/{mid}/recall").status_code == 202
    assert _recalls(gw_node) == 1
    reused = api.post(f"/api/v1/documents/{other}/recall", headers=key)
    assert reused.status_code == 422 and reused.get_json()["type"].endswith(":idempotency-key-reused")
    for bad in ("", "x" * 201):
        r = api.post(f"/api/v1/documents/{other}/recall", headers={"Idempotency-Key": bad})
        assert r.status_code == 400 and "1 to 200 characters" in r.get_json()["detail"]
    assert _recalls(gw_node) == 1
    Worker(gw_node).drain()
    # once done, the same key still answers what the recall did; a new one finds nothing left
    replay = api.post(f"/api/v1/documents/{mid}/recall", headers=key)
    assert replay.status_code == 202 and replay.get_json()["recipients"][0]["status"] == "recalled"
    assert api.post(f"/api/v1/documents/{mid}/recall", headers={"Idempotency-Key": "new"}).status_code == 409
    with gw_node.db.sessions() as s:
        actions = s.scalars(select(AuditEntry.action).where(AuditEntry.action == "message.recall")).all()
    assert len(actions) == 2  # the first recall and the keyless one; replays are not recalls


def test_a_recall_the_legacy_system_failed_says_so_on_the_copy(gw_node, monkeypatch):
    api = Api(gw_node)
    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    Worker(gw_node).drain()

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermanentError("Client.UnknownDocument: no such document")

    monkeypatch.setattr(gw_node.adapter("rec"), "recall", refuse)
    assert api.post(f"/api/v1/documents/{mid}/recall").status_code == 202
    Worker(gw_node).drain()
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert got["status"] == "delivered"
    assert got["reason"].startswith("撤回失败 (recall failed): ") and "UnknownDocument" in got["reason"]
