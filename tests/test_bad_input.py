"""Bad input gets a clear 4xx problem+json and stores nothing."""
from __future__ import annotations

import base64
import hashlib
import json
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


XML_ATTACKS = {
    "malformed": (b"<envelope><header></envelope>", "malformed-xml"),
    "external-entity": (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                        b"<e>&x;</e>", "forbidden-dtd"),
    "entity-bomb": (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
                    b'"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><lolz>&lol2;</lolz>', "forbidden-dtd"),
    "doctype": (b'<?xml version="1.0"?><!DOCTYPE envelope SYSTEM "http://example.invalid/x.dtd"><envelope/>',
                "forbidden-dtd"),
    # a DOCTYPE past the first kilobytes, and one in UTF-16 (no ASCII to find): libxml2 read a
    # local file as the external subset, and the answer told whether it existed
    "doctype-after-a-long-comment": (b"<!--" + b"a" * 5000 + b'--><!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>',
                                     "forbidden-dtd"),
    "doctype-in-utf-16": (('<!--' + "a" * 5000 + '--><!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>').encode("utf-16"),
                          "forbidden-dtd"),
    "too-deep": (b"<a>" * 200 + b"</a>" * 200, "too-deep"),
    "too-deep-for-libxml2": (b"<a>" * 300 + b"</a>" * 300, "too-deep"),  # past libxml2's own 256
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
    body = _problem(r, 413, "too-large")
    # the caller learns the limit, and that files do not travel inside the document
    assert "100002 bytes" in body["detail"] and "at most 65536" in body["detail"], body
    assert "/api/v1/blobs" in body["detail"], body
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
    # a line break after the value is not part of the form (a $ in a pattern lets it through)
    ("doc_number", "州政办发〔2026〕37号\n", "expected issuer code"),
    ("written_date", "2026年1月5日\n", "expected a date"),
    ("written_date", "2026-01-05\n", "expected a date"),
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


def test_a_detail_that_shows_some_of_the_errors_says_how_many_more_there_are(sqlite_api):
    body = _problem(sqlite_api.post("/api/v1/documents", json={"title": "只有标题"}), 422, "validation")
    assert [e["field"] for e in body["errors"]] == ["sender_unit", "issuer", "doc_type", "doc_number",
                                                    "written_date", "recipients", "body"]
    assert body["detail"].endswith("; and 2 more (see errors)"), body["detail"]
    assert "recipients" not in body["detail"]  # five in the detail, every one in the list
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


def test_an_uploaded_blob_whose_file_is_gone_is_named(sqlite_api):
    """Granted to the key but no longer in the store (removed by hand, a restore without
    the blob folder): the document is refused naming that attachment, nothing is stored."""
    data = b"uploaded, then removed from the store"
    sha = sqlite_api.upload(data)
    sqlite_api.node.blobs.path(sha).unlink()
    doc = sqlite_api.document()
    doc["attachments"] = [{"sha256": doc["body"]["sha256"], "name": "附件1.pdf"}, {"sha256": sha, "name": "附件2.pdf"}]
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "unknown-blob")
    assert [e["field"] for e in body["errors"]] == ["attachments.1.sha256"], body
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
    body = _problem(r, 422, "no-route")
    # what the caller can do about it: check the code, or have the node's operator route it
    assert body["errors"] == [{"field": "recipients.0.unit", "message": body["detail"]}]
    assert "check the unit code" in body["detail"] and "operator" in body["detail"], body["detail"]
    _nothing_stored(sqlite_api.node)


def test_wrong_media_type_is_refused(sqlite_api):
    _problem(sqlite_api.post("/api/v1/documents", data=b"a=b", content_type="application/x-www-form-urlencoded"),
             415, "unsupported-media-type")


def test_unknown_route_is_problem_json(sqlite_api):
    _problem(sqlite_api.client.get("/api/v1/nothing-here"), 404, "not-found")


@pytest.mark.parametrize("field, value, named", [
    ("title", "关于\u0001通知", "title"),
    ("note", "附注\u001f", "note"),
    ("issuer", "州政府\ufffe", "issuer"),  # written out in UTF-8 by the client, not escaped
    ("doc_number", "州政\u0001办发〔2026〕37号", "doc_number"),  # was a 500: lxml refused the payload
    ("doc_number", "州政\uffff办发〔2026〕37号", "doc_number"),
    ("attachments", [{"sha256": None, "name": "附件\u0007.pdf"}], "attachments.0.name"),
    ("recipients", [{"unit": COUNTY_A, "name": "甲县\u0000"}], "recipients.0.name"),
])
def test_a_character_xml_cannot_carry_is_refused_naming_the_field(sqlite_api, field, value, named):
    """The envelope is XML: a control character anywhere in the document is a 422 that names
    the field, never a 500 from the XML serialiser."""
    doc = sqlite_api.document()
    if field == "attachments":
        value[0]["sha256"] = doc["body"]["sha256"]
    doc[field] = value
    data = json.dumps(doc, ensure_ascii=field != "issuer").encode()
    body = _problem(sqlite_api.post("/api/v1/documents", data=data, content_type="application/json"),
                    422, "validation")
    assert body["errors"][0]["field"] == named and "control character" in body["errors"][0]["message"], body
    _nothing_stored(sqlite_api.node)
    # escapes of characters XML can carry still pass: tab, line breaks, an emoji as a surrogate pair
    doc = sqlite_api.document(note="第一行\n第二行\t\r\n\U0001F4C4")
    assert sqlite_api.post("/api/v1/documents", data=json.dumps(doc).encode(),
                           content_type="application/json").status_code == 202


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", ".", "附件\\1.pdf", "dir/附件1.pdf"])
def test_a_file_name_that_is_a_path_is_refused_naming_the_field(sqlite_api, name):
    """A body's or attachment's name becomes a file name at legacy systems (an SFTP drop, the
    exchange box): no folder in it, and not . or .."""
    doc = sqlite_api.document()
    doc["attachments"] = [{"sha256": doc["body"]["sha256"], "name": name}]
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    assert body["errors"] == [{"field": "attachments.0.name", "message": "a file name may not contain / or \\ or a "
                               "control character (nor U+FFFE / U+FFFF), or be . or .."}], body
    _nothing_stored(sqlite_api.node)
    doc["attachments"] = [{"sha256": doc["body"]["sha256"], "name": "...附件.pdf"}]  # dots alone are a name
    assert sqlite_api.post("/api/v1/documents", json=doc).status_code == 202


@pytest.mark.parametrize("query", [
    "cursor=" + base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", {"a": 1}]').decode(),
    "cursor=" + base64.urlsafe_b64encode(b'[1, "x"]').decode(),
    "cursor=" + base64.urlsafe_b64encode(b'["2026-01-01T00:00:00", null]').decode(),
    "cursor=not-base64!",
    "limit=-5", "limit=0", "limit=abc", "limit=%EF%BC%95",  # a fullwidth ５
    "status=bogus",
])
def test_list_parameters_out_of_range_are_a_clear_400(sqlite_api, query):
    body = _problem(sqlite_api.get(f"/api/v1/documents?{query}"), 400, "validation")
    assert body["errors"][0]["field"] == query.split("=")[0]


def test_list_limit_above_the_maximum_gives_the_maximum(sqlite_api):
    assert sqlite_api.get("/api/v1/documents?limit=99999999999999999999").status_code == 200


def test_a_message_id_reused_for_a_different_message_is_a_conflict(sqlite_api):
    doc = sqlite_api.document(message_id="caller-msg-0001")
    first = sqlite_api.post("/api/v1/documents", json=doc)
    assert first.status_code == 202
    again = sqlite_api.post("/api/v1/documents", json=doc)  # the same message: a replay
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == "caller-msg-0001:prefecture"
    other = {**doc, "title": "另一份通知"}
    body = _problem(sqlite_api.post("/api/v1/documents", json=other), 409, "message-id-conflict")
    assert "caller-msg-0001" in body["detail"]
    with sqlite_api.node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 1
        assert "另一份通知".encode() not in s.get(Message, "caller-msg-0001:prefecture").envelope_xml


def test_recalling_a_document_with_nothing_left_to_recall_is_a_conflict(sqlite_api):
    from gateway.models import AuditEntry

    mid = sqlite_api.post("/api/v1/documents", json=sqlite_api.document()).get_json()["id"]
    r = sqlite_api.post(f"/api/v1/documents/{mid}/recall")
    assert r.status_code == 202 and r.get_json()["recipients"][0]["status"] == "recalled"

    def recalls() -> int:
        with sqlite_api.node.db.sessions() as s:
            return s.scalar(select(func.count()).select_from(AuditEntry).where(AuditEntry.action == "message.recall"))

    before = recalls()
    body = _problem(sqlite_api.post(f"/api/v1/documents/{mid}/recall"), 409, "conflict")
    assert "no copy left to recall" in body["detail"]
    assert recalls() == before  # nothing happened, nothing audited


def test_a_wrong_method_answers_405_with_allow_and_a_missing_key_401_with_www_authenticate(sqlite_api):
    r = sqlite_api.client.delete("/api/v1/documents")
    _problem(r, 405, "method-not-allowed")
    assert set(r.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    r = sqlite_api.client.get("/api/v1/documents")
    _problem(r, 401, "unauthenticated")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("over, field", [
    ({"title": "   "}, "title"),
    ({"issuer": " "}, "issuer"),
    ({"written_date": "20261120"}, "written_date"),
    ({"written_date": "2026-W47-5"}, "written_date"),
    ({"written_date": "0001-01-01"}, "written_date"),
    ({"doc_number": "州政发〔0000〕1号"}, "doc_number"),
    ({"doc_number": "州政发〔2026〕99999999999999999999号"}, "doc_number"),
    ({"doc_number": "州政发〔２０２６〕１２号"}, "doc_number"),
    ({"sealed": "yes"}, "sealed"),
    ({"printer": {"name": "州政府办公室", "date": "not a date"}}, "printer.date"),
    ({"classification": "机密"}, "classification_period"),  # a rule across fields names its field
    ({"doc_type": "请示", "signer": None}, "signer"),
    ({"signer": ""}, "signer"),  # the payload XSD's texts have a character at least
    ({"note": ""}, "note"),
    ({"publish_level": ""}, "publish_level"),
    ({"recipients": [{"unit": COUNTY_A}, {"unit": COUNTY_A}]}, "recipients"),
])
def test_implausible_values_are_refused_naming_the_field(sqlite_api, over, field):
    doc = {**sqlite_api.document(), **over}
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    assert [e["field"] for e in body["errors"]] == [field], body
    _nothing_stored(sqlite_api.node)


def test_refusals_about_content_name_the_field(sqlite_api):
    doc = sqlite_api.document()
    empty = sqlite_api.upload(b"")
    body = _problem(sqlite_api.post("/api/v1/documents", json={**doc, "body": {"sha256": empty, "name": "正文.ofd"}}),
                    422, "validation")
    assert body["errors"][0]["field"] == "body.sha256" and "empty" in body["detail"]
    ghost = "0" * 64
    body = _problem(sqlite_api.post("/api/v1/documents", json={**doc, "attachments": [
        {"sha256": doc["body"]["sha256"], "name": "附件1.pdf"}, {"sha256": ghost, "name": "附件2.pdf"}]}),
        422, "unknown-blob")
    assert body["errors"] == [{"field": "attachments.1.sha256",
                               "message": f"no content with SHA-256 {ghost} was uploaded with this API key"}]
    body = _problem(sqlite_api.post("/api/v1/documents", json=sqlite_api.document(
        recipients=(COUNTY_A, "91110000600037341L"))), 422, "no-route")
    assert body["errors"][0]["field"] == "recipients.1.unit"
    _nothing_stored(sqlite_api.node)
    # the plausible forms still pass
    for ok in ({"written_date": "2026-11-20"}, {"written_date": "2026年1月5日"}, {"doc_number": "州政发〔2026〕123456号"},
               {"printer": {"name": "州政府办公室", "date": "2026年11月20日"}}, {"sealed": False}):
        assert sqlite_api.post("/api/v1/documents", json={**sqlite_api.document(), **ok}).status_code == 202, ok


def test_an_uploads_location_answers_with_its_size_and_nothing_else_does(sqlite_api):
    r = sqlite_api.post("/api/v1/blobs", data=b"12345", content_type="application/octet-stream")
    assert r.status_code == 201
    got = sqlite_api.get(r.headers["Location"])
    assert got.status_code == 200 and got.get_json() == r.get_json() == {
        "sha256": hashlib.sha256(b"12345").hexdigest(), "size": 5}
    _problem(sqlite_api.get("/api/v1/blobs/" + "0" * 64), 404, "not-found")
    _problem(sqlite_api.get("/api/v1/blobs/..%2Fgw.db"), 404, "not-found")
    reader = Api(sqlite_api.node, scopes=("documents:read",))
    _problem(reader.get(r.headers["Location"]), 403, "forbidden-scope")


def test_a_key_may_name_only_content_it_uploaded(sqlite_api):
    """A hash is not a bearer token: a key that learned the SHA-256 of another key's
    (classified) body can neither send it on in a document of its own nor learn that it exists."""
    secret = b"\x00" + "机密正文".encode() * 100
    owner = Api(sqlite_api.node, scopes=("documents:send", "blobs:write"), clearance="机密")
    sha = owner.upload(secret)
    doc = owner.document(classification="机密", classification_period="10年")
    doc["body"] = {"sha256": sha, "name": "正文.ofd"}
    assert owner.post("/api/v1/documents", json=doc).status_code == 202

    other = Api(sqlite_api.node, scopes=("documents:send", "blobs:write"), clearance="非密")
    plain = other.document()
    plain["body"] = {"sha256": sha, "name": "正文.ofd"}
    body = _problem(other.post("/api/v1/documents", json=plain), 422, "unknown-blob")
    assert body["errors"][0]["field"] == "body.sha256"
    _problem(other.get(f"/api/v1/blobs/{sha}"), 404, "not-found")  # no existence oracle either
    assert owner.get(f"/api/v1/blobs/{sha}").status_code == 200
    # a key that has the content itself uploads it (nothing new is stored) and may then name it
    assert other.upload(secret) == sha
    assert other.post("/api/v1/documents", json=plain).status_code == 202


def test_copy_numbers_are_unique_and_never_000000(sqlite_api):
    from tests.plugins.gatewaynode import CITY_B, EMERGENCY

    classified = {"classification": "秘密", "classification_period": "1年"}
    doc = sqlite_api.document(recipients=(COUNTY_A, CITY_B), **classified)
    doc["recipients"] = [{"unit": COUNTY_A, "copy_no": "000001"}, {"unit": CITY_B, "copy_no": "000001"}]
    body = _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    assert body["errors"][0]["field"] == "recipients" and "000001" in body["detail"]
    doc["recipients"] = [{"unit": COUNTY_A, "copy_no": "000000"}]
    _problem(sqlite_api.post("/api/v1/documents", json=doc), 422, "validation")
    _nothing_stored(sqlite_api.node)
    # numbers not given are the lowest ones nobody was given
    doc["recipients"] = [{"unit": COUNTY_A}, {"unit": CITY_B, "copy_no": "000001"}, {"unit": EMERGENCY}]
    mid = sqlite_api.post("/api/v1/documents", json=doc).get_json()["id"]
    got = {r["unit"]: r["copy_no"] for r in sqlite_api.get(f"/api/v1/documents/{mid}").get_json()["recipients"]}
    assert got == {COUNTY_A: "000002", CITY_B: "000001", EMERGENCY: "000003"}


def test_ling_is_sent_as_its_full_name(sqlite_api):
    """命令（令） is one 文种: the short form is accepted and carried as 命令, which the
    legacy document service knows."""
    mid = sqlite_api.post("/api/v1/documents", json=sqlite_api.document(doc_type="令")).get_json()["id"]
    assert sqlite_api.get(f"/api/v1/documents/{mid}").get_json()["doc_type"] == "命令"


def test_messages_of_a_subsystem_an_adapter_cannot_carry_are_refused(tmp_path):
    """The legacy systems carry official documents only: a duty report routed to one is
    refused before anything is stored (it could never be delivered), and a route that names
    such a subsystem is refused when the node starts."""
    from lxml import etree

    from gateway import migrate, pipeline
    from gateway.config import ConfigError
    from gateway.envelope import Envelope, Recipient
    from gateway.node import Node
    from tests.plugins.gatewaynode import PREFECTURE, node_config

    box = {"type": "xml-exchange", "mode": "folder", "folder": str(tmp_path / "box")}
    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db", adapters={"box": box},
                      routes=[{"units": [COUNTY_A], "adapter": "box"}])
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        node.check_adapters()  # a route for every subsystem is fine: documents can go
        payload = etree.Element("{urn:egov:gateway:legacy:v1}legacy", format="dutyreport")
        payload.append(etree.Element("dutyreport", unit=PREFECTURE))
        env = Envelope(subsystem="duty", type="duty-report", sender_unit=PREFECTURE,
                       recipients=[Recipient(COUNTY_A)], payload=payload)
        with pytest.raises(pipeline.Rejected, match="cannot take duty messages"):
            pipeline.accept(node, env, actor="adapter:drop", source="adapter:drop")
        _nothing_stored(node)
    finally:
        node.close()
    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db", adapters={"box": box},
                      routes=[{"subsystem": "duty", "units": [COUNTY_A], "adapter": "box"}])
    node = Node(cfg)
    try:
        with pytest.raises(ConfigError, match=r"routes\[0\].subsystem: 'duty' messages cannot go to adapter 'box'"):
            node.check_adapters()
    finally:
        node.close()
