"""Leaner indexes on the accept path: drop indexes no query uses (deliveries.message_id is
covered by the unique (message_id, unit) index); list a caller's messages by
(api_key_id, accepted_at).

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as b:
        b.drop_index("ix_deliveries_message_id")
        b.drop_index("ix_deliveries_status")
    with op.batch_alter_table("messages") as b:
        b.drop_index("ix_messages_api_key_id")
        b.drop_index("ix_messages_sender_unit")
        b.drop_index("ix_messages_subsystem")
        b.create_index("ix_messages_key_accepted", ["api_key_id", "accepted_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("messages") as b:
        b.drop_index("ix_messages_key_accepted")
        b.create_index("ix_messages_subsystem", ["subsystem"], unique=False)
        b.create_index("ix_messages_sender_unit", ["sender_unit"], unique=False)
        b.create_index("ix_messages_api_key_id", ["api_key_id"], unique=False)
    with op.batch_alter_table("deliveries") as b:
        b.create_index("ix_deliveries_status", ["status"], unique=False)
        b.create_index("ix_deliveries_message_id", ["message_id"], unique=False)
