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
    send, empty, _ = batch.split(None, jobs)  # type: ignore[arg-type]
    assert [item["seq"] for _, item in send] == [409, 410, 411, 412]
    assert [j.id for j, _ in send] == [409, 410, 411, 412] and [j.id for j in empty] == [7]


def test_claims_are_bounded_by_the_pace_of_delivery():
    """The worker tops its local queue up to 8 x threads rows, but never to more than it
    delivers in a quarter of the lease: with a peer that takes 30 s a call, 64 rows waiting
    behind 8 threads would outlive a 120 s lease and be taken back and tried twice."""
    from gateway.worker import _batch_size

    assert _batch_size(8, None, 120) == 64  # pace not known yet
    assert _batch_size(8, 450.0, 120) == 64  # a fast peer: the cap
    assert _batch_size(8, 8 / 30, 120) == 8  # 30 s a call: one row a thread
    assert _batch_size(8, 1.0, 120) == 30  # 30 rows = 30 s of work = a quarter of the lease
    assert _batch_size(8, 0.0, 120) == 8  # idle: small claims until the pace is known again
