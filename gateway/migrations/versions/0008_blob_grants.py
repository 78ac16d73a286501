"""``blob_grants``: which API key may reference which uploaded content. The blob store is
content-addressed and shared, so a SHA-256 alone was a bearer token: a key that learned the
hash of a 机密 body could send that body in a 非密 document to a unit of its choosing. Now a
document may name only content its own key uploaded (an upload of content already stored
records the grant and stores nothing new). Existing blobs are granted to the key that first
uploaded them; content another key had uploaded too must be uploaded again by that key.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_grants",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "api_key_id"),
    )
    op.execute("INSERT INTO blob_grants (sha256, api_key_id, created_at) "
               "SELECT sha256, uploaded_by, created_at FROM blobs WHERE uploaded_by IS NOT NULL")


def downgrade() -> None:
    op.drop_table("blob_grants")
