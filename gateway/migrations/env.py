"""Alembic environment: the URL comes from the caller (``gateway db upgrade``), never a file."""
from alembic import context
from sqlalchemy import create_engine

from gateway.models import Base

config = context.config
url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
connection = config.attributes.get("connection")


def _run(conn) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    _run(connection)
else:
    engine = create_engine(str(url))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
