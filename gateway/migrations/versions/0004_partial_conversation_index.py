"""Index only the outbox rows that belong to a conversation (初报, 续报 …): the in-order
check looks rows up by conversation, and every other row (every ``deliver`` row) cost an
index entry and, on SQLite, a page written to the WAL with each accept.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_WHERE = sa.text("conversation IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_outbox_conversation", table_name="outbox")
    op.create_index("ix_outbox_conversation", "outbox", ["conversation", "target", "id"], unique=False,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_outbox_conversation", table_name="outbox")
    op.create_index("ix_outbox_conversation", "outbox", ["conversation", "target", "id"], unique=False)
