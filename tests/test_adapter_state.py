"""Adapters' durable state (gateway.node.DbStateStore): poll cursors and high-water marks
that several instances of a node share through one database."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy.engine import make_url

from gateway.node import DbStateStore


def test_a_high_water_mark_never_moves_back_and_set_still_overwrites(gw_node):  # type: ignore[no-untyped-def]
    state = DbStateStore(gw_node.db, "docexchange")
    assert state.get("receipts.cursor") is None
    state.advance("receipts.cursor", 7)
    state.advance("receipts.cursor", 5)  # an instance that read an older cursor acks late
    assert state.get("receipts.cursor") == "7"
    state.advance("receipts.cursor", 12)
    assert state.get("receipts.cursor") == "12"
    state.set("receipts.cursor", "3")  # set is a plain write
    assert state.get("receipts.cursor") == "3"
    assert DbStateStore(gw_node.db, "other").get("receipts.cursor") is None  # per adapter


# SQLite runs one writer at a time (BEGIN IMMEDIATE): the insert race is PostgreSQL's
@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_first_value_written_while_another_instance_inserts_it_goes_again_and_keeps_the_higher(gw_node):  # type: ignore[no-untyped-def]
    """Made deterministic: another instance has inserted the key's first row and not committed;
    this one's insert waits for it (pg_stat_activity), then meets the unique violation once it
    commits, goes again and finds that row."""
    libpq = make_url(gw_node.config.database_url()).set(drivername="postgresql").render_as_string(
        hide_password=False)
    errors: list[BaseException] = []

    def advance() -> None:
        try:
            DbStateStore(gw_node.db, "box").advance("mark", 200)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    with psycopg.connect(libpq) as other, psycopg.connect(libpq, autocommit=True) as watch:
        other.execute("INSERT INTO adapter_state (adapter, key, value) VALUES ('box', 'mark', '100')")
        t = threading.Thread(target=advance)
        t.start()
        deadline = time.monotonic() + 30
        while watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock'").fetchone()[0] < 1:  # type: ignore[index]
            assert t.is_alive() and time.monotonic() < deadline, errors
            time.sleep(0.01)
        other.commit()
    t.join(30)
    assert errors == []
    assert DbStateStore(gw_node.db, "box").get("mark") == "200"
