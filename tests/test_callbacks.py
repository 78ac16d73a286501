"""The exchange box's receipt callback through the gateway's HTTP endpoint: guarded by the
adapter's callback token, applied once however often the box repeats it."""
from __future__ import annotations

from datetime import UTC, datetime

from adapters.archive import write_receipt
from adapters.base import remote_ref
from adapters.simulators.exchange_box import ExchangeBoxServer
from gateway import migrate
from gateway.envelope import Receipt
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import EMERGENCY, Api, node_config


def _node(tmp_path, database_url, box_url: str) -> Node:  # type: ignore[no-untyped-def]
    cfg = node_config(tmp_path, database_url,
                      adapters={"exchangebox": {"type": "xml-exchange", "mode": "http", "address": box_url,
                                                "callback_token_env": "TEST_BOX_TOKEN"}},
                      routes=[{"units": [EMERGENCY], "adapter": "exchangebox"}])
    migrate.upgrade(cfg.database_url())
    return Node(cfg)


def test_box_callback_needs_the_token_and_is_applied_once(tmp_path, database_url, monkeypatch):
    monkeypatch.setenv("TEST_BOX_TOKEN", "s3cret-token")
    box = ExchangeBoxServer().start()
    node = _node(tmp_path, database_url, box.url)
    try:
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document(recipients=(EMERGENCY,))).get_json()["id"]
        Worker(node).drain()
        got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
        assert got["status"] == "delivered", got
        body = write_receipt(Receipt(unit=EMERGENCY, action="SIGNED", remote_ref=remote_ref(mid, EMERGENCY),
                                     signer="吴某", receipt_no="YJJ-2026-9", time=datetime.now(UTC)))
        headers = {"Content-Type": "application/xml; charset=GB18030"}
        no_token = api.client.post("/api/v1/callbacks/exchangebox", data=body, headers=headers)
        assert no_token.status_code == 401 and no_token.mimetype == "application/problem+json"
        wrong = api.client.post("/api/v1/callbacks/exchangebox?token=guess", data=body, headers=headers)
        assert wrong.status_code == 401
        assert api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]["status"] == "delivered"
        for _ in range(2):  # the box repeats a callback it is unsure about
            ok = api.client.post("/api/v1/callbacks/exchangebox?token=s3cret-token", data=body, headers=headers)
            assert ok.status_code == 200, ok.get_data(as_text=True)
        got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
        assert (got["status"], got["signer"], got["receipt_no"]) == ("signed", "吴某", "YJJ-2026-9")
        assert len(got["receipts"]) == 1
        bad = api.client.post("/api/v1/callbacks/exchangebox?token=s3cret-token", data=b"<not-a-receipt/>",
                              headers=headers)
        assert bad.status_code == 400 and bad.mimetype == "application/problem+json"
    finally:
        node.close()
        box.stop()
