"""gateway.pgbatch writes its parameters itself (text, or binary for bytes and timestamps):
on a real PostgreSQL they must arrive as exactly the values psycopg would have sent."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from sqlalchemy.engine import make_url

from gateway import pgbatch

pytestmark = pytest.mark.postgres


def test_parameters_arrive_as_the_values_given(postgres_url: str) -> None:
    china = timezone(timedelta(hours=8))
    stamps = [
        datetime(2026, 11, 28, 2, 30, 1, 123456, tzinfo=UTC),
        datetime(2026, 11, 28, 10, 30, 1, 123456, tzinfo=china),  # the same instant, written in +08:00
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before PostgreSQL's epoch
        datetime(2000, 1, 1, tzinfo=UTC),
        datetime(1949, 10, 1, 15, 0, tzinfo=china),
        datetime(2099, 12, 31, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
    ]
    values = [(at, f"标签{i}", i, b"\x00\xff" * i, i % 2 == 0) for i, at in enumerate(stamps)]
    url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE stamps (at timestamptz, label text, n bigint, data bytea, flag boolean)")
        pgbatch.send_transaction(conn.pgconn, [
            ("INSERT INTO stamps (at, label, n, data, flag) VALUES (%s, %s, %s, %s, %s)", v) for v in values],
            pgbatch.Prepared())
        got = conn.execute("SELECT at, label, n, data, flag FROM stamps ORDER BY n").fetchall()
    assert [(at, label, n, bytes(data), flag) for at, label, n, data, flag in got] == values
    with pytest.raises(TypeError, match="naive"):
        pgbatch._dump(datetime(2026, 1, 1), "utf-8")  # noqa: DTZ001 - the point of the test
