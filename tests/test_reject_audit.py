"""Refused node-to-node requests are audited one by one up to a bound per address and minute;
a flood past it is counted and audited once (gateway.federation.state.RejectAudit)."""
from __future__ import annotations

from typing import Any

from gateway.federation.state import RejectAudit


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle() -> tuple[RejectAudit, _Clock, list[tuple[str, dict[str, Any]]], list[tuple[float, Any]]]:
    clock, written, timers = _Clock(), [], []
    ra = RejectAudit(lambda addr, detail: written.append((addr, detail)), clock=clock,
                     timer=lambda delay, fn: timers.append((delay, fn)))
    return ra, clock, written, timers


def test_a_flood_from_one_address_is_audited_up_to_the_bound_then_counted_once():
    ra, clock, written, timers = _throttle()
    admitted = [ra.admit("10.0.0.9", "bad-signature") for _ in range(RejectAudit.PER_MINUTE)]
    assert admitted == [True] * RejectAudit.PER_MINUTE
    clock.now += 10
    assert [ra.admit("10.0.0.9", k) for k in ("bad-signature", "unknown-key", "bad-signature")] == [False] * 3
    assert ra.admit("10.0.0.7", "stale-request") is True  # another address has its own bound
    assert written == [] and len(timers) == 1  # one summary, due when the minute is over
    delay, fire = timers[0]
    assert delay == RejectAudit.WINDOW - 10
    clock.now += delay
    fire()
    assert written == [("10.0.0.9", {"count": 3, "kinds": {"bad-signature": 2, "unknown-key": 1},
                                     "window_seconds": RejectAudit.WINDOW, "remote_addr": "10.0.0.9"})]
    assert ra.admit("10.0.0.9", "bad-signature") is True  # a new minute


def test_the_count_is_written_by_the_next_refusal_if_the_timer_has_not_run():
    ra, clock, written, timers = _throttle()
    for _ in range(RejectAudit.PER_MINUTE + 2):
        ra.admit("10.0.0.9", "bad-signature")
    window = ra._windows["10.0.0.9"]
    window.flushing = False  # as if no timer had been started
    clock.now += RejectAudit.WINDOW + 1
    assert ra.admit("10.0.0.9", "bad-signature") is True
    assert [d["count"] for _, d in written] == [2]


def test_many_addresses_share_one_bound_past_the_tracked_number(monkeypatch):
    monkeypatch.setattr(RejectAudit, "MAX_ADDRESSES", 3)
    ra, _clock, _written, _timers = _throttle()
    for i in range(3):
        assert ra.admit(f"10.0.1.{i}", "bad-signature")
    results = [ra.admit(f"10.0.2.{i}", "bad-signature") for i in range(RejectAudit.PER_MINUTE + 5)]
    assert results.count(True) == RejectAudit.PER_MINUTE  # all of them under "*"
    assert set(ra._windows) == {"10.0.1.0", "10.0.1.1", "10.0.1.2", "*"}


def test_unsigned_requests_flooding_a_node_leave_a_bounded_audit_trail(tmp_path, monkeypatch):
    import json
    import time

    from sqlalchemy import select

    from gateway import audit, migrate
    from gateway.app import create_app
    from gateway.models import AuditEntry
    from gateway.node import Node
    from tests.plugins.gatewaynode import node_config

    monkeypatch.setattr(RejectAudit, "WINDOW", 1.0)
    cfg = node_config(tmp_path, f"sqlite:///{tmp_path}/gw.db")
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        client = create_app(node=node).test_client()
        answers = [client.get("/federation/v1/ping").status_code for _ in range(RejectAudit.PER_MINUTE + 7)]
        assert answers == [401] * (RejectAudit.PER_MINUTE + 7)  # every one is refused all the same

        def entries() -> list[tuple[str, dict]]:
            with node.db.sessions() as s:
                return [(e.outcome, json.loads(e.detail) if isinstance(e.detail, str) else e.detail) for e in s.scalars(
                    select(AuditEntry).where(AuditEntry.action == "federation.reject").order_by(AuditEntry.seq))]

        assert [o for o, _ in entries()] == ["bad-signature"] * RejectAudit.PER_MINUTE
        deadline = time.monotonic() + 10
        while len(entries()) == RejectAudit.PER_MINUTE and time.monotonic() < deadline:
            time.sleep(0.1)
        outcome, detail = entries()[-1]
        assert outcome == "suppressed" and detail["count"] == 7 and detail["kinds"] == {"bad-signature": 7}
        with node.db.sessions() as s:
            assert audit.verify(s).ok
    finally:
        node.close()
