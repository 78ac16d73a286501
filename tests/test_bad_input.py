"""Bad input gets a clear 4xx problem+json and stores nothing."""
from __future__ import annotations

import hashlib
import os

import pytest
from sqlalchemy import func, select

from gateway.models import Delivery, IdempotencyRecord, Message, OutboxEntry
from tests.plugins.gatewaynode import COUNTY_A, Api

ENVELOPE_HEAD = b'<?xml version="1.0"?>\n'


def _nothing_stored(node) -> None:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        for model in (Message, Delivery, OutboxEntry, IdempotencyRecord):
            assert s.scalar(select(func.count()).select_from(model)) == 0, model.__name__


def _problem(r, status: int, kind: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["type"] == f"urn:egov:gateway:problem:{kind}", body
    assert body["status"] == status and body["detail"]
    return body


@pytest.fixture
def sqlite_api(tmp_path):  # type: ignore[no-untyped-def]
    from gateway import migrate
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield Api(n)
    n.close()


XML_ATTACKS = {
    "malformed": (b"<envelope><header></envelope>", "malformed-xml"),
    "external-entity": (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        b"<e>&x;</e>", "forbidden-dtd"),
    "entity-bomb": (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
                    b'"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><lolz>&lol2;</lolz>', "forbidden-dtd"),
    "doctype": (b'<?xml version="1.0"?><!DOCTYPE envelope SYSTEM "http://example.invalid/x.dtd"><envelope/>',
                "forbidden-dtd"),
    "too-deep": (b"<a>" * 200 + b"</a>" * 200, "too-deep"),
}


@pytest.mark.parametrize("case", sorted(XML_ATTACKS))
def test_hostile_xml_is_refused(sqlite_api, case):
    data, kind = XML_ATTACKS[case]
    r = sqlite_api.post("/api/v1/documents", data=data, content_type="application/xml")
    body = _problem(r, 400, kind)
    assert "root:" not in body["detail"]  # never echoes a local file
    _nothing_stored(sqlite_api.node)


def test_oversized_body_is_refused(sqlite_api):
    sqlite_api.app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    r = sqlite_api.post("/api/v1/documents", data=b"{" + b" " * 100_000 + b"}", content_type="application/json")
    _problem(r, 413, "too-large")
    _nothing_stored(sqlite_api.node)


def test_malformed_json_is_refused(sqlite_api):
    r = sqlite_api.post("/api/v1/documents", data=b'{"title": ', content_type="application/json")
    _problem(r, 400, "malformed-json")
    _nothing_stored(sqlite_api.node)


@pytest.mark.parametrize("field,value,expect", [
    ("classification", "内部", "classification"),
    ("doc_number", "州政办发[2026]37号", "〔〕"),
    ("doc_number", "州政办发〔2026〕037号", "leading zeros"),
    ("doc_number", "州政办发〔2026〕第37号", "第"),
    ("urgency", "十万火急", "urgency"),
    ("doc_type", "便函", "文种"),
    ("written_date", "2026年01月05日", "no leading zeros"),
])
def test_value_rules_are_enforced_with_reasons(sqlite_api, field, value, expect):
    doc = sqlite_api.document(**{field: value})
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    assert expect in body["detail"]
    assert body["errors"][0]["field"] == field
    _nothing_stored(sqlite_api.node)


def test_invalid_unit_code_names_the_recipient(sqlite_api):
    doc = sqlite_api.document(recipients=("1152230107CTPD8U2Q",))
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    assert body["errors"][0]["field"] == "recipients.0.unit"
    assert "check character" in body["detail"]
    _nothing_stored(sqlite_api.node)


def test_classified_document_needs_a_period_and_upward_needs_a_signer(sqlite_api):
    body = _problem(sqlite_api.post("/api/v1/documents", json=sqlite_api.document(classification="秘密")),
                    422, "validation")
    assert "保密期限" in body["detail"]
    body = _problem(sqlite_api.post("/api/v1/documents", json=sqlite_api.document(doc_type="请示", signer=None)),
                    422, "validation")
    assert "签发人" in body["detail"]
    _nothing_stored(sqlite_api.node)


def test_missing_key_and_missing_scope_are_refused(sqlite_api):
    doc = sqlite_api.document()
    r = sqlite_api.client.post("/api/v1/documents", json=doc)
    _problem(r, 401, "unauthenticated")
    r = sqlite_api.client.post("/api/v1/documents", json=doc, headers={"Authorization": "Bearer gw_abc_wrong"})
    _problem(r, 401, "unauthenticated")
    reader = Api(sqlite_api.node, scopes=("documents:read",))
    _problem(reader.post("/api/v1/documents", json=doc), 403, "forbidden-scope")
    _nothing_stored(sqlite_api.node)


def test_clearance_too_low_is_refused(sqlite_api):
    low = Api(sqlite_api.node, scopes=("documents:send", "blobs:write"), clearance="秘密")
    doc = low.document(classification="机密", classification_period="10年")
    body = _problem(low.post("/api/v1/documents", json=doc), 403, "clearance-too-low")
    assert "机密" in body["detail"]
    _nothing_stored(sqlite_api.node)


def test_reading_a_document_above_clearance_is_refused(sqlite_api):
    doc = sqlite_api.document(classification="机密", classification_period="10年")
    mid = sqlite_api.post("/api/v1/documents", json=doc).get_json()["id"]
    # the same caller with a lower clearance: an admin key of 秘密 clearance
    low = Api(sqlite_api.node, scopes=("admin", "documents:read"), clearance="秘密")
    _problem(low.get(f"/api/v1/documents/{mid}"), 403, "clearance-too-low")
    # the stored envelope (Accept: application/xml) is refused alike
    r = low.get(f"/api/v1/documents/{mid}", headers={"Accept": "application/xml"})
    assert b"urn:egov:gateway:envelope:v1" not in r.data
    _problem(r, 403, "clearance-too-low")
    # and another caller's document does not exist for a non-admin key, in either form
    other = Api(sqlite_api.node, scopes=("documents:read",), clearance="机密")
    for headers in ({}, {"Accept": "application/xml"}):
        _problem(other.get(f"/api/v1/documents/{mid}", headers=headers), 404, "not-found")
    assert low.get("/api/v1/documents").get_json()["items"] == []


def test_classified_copies_get_copy_numbers(sqlite_api):
    doc = sqlite_api.document(classification="秘密", classification_period="1年", recipients=(COUNTY_A,))
    got = sqlite_api.post("/api/v1/documents", json=doc).get_json()
    assert got["recipients"][0]["copy_no"] == "000001"


def test_unknown_body_blob_is_refused(sqlite_api):
    doc = sqlite_api.document()
    doc["body"]["sha256"] = "0" * 64
    _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "unknown-blob")
    _nothing_stored(sqlite_api.node)


def test_a_blob_refused_as_unknown_is_accepted_once_uploaded(sqlite_api, monkeypatch):
    """The accept path remembers blob sizes it found (content under a SHA-256 never changes),
    never the absence of one."""
    data = b"uploaded after the first try"
    sha = hashlib.sha256(data).hexdigest()
    doc = sqlite_api.document()
    doc["attachments"] = [{"sha256": sha, "name": "附件1.pdf"}]
    _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "unknown-blob")
    assert sqlite_api.upload(data) == sha
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(str(p)) or real_stat(p, *a, **k))
    for _ in range(3):
        assert sqlite_api.post("/api/v1/documents", json=doc).status_code == 202
    assert sum(sha in p for p in stats) == 1  # looked up once, then remembered


def test_sender_unit_not_served_by_this_node_is_refused(sqlite_api):
    doc = sqlite_api.document(sender_unit=COUNTY_A)
    _problem(sqlite_api.post("/api/v1/documents", json=doc), 403, "forbidden-unit")
    _nothing_stored(sqlite_api.node)


def test_unrouted_recipient_is_refused(sqlite_api):
    doc = sqlite_api.document(recipients=("91110000600037341L",))
    r = sqlite_api.post("/api/v1/documents", json=doc)
    if r.status_code == 422 and r.get_json()["type"].endswith("validation"):
        pytest.fail("the sample code should be a valid USCC: " + r.get_json()["detail"])
    _problem(r, 422, "no-route")
    _nothing_stored(sqlite_api.node)


def test_wrong_media_type_is_refused(sqlite_api):
    _problem(sqlite_api.post("/api/v1/documents", data=b"a=b", content_type="application/x-www-form-urlencoded"),
             415, "unsupported-media-type")


def test_unknown_route_is_problem_json(sqlite_api):
    _problem(sqlite_api.client.get("/api/v1/nothing-here"), 404, "not-found")
