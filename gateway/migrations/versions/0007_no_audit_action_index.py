"""Drop the audit log's index on ``action``: nothing in the gateway looks entries up by
action (``gateway audit verify`` and every reader walk the chain by ``seq``), while every
accept, delivery attempt, receipt and administrative change appended an entry to it.
Measured on SQLite with the accept benchmark's documents (1000 accepts in process, one per
transaction, checkpoints included): 112.6-113.1 KB written and 48.3-48.5 write calls per
accept with the index, 107.8-108.2 KB and 46.0-46.1 without (about 4% less). On PostgreSQL
it is one index insert and one WAL record fewer per entry. An auditor who often queries a
large log by action in SQL can add an index of their own (``CREATE INDEX ON audit_log
(action)``); the gateway does not need it.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_log") as b:
        b.drop_index("ix_audit_log_action")


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as b:
        b.create_index("ix_audit_log_action", ["action"], unique=False)
