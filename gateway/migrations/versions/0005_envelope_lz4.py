"""PostgreSQL: compress stored envelopes with LZ4 instead of the default pglz.

An envelope (20 KB for a document with 40 attachments) is TOASTed on every accept.
Measured on PostgreSQL 15 with the accept benchmark's envelope (22 KB): pglz cost the
server 220 µs of CPU per row, LZ4 92 µs, and LZ4's rows were slightly smaller (4.3 KB
against 4.5 KB). LZ4 needs PostgreSQL 14 or newer built with it (Debian's and most
distributions' packages are); elsewhere the column keeps pglz and this says so. Rows
already stored keep their compression. SQLite: nothing to do.

Revision ID: 0005
Revises: 0004
"""
import logging

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def _version(bind: sa.Connection) -> int:
    return int(bind.exec_driver_sql("SHOW server_version_num").scalar_one())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if _version(bind) < 140000:
        log.warning("PostgreSQL before 14: stored envelopes stay compressed with pglz")
        return
    try:
        with bind.begin_nested():
            bind.exec_driver_sql("ALTER TABLE messages ALTER COLUMN envelope_xml SET COMPRESSION lz4")
    except sa.exc.DBAPIError as exc:  # a server built without LZ4
        log.warning("LZ4 is not available on this PostgreSQL (%s); stored envelopes stay compressed with pglz",
                    str(exc.orig).strip().splitlines()[0])


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql" and _version(bind) >= 140000:
        bind.exec_driver_sql("ALTER TABLE messages ALTER COLUMN envelope_xml SET COMPRESSION default")
