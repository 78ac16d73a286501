"""Forwards of one conversation (初报, 续报一, 续报二 …) leave for a node in accept order: the
worker claims a forward only when no earlier forward of its conversation to that node is
still queued or in flight, whatever their urgencies. Other conversations are not held up."""
from __future__ import annotations

from sqlalchemy import update

from gateway import migrate
from gateway.models import OutboxEntry
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import COUNTY_C, Api, node_config

PEER = {"county-c": {"url": "http://127.0.0.1:9", "public_key": "ed25519:dkYAFJi1i+2JPh9OOx/AVZy1nJq+lItax2NoREl/BhA=",
                      "units": [COUNTY_C]}}


def test_a_follow_up_report_never_overtakes_its_first_report(tmp_path, database_url):
    cfg = node_config(tmp_path, database_url, peers=PEER)
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        api = Api(node)

        def send(title: str, conversation: str, urgency: str) -> str:
            r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_C,), title=title,
                                                                conversation_id=conversation, urgency=urgency))
            assert r.status_code == 202, r.get_json()
            return r.get_json()["id"]

        first = send("事故初报", "incident-1", "平件")
        follow_up = send("事故续报一", "incident-1", "特急")  # more urgent, but must wait for the first
        other = send("另一事件初报", "incident-2", "平件")
        worker = Worker(node, worker_id="order-test")
        claimed = {j.message_id for j in worker.claim(10)}
        assert claimed == {first, other}
        # while the first is in flight the follow-up still waits
        assert worker.claim(10) == []
        with node.db.begin() as s:  # the first one has gone
            s.execute(update(OutboxEntry).where(OutboxEntry.state == "claimed").values(state="done"))
        assert [j.message_id for j in worker.claim(10)] == [follow_up]
    finally:
        node.close()
