"""Times and time zones end to end: legacy times written without an offset are local times of
the legacy system's zone (``[adapters.NAME] timezone``, else ``[node] timezone``, China by
default), whatever the server's TZ; a time that is none is refused, never replaced by the
clock; report days are the node zone's days. On SQLite and PostgreSQL, SOAP over real HTTP."""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text

from adapters import archive
from adapters.base import legacy_time, remote_ref
from adapters.simulators.soap_service import SoapServiceServer
from gateway import config as config_mod
from gateway import inbound, migrate
from gateway.cli import main
from gateway.config import ConfigError
from gateway.models import AuditEntry, ReceiptRecord
from gateway.node import Node
from gateway.worker import Worker
from tests.plugins.gatewaynode import CITY_B, COUNTY_A, Api, node_config
from tests.plugins.soap import DOCEXCHANGE_WSDL
from tests.test_assessment import _copy

CHINA = ZoneInfo("Asia/Shanghai")


# -- reading a legacy time -------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-27T00:30:00+08:00", "2026-11-26T16:30:00+00:00"),
    ("2026-11-27 00:30:00", "2026-11-26T16:30:00+00:00"),  # local time: still 26 Nov in UTC
    ("20261127003000", "2026-11-26T16:30:00+00:00"),  # as in ZB_<unit>_<yyyymmddHHMMSS>.xml
    ("2026/11/27 00:30:00", "2026-11-26T16:30:00+00:00"),
    ("2026-11-30T23:59:59Z", "2026-11-30T23:59:59+00:00"),
])
def test_a_legacy_time_without_an_offset_is_local_time_of_the_legacy_zone(text: str, expected: str) -> None:
    assert legacy_time(text, CHINA).astimezone(UTC).isoformat() == expected


@pytest.mark.parametrize(("text", "said"), [
    ("2026-11-27", "is not a date and time"),  # a date says no time: midnight would be a guess
    ("20261127", "is not a date and time"),
    ("昨天下午", "is not a date and time"),
    ("2026-11-31 10:00:00", "is not a date and time"),
    ("２０２６-11-27T00:30:00", "is not a date and time"),  # full-width digits
])
def test_a_legacy_time_that_is_none_is_refused_saying_what_was_expected(text: str, said: str) -> None:
    with pytest.raises(ValueError) as err:
        legacy_time(text, CHINA)
    assert said in str(err.value)


def _receipt(stamp: str) -> bytes:
    xml = archive.write_receipt(archive.Receipt(unit=COUNTY_A, action="SIGNED", remote_ref="abc", signer="李某",
                                                receipt_no="JXF-1", time=datetime(2026, 1, 1, tzinfo=UTC)))
    return xml.replace(b"2026-01-01T00:00:00+00:00", stamp.encode())


def test_an_archive_receipt_reads_its_time_in_the_zone_it_is_given_and_refuses_a_bare_date() -> None:
    assert archive.parse_receipt(_receipt("2026-11-27T00:30:00")).time == datetime(2026, 11, 26, 16, 30, tzinfo=UTC)
    assert archive.parse_receipt(_receipt("2026-11-27T00:30:00"), ZoneInfo("UTC")).time == datetime(
        2026, 11, 27, 0, 30, tzinfo=UTC)
    with pytest.raises(archive.ArchiveFormatError) as err:
        archive.parse_receipt(_receipt("2026-11-27"))
    assert "receipt/time" in str(err.value) and "is not a date and time" in str(err.value)


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Beijing", "CST", "+08:00", "../../etc/passwd", ""])
def test_a_node_time_zone_that_is_none_is_refused_naming_the_file_and_the_key(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_mod.from_mapping({"node": {"timezone": name}}, source="node.toml", base_dir=str(tmp_path))
    assert str(err.value).startswith(f"node.toml: node.timezone: {name!r} is not a time zone; expected an IANA")


def test_an_adapter_time_zone_that_is_none_stops_the_start_naming_the_file_and_the_key(tmp_path: Path) -> None:
    cfg = config_mod.from_mapping({"node": {"data_dir": str(tmp_path / "var"), "timezone": "UTC"}, "adapters": {
        "docexchange": {"type": "soap", "wsdl": DOCEXCHANGE_WSDL, "timezone": "Asia/Beijing"}}},
        source="node.toml", base_dir=str(tmp_path))
    node = Node(cfg)
    try:
        with pytest.raises(ConfigError) as err:
            node.check_adapters()
    finally:
        node.close()
    assert str(err.value).startswith("node.toml: adapters.docexchange.timezone: 'Asia/Beijing' is not a time zone")


# -- SOAP receipts, end to end -----------------------------------------------------------------
@pytest.fixture
def soap_node(tmp_path: Path, database_url: str, soap_service: SoapServiceServer,
              request: pytest.FixtureRequest) -> Iterator[tuple[Node, SoapServiceServer]]:
    own: dict[str, Any] = getattr(request, "param", {})
    cfg = node_config(tmp_path, database_url, adapters={"docexchange": {
        "type": "soap", "wsdl": DOCEXCHANGE_WSDL, "address": soap_service.url, "timeout": 5, **own}},
        routes=[{"units": [COUNTY_A], "adapter": "docexchange"}])
    migrate.upgrade(cfg.database_url())
    n = Node(cfg)
    yield n, soap_service
    n.close()


def _delivered(node: Node) -> tuple[Api, str]:
    api = Api(node)
    r = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A,)))
    assert r.status_code == 202, r.get_json()
    Worker(node).drain()
    return api, r.get_json()["id"]


@pytest.mark.parametrize(("soap_node", "expected"), [
    ({}, "2026-11-26T16:30:00Z"),  # China time, the default: 00:30 on the 27th is 16:30Z on the 26th
    ({"timezone": "UTC"}, "2026-11-27T00:30:00Z"),  # a legacy system kept in UTC
], indirect=["soap_node"])
def test_a_soap_receipt_time_without_an_offset_is_read_in_the_adapter_zone(
        soap_node: tuple[Node, SoapServiceServer], expected: str) -> None:
    node, service = soap_node
    api, mid = _delivered(node)
    service.state.sign(remote_ref(mid, COUNTY_A), "李某", stamp="2026-11-27 00:30:00")
    assert inbound.collect(node, "docexchange") == {"signed": 1}
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert (got["status"], got["signed_at"], got["receipts"][0]["time"]) == ("signed", expected, expected)


@pytest.mark.parametrize("stamp", ["2026-11-27", "2026年11月27日 00:30", "9999-12-31T23:59:59-14:00"])
def test_a_soap_receipt_whose_time_is_none_is_refused_and_audited_not_dated_now(
        soap_node: tuple[Node, SoapServiceServer], stamp: str) -> None:
    node, service = soap_node
    api, mid = _delivered(node)
    service.state.sign(remote_ref(mid, COUNTY_A), "李某", stamp=stamp)
    assert inbound.collect(node, "docexchange") == {"rejected": 1}
    got = api.get(f"/api/v1/documents/{mid}").get_json()["recipients"][0]
    assert (got["status"], got["signed_at"], got["receipts"]) == ("delivered", None, [])
    with node.db.sessions() as s:
        [entry] = s.scalars(select(AuditEntry).where(AuditEntry.action == "inbound.reject")).all()
        assert s.scalars(select(ReceiptRecord)).all() == []
    reason = json.loads(entry.detail)["reason"]
    assert entry.object == "docexchange:seq:1" and "time" in reason and stamp in reason
    assert inbound.collect(node, "docexchange") == {}  # skipped for good: the cursor moved past it


# -- report days -------------------------------------------------------------------------------
@pytest.mark.parametrize(("timezone", "november", "december"), [(None, 0, 1), ("UTC", 1, 0)])
def test_a_copy_delivered_at_0030_beijing_time_counts_in_the_day_of_the_node_zone(
        gw_node: Node, tmp_path: Path, database_url: str, timezone: str | None, november: int,
        december: int) -> None:
    """Delivered 2026-11-30T16:30Z: 1 December in Beijing (the default zone), 30 November in UTC."""
    delivered = datetime(2026, 11, 30, 16, 30, tzinfo=UTC)
    _copy(gw_node, Api(gw_node), CITY_B, "signed", delivered, delivered + timedelta(hours=2))
    conf = tmp_path / "report.toml"
    conf.write_text(f'[node]\nid = "prefecture"\ndata_dir = "{tmp_path / "var"}"\n'
                    + (f'timezone = "{timezone}"\n' if timezone else "")
                    + f'[database]\nurl = "{database_url}"\n', encoding="utf-8")
    counts = []
    for day in ("2026-11-30", "2026-12-01"):
        r = CliRunner().invoke(main, ["-c", str(conf), "report", "sign-for", "--from", day, "--to", day, "--json"])
        assert r.exit_code == 0, r.output
        counts.append(sum(json.loads(line)["delivered"] for line in r.output.splitlines()))
    assert counts == [november, december]
    r = CliRunner().invoke(main, ["-c", str(conf), "report", "sign-for", "--from", "2026-11-30", "--to", "2026-11-30"])
    assert f"2026-11-30 – 2026-11-30 ({timezone or 'China time'})" in r.output


# -- stored times ------------------------------------------------------------------------------
@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # PostgreSQL only: no skip
def test_times_read_from_postgresql_are_utc_whatever_the_session_time_zone(
        tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL server set up in Beijing or New York time gives timestamptz values in that
    zone; the API still writes UTC (``Z``), as it does on SQLite."""
    assert database_url.startswith("postgresql")
    monkeypatch.setenv("PGTZ", "America/New_York")  # libpq sets the session's TimeZone from it
    cfg = node_config(tmp_path, database_url)
    migrate.upgrade(cfg.database_url())
    node = Node(cfg)
    try:
        with node.db.sessions() as s:
            assert s.scalar(text("SHOW TimeZone")) == "America/New_York"
        api = Api(node)
        mid = api.post("/api/v1/documents", json=api.document(recipients=(COUNTY_A,))).get_json()["id"]
        one = api.get(f"/api/v1/documents/{mid}").get_json()
        [listed] = api.get("/api/v1/documents").get_json()["items"]
        assert one["accepted_at"].endswith("Z") and listed["accepted_at"] == one["accepted_at"]
        with node.db.sessions() as s:
            [at] = s.scalars(select(AuditEntry.at).limit(1)).all()
        assert at.utcoffset() == timedelta(0)
    finally:
        node.close()
