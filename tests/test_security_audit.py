"""Security events in the audit log (GB/T 22239): refused API requests and reads of classified
documents, on SQLite and PostgreSQL; a flood of refusals is bounded."""
from __future__ import annotations

import json

from sqlalchemy import select

from gateway import audit
from gateway.models import AuditEntry
from tests.plugins.gatewaynode import Api


def _entries(node, action: str) -> list[AuditEntry]:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action).order_by(AuditEntry.seq)))


def test_refused_requests_are_audited_with_who_what_and_why(gw_node):
    api = Api(gw_node, scopes=("documents:read",), clearance="非密")
    r = api.client.get("/api/v1/documents", headers={"Authorization": "Bearer gw_deadbeef_notasecret"})
    assert r.status_code == 401
    r = api.post("/api/v1/documents", json={})
    assert r.status_code == 403
    unknown, scope = _entries(gw_node, "api.refuse")
    assert (unknown.actor, unknown.object, unknown.outcome) == ("anonymous", "GET /api/v1/documents",
                                                                 "unauthenticated")
    detail = json.loads(unknown.detail)
    assert detail["key_id"] == "deadbeef" and detail["remote_addr"] == "127.0.0.1"
    assert scope.actor.startswith(f"key:{api.key.split('_')[1]}") and scope.outcome == "forbidden-scope"
    assert "documents:send" in json.loads(scope.detail)["reason"]
    # what is no security matter is not audited: a document that is not there
    assert api.get("/api/v1/documents/no-such-document").status_code == 404
    assert len(_entries(gw_node, "api.refuse")) == 2
    with gw_node.db.sessions() as s:
        assert audit.verify(s).ok


def test_a_flood_of_refusals_is_counted_not_written_one_by_one(gw_node):
    api = Api(gw_node)
    api.app.extensions["gateway.on_problem"].limiter._timer = lambda delay, fn: None  # no summary mid-test
    for _ in range(25):
        assert api.client.get("/api/v1/documents", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert len(_entries(gw_node, "api.refuse")) == 20  # RejectAudit.PER_MINUTE


def test_reading_a_classified_document_is_audited_and_an_unclassified_one_is_not(gw_node):
    api = Api(gw_node)
    secret = api.post("/api/v1/documents", json=api.document(classification="秘密",
                                                              classification_period="1年")).get_json()["id"]
    plain = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    assert api.get(f"/api/v1/documents/{plain}").status_code == 200
    assert _entries(gw_node, "document.read") == []
    assert api.get(f"/api/v1/documents/{secret}").status_code == 200
    assert api.get(f"/api/v1/documents/{secret}", headers={"Accept": "application/xml"}).status_code == 200
    reads = _entries(gw_node, "document.read")
    assert [(e.object, json.loads(e.detail)["form"]) for e in reads] == [(f"message:{secret}", "json"),
                                                                         (f"message:{secret}", "xml")]
    assert all(e.actor == f"key:{api.key.split('_')[1]}(测试系统)" for e in reads)
    assert api.get("/api/v1/documents").status_code == 200
    [listed] = _entries(gw_node, "document.list")
    assert json.loads(listed.detail)["classified"] == [secret]
