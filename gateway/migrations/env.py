"""Alembic environment: the URL comes from the caller (``gateway db upgrade``), never a file."""
from alembic import context
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from gateway.models import Base

config = context.config
url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
connection = config.attributes.get("connection")


def _engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        # Python's sqlite3 opens a transaction only before INSERT, UPDATE or DELETE, so each
        # CREATE, ALTER and DROP of a migration would commit on its own: an upgrade cut short
        # (an error, a full disk, a killed process) would leave some of a migration's tables
        # and columns behind under the old revision, and every later `db upgrade` would fail
        # on them ("duplicate column name"). BEGIN is ours, so an upgrade commits whole or not
        # at all, as on PostgreSQL.
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the writer's lock for the whole run

    return engine


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    # one transaction for the whole run on both databases (see _engine for SQLite)
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    engine = _engine(str(url))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
