"""Mixed versions in a federation: a prefecture and its counties never upgrade on the same day,
so a node of this version meets peers that send fields it does not know (a newer version) or
leave out optional ones (an older version). What it does not know it ignores; what it cannot
read safely (an envelope of another version, a status it has no meaning for) it refuses with a
problem answer that says so, and nothing of it is stored."""
from __future__ import annotations

from pathlib import Path

from lxml import etree
from sqlalchemy import select

from gateway import nodekey
from gateway.envelope import NS, Envelope
from gateway.federation import directory
from gateway.federation.keys import public_text
from gateway.models import Delivery, Message
from tests.plugins.gatewaynode import CITY_B, COUNTY_A
from tests import test_federation_attacks
from tests.test_federation_attacks import Prefecture, forward

pref = test_federation_attacks.pref  # the prefecture with two county peers (the fixture)

DOC = "urn:egov:gateway:documents:v1"
EXT = "urn:example:gateway-ext:v9"  # a later version's extension namespace


def _with_extensions(xml: str) -> str:
    """The envelope as a newer node might write it: an element of its own namespace at the end
    of the header and of the envelope, and attributes of that namespace on the elements a
    later version may say more about."""
    root = etree.fromstring(xml.encode("utf-8"))
    header = root.find(f"{{{NS}}}header")
    assert header is not None
    etree.SubElement(header, f"{{{EXT}}}sign-deadline").text = "2026-11-30T18:00:00+08:00"
    etree.SubElement(root, f"{{{EXT}}}trace", {"id": "4bf92f3577b34da6"})
    document = root.find(f"{{{NS}}}payload/{{{DOC}}}document")
    assert document is not None
    etree.SubElement(document, f"{{{EXT}}}reply-by").text = "2026-12-05"  # the payload's own schema too
    document.set(f"{{{EXT}}}hint", "newer")
    for tag in ("sender", "recipient", "classification"):
        for el in root.iter(f"{{{NS}}}{tag}"):
            el.set(f"{{{EXT}}}hint", "newer")
    root.set(f"{{{EXT}}}profile", "v9")
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8").decode("utf-8")


def test_a_forward_with_fields_this_version_does_not_know_is_accepted(pref: Prefecture) -> None:
    body = forward(COUNTY_A, "county-a", ["county-a"], title="新版本字段")
    body.update({"trace": {"id": "4bf92f3577b34da6"}, "priority_hint": 1})  # fields of a newer version
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 200, r.get_json()
    assert body["message_id"] in pref.messages()


def test_a_forward_whose_envelope_carries_a_newer_versions_extensions_is_accepted(pref: Prefecture) -> None:
    """Extensions in a namespace of their own are ignored (the envelope's fields are read as
    before); a change to the envelope's own elements is a new envelope version instead."""
    body = forward(COUNTY_A, "county-a", ["county-a"], title="信封扩展")
    body["envelope"] = _with_extensions(body["envelope"])
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 200, r.get_json()
    with pref.node.db.sessions() as s:
        m = s.get(Message, body["message_id"])
        assert m is not None
        stored = Envelope.from_xml(m.envelope_xml)  # what this node keeps and passes on is read as before
        assert stored.payload.findtext(f"{{{DOC}}}title") == "信封扩展"
        assert stored.payload.findtext(f"{{{EXT}}}reply-by") == "2026-12-05"  # a payload travels as it came
        assert s.scalars(select(Delivery.unit).where(Delivery.message_id == m.id)).all() == ["11522300GDR9YB9550"]


def test_an_envelope_of_another_version_is_refused_saying_which(pref: Prefecture) -> None:
    body = forward(COUNTY_A, "county-a", ["county-a"], title="第二版信封")
    body["envelope"] = body["envelope"].replace('version="1"', 'version="2"', 1)
    r = pref.post("county-a", "/messages", body)
    assert r.status_code == 422, r.get_json()
    problem = r.get_json()
    assert problem["type"].endswith(":validation") and "version" in problem["detail"], problem
    assert body["message_id"] not in pref.messages()


def test_a_status_report_with_unknown_fields_or_without_optional_ones_is_applied(pref: Prefecture) -> None:
    body = forward(CITY_B, "county-b", ["county-b"], to=COUNTY_A)
    assert pref.post("county-b", "/messages", body).status_code == 200
    older = {"message_id": body["message_id"], "unit": COUNTY_A, "status": "delivered"}  # no at, signer …
    newer = {"message_id": body["message_id"], "unit": COUNTY_A, "status": "signed", "signer": "李某",
             "at": "2026-11-27T00:30:00+08:00", "read_by": ["王某"], "channel": {"kind": "mobile"}}
    r = pref.post("county-a", "/status", {"items": [older, newer], "sent_by_version": "9.0"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["outcomes"] == {"delivered": 1, "signed": 1}


def test_a_status_this_version_has_no_meaning_for_is_refused_saying_which(pref: Prefecture) -> None:
    body = forward(CITY_B, "county-b", ["county-b"], to=COUNTY_A)
    assert pref.post("county-b", "/messages", body).status_code == 200
    r = pref.post("county-a", "/status", {"items": [{"message_id": body["message_id"], "unit": COUNTY_A,
                                                      "status": "read"}]})
    assert r.status_code == 400 and r.get_json()["type"].endswith(":validation"), r.get_json()
    assert "'read'" in r.get_json()["detail"] and "signed" in r.get_json()["detail"]
    with pref.node.db.sessions() as s:
        assert s.scalars(select(Delivery.status).where(Delivery.message_id == body["message_id"])).all() == ["queued"]


def test_a_batch_item_with_unknown_fields_is_applied_and_one_of_an_unknown_kind_refused_alone(pref: Prefecture) -> None:
    first = forward(COUNTY_A, "county-a", ["county-a"], title="批量一")
    second = forward(COUNTY_A, "county-a", ["county-a"], title="批量二")
    r = pref.post("county-a", "/batch", {"items": [
        {"seq": 1, "kind": "forward", "trace": "x", **first},
        {"seq": 2, "kind": "acknowledge", "message_id": first["message_id"]},  # a kind of a later version
        {"seq": 3, "kind": "forward", **second}], "protocol": 9})
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    assert [(x["seq"], x["outcome"]) for x in results] == [(1, "ok"), (2, "rejected"), (3, "ok")]
    assert "'acknowledge'" in results[1]["detail"]
    assert {first["message_id"], second["message_id"]} <= set(pref.messages())


def test_a_directory_with_fields_this_version_does_not_know_is_read(tmp_path: Path) -> None:
    key = public_text(nodekey.load_or_create(tmp_path))
    doc = {"issuer": "prefecture", "version": 1764300000000, "issued_at": "2026-11-28T00:00:00Z",
           "expires_at": "2026-12-01T00:00:00Z", "format": 2, "signed_by_version": "9.0",
           "nodes": [{"id": "prefecture", "public_key": key, "url": "http://127.0.0.1:9", "region": "黔西南",
                      "units": [{"code": COUNTY_A, "name": "某县", "level": "county"}]}]}
    d = directory.parse(directory.canonical(doc))
    assert d.units == {COUNTY_A: "prefecture"}
