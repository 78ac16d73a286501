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

from gateway.migrations.lz4 import use_default, use_lz4

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    use_lz4("messages", "envelope_xml", "stored envelopes")


def downgrade() -> None:
    use_default("messages", "envelope_xml")
