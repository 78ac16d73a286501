"""A compromised county node (its key is the attacker's) against the prefecture, in process:
signed requests from a node whose key the attacker holds, or captured ones replayed. Each
attack is refused with a problem answer; nothing it asks for happens."""
from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select, update

from gateway import migrate, nodekey
from gateway.app import create_app
from gateway.federation.keys import public_text
from gateway.federation import signing
from gateway.federation.signing import Signer
from gateway.models import AuditEntry, Delivery, Message, OutboxEntry
from gateway.node import Node
from systems.documents.payload import to_envelope
from systems.documents.schemas import DocumentIn
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, PREFECTURE, RecordingAdapter, node_config

URL = "http://localhost/federation/v1"


class Prefecture:
    """The prefecture node with two county peers; the test holds both counties' keys."""

    def __init__(self, tmp_path: Path, database_url: str, **county_a: Any) -> None:
        for p in ("county-a", "county-b"):
            (tmp_path / p).mkdir(exist_ok=True)
        self.keys = {p: nodekey.load_or_create(tmp_path / p) for p in ("county-a", "county-b")}
        peers = {p: {"url": "http://127.0.0.1:9", "public_key": public_text(k), "units": [u]}
                 for (p, k), u in zip(self.keys.items(), (COUNTY_A, CITY_B))}
        peers["county-a"].update(county_a)
        cfg = node_config(tmp_path, database_url, peers=peers, api={"max_blob_bytes": 4096},
                          routes=[{"units": [PREFECTURE], "adapter": "rec"}])
        migrate.upgrade(cfg.database_url())
        self.node = Node(cfg)
        self.client: FlaskClient = create_app(node=self.node).test_client()

    def post(self, as_node: str, path: str, body: Any) -> Any:
        raw = json.dumps(body, ensure_ascii=False).encode()
        headers = Signer(as_node, self.keys[as_node]).sign("POST", URL + path, {}, raw, to="prefecture")
        return self.client.post(URL + path, data=raw, headers={"Content-Type": "application/json", **headers})

    def get(self, as_node: str, path: str) -> Any:
        headers = Signer(as_node, self.keys[as_node]).sign("GET", URL + path, {}, None, to="prefecture")
        return self.client.get(URL + path, headers=headers)

    def audit(self, action: str) -> list[AuditEntry]:
        with self.node.db.sessions() as s:
            return list(s.scalars(select(AuditEntry).where(AuditEntry.action == action)))

    def messages(self) -> list[str]:
        with self.node.db.sessions() as s:
            return list(s.scalars(select(Message.id)))


@pytest.fixture
def pref(tmp_path: Path, database_url: str) -> Iterator[Prefecture]:
    RecordingAdapter.instances.clear()
    p = Prefecture(tmp_path, database_url)
    yield p
    p.node.close()


def forward(sender_unit: str, sender_node: str, hops: list[str], title: str = "冒充发文",
            content: bytes | None = None, inline: bool = True, to: str = PREFECTURE,
            message_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """A forward of a small document to the prefecture's own unit, its body inline (or, with
    ``inline`` off, to be fetched from the sender)."""
    content = content if content is not None else f"{title} 正文".encode()
    sha = hashlib.sha256(content).hexdigest()
    doc = DocumentIn.model_validate({
        "sender_unit": sender_unit, "issuer": "测试机关", "doc_type": "通知", "doc_number": "州政办发〔2026〕41号",
        "title": title, "written_date": "2026-11-26", "recipients": [{"unit": to}],
        "body": {"sha256": sha, "name": "正文.ofd", "media_type": "application/ofd"}, **extra})
    env = to_envelope(doc, message_id=message_id, node_id=sender_node, sizes={sha: len(content)})
    return {"message_id": env.message_id, "units": [to], "hops": hops,
            "envelope": env.to_xml().decode("utf-8"),
            "blobs": {sha: base64.b64encode(content).decode()} if inline else {}}


def test_a_county_forwards_a_document_of_its_own_unit(pref: Prefecture) -> None:
    r = pref.post("county-a", "/messages", forward(COUNTY_A, "county-a", ["county-a"]))
    assert r.status_code == 200, r.get_json()


def test_a_county_cannot_send_as_a_unit_of_another_county_by_naming_it_the_first_hop(pref: Prefecture) -> None:
    """County A claims the document came from county B and passed county A on its way: but
    only a node's parent relays for other nodes, and county A is nobody's parent here."""
    body = forward(CITY_B, "county-b", ["county-b", "county-a"])
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["type"].endswith(":forbidden-unit")
    assert body["message_id"] not in pref.messages()


def test_a_refused_forward_is_audited_in_the_name_of_the_node_that_signed_it(pref: Prefecture) -> None:
    """An authenticated peer's attempt is a security event of that node, not an anonymous one."""
    pref.post("county-a", "/messages", forward(CITY_B, "county-b", ["county-b", "county-a"]))
    [entry] = pref.audit("federation.reject")
    assert (entry.actor, entry.object, entry.outcome) == ("node:county-a", "POST /federation/v1/messages",
                                                          "forbidden-unit")
    assert pref.audit("api.refuse") == []


def test_a_county_cannot_send_as_a_unit_of_the_prefecture(pref: Prefecture) -> None:
    r = pref.post("county-a", "/messages", forward(PREFECTURE, "county-a", ["county-a"]))
    assert r.status_code == 422, r.get_json()
    r = pref.post("county-a", "/messages", forward(PREFECTURE, "prefecture", ["prefecture", "county-a"]))
    assert r.status_code == 422, r.get_json()


def serve_blob(pref: Prefecture, content: bytes) -> list[str]:
    """County A's node answers every blob fetch with ``content``; the paths fetched."""
    fetched: list[str] = []

    @contextmanager
    def get_stream(peer: str, path: str) -> Iterator[Any]:
        fetched.append(path)
        yield SimpleNamespace(raw=io.BytesIO(content))

    pref.node.federation.client.get_stream = get_stream  # type: ignore[method-assign]
    return fetched


def test_an_attachment_larger_than_this_node_takes_is_refused_before_it_is_fetched(pref: Prefecture) -> None:
    """A peer declares a body of any size it likes; it is held to [api] max_blob_bytes, as a
    caller's upload and a ferry file are, and is not fetched at all."""
    content = b"x" * 5000
    fetched = serve_blob(pref, content)
    body = forward(COUNTY_A, "county-a", ["county-a"], content=content, inline=False)
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 413, r.get_json()
    assert r.get_json()["type"].endswith(":too-large") and "4096" in r.get_json()["detail"]
    assert fetched == [] and body["message_id"] not in pref.messages()


def test_a_fetched_attachment_longer_than_its_envelope_says_is_a_422_not_a_500(pref: Prefecture) -> None:
    fetched = serve_blob(pref, b"y" * 3000)
    body = forward(COUNTY_A, "county-a", ["county-a"], content=b"y" * 1000, inline=False)
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 422, r.get_json()
    assert "does not match" in r.get_json()["detail"]
    assert len(fetched) == 1 and body["message_id"] not in pref.messages()


def test_the_same_impersonation_in_a_batch_item_is_refused_and_the_batch_goes_on(pref: Prefecture) -> None:
    forged = forward(CITY_B, "county-b", ["county-b", "county-a"], title="批量冒充")
    own = forward(COUNTY_A, "county-a", ["county-a"], title="批量本县")
    r = pref.post("county-a", "/batch", {"items": [{"seq": 1, "kind": "forward", **forged},
                                                  {"seq": 2, "kind": "forward", **own}]})
    assert r.status_code == 200, r.get_json()
    assert [(x["outcome"], x.get("type")) for x in r.get_json()["results"]] == [("rejected", "forbidden-unit"),
                                                                              ("ok", None)]
    assert forged["message_id"] not in pref.messages() and own["message_id"] in pref.messages()
    [entry] = pref.audit("federation.reject")
    assert (entry.actor, entry.object, entry.outcome) == ("node:county-a", "batch item 1", "forbidden-unit")


def test_a_refused_batch_item_sent_again_is_refused_again_not_answered_duplicate(pref: Prefecture) -> None:
    """The sender lost the first answer and sends the batch again: the refused item must not
    come back as a duplicate, which the sender records as handed over (its copies would wait
    for a status report that never comes)."""
    forged = forward(CITY_B, "county-b", ["county-b", "county-a"], title="再次冒充")
    own = forward(COUNTY_A, "county-a", ["county-a"], title="再次本县")
    batch = {"items": [{"seq": 1, "kind": "forward", **forged}, {"seq": 2, "kind": "forward", **own}]}
    assert pref.post("county-a", "/batch", batch).status_code == 200
    again = pref.post("county-a", "/batch", batch)
    assert again.status_code == 200, again.get_json()
    assert [x["outcome"] for x in again.get_json()["results"]] == ["rejected", "duplicate"]
    assert len(pref.audit("federation.reject")) == 1  # audited once, when it was refused


def test_a_county_cannot_take_the_message_id_another_county_made(pref: Prefecture) -> None:
    """County B's document goes by an id county B made (<UUIDv7>:county-b). County A, which
    saw the id (a copy of it for one of its units, say), sends a document of its own under it
    before county B's reaches the prefecture: refused and audited, so that county B's document
    is not then refused as a different message under a taken id (409 message-id-conflict)."""
    real = forward(CITY_B, "county-b", ["county-b"], title="乙市发文")
    assert real["message_id"].endswith(":county-b")
    squat = forward(COUNTY_A, "county-a", ["county-a"], title="抢占编号", message_id=real["message_id"])
    r = pref.post("county-a", "/messages", squat)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["type"].endswith(":foreign-message-id") and "county-b" in r.get_json()["detail"]
    [entry] = pref.audit("federation.reject")
    assert (entry.actor, entry.outcome) == ("node:county-a", "foreign-message-id")
    assert real["message_id"] not in pref.messages()
    r = pref.post("county-b", "/messages", real)
    assert r.status_code == 200, r.get_json()
    with pref.node.db.sessions() as s:
        assert s.get(Message, real["message_id"]).sender_unit == CITY_B  # type: ignore[union-attr]


def test_a_county_cannot_take_an_id_a_caller_of_another_county_chose(pref: Prefecture) -> None:
    """County B stores its caller's own id as <id>:county-b (envelope.own_id). County A, which
    saw it, cannot store a document under it at the prefecture first: the id names a node the
    prefecture knows (a peer), and county A is not it."""
    real = forward(CITY_B, "county-b", ["county-b"], title="乙市自编号", message_id="oa-2026-000037:county-b")
    squat = forward(COUNTY_A, "county-a", ["county-a"], title="抢占自编号", message_id=real["message_id"])
    r = pref.post("county-a", "/messages", squat)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["type"].endswith(":foreign-message-id") and "county-b" in r.get_json()["detail"]
    assert real["message_id"] not in pref.messages()
    assert pref.post("county-b", "/messages", real).status_code == 200
    # an id whose last part names no node the prefecture knows is anybody's, as before
    other = forward(COUNTY_A, "county-a", ["county-a"], title="普通编号", message_id="oa-2026-000038:nowhere")
    assert pref.post("county-a", "/messages", other).status_code == 200


def test_the_same_id_taking_in_a_batch_item_is_refused_and_audited(pref: Prefecture) -> None:
    real = forward(CITY_B, "county-b", ["county-b"], title="乙市批量")
    squat = forward(COUNTY_A, "county-a", ["county-a"], title="批量抢占", message_id=real["message_id"])
    r = pref.post("county-a", "/batch", {"items": [{"seq": 1, "kind": "forward", **squat}]})
    assert r.status_code == 200, r.get_json()
    assert [(x["outcome"], x.get("type")) for x in r.get_json()["results"]] == [("rejected", "foreign-message-id")]
    [entry] = pref.audit("federation.reject")
    assert (entry.actor, entry.object, entry.outcome) == ("node:county-a", "batch item 1", "foreign-message-id")
    assert pref.post("county-b", "/messages", real).status_code == 200


def test_a_county_cannot_recall_a_document_another_county_sent(pref: Prefecture) -> None:
    body = forward(CITY_B, "county-b", ["county-b"], title="乙市发文")
    assert pref.post("county-b", "/messages", body).status_code == 200
    r = pref.post("county-a", "/recall", {"message_id": body["message_id"], "units": [PREFECTURE]})
    assert r.status_code == 404, r.get_json()
    with pref.node.db.sessions() as s:
        assert pref.audit("message.recall") == [] and s.get(Message, body["message_id"]) is not None


def test_a_document_above_the_link_clearance_is_refused(pref: Prefecture) -> None:
    body = forward(COUNTY_A, "county-a", ["county-a"], title="绝密测试", classification="绝密",
                   classification_period="长期")
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 403, r.get_json()
    assert r.get_json()["type"].endswith(":clearance-too-low")


@pytest.mark.parametrize("nonce", ["n" * 65, "n" * 4000])
def test_a_nonce_longer_than_this_node_keeps_is_refused_as_a_bad_signature(pref: Prefecture, nonce: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The nonce is the signer's to choose; one no nonce column keeps is a 401, not a 500."""
    with monkeypatch.context() as m:
        m.setattr(signing.secrets, "token_urlsafe", lambda _n: nonce)
        r = pref.post("county-a", "/status", {"items": []})
    assert r.status_code == 401, r.get_json()
    assert r.get_json()["type"].endswith(":bad-signature") and "nonce" in r.get_json()["detail"]
    [entry] = pref.audit("federation.reject")
    assert entry.actor == "node:county-a"


@pytest.mark.parametrize("created", [10**12, -10**12])
def test_a_signature_created_beyond_any_calendar_date_is_stale_not_a_500(pref: Prefecture, created: int) -> None:
    """``created`` is the signer's number of seconds; one no date has (year 33658, or before
    year 1) is refused like any other request signed too far from this node's clock."""
    raw = b'{"items": []}'
    far = SimpleNamespace(timestamp=lambda: created)  # what the signing library reads of a datetime
    headers = Signer("county-a", pref.keys["county-a"]).sign("POST", URL + "/status", {}, raw,
                                                             created=far, to="prefecture")  # type: ignore[arg-type]
    assert f"created={created};" in headers["Signature-Input"]
    r = pref.client.post(URL + "/status", data=raw, headers={"Content-Type": "application/json", **headers})
    assert r.status_code == 401, r.get_data(as_text=True)[:300]
    assert r.get_json()["type"].endswith(":stale-request") and "clock" in r.get_json()["detail"]
    [entry] = pref.audit("federation.reject")
    assert entry.outcome == "stale-request"


@pytest.mark.parametrize("at", ["9999-12-31T23:59:59-14:00", "昨天下午", "2026-11-20", 20261120])
def test_a_status_time_no_column_can_keep_is_a_400_and_changes_nothing(pref: Prefecture, at: Any) -> None:
    """A peer's ``at`` that is no time in range (UTC would be year 10000, or before year 1)
    or no date-time at all is refused with the item's batch, neither a 500 the peer retries for
    ever nor a 签收 silently dated on arrival."""
    body = forward(CITY_B, "county-b", ["county-b"], to=COUNTY_A)
    assert pref.post("county-b", "/messages", body).status_code == 200
    item = {"message_id": body["message_id"], "unit": COUNTY_A, "status": "signed", "signer": "李某", "at": at}
    r = pref.post("county-a", "/status", {"items": [item]})
    assert r.status_code == 400, r.get_data(as_text=True)[:300]
    assert r.get_json()["type"].endswith(":validation") and "ISO 8601" in r.get_json()["detail"]
    with pref.node.db.sessions() as s:
        assert s.execute(select(Delivery.status, Delivery.signed_at).where(
            Delivery.message_id == body["message_id"])).all() == [("queued", None)]
    item["at"] = "2026-11-27T00:30:00+08:00"  # the same report, sent right
    assert pref.post("county-a", "/status", {"items": [item]}).get_json()["outcomes"] == {"signed": 1}
    with pref.node.db.sessions() as s:
        [signed_at] = s.scalars(select(Delivery.signed_at).where(Delivery.message_id == body["message_id"])).all()
    assert signed_at.isoformat() == "2026-11-26T16:30:00+00:00"


def test_reconcile_refuses_one_bad_time_in_a_peers_answer_and_repairs_the_rest(pref: Prefecture) -> None:
    """The nightly reconcile asks a peer for the status of open copies; one item of its answer
    with a time no column can keep is counted as refused and logged, the other items (and the
    peers after this one) are still repaired, rather than the whole run failing on it."""
    from gateway.federation import reconcile

    ids = []
    for title in ("对账一", "对账二"):
        body = forward(CITY_B, "county-b", ["county-b"], to=COUNTY_A, title=title)
        assert pref.post("county-b", "/messages", body).status_code == 200
        ids.append(body["message_id"])
    mine = {(mid, COUNTY_A): "queued" for mid in ids}
    theirs = [{"message_id": ids[0], "unit": COUNTY_A, "status": "signed", "signer": "李某", "at": "昨天下午"},
              {"message_id": ids[1], "unit": COUNTY_A, "status": "signed", "signer": "李某",
               "at": "2026-11-27T00:30:00+08:00"}]
    counts = {"checked": 2, "repaired": 0, "reforwarded": 0, "agree": 0}
    reconcile._repair(pref.node, "county-a", mine, theirs, counts)
    assert (counts["refused"], counts["repaired"]) == (1, 1)
    with pref.node.db.sessions() as s:
        rows = s.execute(select(Delivery.message_id, Delivery.status).where(Delivery.message_id.in_(ids))).all()
    assert {mid: status for mid, status in rows} == {ids[0]: "queued", ids[1]: "signed"}


def test_reconcile_leaves_out_the_copies_whose_forward_is_still_on_its_way(pref: Prefecture) -> None:
    """The peer cannot know a copy whose forward has not left yet: reconcile does not ask
    about it (it would answer "unknown", and the copy would be forwarded a second time). Each
    copy is judged by its own message's forward, not by one message's for all."""
    from gateway.federation import reconcile

    ids = []
    for title in ("在途一", "在途二"):
        body = forward(CITY_B, "county-b", ["county-b"], to=COUNTY_A, title=title)
        assert pref.post("county-b", "/messages", body).status_code == 200
        ids.append(body["message_id"])
    assert reconcile._open_copies(pref.node, "county-a") == []  # both forwards still queued here
    with pref.node.db.begin() as s:  # the second one's forward has left
        s.execute(update(OutboxEntry).where(OutboxEntry.kind == "forward", OutboxEntry.delivery_id.in_(
            select(Delivery.id).where(Delivery.message_id == ids[1]))).values(state="done"))
    assert [(m, u) for _, m, u, _ in reconcile._open_copies(pref.node, "county-a")] == [(ids[1], COUNTY_A)]


def test_a_county_whose_clearance_was_lowered_cannot_pull_what_was_queued_for_it_before(
        tmp_path: Path, database_url: str) -> None:
    """A 机密 document is queued for county A; then county A's link is lowered to 秘密 (its
    node is suspected compromised). Its pull gets nothing of that document, not even the
    body by its hash, and the copy fails here for the sender to see."""
    before = Prefecture(tmp_path, database_url, link="batch")
    body = forward(CITY_B, "county-b", ["county-b"], title="机密下发", to=COUNTY_A, classification="机密",
                   classification_period="10年")
    assert before.post("county-b", "/messages", body).status_code == 200
    before.node.close()
    pref = Prefecture(tmp_path, database_url, link="batch", clearance="秘密")
    try:
        sha = next(iter(body["blobs"]))
        r = pref.get("county-a", "/batch")
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["items"] == []
        assert pref.get("county-a", f"/messages/{body['message_id']}/blobs/{sha}").status_code == 404
        with pref.node.db.sessions() as s:
            assert s.scalars(select(Delivery.status).where(Delivery.message_id == body["message_id"])).all() == [
                "failed"]
    finally:
        pref.node.close()
