"""A daily upload quota of each API key's own (``gateway keys create --upload-quota``,
``gateway keys quota``); NULL: the node's ``[api] upload_quota_bytes_per_day``.

Revision ID: 0010
Revises: 0009
"""
import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as t:
        t.add_column(sa.Column("upload_quota_bytes_per_day", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as t:
        t.drop_column("upload_quota_bytes_per_day")
