"""The documents API and the one path behind it, on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import datetime, UTC

from sqlalchemy import func, select

from gateway import audit
from gateway.envelope import Receipt
from gateway.inbound import collect
from gateway.models import AuditEntry, Delivery, Message, OutboxEntry
from gateway.worker import Worker
from adapters.base import PermanentError, PolledItem, RetryableError
from systems.documents.schemas import DocumentOut
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, COUNTY_C, EMERGENCY, Api


def _count(node, model) -> int:  # type: ignore[no-untyped-def]
    with node.db.sessions() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_accepted_document_is_stored_with_audit_and_outbox_before_202(api, gw_node):
    r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, CITY_B)))
    assert r.status_code == 202, r.get_json()
    body = r.get_json()
    DocumentOut.model_validate(body)  # the 202 answer keeps to its published schema
    assert [x["status"] for x in body["recipients"]] == ["queued", "queued"]
    assert r.headers["Location"] == f"/api/v1/documents/{body['id']}"
    with gw_node.db.sessions() as s:
        assert s.get(Message, body["id"]) is not None
        assert s.scalar(select(func.count()).select_from(OutboxEntry).where(OutboxEntry.kind == "deliver")) == 2
        actions = s.scalars(select(AuditEntry.action)).all()
    assert "message.accept" in actions


def test_worker_delivers_each_recipient_through_its_routed_adapter(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, CITY_B))).get_json()
    Worker(gw_node).drain()
    rec, rec2 = gw_node.adapter("rec"), gw_node.adapter("rec2")
    assert [d.recipient.unit for d in rec.delivered] == [COUNTY_A]
    assert [d.recipient.unit for d in rec2.delivered] == [CITY_B]
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()
    assert {x["unit"]: x["status"] for x in got["recipients"]} == {COUNTY_A: "delivered", CITY_B: "delivered"}


def test_recipient_at_a_node_that_is_not_a_peer_has_no_route(api, gw_node, monkeypatch):
    # the directory places the unit at county-c, with which this node has no link (and no parent)
    monkeypatch.setattr(gw_node.directory, "node_for", lambda unit: "county-c" if unit == COUNTY_C else None)
    r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_C,)))
    assert r.status_code == 422, r.get_json()
    problem = r.get_json()
    assert problem["type"] == "urn:egov:gateway:problem:no-route"
    assert "county-c" in problem["detail"] and "not a peer" in problem["detail"]
    assert Worker(gw_node).run_once() == 0


def test_sign_for_receipt_updates_status_once(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    ref = rec.delivered[0].remote_ref
    receipt = Receipt(unit=COUNTY_A, action="SIGNED", remote_ref=ref, signer="李某", receipt_no="JXF-1",
                      time=datetime(2026, 11, 20, 10, 15, tzinfo=UTC))
    rec.pending_items = [PolledItem(key="rec:1", receipt=receipt)]
    assert collect(gw_node, "rec") == {"signed": 1}
    rec.pending_items = [PolledItem(key="rec:1", receipt=receipt)]  # the same item again
    assert collect(gw_node, "rec") == {"duplicate": 1}
    assert rec.acked == ["rec:1", "rec:1"]
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]
    assert (got["status"], got["signer"], got["receipt_no"]) == ("signed", "李某", "JXF-1")
    assert [x["action"] for x in got["receipts"]] == ["SIGNED"]


def test_a_copy_the_legacy_system_refused_fails_with_its_reason(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    receipt = Receipt(unit=COUNTY_A, action="REFUSED", remote_ref=rec.delivered[0].remote_ref,
                      reason="发文字号格式错误，无法登记")
    rec.pending_items = [PolledItem(key="rec:refused", receipt=receipt)]
    assert collect(gw_node, "rec") == {"failed": 1}
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]
    assert got["status"] == "failed" and "发文字号格式错误" in got["last_error"]
    assert [x["action"] for x in got["receipts"]] == ["REFUSED"]


def test_receipt_from_a_unit_we_did_not_send_to_is_rejected(api, gw_node):
    api.post("/api/v1/documents", json=api.document())
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    rejected: list[str] = []
    item = PolledItem(key="rec:x", receipt=Receipt(unit=CITY_B, action="SIGNED", remote_ref=rec.delivered[0].remote_ref),
                      _reject=rejected.append)
    rec.pending_items = [item]
    assert collect(gw_node, "rec") == {"rejected": 1}
    assert rejected and "no delivery through adapter rec matches" in rejected[0]


def test_a_receipt_collected_by_one_adapter_never_applies_to_another_adapters_copy(api, gw_node):
    """Each legacy system speaks only for the copies handed to it: a receipt arriving through
    rec2 (another system, or its callback) for a copy delivered through rec is refused."""
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    Worker(gw_node).drain()
    ref = gw_node.adapter("rec").delivered[0].remote_ref
    rejected: list[str] = []
    forged = Receipt(unit=COUNTY_A, action="RETURNED", remote_ref=ref, signer="attacker", reason="forged")
    gw_node.adapter("rec2").pending_items = [PolledItem(key="rec2:x", receipt=forged, _reject=rejected.append)]
    assert collect(gw_node, "rec2") == {"rejected": 1}
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]
    assert got["status"] == "delivered" and got["signer"] is None


def test_retryable_failures_back_off_then_deliver(api, gw_node):
    api.post("/api/v1/documents", json=api.document())
    rec = gw_node.adapter("rec")
    rec.failures = [RetryableError("HTTP 503"), RetryableError("HTTP 503")]
    Worker(gw_node).drain(timeout=10)
    import time
    deadline = time.time() + 5
    while not rec.delivered and time.time() < deadline:
        Worker(gw_node).run_once()
        time.sleep(0.02)
    assert len(rec.delivered) == 1
    with gw_node.db.sessions() as s:
        e = s.scalars(select(OutboxEntry)).one()
        assert (e.state, e.attempts) == ("done", 3)
        outcomes = s.scalars(select(AuditEntry.outcome).where(AuditEntry.action == "delivery.attempt")).all()
    assert outcomes == ["retry", "retry", "delivered"]


def test_permanent_failure_is_dead_lettered_at_once(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    gw_node.adapter("rec").failures = [PermanentError("Client.InvalidUrgency")]
    Worker(gw_node).drain()
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]
    assert got["status"] == "failed" and "InvalidUrgency" in got["last_error"]
    with gw_node.db.sessions() as s:
        assert s.scalars(select(OutboxEntry.state)).one() == "dead"


def test_exhausted_retries_are_dead_lettered(api, gw_node):
    api.post("/api/v1/documents", json=api.document())
    rec = gw_node.adapter("rec")
    rec.failures = [RetryableError("timeout")] * 3  # max_attempts = 3 in the test config
    import time
    deadline = time.time() + 5
    while time.time() < deadline:
        Worker(gw_node).run_once()
        with gw_node.db.sessions() as s:
            if s.scalars(select(OutboxEntry.state)).one() == "dead":
                break
        time.sleep(0.02)
    with gw_node.db.sessions() as s:
        assert s.scalars(select(Delivery.status)).one() == "failed"


def test_urgent_documents_are_claimed_first(api, gw_node):
    for _ in range(5):
        api.post("/api/v1/documents", json=api.document(urgency="平件"))
    api.post("/api/v1/documents", json=api.document(urgency="加急"))
    urgent = api.post("/api/v1/documents", json=api.document(urgency="特急")).get_json()["id"]
    w = Worker(gw_node, threads=1)
    w.run_once()
    assert gw_node.adapter("rec").delivered[0].message_id == urgent
    w.run_once()
    assert gw_node.adapter("rec").delivered[1].envelope.urgency == "加急"


def test_same_message_id_or_idempotency_key_is_accepted_once(api, gw_node):
    doc = api.document(message_id="oa-2026-000037")
    r1 = api.post("/api/v1/documents", json=doc)
    r2 = api.post("/api/v1/documents", json=doc)
    assert (r1.status_code, r2.status_code) == (202, 202)
    assert r2.headers.get("Idempotent-Replayed") == "true"
    doc2 = api.document()
    a = api.post("/api/v1/documents", json=doc2, headers={"Idempotency-Key": "k-1"})
    b = api.post("/api/v1/documents", json=doc2, headers={"Idempotency-Key": "k-1"})
    assert a.get_json()["id"] == b.get_json()["id"]
    c = api.post("/api/v1/documents", json={**doc2, "title": "另一个标题"}, headers={"Idempotency-Key": "k-1"})
    assert c.status_code == 422 and c.get_json()["type"].endswith("idempotency-key-reused")
    assert "exact bytes" in c.get_json()["detail"] and "new key" in c.get_json()["detail"]  # what to do
    assert _count(gw_node, Message) == 2


def test_a_callers_own_id_is_stored_with_the_node_id_and_found_by_either_form(api, gw_node):
    """A caller's message_id X is stored as X:<node> (envelope.own_id), so that calling systems
    at two nodes that number alike never meet; X still finds, resends and recalls it."""
    doc = api.document(message_id="oa-2026-000099")
    r = api.post("/api/v1/documents", json=doc)
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["id"] == "oa-2026-000099:prefecture"
    assert r.headers["Location"].endswith("/api/v1/documents/oa-2026-000099:prefecture")
    for given in ("oa-2026-000099", "oa-2026-000099:prefecture"):
        again = api.post("/api/v1/documents", json={**doc, "message_id": given})
        assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true", given
        assert again.get_json()["id"] == "oa-2026-000099:prefecture"
        got = api.get(f"/api/v1/documents/{given}")
        assert got.status_code == 200 and got.get_json()["id"] == "oa-2026-000099:prefecture", given
        xml = api.get(f"/api/v1/documents/{given}", headers={"Accept": "application/xml"})
        assert b"<message-id>oa-2026-000099:prefecture</message-id>" in xml.data
    other = api.post("/api/v1/documents", json={**doc, "message_id": "oa-2026-000099", "title": "另一份"})
    assert other.status_code == 409 and other.get_json()["type"].endswith(":message-id-conflict")
    assert api.post("/api/v1/documents/oa-2026-000099/recall").status_code == 202
    assert api.get("/api/v1/documents/oa-2026-000099").get_json()["recipients"][0]["status"] == "recalled"
    # the whole id must fit the envelope's 128 characters: the answer says how long X may be here
    r = api.post("/api/v1/documents", json=api.document(message_id="x" * 120))
    assert r.status_code == 422 and r.get_json()["errors"][0]["field"] == "message_id"
    assert "at most 117 characters" in r.get_json()["detail"]
    assert api.post("/api/v1/documents", json=api.document(message_id="y" * 117)).get_json()["id"] == "y" * 117 + ":prefecture"
    assert _count(gw_node, Message) == 2


def test_a_document_stored_under_the_callers_id_alone_keeps_it_when_sent_again(api, gw_node):
    """A node of a version from before 2026-11-28 stored a caller's id as it was. After the
    upgrade the caller resends (it never got the answer): a replay of that document, not a
    second one under <id>:<node>."""
    from gateway import pipeline
    from gateway.envelope import Envelope

    doc = api.document(message_id="oa-2026-000100")
    first = api.post("/api/v1/documents", json=doc).get_json()["id"]
    with gw_node.db.sessions() as s:
        m = s.get(Message, first)
        env, key = Envelope.from_xml(m.envelope_xml), m.api_key_id
    # as the old version stored it: the caller's id alone, by the same key
    env.message_id = "oa-2026-000101"
    pipeline.accept(gw_node, env, actor="api", api_key_id=key)
    r = api.post("/api/v1/documents", json={**doc, "message_id": "oa-2026-000101"})
    assert r.status_code == 202 and r.headers.get("Idempotent-Replayed") == "true", r.get_json()
    assert r.get_json()["id"] == "oa-2026-000101"
    assert _count(gw_node, Message) == 2


def test_the_callers_own_id_alone_finds_its_document_where_another_is_stored_under_it(api, gw_node):
    """A node of an older version stored a document of a caller at another node under that
    caller's id alone (oa-2026-000102), and forwarded it here. A caller here sends its own
    oa-2026-000102 (stored as oa-2026-000102:prefecture): the id alone finds, and recalls,
    the caller's document, not the other one (a 404 to a key without admin; to this one, with
    admin, the other document, whose copies its recall would have recalled)."""
    from gateway import pipeline
    from gateway.envelope import Envelope

    doc = api.document(message_id="oa-2026-000103")
    first = api.post("/api/v1/documents", json=doc).get_json()["id"]
    with gw_node.db.sessions() as s:
        env = Envelope.from_xml(s.get(Message, first).envelope_xml)
    env.message_id = "oa-2026-000102"  # another node's caller's, as an older version stored it
    pipeline.accept(gw_node, env, actor="node:county-b")
    r = api.post("/api/v1/documents", json={**doc, "message_id": "oa-2026-000102", "title": "本级来文"})
    assert r.status_code == 202 and r.get_json()["id"] == "oa-2026-000102:prefecture", r.get_json()
    got = api.get("/api/v1/documents/oa-2026-000102")
    assert got.status_code == 200 and got.get_json()["id"] == "oa-2026-000102:prefecture", got.get_json()
    xml = api.get("/api/v1/documents/oa-2026-000102", headers={"Accept": "application/xml"})
    assert b"<message-id>oa-2026-000102:prefecture</message-id>" in xml.data
    assert api.post("/api/v1/documents/oa-2026-000102/recall").status_code == 202
    with gw_node.db.sessions() as s:
        assert s.scalars(select(Delivery.status).where(Delivery.message_id == "oa-2026-000102")).all() == ["queued"]


def test_another_keys_document_stored_under_the_id_alone_does_not_stand_in_the_callers_way(api, gw_node):
    """Before 2026-11-28 calling system Y stored oa-2026-000104 here under that id alone.
    Calling system X, at the same node and numbering alike, sends its own oa-2026-000104:
    stored as oa-2026-000104:prefecture, not refused as Y's id (409) nor taken for Y's."""
    from gateway import pipeline
    from gateway.envelope import Envelope

    first = api.post("/api/v1/documents", json=api.document(message_id="oa-2026-000105")).get_json()["id"]
    with gw_node.db.sessions() as s:
        m = s.get(Message, first)
        env, y = Envelope.from_xml(m.envelope_xml), m.api_key_id
    env.message_id = "oa-2026-000104"  # Y's, as the old version stored it
    pipeline.accept(gw_node, env, actor="api", api_key_id=y)
    x = Api(gw_node, scopes=("documents:send", "documents:read", "blobs:write"))
    r = x.post("/api/v1/documents", json=x.document(message_id="oa-2026-000104", title="乙系统的文"))
    assert r.status_code == 202 and r.get_json()["id"] == "oa-2026-000104:prefecture", r.get_json()
    assert x.get("/api/v1/documents/oa-2026-000104").get_json()["title"] == "乙系统的文"
    assert _count(gw_node, Message) == 3


def test_ids_this_node_makes_are_its_own_and_no_caller_or_legacy_system_takes_another_nodes(api, gw_node):
    """An id the gateway makes is <UUIDv7>:<node id> (envelope.new_message_id). Only that node
    stores a message under it: a caller (or a legacy system) here that saw an id county B made
    cannot take it before county B's document arrives, which would be refused then (409)."""
    import pytest

    from gateway import pipeline
    from gateway.envelope import Envelope, id_owner, new_message_id

    doc = api.document()
    r = api.post("/api/v1/documents", json=doc)
    mine = r.get_json()["id"]
    assert r.status_code == 202 and id_owner(mine) == "prefecture" and mine.startswith(mine[:36] + ":")
    again = api.post("/api/v1/documents", json={**doc, "message_id": mine})  # a retry with the id it was given
    assert again.status_code == 202 and again.headers.get("Idempotent-Replayed") == "true"
    theirs = new_message_id("county-b")
    r = api.post("/api/v1/documents", json=api.document(message_id=theirs))
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["type"].endswith(":foreign-message-id") and "county-b" in r.get_json()["detail"]
    assert r.get_json()["errors"][0]["field"] == "message_id"
    with gw_node.db.sessions() as s:
        [entry] = s.scalars(select(AuditEntry).where(AuditEntry.action == "api.refuse")).all()
        stored = s.get(Message, mine).envelope_xml
    assert entry.outcome == "foreign-message-id"
    env = Envelope.from_xml(stored)
    env.message_id = theirs
    with pytest.raises(pipeline.Rejected) as err:
        pipeline.accept(gw_node, env, actor="adapter:rec", source="adapter:rec")
    assert err.value.kind == "foreign-message-id"
    assert _count(gw_node, Message) == 1


def test_recall_before_delivery_withdraws_and_after_sign_for_is_too_late(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A, EMERGENCY))).get_json()
    r = api.post(f"/api/v1/documents/{body['id']}/recall")
    assert r.status_code == 202
    assert {x["status"] for x in r.get_json()["recipients"]} == {"recalled"}
    Worker(gw_node).drain()
    assert gw_node.adapter("rec").delivered == []


def test_recall_after_delivery_goes_to_the_legacy_system(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    Worker(gw_node).drain()
    api.post(f"/api/v1/documents/{body['id']}/recall")
    Worker(gw_node).drain()
    got = api.get(f"/api/v1/documents/{body['id']}").get_json()
    assert got["recipients"][0]["status"] == "recalled"


def test_adapters_get_the_remote_ref_stored_with_the_delivery(api, gw_node):
    """A delivery keeps the ref it was stored with at accept, whatever remote_ref() makes
    today (refs were UUIDv5 until 2026-11-28): a retry after an upgrade must reach the legacy
    system under the id it saw first, and so must a recall."""
    from sqlalchemy import update

    body = api.post("/api/v1/documents", json=api.document()).get_json()
    old = "0d4c7b1e-9a35-5f62-8b1d-3c2e4f5a6b7c"  # a UUIDv5, as stored before
    with gw_node.db.begin() as s:
        s.execute(update(Delivery).where(Delivery.message_id == body["id"]).values(remote_ref=old))
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    assert [d.remote_ref for d in rec.delivered] == [old] and rec.effects == {old: 1}
    api.post(f"/api/v1/documents/{body['id']}/recall")
    Worker(gw_node).drain()
    assert rec.recalled == [old]
    assert api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]["status"] == "recalled"


def test_list_is_paged_newest_first_and_only_the_callers(api, gw_node):
    ids = [api.post("/api/v1/documents", json=api.document()).get_json()["id"] for _ in range(3)]
    other = Api(gw_node, scopes=("documents:read",))
    assert other.get("/api/v1/documents").get_json()["items"] == []
    page1 = api.get("/api/v1/documents?limit=2").get_json()
    page2 = api.get(f"/api/v1/documents?limit=2&cursor={page1['next_cursor']}").get_json()
    got = [x["id"] for x in page1["items"] + page2["items"]]
    assert sorted(got) == sorted(ids) and page2["next_cursor"] is None


def test_status_answers_do_not_read_the_stored_envelope(api, gw_node):
    """A list page of 50 documents with 40 attachments each would read a megabyte of
    envelopes that the JSON answer never shows."""
    from sqlalchemy import event

    mid = api.post("/api/v1/documents", json=api.document()).get_json()["id"]
    seen: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        seen.append(statement)

    event.listen(gw_node.db.engine, "before_cursor_execute", record)
    try:
        assert api.get("/api/v1/documents").status_code == 200
        assert api.get(f"/api/v1/documents/{mid}").status_code == 200
        reads = [q for q in seen if "FROM messages" in q]
        assert reads and not any("envelope_xml" in q for q in reads)
        seen.clear()  # the XML answer is the envelope itself
        assert api.get(f"/api/v1/documents/{mid}", headers={"Accept": "application/xml"}).status_code == 200
        # one read of the message, with its envelope; none of the recipients' status rows
        assert [q for q in seen if "FROM messages" in q and "envelope_xml" in q] == [q for q in seen]
        assert len(seen) == 1
    finally:
        event.remove(gw_node.db.engine, "before_cursor_execute", record)


def test_get_as_xml_returns_the_canonical_envelope(api, gw_node):
    body = api.post("/api/v1/documents", json=api.document()).get_json()
    r = api.get(f"/api/v1/documents/{body['id']}", headers={"Accept": "application/xml"})
    assert r.mimetype == "application/xml"
    assert b"urn:egov:gateway:envelope:v1" in r.data and "州政办发〔2026〕37号".encode() in r.data


def test_canonical_xml_envelope_is_accepted_like_json(api, gw_node):
    from gateway.envelope import Envelope
    from systems.documents.payload import to_envelope
    from systems.documents.schemas import DocumentIn

    doc = DocumentIn.model_validate(api.document(recipients=(COUNTY_A,)))
    env = to_envelope(doc, message_id="xml-msg-0001", node_id="prefecture",
                      sizes={doc.body["sha256"]: 10})
    r = api.post("/api/v1/documents", data=env.to_xml(), content_type="application/xml")
    assert r.status_code == 202, r.get_json()
    assert r.get_json()["id"] == "xml-msg-0001:prefecture"  # the caller's own id, stored as this node's
    got = Envelope.from_xml(api.get("/api/v1/documents/xml-msg-0001", headers={"Accept": "application/xml"}).data)
    assert got.message_id == "xml-msg-0001:prefecture"


def test_an_xml_callers_payload_is_checked_against_the_payload_xsd(api, gw_node):
    """The envelope XSD leaves the payload to its own XSD: an element the payload schema does
    not have is refused (422 naming it), not dropped on the way to the request model."""
    from systems.documents.payload import to_envelope
    from systems.documents.schemas import DocumentIn

    doc = DocumentIn.model_validate(api.document(recipients=(COUNTY_A,)))
    xml = to_envelope(doc, message_id="xml-xsd-0001", node_id="prefecture", sizes={doc.body["sha256"]: 10}).to_xml()
    assert api.post("/api/v1/documents", data=xml, content_type="application/xml").status_code == 202
    bad = xml.replace(b"<sealed>", b"<stamp>x</stamp><sealed>").replace(b"xml-xsd-0001", b"xml-xsd-0002")
    r = api.post("/api/v1/documents", data=bad, content_type="application/xml")
    assert r.status_code == 422 and r.mimetype == "application/problem+json", r.get_data(as_text=True)
    assert "stamp" in r.get_json()["detail"] and r.get_json()["errors"][0]["field"].startswith("payload")
    assert api.get("/api/v1/documents/xml-xsd-0002").status_code == 404


def test_an_xml_body_is_read_in_the_charset_its_content_type_names(api, gw_node):
    """RFC 7303: the charset parameter wins; a GB18030 envelope without an XML declaration
    is read as GB18030, not refused as bad UTF-8."""
    from systems.documents.payload import to_envelope
    from systems.documents.schemas import DocumentIn

    doc = DocumentIn.model_validate(api.document(recipients=(COUNTY_A,)))
    env = to_envelope(doc, message_id="xml-gb-00001", node_id="prefecture", sizes={doc.body["sha256"]: 10})
    text = env.to_xml().decode("utf-8")
    text = text[text.index("?>") + 2:] if text.startswith("<?xml") else text  # no declaration
    r = api.post("/api/v1/documents", data=text.encode("gb18030"), content_type="application/xml; charset=GB18030")
    assert r.status_code == 202, r.get_json()
    got = api.get("/api/v1/documents/xml-gb-00001").get_json()
    assert got["title"] == doc.title
    r = api.post("/api/v1/documents", data=b"<a/>", content_type="application/xml; charset=x-nonsense")
    assert r.status_code == 400 and r.get_json()["type"].endswith(":bad-encoding")


def test_audit_chain_verifies_and_detects_tampering(api, gw_node):
    api.post("/api/v1/documents", json=api.document())
    Worker(gw_node).drain()
    with gw_node.db.sessions() as s:
        assert audit.verify(s).ok
    with gw_node.db.begin() as s:
        e = s.get(AuditEntry, 2)
        e.outcome = "changed"
    with gw_node.db.sessions() as s:
        r = audit.verify(s)
    assert not r.ok and r.seq == 2 and "altered" in r.problem


def test_audit_detects_a_removed_entry(api, gw_node):
    api.post("/api/v1/documents", json=api.document())
    Worker(gw_node).drain()
    with gw_node.db.begin() as s:
        s.delete(s.get(AuditEntry, 2))
    with gw_node.db.sessions() as s:
        r = audit.verify(s)
    assert not r.ok and "missing" in r.problem


def test_times_are_given_with_their_offset(api, gw_node):
    """A naive time would be read as Beijing time by a caller in UTC+8."""
    created = api.post("/api/v1/documents", json=api.document()).get_json()
    got = api.get(f"/api/v1/documents/{created['id']}").get_json()
    for body in (created, got):
        assert body["accepted_at"].endswith("Z"), body["accepted_at"]
    assert created["accepted_at"] == got["accepted_at"]


def test_documents_from_anywhere_but_the_api_are_held_to_the_same_rules(api, gw_node):
    """The XSD lets a 发文字号 with [ ] and 第, or a 请示 without 签发人, through: another node's
    (or a legacy system's) documents meet the documents rules before they are stored."""
    import pytest

    from gateway import pipeline
    from systems.documents.payload import D, to_envelope
    from systems.documents.schemas import DocumentIn

    doc = DocumentIn.model_validate(api.document())
    for i, (element, text, field) in enumerate([("doc-number", "州政办发[2026]第037号", "doc_number"),
                                                 ("urgency", "特提", "urgency")]):
        env = to_envelope(doc, message_id=f"from-node-{i:04d}", node_id="county-x", sizes={doc.body["sha256"]: 10})
        if element == "urgency":  # a header field
            env.urgency = text
        else:
            env.payload.find(D + element).text = text  # type: ignore[union-attr]
        with pytest.raises(pipeline.Rejected, match=field):
            pipeline.accept(gw_node, env, actor="node:county-x", source="node:county-x")
    with gw_node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0
    ok = to_envelope(doc, message_id="from-node-ok01", node_id="county-x", sizes={doc.body["sha256"]: 10})
    assert pipeline.accept(gw_node, ok, actor="node:county-x", source="node:county-x").created


def test_a_classified_document_from_elsewhere_must_carry_its_copy_numbers(api, gw_node):
    """The API numbers a classified document's copies itself; one that comes from another
    node or a legacy system without them is refused (DOMAIN.md: 秘密 and up carry a 份号)."""
    import dataclasses

    import pytest

    from gateway.envelope import Envelope
    from gateway.pipeline import Rejected, accept

    body = api.post("/api/v1/documents", json=api.document(classification="秘密", classification_period="1年",
                                                           recipients=(COUNTY_A, CITY_B))).get_json()
    assert all(r["copy_no"] for r in body["recipients"])
    with gw_node.db.sessions() as s:
        stored = s.get(Message, body["id"]).envelope_xml
    env = Envelope.from_xml(stored)
    env.message_id = "from-a-county-0001"
    env.recipients = [env.recipients[0], dataclasses.replace(env.recipients[1], copy_no=None)]
    with pytest.raises(Rejected) as err:
        accept(gw_node, env, actor="node:county-a", source="node:county-a")
    assert "recipients.1.copy_no: a 秘密 document carries a 份号" in str(err.value) and CITY_B in str(err.value)
    with gw_node.db.sessions() as s:
        assert s.get(Message, "from-a-county-0001") is None
    env.recipients = Envelope.from_xml(stored).recipients  # with its numbers it is taken
    assert accept(gw_node, env, actor="node:county-a", source="node:county-a").created


def test_a_caller_asking_for_xml_gets_the_stored_envelope_in_the_202(api, gw_node):
    """DESIGN.md: the canonical XML is returned where a caller asks for it; the 202 then is the
    envelope as stored (its generated id, its 份号), the same bytes a GET with XML gives."""
    from lxml import etree

    doc = api.document(classification="秘密", classification_period="1年")
    r = api.post("/api/v1/documents", json=doc, headers={"Accept": "application/xml", "Idempotency-Key": "x-1"})
    assert r.status_code == 202 and r.mimetype == "application/xml", r.get_data(as_text=True)[:300]
    root = etree.fromstring(r.get_data())
    mid = root.findtext("{*}header/{*}message-id") or root.findtext(".//{*}message-id")
    assert mid and r.headers["Location"] == f"/api/v1/documents/{mid}"
    stored = api.get(f"/api/v1/documents/{mid}", headers={"Accept": "application/xml"}).get_data()
    assert r.get_data() == stored
    again = api.post("/api/v1/documents", json=doc, headers={"Accept": "application/xml", "Idempotency-Key": "x-1"})
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == stored
    # JSON stays the default, also for */*
    r = api.post("/api/v1/documents", json=api.document(), headers={"Accept": "*/*"})
    assert r.status_code == 202 and r.mimetype == "application/json"


def test_a_replayed_send_and_a_recall_answer_with_the_receipts_a_get_shows(api, gw_node):
    """Every answer that shows a copy's status shows its receipts too: a replay (message_id or
    Idempotency-Key) and a recall are answered with the copies as they are now, so a signed
    copy comes with its SIGNED receipt, not with an empty list a client reads as "none"."""
    doc = api.document(recipients=(COUNTY_A, EMERGENCY), message_id="oa-2026-replay-receipts")
    first = api.post("/api/v1/documents", json=doc, headers={"Idempotency-Key": "replay-receipts"})
    assert first.status_code == 202
    Worker(gw_node).drain()
    rec = gw_node.adapter("rec")
    ref = next(d.remote_ref for d in rec.delivered if d.recipient.unit == COUNTY_A)
    rec.pending_items = [PolledItem(key="rec:9", receipt=Receipt(
        unit=COUNTY_A, action="SIGNED", remote_ref=ref, signer="李某", receipt_no="JXF-9",
        time=datetime(2026, 11, 20, 10, 15, tzinfo=UTC)))]
    assert collect(gw_node, "rec") == {"signed": 1}
    shown = api.get(f"/api/v1/documents/{doc['message_id']}").get_json()["recipients"]
    assert [x["action"] for x in shown[0]["receipts"]] == ["SIGNED"]
    for headers in ({}, {"Idempotency-Key": "replay-receipts"}):
        again = api.post("/api/v1/documents", json=doc, headers=headers)
        assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
        DocumentOut.model_validate(again.get_json())
        assert again.get_json()["recipients"] == shown
    recalled = api.post(f"/api/v1/documents/{doc['message_id']}/recall")
    assert recalled.status_code == 202
    mine = {x["unit"]: x for x in recalled.get_json()["recipients"]}
    assert mine[COUNTY_A]["status"] == "signed"
    assert [x["action"] for x in mine[COUNTY_A]["receipts"]] == ["SIGNED"]


def test_the_list_refuses_a_filter_it_does_not_have(api, gw_node):
    """A query parameter the list does not take is refused, naming it, rather than ignored:
    a caller asking for ?since= or ?sender_unit= would otherwise take every document for the
    filtered ones."""
    api.post("/api/v1/documents", json=api.document())
    for query in ("since=2026-11-01", "sender_unit=11522300GDR9YB9550", "Status=signed", "page=2"):
        r = api.get(f"/api/v1/documents?{query}")
        assert r.status_code == 400, (query, r.get_json())
        problem = r.get_json()
        name = query.split("=")[0]
        assert problem["errors"] == [{"field": name, "message": "not a parameter of this list; it takes "
                                                                "status, limit and cursor"}]
        assert f"'{name}'" in problem["detail"]
    assert len(api.get("/api/v1/documents?status=queued&limit=5").get_json()["items"]) == 1
