"""Column compression for the migrations that set it (0005, 0006): LZ4 where the PostgreSQL
server has it (14 or newer, built with LZ4, as Debian's and most distributions' packages
are); elsewhere the column keeps pglz and the migration says so in its log. Rows already
stored keep their compression. SQLite: nothing to do."""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

log = logging.getLogger("alembic.runtime.migration")


def _version(bind: sa.Connection) -> int:
    return int(bind.exec_driver_sql("SHOW server_version_num").scalar_one())


def use_lz4(table: str, column: str, what: str) -> None:
    """``ALTER TABLE table ALTER COLUMN column SET COMPRESSION lz4`` if the server can;
    ``what`` names the column's contents in the log (e.g. "stored envelopes")."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if _version(bind) < 140000:
        log.warning("PostgreSQL before 14: %s stay compressed with pglz", what)
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")
    except sa.exc.DBAPIError as exc:  # a server built without LZ4
        log.warning("LZ4 is not available on this PostgreSQL (%s); %s stay compressed with pglz",
                    str(exc.orig).strip().splitlines()[0], what)


def use_default(table: str, column: str) -> None:
    """Undo :func:`use_lz4`: the server's default compression again."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and _version(bind) >= 140000:
        bind.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION default")
