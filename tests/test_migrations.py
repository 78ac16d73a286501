"""Alembic migrations build exactly the schema the models describe, on both databases, and
step down and up again."""
from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine

from gateway import migrate
from gateway.models import Base


def test_migrations_match_the_models_and_go_down_and_up(database_url):
    migrate.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        command.downgrade(migrate.alembic_config(database_url), "0001")
        assert not migrate.current_is_head(engine)
        migrate.upgrade(database_url)
        assert migrate.current_is_head(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize(("column", "revision"), [("envelope_xml", "0005"), ("summary", "0006")])
def test_postgresql_compresses_message_rows_with_lz4(database_url, column, revision):
    """Migrations 0005 and 0006: LZ4 for messages.envelope_xml and messages.summary
    (PostgreSQL 14+ built with it, as the test cluster is), pglz again after stepping below
    the migration that set it."""
    query = ("SELECT attcompression FROM pg_attribute "
             f"WHERE attrelid = 'messages'::regclass AND attname = '{column}'")
    migrate.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == "l"
        command.downgrade(migrate.alembic_config(database_url), f"{int(revision) - 1:04d}")
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == ""  # the server's default (pglz)
    finally:
        engine.dispose()
