"""Forwards to one node leave in one request in queue order (outbox id = the item's seq): the
receiver applies a batch in turn and refuses one whose seq does not increase (400, which
dead-letters every forward in it). The dispatcher groups ready rows by urgency first and a
claim orders by due time, so a group can hold them in any order; split() restores it."""
from __future__ import annotations

from gateway.federation import batch
from gateway.worker import Job


def test_split_sends_items_in_increasing_seq_whatever_order_the_group_has(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(batch, "item_for", lambda node, job: None if job.id == 7 else {"seq": job.id})
    # a 特急 row first (claimed later, larger id), then 平件 rows in due-time order
    jobs = [Job(412, "forward", "prefecture", 0, None, priority=0), Job(409, "forward", "prefecture", 0, None),
            Job(7, "forward", "prefecture", 0, None), Job(411, "forward", "prefecture", 0, None),
            Job(410, "forward", "prefecture", 0, None)]
    send, empty = batch.split(None, jobs)  # type: ignore[arg-type]
    assert [item["seq"] for _, item in send] == [409, 410, 411, 412]
    assert [j.id for j, _ in send] == [409, 410, 411, 412] and [j.id for j in empty] == [7]
