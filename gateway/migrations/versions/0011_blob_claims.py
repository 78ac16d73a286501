"""Content a stored message names (``blob_claims``): the ``blobs`` job (gateway.retention)
removes only content that is not claimed and unused for ``[api] unclaimed_upload_days``.

The job reads only the messages stored since its last scan (its cursor in ``adapter_state``,
``blobs`` / ``claims-scanned-to``). Both ways the cursor goes with the table: a database
stepped below this revision and up again (a rollback, then the upgrade once more) starts with
an empty ``blob_claims``, and a cursor left from before would have the job claim only the
newest messages and remove the content of every older one.

Revision ID: 0011
Revises: 0010
"""
import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_FORGET_CURSOR = "DELETE FROM adapter_state WHERE adapter = 'blobs' AND key = 'claims-scanned-to'"


def upgrade() -> None:
    op.create_table("blob_claims",
                    sa.Column("sha256", sa.String(64), primary_key=True),
                    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False))
    op.execute(_FORGET_CURSOR)  # the first run reads every stored message


def downgrade() -> None:
    op.drop_table("blob_claims")
    op.execute(_FORGET_CURSOR)
