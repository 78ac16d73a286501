"""Index the copies (deliveries) by their delivery time, for ``gateway report sign-for``: it
reads the copies delivered in its period (a month), and without this index it read every copy
the node ever stored (some 600,000 a year at a prefecture node) for each report.

Only delivered copies are in it (partial: ``delivered_at IS NOT NULL``): an accept writes no
entry, and the worker's recording of a delivery writes one. A later status change (签收, 退回)
leaves ``delivered_at`` as it is, so on PostgreSQL its update may still be HOT (no column of
an index changes); only the update that records the delivery no longer can be.

Revision ID: 0014
Revises: 0013
"""
import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_WHERE = sa.text("delivered_at IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_deliveries_delivered_at", "deliveries", ["delivered_at"], unique=False,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_deliveries_delivered_at", table_name="deliveries")
