"""Federation: replay-protection nonces, the signed directory, scheduled job runs, and the
outbox's conversation column (ordered forwarding).

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op


revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("outbox") as b:
        b.add_column(sa.Column("conversation", sa.String(128), nullable=True))
        b.create_index("ix_outbox_conversation", ["conversation", "target", "id"], unique=False)
    op.create_table(
        "federation_nonces",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_federation_nonces_seen_at", "federation_nonces", ["seen_at"])
    op.create_table(
        "directory",
        sa.Column("version", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("document", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "job_runs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("tick", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("instance", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(12), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("job", "tick"),
    )
    op.create_index("ix_job_runs_job_started", "job_runs", ["job", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_job_runs_job_started", table_name="job_runs")
    op.drop_table("job_runs")
    op.drop_table("directory")
    op.drop_index("ix_federation_nonces_seen_at", table_name="federation_nonces")
    op.drop_table("federation_nonces")
    with op.batch_alter_table("outbox") as b:
        b.drop_index("ix_outbox_conversation")
        b.drop_column("conversation")
