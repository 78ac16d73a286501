"""PostgreSQL: compress messages.summary with LZ4 too, as 0005 does for the envelope.

Every accepted message's row is larger than PostgreSQL's 2 KB TOAST threshold (the envelope
alone is), so after the envelope the summary (the JSON of 发文字号, 标题 and 文种, with each
Chinese character written as a six-byte \\u escape) is compressed as well, with pglz unless
the column says otherwise. Measured on PostgreSQL 15 with the accept benchmark's rows (a
22 KB envelope and a 2.7 KB summary, 3 × 3000 rows inserted by one statement each): 47-52 µs
of server time per row with only the envelope on LZ4, 28-36 µs with both; the table's size
did not change.
Same conditions as 0005: PostgreSQL 14 or newer built with LZ4, otherwise the column keeps
pglz and this says so; rows already stored keep their compression; SQLite: nothing to do.

Revision ID: 0006
Revises: 0005
"""

from gateway.migrations.lz4 import use_default, use_lz4

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    use_lz4("messages", "summary", "message summaries")


def downgrade() -> None:
    use_default("messages", "summary")
