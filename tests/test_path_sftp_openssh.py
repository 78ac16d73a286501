"""Documents end to end through the SFTP drop on a real OpenSSH server: accepted by the API,
delivered by the worker as GW_ files, signed for by the legacy clerk, receipts collected back;
duty reports (ZB_ files) ingested into the same path."""
from __future__ import annotations

import shutil
import time
import uuid

from sqlalchemy import select

from adapters.simulators.sftp_server import LegacySftpClerk
from gateway import migrate
from gateway.inbound import collect
from gateway.models import Message
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, PREFECTURE, Api, node_config


def _node(tmp_path, database_url, endpoint, sub):  # type: ignore[no-untyped-def]
    cfg = node_config(tmp_path, database_url,
                      adapters={"countydrop": endpoint.adapter_config(sub, units=[CITY_B],
                                                                      duty_report_to=PREFECTURE)},
                      routes=[{"units": [CITY_B], "adapter": "countydrop"},
                              {"units": [PREFECTURE], "adapter": "rec"}])
    migrate.upgrade(cfg.database_url())
    return Node(cfg)


def test_document_signed_for_at_the_sftp_drop(tmp_path, database_url, openssh_server):
    sub = f"drop-{uuid.uuid4().hex[:8]}"
    node = _node(tmp_path, database_url, openssh_server, sub)
    clerk = LegacySftpClerk(openssh_server.data_root / sub, units=[CITY_B])
    clerk.clerk(CITY_B)  # the legacy system owns its folders; the gateway never creates them
    try:
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document(recipients=(CITY_B,))).get_json()["id"]
        Worker(node).drain()
        taken = clerk.take_inbox()
        assert len(taken) == 1, api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]["last_error"]
        clerk.sign(taken[0].ref, CITY_B, signer="周某")
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            collect(node, "countydrop")
            got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
            status = got["status"]
            if status == "signed":
                break
            time.sleep(0.2)
        assert status == "signed" and got["signer"] == "周某"
        assert collect(node, "countydrop") == {}  # the receipt moved to archive/, never read twice
        assert list((openssh_server.data_root / sub / CITY_B / "archive").glob("HZ_*.xml"))
    finally:
        node.close()
        shutil.rmtree(openssh_server.data_root / sub, ignore_errors=True)


def test_duty_report_from_the_drop_enters_the_path_once(tmp_path, database_url, openssh_server):
    sub = f"drop-{uuid.uuid4().hex[:8]}"
    node = _node(tmp_path, database_url, openssh_server, sub)
    outbox = openssh_server.data_root / sub / CITY_B / "outbox"
    outbox.mkdir(parents=True)
    from pathlib import Path

    data = (Path(__file__).parent / "data" / "ZB_1152230107CTPD8U2P_20261126145210.xml").read_bytes()
    data = data.replace(b"1152230107CTPD8U2P", CITY_B.encode())
    name = f"ZB_{CITY_B}_20261126145210.xml"
    (outbox / name).write_bytes(data)
    (outbox / f"{name}.ok").write_bytes(b"")
    try:
        assert collect(node, "countydrop") == {"accepted": 1}
        assert collect(node, "countydrop") == {}
        with node.db.sessions() as s:
            m = s.scalars(select(Message).where(Message.subsystem == "duty")).one()
            assert m.sender_unit == CITY_B and m.source == "adapter:countydrop"
            assert "今日无突发事件".encode() in m.envelope_xml
        assert (openssh_server.data_root / sub / CITY_B / "archive" / name).exists()
    finally:
        node.close()
        shutil.rmtree(openssh_server.data_root / sub, ignore_errors=True)
