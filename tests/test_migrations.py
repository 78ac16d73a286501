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
def test_postgresql_compresses_stored_envelopes_with_lz4(database_url):
    """Migration 0005: LZ4 for messages.envelope_xml (PostgreSQL 14+ built with it, as the
    test cluster is), pglz again after stepping down."""
    query = ("SELECT attcompression FROM pg_attribute "
             "WHERE attrelid = 'messages'::regclass AND attname = 'envelope_xml'")
    migrate.upgrade(database_url)
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == "l"
        command.downgrade(migrate.alembic_config(database_url), "0004")
        with engine.connect() as conn:
            assert conn.exec_driver_sql(query).scalar() == ""  # the server's default (pglz)
    finally:
        engine.dispose()
