"""The database fixtures themselves: each backend is real, and each test gets its own database."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, make_url, text

_seen: dict[str, str] = {}  # backend -> database URL handed to the "first" round below


def test_database_url_is_a_working_database(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE probe (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
            conn.execute(text("INSERT INTO probe (id, body) VALUES (1, 'hello'), (2, 'world')"))
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, body FROM probe ORDER BY id")).all()
            if engine.dialect.name == "postgresql":
                assert "PostgreSQL" in conn.execute(text("SELECT version()")).scalar_one()
                current = conn.execute(text("SELECT current_database()")).scalar_one()
                assert current == make_url(database_url).database
                assert make_url(database_url).host == "127.0.0.1"
            else:
                assert engine.dialect.name == "sqlite"
        assert [tuple(r) for r in rows] == [(1, "hello"), (2, "world")]
    finally:
        engine.dispose()


@pytest.mark.parametrize("round_", ["first", "second"])
def test_each_test_gets_a_fresh_database(database_url: str, round_: str) -> None:
    backend = make_url(database_url).get_backend_name()
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            # no IF NOT EXISTS: this fails if the database was handed out before
            conn.execute(text("CREATE TABLE marker (round TEXT NOT NULL)"))
            conn.execute(text("INSERT INTO marker (round) VALUES (:r)"), {"r": round_})
        with engine.connect() as conn:
            assert conn.execute(text("SELECT round FROM marker")).scalars().all() == [round_]
    finally:
        engine.dispose()
    if round_ == "first":
        _seen[backend] = database_url
    elif backend in _seen:
        assert database_url != _seen[backend]
