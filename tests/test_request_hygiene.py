"""Input that once reached the database or the log unchecked (a NUL PostgreSQL refuses, a lone
surrogate UTF-8 cannot hold, a receipt no column could keep), on SQLite and PostgreSQL: each is
a 4xx problem, nothing stored. The framing cases need a real server: tests/test_http_edges.py."""
from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from adapters.archive import write_receipt
from adapters.base import remote_ref
from adapters.simulators.exchange_box import ExchangeBoxServer
from gateway import migrate
from gateway.envelope import Receipt
from gateway.models import IngestedItem, Message, ReceiptRecord
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, EMERGENCY, Api, node_config


def _problem(r, status: int, kind: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"
    body = r.get_json()
    assert body["type"] == f"urn:egov:gateway:problem:{kind}", body
    return body


def _cursor(*parts: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode()


@pytest.mark.parametrize("path", ["/api/v1/documents/a%00b", "/api/v1/documents/a%0Ab",
                                  "/api/v1/documents/a%1B%5B2Jb", "/api/v1/documents/a%00b/recall"])
def test_a_path_with_control_characters_is_refused_before_any_query(api, path):
    r = api.post(path) if path.endswith("/recall") else api.get(path)
    body = _problem(r, 400, "validation")
    assert "control characters" in body["detail"] and "\x00" not in body["detail"]


def test_one_adapter_set_wrong_does_not_stop_the_others_being_polled(gw_node, monkeypatch):
    """A wrong setting fails the receipts run, naming it, but only after every other adapter
    has had its turn: the others' 签收 still come in."""
    from adapters.base import ConfigError, PolledItem
    from gateway.envelope import Receipt
    from gateway.inbound import collect_all

    api = Api(gw_node)
    body = api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,))).get_json()
    Worker(gw_node).drain()
    rec2 = gw_node.adapter("rec2")
    rec2.pending_items = [PolledItem(key="rec2:1", receipt=Receipt(unit=CITY_B, action="SIGNED",
                                                                     remote_ref=rec2.delivered[0].remote_ref,
                                                                     signer="王某", receipt_no="S-1"))]

    def wrong():  # type: ignore[no-untyped-def]
        raise ConfigError("adapters.rec.password_env: environment variable X is not set")

    monkeypatch.setattr(gw_node.adapter("rec"), "poll", wrong)  # polled first (names in order)
    with pytest.raises(ConfigError, match="password_env"):
        collect_all(gw_node)
    assert api.get(f"/api/v1/documents/{body['id']}").get_json()["recipients"][0]["status"] == "signed"


@pytest.mark.parametrize("query", [
    "cursor=" + _cursor("2026-01-01T00:00:00+00:00", "a\u0000b"),
    "cursor=" + _cursor("2026-01-01T00:00:00+00:00", "\ud800"),
    "cursor=" + _cursor("2026-01-01T00:00:00", "x"),  # no offset: not a cursor this API wrote
    "cursor=" + _cursor("2026-01-01T00:00:00+00:00", "x" * 129),
    "status=queued%00",
])
def test_a_cursor_or_parameter_no_database_could_compare_is_a_400(api, query):
    _problem(api.get(f"/api/v1/documents?{query}"), 400, "validation")


def test_a_cursor_this_api_wrote_still_pages(api):
    for _ in range(3):
        assert api.post("/api/v1/documents", json=api.document()).status_code == 202
    first = api.get("/api/v1/documents?limit=2").get_json()
    rest = api.get(f"/api/v1/documents?limit=2&cursor={first['next_cursor']}").get_json()
    assert len(first["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None


def test_a_query_parameter_given_twice_is_refused_not_picked(api):
    body = _problem(api.get("/api/v1/documents?limit=1&limit=abc"), 400, "validation")
    assert "'limit' is given 2 times" in body["detail"] and body["errors"][0]["field"] == "limit"


def test_json_in_another_charset_is_refused_and_a_byte_order_mark_is_ignored(api):
    doc = json.dumps(api.document(), ensure_ascii=False)
    r = api.post("/api/v1/documents", data=doc.encode("gbk"), content_type="application/json; charset=gbk")
    body = _problem(r, 415, "bad-encoding")
    assert "charset=gbk" in body["detail"] and "UTF-8" in body["detail"]
    with api.node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0
    r = api.post("/api/v1/documents", data=b"\xef\xbb\xbf" + doc.encode(), content_type="application/json")
    assert r.status_code == 202, r.get_json()
    r = api.post("/api/v1/documents", data=json.dumps(api.document()).encode(),
                 content_type="application/json; charset=UTF-8")
    assert r.status_code == 202, r.get_json()


def test_an_empty_idempotency_key_is_refused_not_ignored(api):
    r = api.post("/api/v1/documents", json=api.document(), headers={"Idempotency-Key": ""})
    assert "1 to 200 characters" in _problem(r, 400, "validation")["detail"]


@pytest.fixture
def box_node(tmp_path, database_url):  # type: ignore[no-untyped-def]
    box = ExchangeBoxServer().start()
    cfg = node_config(tmp_path, database_url,
                      adapters={"exchangebox": {"type": "xml-exchange", "mode": "http", "address": box.url}},
                      routes=[{"units": [EMERGENCY], "adapter": "exchangebox"}])
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield n
    n.close()
    box.stop()


def _callback(api: Api, receipt: Receipt):  # type: ignore[no-untyped-def]
    return api.client.post("/api/v1/callbacks/exchangebox", data=write_receipt(receipt),
                           headers={"Content-Type": "application/xml; charset=GB18030"})


def test_a_receipt_the_gateway_refuses_is_never_answered_ok(box_node):
    """The box takes 'OK' as 'delivered' and never sends again: a receipt that matches no
    copy, sent once or again, is answered with the reason."""
    api = Api(box_node)
    stray = Receipt(unit=EMERGENCY, action="SIGNED", remote_ref="0" * 36, signer="吴某", receipt_no="YJJ-1",
                    time=datetime.now(UTC))
    for _ in range(2):
        body = _problem(_callback(api, stray), 422, "validation")
        assert body["detail"].startswith("receipt refused") and "no delivery through adapter" in body["detail"] \
            or "refused when it first came" in body["detail"]
    with box_node.db.sessions() as s:
        assert s.scalar(select(func.count()).select_from(ReceiptRecord)) == 0
        assert s.scalars(select(IngestedItem.outcome)).all() == ["rejected"]


@pytest.mark.parametrize(("over", "said"), [
    ({"receipt_no": "R" * 101}, "receipt_no is 101 characters long"),
    ({"signer": "签" * 101}, "signer is 101 characters long"),
    ({"time": "9999-12-31T23:59:59-14:00"}, "out of range"),  # year 10000 in UTC
])
def test_a_receipt_no_column_could_keep_is_refused_with_the_reason(box_node, over, said):
    api = Api(box_node)
    mid = api.post("/api/v1/documents", json=api.document(recipients=(EMERGENCY,))).get_json()["id"]
    Worker(box_node).drain()
    fields = {"unit": EMERGENCY, "action": "SIGNED", "remote_ref": remote_ref(mid, EMERGENCY), "signer": "吴某",
              "receipt_no": "YJJ-2", "time": datetime(2026, 11, 28, 9, 0, tzinfo=UTC), **over}
    if isinstance(fields["time"], str):  # a time no datetime holds, as the box might write it
        xml = write_receipt(Receipt(**{**fields, "time": datetime(2026, 11, 28, 9, 0, tzinfo=UTC)}))
        stamp = re.search(rb"<time>([^<]*)</time>", xml)
        assert stamp is not None, xml
        xml = xml.replace(stamp.group(1), fields["time"].encode())
        r = api.client.post("/api/v1/callbacks/exchangebox", data=xml,
                            headers={"Content-Type": "application/xml; charset=GB18030"})
    else:
        r = _callback(api, Receipt(**fields))
    body = _problem(r, 422, "validation")
    assert said in body["detail"]
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert got["status"] == "delivered" and got["receipts"] == []


@pytest.mark.parametrize("stamp", ["2026-11-28", "2026-11-28 下午"])
def test_a_receipt_whose_time_is_no_date_and_time_is_a_400_naming_the_field(box_node, stamp):
    """A date alone says no time (midnight would be a guess); the box is told, nothing is stored."""
    api = Api(box_node)
    mid = api.post("/api/v1/documents", json=api.document(recipients=(EMERGENCY,))).get_json()["id"]
    Worker(box_node).drain()
    xml = write_receipt(Receipt(unit=EMERGENCY, action="SIGNED", remote_ref=remote_ref(mid, EMERGENCY), signer="吴某",
                                receipt_no="YJJ-3", time=datetime(2026, 11, 28, 9, 0, tzinfo=UTC)))
    xml = xml.replace(b"2026-11-28T09:00:00+00:00", stamp.encode("gb18030"))
    r = api.client.post("/api/v1/callbacks/exchangebox", data=xml,
                        headers={"Content-Type": "application/xml; charset=GB18030"})
    body = _problem(r, 400, "validation")
    assert "receipt/time" in body["detail"] and "is not a date and time" in body["detail"]
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert got["status"] == "delivered" and got["receipts"] == []
