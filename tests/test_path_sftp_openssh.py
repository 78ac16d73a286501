"""Documents end to end through the SFTP drop on a real OpenSSH server: accepted by the API,
delivered by the worker as GW_ files, signed for by the legacy clerk, receipts collected back;
duty reports (ZB_ files) ingested into the same path."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from sqlalchemy import select

from adapters.simulators.sftp_server import LegacySftpClerk
from gateway import migrate
from gateway.inbound import collect
from gateway.models import Message
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, PREFECTURE, Api, node_config
from tests.plugins.sshd import give_to


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


def test_a_file_the_server_will_not_move_holds_no_other_back_and_is_ingested_once(
        tmp_path, database_url, unprivileged_openssh_server):
    """The move to archive/ of one unit is refused: the round goes on with the other unit's
    file; the refused one stays in the outbox, is read again by later polls and never
    ingested twice, and is moved once the folder is fixed."""
    server = unprivileged_openssh_server
    sub = f"drop-{uuid.uuid4().hex[:8]}"
    cfg = node_config(tmp_path, database_url,
                      adapters={"countydrop": server.adapter_config(sub, units=[CITY_B, COUNTY_A],
                                                                    duty_report_to=PREFECTURE)},
                      routes=[{"units": [CITY_B, COUNTY_A], "adapter": "countydrop"},
                              {"units": [PREFECTURE], "adapter": "rec"}])
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    local = server.data_root / sub
    data = (Path(__file__).parent / "data" / "ZB_1152230107CTPD8U2P_20261126145210.xml").read_bytes()
    names = {}
    for unit in (CITY_B, COUNTY_A):
        (local / unit / "outbox").mkdir(parents=True)
        (local / unit / "archive").mkdir()
        names[unit] = name = f"ZB_{unit}_20261126145210.xml"
        (local / unit / "outbox" / name).write_bytes(data.replace(COUNTY_A.encode(), unit.encode()))
        (local / unit / "outbox" / f"{name}.ok").write_bytes(b"")
    give_to(server, local)
    (local / CITY_B / "archive").chmod(0o555)  # polled first: units rotate from the first
    try:
        assert collect(node, "countydrop") == {"accepted": 2}
        assert sorted(os.listdir(local / COUNTY_A / "archive")) == [names[COUNTY_A], names[COUNTY_A] + ".ok"]
        assert sorted(os.listdir(local / CITY_B / "outbox")) == [names[CITY_B], names[CITY_B] + ".ok"]

        assert collect(node, "countydrop") == {"duplicate": 1}  # read again, still refused its move
        (local / CITY_B / "archive").chmod(0o755)
        assert collect(node, "countydrop") == {"duplicate": 1}
        assert collect(node, "countydrop") == {}
        assert sorted(os.listdir(local / CITY_B / "archive")) == [names[CITY_B], names[CITY_B] + ".ok"]
        with node.db.sessions() as s:
            senders = sorted(s.scalars(select(Message.sender_unit).where(Message.subsystem == "duty")))
        assert senders == sorted([CITY_B, COUNTY_A])
    finally:
        node.close()
        (local / CITY_B / "archive").chmod(0o755)
        shutil.rmtree(local, ignore_errors=True)
