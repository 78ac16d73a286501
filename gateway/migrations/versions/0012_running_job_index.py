"""Index the job runs still marked running: every run of a job first looks for its runs left
``running`` by a process that died, and without this index it read every run the job ever
had (a receipts poll every five minutes is 105,000 rows a year), on every run.

Revision ID: 0012
Revises: 0011
"""
import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_WHERE = sa.text("outcome = 'running'")


def upgrade() -> None:
    # one read of job_runs (a small table: a year is ~110,000 short rows) builds it; the index
    # holds only the few runs under way
    op.create_index("ix_job_runs_running", "job_runs", ["job"], unique=False,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index("ix_job_runs_running", table_name="job_runs")
