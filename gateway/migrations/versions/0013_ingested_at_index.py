"""Index the keys of taken items by ``at``: the ``prune`` job forgets the keys not seen for
``[worker] keep_ingested_days`` (legacy items) and ``keep_peer_items_days`` (the items batch and
ferry peers sent), a slice of 5,000 at a time. Without the index each slice read the table
from its start until it had found 5,000 old keys, and the last slice of every run (and every
slice of a run with nothing to forget) read all of it: millions of rows after a few years.

Revision ID: 0013
Revises: 0012
"""
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_ingested_at", "ingested", ["at"])


def downgrade() -> None:
    op.drop_index("ix_ingested_at", table_name="ingested")
