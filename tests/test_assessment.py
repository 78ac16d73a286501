"""Timeliness of sign-for per receiving unit (systems.documents.assessment, ``gateway report
sign-for``), on SQLite and PostgreSQL, with delivery and sign-for times set as receipts leave them."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update

from gateway.models import Delivery
from systems.documents.assessment import sign_for, table
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, Api
from tests.test_cli import _config, gateway

T0 = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)  # 09:00 China time


def _copy(node, api: Api, unit: str, status: str, delivered: datetime | None, signed: datetime | None = None) -> None:  # type: ignore[no-untyped-def]
    mid = api.post("/api/v1/documents", json=api.document(recipients=(unit,))).get_json()["id"]
    with node.db.begin() as s:
        s.execute(update(Delivery).where(Delivery.message_id == mid)
                  .values(status=status, delivered_at=delivered, signed_at=signed))


def test_each_unit_gets_its_counts_and_hours_to_sign_for(gw_node):
    api = Api(gw_node)
    for hours in (1, 2, 3, 30):  # county A signs four, one of them late
        _copy(gw_node, api, COUNTY_A, "signed", T0, T0 + timedelta(hours=hours))
    _copy(gw_node, api, COUNTY_A, "returned", T0, T0 + timedelta(hours=5))
    _copy(gw_node, api, CITY_B, "delivered", T0)  # city B has not signed yet
    _copy(gw_node, api, CITY_B, "signed", T0 - timedelta(days=40), T0)  # delivered before the period
    _copy(gw_node, api, CITY_B, "queued", None)  # not delivered: not counted
    now = T0 + timedelta(hours=50)
    a, b = sign_for(gw_node.db, T0 - timedelta(days=1), T0 + timedelta(days=1), 24, now)
    assert (a.unit, a.delivered, a.signed, a.signed_within, a.returned, a.waiting) == (COUNTY_A, 5, 4, 3, 1, 0)
    assert (a.median_hours, a.p90_hours, a.longest_waiting_hours) == (2.0, 30.0, None)
    assert (b.unit, b.delivered, b.signed, b.waiting, b.median_hours) == (CITY_B, 1, 0, 1, None)
    assert b.longest_waiting_hours == 50.0
    cells = table([a, b])
    assert cells[0][0] == "单位 unit" and cells[1][:7] == [COUNTY_A, "-", "5", "4", "3", "1", "0"]
    assert cells[2][7] == "-"  # no median without a signed copy


def test_the_cli_reports_a_period_in_china_time_and_refuses_a_backward_one(tmp_path):
    conf = _config(tmp_path)
    assert gateway("-c", str(conf), "db", "upgrade", cwd=tmp_path).returncode == 0
    r = gateway("-c", str(conf), "report", "sign-for", "--from", "2026-11-01", "--to", "2026-11-30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2026-11-01 – 2026-11-30 (China time)" in r.stdout and "(no copy was delivered in this period)" in r.stdout
    r = gateway("-c", str(conf), "report", "sign-for", "--json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == ""
    r = gateway("-c", str(conf), "report", "sign-for", "--from", "2026-11-30", "--to", "2026-11-01", cwd=tmp_path)
    assert r.returncode == 2 and "is before --from" in r.stderr
    r = gateway("-c", str(conf), "report", "sign-for", "--from", "2026/11/01", cwd=tmp_path)
    assert r.returncode == 2 and "--from" in r.stderr and "Traceback" not in r.stderr
    r = gateway("-c", str(conf), "report", "sign-for", "--within", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--within" in r.stderr
    for option, day in (("--to", "9999-12-31"), ("--from", "0001-01-01")):  # no day after, no UTC time
        r = gateway("-c", str(conf), "report", "sign-for", option, day, cwd=tmp_path)
        assert r.returncode == 2 and f"{option}: {day}: expected a day of the years 1949-2099" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
