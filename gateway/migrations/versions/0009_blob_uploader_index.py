"""An index of uploads by key and time, for ``[api] upload_quota_bytes_per_day``: each upload
adds up what its key stored in the last 24 hours, which must not read every blob row.

Revision ID: 0009
Revises: 0008
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_blobs_uploader_time", "blobs", ["uploaded_by", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_blobs_uploader_time", table_name="blobs")
