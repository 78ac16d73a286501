"""Content a stored message names (``blob_claims``): the ``blobs`` job (gateway.retention)
removes only content that is not claimed and unused for ``[api] unclaimed_upload_days``.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("blob_claims",
                    sa.Column("sha256", sa.String(64), primary_key=True),
                    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False))


def downgrade() -> None:
    op.drop_table("blob_claims")
