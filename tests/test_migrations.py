"""Alembic migrations build exactly the schema the models describe, on both databases, and
step down and up again."""
from __future__ import annotations

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
